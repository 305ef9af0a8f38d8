"""The CLIP BPE tokenizer, built offline from the vocabulary that ships in this package.

`bpe_simple_vocab_16e6.txt.gz` is OpenAI CLIP's merge list (MIT licence), the same one
sdxl-turbo's tokenizers use. transformers 5 ignores vocab/merges file arguments given to
the constructor, so the files are written out and loaded with `from_pretrained(dir)`.
"""

from __future__ import annotations

import gzip
import json
from importlib import resources
from pathlib import Path

MODEL_MAX_LENGTH = 77
VOCAB_SIZE = 49408


def _bytes_to_unicode() -> dict[int, str]:
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _merges() -> list[str]:
    raw = resources.files("serve_app.assets").joinpath("bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.decompress(raw.read_bytes()).decode("utf-8").split("\n")
    return lines[1:49152 - 256 - 2 + 1]


def write_clip_tokenizer(directory: Path, pad_token: str = "<|endoftext|>") -> Path:
    """Write vocab.json, merges.txt and configs of a CLIP tokenizer into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    merges = _merges()
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    if len(vocab) != VOCAB_SIZE:
        raise RuntimeError(f"CLIP vocabulary has {len(vocab)} entries, expected {VOCAB_SIZE}")
    (directory / "vocab.json").write_text(
        json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (directory / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": pad_token}))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": pad_token,
        "do_lower_case": True, "clean_up_tokenization_spaces": True}))
    return directory
