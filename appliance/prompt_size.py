"""Whether a prompt can fit a bundle's context, decided before its model is loaded.

``appliance chat`` loads a model in seconds (minutes for a large one on the card); a prompt that
cannot fit is refused first: by its length in characters against the context (no tokenizing of
a huge text), then by its tokens, counted with the bundle's tokenizer and chat template alone,
which load in a fraction of a second. The loaded runner checks the exact figure again.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from npu.llm.chat_template import ChatTemplate
from npu.llm.model_args import DEFAULT_KV_CACHE_LEN, ModelArgs
from npu.llm.params import max_prompt_chars
from npu.llm.prompt_tokens import PromptEncoder
from npu.llm.runner import ContextLengthError
from npu.llm.shape_groups import plan_dynamic


def prompt_token_limit(bundle: Path, backend: str) -> int:
    """The most prompt tokens the bundle can take, from its ``config.json``.

    Exact for the CPU twin (its groups follow from the config); for compiled models, whose groups
    only the loaded sessions declare, the context from the config bounds it from above.
    """
    args = ModelArgs.load(bundle)
    compiled = backend != "onnx" and any(bundle.glob("*.axmodel"))
    if compiled:
        return (args.kv_cache_len or args.max_position_embeddings) - 1
    kv_len = args.kv_cache_len or DEFAULT_KV_CACHE_LEN
    chunks = args.max_prefill_chunks or kv_len // args.prefill_chunk
    return plan_dynamic(kv_len, args.prefill_chunk, chunks, args.kv_dim).max_prompt_tokens


def check_prompt_size(bundle: Path, messages: Sequence[dict[str, Any]], backend: str = "auto") -> None:
    """Raise ``ContextLengthError`` (or ``ValueError`` for the character count) for a prompt that
    cannot fit; a missing bundle is left to the loader, which says what to do."""
    if not (bundle / "config.json").is_file() or not (bundle / "tokenizer.json").is_file():
        return
    limit = prompt_token_limit(bundle, backend)
    chars = sum(len(str(m.get("content") or "")) for m in messages)
    if chars > max_prompt_chars(limit):
        raise ValueError(
            f"the prompt has {chars} characters, more than any prompt of at most {limit} tokens (the "
            f"most this model's context holds) can have ({max_prompt_chars(limit)}); shorten it"
        )
    encoder = PromptEncoder(Tokenizer.from_file(str(bundle / "tokenizer.json")))
    tokens = len(encoder.encode_chat(ChatTemplate.from_bundle(bundle), messages))
    if tokens > limit:
        raise ContextLengthError(tokens, limit)
