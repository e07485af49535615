"""Stable Diffusion parts the reference model is built from, offline: no network, no real CLIP vocabulary.

- :data:`SD15_SCHEDULER_CONFIG`: the scheduler config shipped with Stable Diffusion v1.5, which the reference
  model (``training/train_reference.py``) and the tiny test pipelines (``fixtures/tiny.py``) use;
- :func:`build_clip_tokenizer` and :func:`write_vocab_files`: a CLIP BPE tokenizer, as an object or as the
  ``vocab.json`` and ``merges.txt`` of a diffusers folder, in which every word of a list is one token
  (:func:`faster_diffusion.reference.build_tokenizer` builds the reference model's).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
from pathlib import Path
from typing import Any

from transformers import CLIPTokenizer

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "MODEL_MAX_LENGTH",
    "SD15_SCHEDULER_CONFIG",
    "build_clip_tokenizer",
    "write_vocab_files",
]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"  # also CLIP's unk and pad token
END_OF_WORD = "</w>"
MODEL_MAX_LENGTH = 77

#: The scheduler config shipped with Stable Diffusion v1.5. ``clip_sample`` is not a PNDM argument, but
#: ``from_config`` keeps it in the config so that e.g. ``DDIMScheduler.from_config`` inherits it, as with SD.
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "trained_betas": None,
}


# --------------------------------------------------------------------------------------------- tokenizer


@functools.lru_cache(maxsize=1)
def _bytes_to_unicode() -> tuple[str, ...]:
    """The 256 printable stand-ins for bytes used by CLIP/GPT-2 byte-level BPE, in CLIP's order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return tuple(chr(c) for c in cs)


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges like ``tokenizers`` does: repeatedly merge the lowest-ranked (then leftmost) pair."""
    symbols = list(symbols)
    while len(symbols) > 1:
        candidates = [(ranks[pair], i) for i, pair in enumerate(itertools.pairwise(symbols)) if pair in ranks]
        if not candidates:
            break
        _, i = min(candidates)
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


@functools.lru_cache(maxsize=4)
def _vocab_and_merges(words: tuple[str, ...]) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Build a CLIP-style vocabulary and merge list in which every entry of ``words`` is one token.

    Layout mirrors the real CLIP vocabulary: 256 byte symbols, the same with ``</w>``, one token per
    merge, then ``<|startoftext|>`` and ``<|endoftext|>``. The end-of-word marker is always attached to a
    character token (``"d</w>"``), never merged on its own. Merges are added word by word and always
    appended after the existing ones: each word is first segmented with the merges so far and then its
    segments are chained left to right. Appended merges only fire once all earlier ones are exhausted, so
    words handled earlier keep encoding to a single token.
    """
    base = _bytes_to_unicode()
    tokens = list(base) + [c + END_OF_WORD for c in base]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        segments = _bpe([*word[:-1], word[-1] + END_OF_WORD], ranks)
        left = segments[0]
        for right in segments[1:]:
            pair = (left, right)
            if pair not in ranks:
                ranks[pair] = len(merges)
                merges.append(pair)
                tokens.append(left + right)
            left += right
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, tuple(merges)


def build_clip_tokenizer(words: tuple[str, ...], model_max_length: int = MODEL_MAX_LENGTH) -> CLIPTokenizer:
    """A CLIP BPE tokenizer in which every entry of ``words`` is a single token.

    Any other text falls back to byte-level character tokens, so nothing ever fails to tokenize.
    """
    vocab, merges = _vocab_and_merges(tuple(words))
    # transformers 5's CLIPTokenizer is backed by `tokenizers`; its BPE takes merges as (left, right)
    # tuples (a list of "left right" strings is rejected).
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        unk_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=model_max_length,
    )


def write_vocab_files(folder: str | os.PathLike, words: tuple[str, ...]) -> None:
    """Write ``vocab.json`` and ``merges.txt`` (as shipped with real SD weights) into ``folder``."""
    folder = Path(folder)
    vocab, merges = _vocab_and_merges(tuple(words))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{left} {right}" for left, right in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
