"""CLIP's tokenizer, built with the ``tokenizers`` library from a bundle's vocab.json and merges.txt.

Stable Diffusion bundles ship CLIP's slow-tokenizer files, not a ``tokenizer.json``. CLIP's rules:
NFC, runs of whitespace made one space, lower case; split into letters, single digits and
punctuation runs; byte-level BPE with ``</w>`` closing each word; ``<|startoftext|>`` and
``<|endoftext|>`` around the prompt, padded with the pad token (``<|endoftext|>`` for SD 1.5).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CONTEXT = 77
SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


@dataclass(frozen=True)
class PromptTokens:
    ids: np.ndarray  # [1, 77]
    tokens: int  # the prompt's own tokens, without BOS/EOS
    truncated: bool


class ClipTokenizer:
    def __init__(self, tokenizer: Tokenizer, pad_id: int, context: int = CONTEXT) -> None:
        self.tokenizer = tokenizer
        self.pad_id = pad_id
        self.context = context
        self.bos_id = tokenizer.token_to_id(BOS)
        self.eos_id = tokenizer.token_to_id(EOS)

    @classmethod
    def load(cls, folder: Path) -> ClipTokenizer:
        vocab, merges = folder / "vocab.json", folder / "merges.txt"
        for path in (vocab, merges):
            if not path.is_file():
                raise FileNotFoundError(f"{folder} lacks {path.name} (the CLIP tokenizer)")
        tokenizer = Tokenizer(models.BPE.from_file(str(vocab), str(merges), unk_token=EOS,
                                                   end_of_word_suffix="</w>", continuing_subword_prefix="",
                                                   fuse_unk=False))
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.add_special_tokens([BOS, EOS])
        bos, eos = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
        if bos is None or eos is None:
            raise ValueError(f"{vocab} lacks {BOS} or {EOS}")
        return cls(tokenizer, _pad_id(folder, tokenizer, eos))

    def encode(self, text: str) -> PromptTokens:
        """``[1, 77]`` ids: BOS, the prompt (cut to fit, as CLIP was trained), EOS, padding."""
        ids = self.tokenizer.encode(text.strip(), add_special_tokens=False).ids
        room = self.context - 2
        row = [self.bos_id, *ids[:room], self.eos_id]
        row += [self.pad_id] * (self.context - len(row))
        return PromptTokens(np.asarray([row], dtype=np.int64), len(ids), len(ids) > room)


def _pad_id(folder: Path, tokenizer: Tokenizer, eos: int) -> int:
    """The pad token from tokenizer_config.json / special_tokens_map.json, else ``<|endoftext|>``."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if not path.is_file():
            continue
        pad = json.loads(path.read_text(encoding="utf-8")).get("pad_token")
        if isinstance(pad, dict):
            pad = pad.get("content")
        if isinstance(pad, str) and tokenizer.token_to_id(pad) is not None:
            return int(tokenizer.token_to_id(pad))
    return eos
