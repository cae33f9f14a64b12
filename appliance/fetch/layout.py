"""From AXERA's repository layout to the bundle contract, and the checks a fetched bundle must pass.

Pure functions: which files to ask the hub for, what the bundle's ``config.json`` says, and what is
missing or the wrong size in a bundle folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from appliance.fetch.catalog import ChatSource, ImageSource

EMBED_FILE = "model.embed_tokens.weight.bfloat16.bin"
BF16_BYTES = 2


def chat_compiled_files(source: ChatSource, num_layers: int) -> list[str]:
    """Paths inside the compiled repository: one file per decoder layer, the post model, the embeddings."""
    names = [f"{source.prefix}_p128_l{i}_together.axmodel" for i in range(num_layers)]
    names += [f"{source.prefix}_post.axmodel", EMBED_FILE]
    return [repo_path(source.compiled.folder, name) for name in names]


def image_compiled_files(source: ImageSource) -> list[str]:
    return [repo_path(source.compiled.folder, name) for name in source.files]


def repo_path(folder: str, name: str) -> str:
    return f"{folder.strip('/')}/{name}" if folder.strip("/") else name


def bundle_config(config: dict[str, Any], generation_config: dict[str, Any] | None) -> dict[str, Any]:
    """The model's own ``config.json``, with every end-of-turn id the generation config names.

    Qwen's ``config.json`` lists one EOS id while ``generation_config.json`` lists both ``<|im_end|>``
    and ``<|endoftext|>``; without the second a reply could run on past the end of the text.
    """
    merged = dict(config)
    ids: list[int] = []
    for source in (config, generation_config or {}):
        value = source.get("eos_token_id")
        for token in value if isinstance(value, list) else [value] if value is not None else []:
            if token not in ids:
                ids.append(int(token))
    merged["eos_token_id"] = ids
    return merged


def chat_problems(bundle: Path, config: dict[str, Any], prefix: str) -> list[str]:
    """What keeps ``bundle`` from loading as a chat model; empty when it is complete."""
    problems = [f"{name} is missing" for name in ("config.json", "tokenizer.json", "tokenizer_config.json")
                if not (bundle / name).is_file()]
    layers = int(config.get("num_hidden_layers", 0))
    if layers <= 0:
        problems.append("config.json gives no num_hidden_layers")
    for i in range(layers):
        name = f"{prefix}_p128_l{i}_together.axmodel"
        if not (bundle / name).is_file():
            problems.append(f"{name} is missing")
    if not (bundle / f"{prefix}_post.axmodel").is_file():
        problems.append(f"{prefix}_post.axmodel is missing")
    embed = bundle / EMBED_FILE
    if not embed.is_file():
        problems.append(f"{EMBED_FILE} is missing")
    else:
        want = int(config.get("vocab_size", 0)) * int(config.get("hidden_size", 0)) * BF16_BYTES
        got = embed.stat().st_size
        if got != want:
            problems.append(
                f"{EMBED_FILE} holds {got} bytes, not vocab_size x hidden_size x 2 = {want}: "
                "the compiled model and config.json are from different models"
            )
    return problems

