"""LRU cache of prompt embeddings in front of the pipeline's encode_prompt (lever
prompt_cache_size): a repeated prompt skips both text encoders."""

from __future__ import annotations

import hashlib
import hmac
import os
from collections import OrderedDict
from typing import Any

import torch


class PromptEmbeddingCache:
    """LRU cache in front of StableDiffusionXLPipeline.encode_prompt, keyed by prompt.

    Only the plain case is cached: string prompts, no prompt_2/negatives/precomputed
    embeddings, no classifier-free guidance (SDXL-Turbo runs guidance_scale 0), no LoRA
    scale or clip_skip. Everything else is passed straight through.

    Keyed by a keyed hash of the prompt (HMAC-SHA256, a random key per process), never the
    prompt itself: no prompt text outlives its call here. The embeddings of the last
    `max_size` prompts do stay in the replica's memory (prompt_cache_size 0 keeps none).
    """

    def __init__(self, encode_prompt: Any, max_size: int) -> None:
        self.encode_prompt = encode_prompt
        self.max_size = max_size
        self.entries: OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._hash_key = os.urandom(32)
        self.hits = 0
        self.misses = 0

    def _cacheable(self, prompt: Any, kwargs: dict[str, Any]) -> bool:
        if isinstance(prompt, str):
            prompt = [prompt]
        if not isinstance(prompt, list | tuple) or not all(isinstance(p, str) for p in prompt):
            return False
        if kwargs.get("do_classifier_free_guidance", True):
            return False
        passthrough = ("prompt_2", "negative_prompt", "negative_prompt_2", "prompt_embeds",
                       "negative_prompt_embeds", "pooled_prompt_embeds",
                       "negative_pooled_prompt_embeds", "lora_scale", "clip_skip")
        return all(kwargs.get(name) is None for name in passthrough)

    def _key(self, text: str) -> bytes:
        return hmac.new(self._hash_key, text.encode(), hashlib.sha256).digest()

    def __call__(self, prompt: Any = None, *args: Any, **kwargs: Any):
        if args or not self._cacheable(prompt, kwargs):
            return self.encode_prompt(prompt, *args, **kwargs)
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [self._key(text) for text in texts]
        by_key = dict(zip(prompts, texts))
        missing = list(dict.fromkeys(p for p in prompts if p not in self.entries))
        if missing:
            call = dict(kwargs, num_images_per_prompt=1)
            embeds, negative, pooled, negative_pooled = self.encode_prompt(
                [by_key[key] for key in missing], **call)
            if negative is not None or negative_pooled is not None:
                return self.encode_prompt(prompt, *args, **kwargs)
            for i, key in enumerate(missing):
                self.entries[key] = (embeds[i:i + 1].clone(), pooled[i:i + 1].clone())
        self.misses += len(missing)
        self.hits += len(prompts) - len(missing)
        found = [self.entries[p] for p in prompts]
        for key in prompts:
            self.entries.move_to_end(key)
        while len(self.entries) > self.max_size:
            self.entries.popitem(last=False)
        repeat = int(kwargs.get("num_images_per_prompt") or 1)
        embeds = torch.cat([e for e, _ in found]).repeat_interleave(repeat, dim=0)
        pooled = torch.cat([p for _, p in found]).repeat_interleave(repeat, dim=0)
        device = kwargs.get("device")
        if device is not None:
            embeds, pooled = embeds.to(device), pooled.to(device)
        return embeds, None, pooled, None
