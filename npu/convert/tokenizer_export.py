"""Build ``tokenizer.json`` / ``tokenizer_config.json`` from a GGUF's tokenizer metadata.

Only byte-level BPE (``tokenizer.ggml.model == "gpt2"``) is supported: the vocabulary in the GGUF
is already spelled in the GPT-2 byte alphabet, so tokens and merges go straight into a
``tokenizers`` BPE model. The pre-tokenizer follows ``tokenizer.ggml.pre`` the way Hugging Face
ships those models, so ids match the original ``tokenizer.json``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

logger = logging.getLogger(__name__)

SUPPORTED_TOKENIZER_MODELS = ("gpt2",)
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_PRES = {
    "qwen2": QWEN2_SPLIT,
    "deepseek-r1-qwen": QWEN2_SPLIT,
    "llama3": LLAMA3_SPLIT,
    "llama-bpe": LLAMA3_SPLIT,
}
# End-of-turn markers of common chat templates; their ids join eos_token_id when present.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>")


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre == "smollm":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )
    split = _SPLIT_PRES.get(pre)
    if split is not None:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
            ]
        )
    if pre not in ("gpt2", "default", ""):
        logger.warning("unknown tokenizer.ggml.pre %r; using the GPT-2 byte-level regex", pre)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)


def build_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` from GGUF ``tokenizer.*`` metadata (keys as in the GGUF)."""
    model = meta.get("tokenizer.ggml.model")
    if model not in SUPPORTED_TOKENIZER_MODELS:
        raise ValueError(
            f"unsupported GGUF tokenizer model {model!r}; supported: {', '.join(SUPPORTED_TOKENIZER_MODELS)}"
            " (byte-level BPE)"
        )
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    merges_raw: list[str] = list(meta.get("tokenizer.ggml.merges") or [])
    if not merges_raw:
        raise ValueError("GGUF byte-level BPE tokenizer has no tokenizer.ggml.merges")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in merges_raw]
    bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)  # type: ignore[arg-type]
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = _pre_tokenizer(str(meta.get("tokenizer.ggml.pre") or "default"))
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)

    types = list(meta.get("tokenizer.ggml.token_type") or [])
    special = [
        AddedToken(tokens[i], special=True, normalized=False)
        for i, t in enumerate(types)
        if int(t) in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)
    ]
    if special:
        tok.add_special_tokens(special)
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
        bos_tok = tokens[int(bos)]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_tok} $A", pair=f"{bos_tok} $A {bos_tok} $B", special_tokens=[(bos_tok, int(bos))]
        )
    return tok


def _token(tokens: list[str], meta: dict[str, Any], key: str) -> str | None:
    idx = meta.get(f"tokenizer.ggml.{key}")
    if idx is None or not 0 <= int(idx) < len(tokens):
        return None
    return tokens[int(idx)]


def eos_token_ids(meta: dict[str, Any]) -> list[int]:
    """The GGUF eos id plus the ids of end-of-turn tokens present in the vocabulary."""
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    ids: list[int] = []
    eos = meta.get("tokenizer.ggml.eos_token_id")
    if eos is not None:
        ids.append(int(eos))
    eot = meta.get("tokenizer.ggml.eot_token_id")
    if eot is not None:
        ids.append(int(eot))
    index = {t: i for i, t in enumerate(tokens) if t.startswith("<")}
    ids.extend(index[t] for t in END_OF_TURN_TOKENS if t in index)
    return list(dict.fromkeys(ids))


def tokenizer_config(meta: dict[str, Any], model_max_length: int) -> dict[str, Any]:
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    return {
        "chat_template": meta.get("tokenizer.chat_template"),
        "bos_token": _token(tokens, meta, "bos_token_id"),
        "eos_token": _token(tokens, meta, "eos_token_id"),
        "pad_token": _token(tokens, meta, "padding_token_id"),
        "unk_token": _token(tokens, meta, "unknown_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "model_max_length": int(model_max_length),
        "clean_up_tokenization_spaces": False,
    }


def write_tokenizer(meta: dict[str, Any], dest: Path, model_max_length: int) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``dest``."""
    build_tokenizer(meta).save(str(dest / "tokenizer.json"))
    with (dest / "tokenizer_config.json").open("w", encoding="utf-8") as fh:
        json.dump(tokenizer_config(meta, model_max_length), fh, ensure_ascii=False, indent=2)
