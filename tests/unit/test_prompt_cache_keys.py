"""The prompt-embedding cache keeps no prompt text (issue 21): entries are keyed by a keyed
hash, and a repeated prompt still skips the encoders."""

import torch

from serve_app.model.optimize.prompt_cache import PromptEmbeddingCache


class CountingEncoder:
    def __init__(self) -> None:
        self.encoded: list[str] = []

    def __call__(self, prompts, **kwargs):
        self.encoded.extend(prompts)
        n = len(prompts)
        return torch.ones(n, 3, 4), None, torch.ones(n, 4), None


def test_entries_hold_no_prompt_text_and_repeats_hit():
    encoder = CountingEncoder()
    cache = PromptEmbeddingCache(encoder, max_size=4)
    secret = "confidential prompt 7f3a"
    embeds, _, pooled, _ = cache(secret, do_classifier_free_guidance=False,
                                 num_images_per_prompt=2)
    assert (tuple(embeds.shape), tuple(pooled.shape)) == ((2, 3, 4), (2, 4))
    cache([secret, "other"], do_classifier_free_guidance=False)
    assert encoder.encoded == [secret, "other"]
    assert (cache.hits, cache.misses) == (1, 2)
    assert len(cache.entries) == 2
    assert all(isinstance(key, bytes) and len(key) == 32 for key in cache.entries)
    state = repr(vars(cache)) + repr(list(cache.entries))
    assert secret not in state and secret.encode() not in b"".join(cache.entries)
