from __future__ import annotations

import torch

from serve_app.model.optimize import PromptEmbeddingCache


class FakeEncoder:
    def __init__(self):
        self.calls = []

    def __call__(self, prompt=None, prompt_2=None, device=None, num_images_per_prompt=1,
                 do_classifier_free_guidance=True, **kwargs):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        self.calls.append(list(prompts))
        embeds = torch.stack([torch.full((3, 4), float(len(p))) for p in prompts])
        pooled = torch.stack([torch.full((2,), float(len(p)) + 0.5) for p in prompts])
        embeds = embeds.repeat_interleave(num_images_per_prompt, dim=0)
        pooled = pooled.repeat_interleave(num_images_per_prompt, dim=0)
        negative = torch.zeros_like(embeds) if do_classifier_free_guidance else None
        negative_pooled = torch.zeros_like(pooled) if do_classifier_free_guidance else None
        return embeds, negative, pooled, negative_pooled


def plain(prompt, n=1):
    return dict(prompt=prompt, device="cpu", num_images_per_prompt=n,
                do_classifier_free_guidance=False)


def test_hits_skip_the_encoder_and_match_uncached_output():
    encoder = FakeEncoder()
    cache = PromptEmbeddingCache(encoder, max_size=4)
    first = cache(**plain(["a", "bb", "a"], n=2))
    assert encoder.calls == [["a", "bb"]]
    second = cache(**plain(["bb", "a", "a"], n=2))
    assert encoder.calls == [["a", "bb"]]  # all hits
    ref = FakeEncoder()(**plain(["a", "bb", "a"], n=2))
    assert torch.equal(first[0], ref[0]) and torch.equal(first[2], ref[2])
    assert first[1] is None and first[3] is None
    assert torch.equal(second[0], FakeEncoder()(**plain(["bb", "a", "a"], n=2))[0])
    assert (cache.hits, cache.misses) == (4, 2)


def test_lru_eviction():
    encoder = FakeEncoder()
    cache = PromptEmbeddingCache(encoder, max_size=2)
    for prompt in ("a", "bb", "a", "ccc", "bb"):
        cache(**plain(prompt))
    # "bb" was least recently used when "ccc" arrived, so it was encoded again.
    assert encoder.calls == [["a"], ["bb"], ["ccc"], ["bb"]]
    # Keyed by a keyed hash of the prompt (issue 21: no prompt text kept).
    assert list(cache.entries) == [cache._key("ccc"), cache._key("bb")]


def test_guidance_and_extra_inputs_pass_through():
    encoder = FakeEncoder()
    cache = PromptEmbeddingCache(encoder, max_size=4)
    cache(prompt="a", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
    cache(**plain("a"), negative_prompt="b")
    cache(**plain("a"), clip_skip=1)
    assert len(encoder.calls) == 3 and not cache.entries
