"""tokenizer.json built from GGUF metadata encodes exactly like transformers' GGUF tokenizer."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from npu.convert.tokenizer_export import build_tokenizer

TEXTS = [
    "Hello, world!",
    "The year 2024 had 366 days; pi is 3.14159.",
    "emoji 😀🎉 and flags 🇫🇷",
    "中文字符和日本語のテキスト",
    "tabs\tand   many    spaces   ",
    "line one\nline two\n\n\nline five\r\n",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "  leading spaces and trailing  ",
    "don't won't it's I'm we'll they've",
    "mixed123abc456 ___ --- !!! ???",
    "",
]


@functools.cache
def _hf_tokenizer(gguf_path: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


def _check(bundle: Path, gguf_path: Path) -> None:
    ours = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    theirs = _hf_tokenizer(gguf_path)
    for text in TEXTS:
        expected = theirs(text, add_special_tokens=False)["input_ids"]
        assert ours.encode(text, add_special_tokens=False).ids == expected, text
        assert ours.decode(expected, skip_special_tokens=False) == text


@pytest.mark.reference
def test_demo_tokenizer_matches_transformers(demo_bundle_fp32: Path, demo_gguf_path: Path) -> None:
    _check(demo_bundle_fp32, demo_gguf_path)


@pytest.mark.reference
def test_qwen2_pretokenizer_matches_transformers(tiny_bundles: dict[str, tuple[Path, Path]]) -> None:
    gguf_path, bundle = tiny_bundles["qwen2"]
    _check(bundle, gguf_path)


def test_special_tokens_stay_whole(demo_bundle_fp32: Path) -> None:
    tok = Tokenizer.from_file(str(demo_bundle_fp32 / "tokenizer.json"))
    ids = tok.encode("<|im_start|>x<|im_end|>").ids
    assert ids[0] == tok.token_to_id("<|im_start|>")
    assert ids[-1] == tok.token_to_id("<|im_end|>")


def test_tokenizer_config(demo_bundle_fp32: Path) -> None:
    cfg = json.loads((demo_bundle_fp32 / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in cfg["chat_template"]
    assert cfg["bos_token"] == "<|im_start|>"
    assert cfg["eos_token"] == "<|im_end|>"
    assert cfg["unk_token"] == "<|endoftext|>"
    assert cfg["add_bos_token"] is False
    assert cfg["model_max_length"] == 8192


def test_sentencepiece_rejected() -> None:
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"]}
    with pytest.raises(ValueError, match="supported: gpt2"):
        build_tokenizer(meta)
