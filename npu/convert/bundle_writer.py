"""GGUF -> bundle directory (config, tokenizer, embedding, per-layer ONNX graphs, the twin graph).

The per-layer graphs and the twin graph share one weights file (``weight_file``).

Everything is written into a temporary sibling directory that is renamed into place at the end,
so an interrupted conversion never leaves a half bundle where the runner would look.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from npu.convert.gguf_source import GGUFSource, Hyperparams, file_sha256, unpermute_llama
from npu.convert.layer_graphs import LayerShape, LayerWeights, Weight, build_layer, build_post
from npu.convert.quant4 import BLOCK, from_q4_1, from_q4_1_offsets, from_q8_0, quantize, quantize_int
from npu.convert.tokenizer_export import eos_token_ids, write_tokenizer
from npu.convert.twin_graphs import TwinGraph
from npu.convert.weight_file import WeightFile
from npu.llm.model_args import BUNDLE_FORMAT
from npu.llm.twin_names import twin_file_name, weights_file_name
from npu.staged_folder import staged_folder

logger = logging.getLogger(__name__)

PREFILL_CHUNK = 128
SUPPORTED_BITS = (None, 4)
Q4_FORMS = ("fast", "float-zp")


def to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bit patterns (uint16), round-to-nearest-even; NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


def _tokenizer_meta(src: GGUFSource) -> dict[str, Any]:
    return {key: src.get(key) for key in src.reader.fields if key.startswith("tokenizer.")}


class _WeightLoader:
    """fp32 or 4-bit weights for the graphs, reusing the GGUF's codes where they map exactly.

    ``q4_form`` ``fast`` (the default): Q4_1 codes on MatMulNBits' integer-zero-point kernels
    plus per-block offsets (exact weights), Q8_0 codes (the tied LM head) on its 8-bit kernel,
    anything else requantized to integer zero points. ``float-zp``: every 4-bit matrix with
    float zero points, Q4_1 exact in one op but on ONNX Runtime's slow generic path.
    """

    def __init__(self, src: GGUFSource, bits: int | None, q4_form: str = "fast") -> None:
        self.src = src
        self.bits = bits
        self.q4_form = q4_form

    def dense(self, name: str) -> np.ndarray:
        return self.src.tensor(name)

    def matrix(self, name: str) -> Weight:
        if self.bits is None:
            return self.src.tensor(name)
        import gguf

        raw = self.src.raw(name)
        k, n = (int(d) for d in raw.shape.tolist())
        if raw.tensor_type == gguf.GGMLQuantizationType.Q4_1 and k % BLOCK == 0:
            order = None
            if self.src.is_permuted(name):
                order = unpermute_llama(np.arange(n)[:, None], self.src.permuted_heads(name))[:, 0]
            if self.q4_form == "float-zp":
                return from_q4_1(np.asarray(raw.data), n, k, order)
            return from_q4_1_offsets(np.asarray(raw.data), n, k, order)
        if self.q4_form == "float-zp":
            return quantize(self.src.tensor(name))
        q8 = raw.tensor_type == gguf.GGMLQuantizationType.Q8_0
        if q8 and k % BLOCK == 0 and not self.src.is_permuted(name):
            return from_q8_0(np.asarray(raw.data), n, k)
        return quantize_int(self.src.tensor(name))

    def optional(self, name: str) -> np.ndarray | None:
        return self.src.tensor(name) if self.src.has_tensor(name) else None

    def layer(self, i: int) -> LayerWeights:
        p = f"blk.{i}."
        return LayerWeights(
            attn_norm=self.dense(p + "attn_norm.weight"),
            q=self.matrix(p + "attn_q.weight"),
            k=self.matrix(p + "attn_k.weight"),
            v=self.matrix(p + "attn_v.weight"),
            o=self.matrix(p + "attn_output.weight"),
            ffn_norm=self.dense(p + "ffn_norm.weight"),
            gate=self.matrix(p + "ffn_gate.weight"),
            up=self.matrix(p + "ffn_up.weight"),
            down=self.matrix(p + "ffn_down.weight"),
            q_bias=self.optional(p + "attn_q.bias"),
            k_bias=self.optional(p + "attn_k.bias"),
            v_bias=self.optional(p + "attn_v.bias"),
            q_norm=self.optional(p + "attn_q_norm.weight"),
            k_norm=self.optional(p + "attn_k_norm.weight"),
        )


def _config(src: GGUFSource, hp: Hyperparams, meta: dict[str, Any], kv_cache_len: int,
            bits: int | None, sha256: str) -> dict[str, Any]:
    bos = meta.get("tokenizer.ggml.bos_token_id")
    return {
        "model_type": hp.arch,
        "num_hidden_layers": hp.num_layers,
        "hidden_size": hp.hidden,
        "intermediate_size": hp.intermediate,
        "num_attention_heads": hp.n_heads,
        "num_key_value_heads": hp.n_kv_heads,
        "head_dim": hp.head_dim,
        "vocab_size": hp.vocab_size,
        "rms_norm_eps": hp.rms_eps,
        "rope_theta": hp.rope_theta,
        "tie_word_embeddings": hp.tied,
        "bos_token_id": int(bos) if bos is not None else None,
        "eos_token_id": eos_token_ids(meta),
        "max_position_embeddings": hp.context_length,
        "kv_cache_len": kv_cache_len,
        "prefill_chunk": PREFILL_CHUNK,
        "max_prefill_chunks": kv_cache_len // PREFILL_CHUNK,
        "model_prefix": hp.arch,
        "weight_bits": bits,
        "bundle_format": BUNDLE_FORMAT,
        "source": {"gguf": src.path.name, "sha256": sha256},
    }


def bundle_is_current(bundle: Path) -> bool:
    """Whether ``bundle``'s config.json was written in this converter's bundle format."""
    try:
        config = json.loads((Path(bundle) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("bundle_format") == BUNDLE_FORMAT


def convert_gguf(src: Path, dest: Path, *, bits: int | None = None, kv_cache_len: int = 2047,
                 overwrite: bool = False, q4_form: str = "fast") -> Path:
    """Convert a llama/qwen2/qwen3 GGUF into a CPU-twin bundle at ``dest``; returns ``dest``."""
    src, dest = Path(src), Path(dest)
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be None (fp32) or 4, not {bits!r}")
    if q4_form not in Q4_FORMS:
        raise ValueError(f"q4_form must be one of {', '.join(Q4_FORMS)}, not {q4_form!r}")
    if kv_cache_len < PREFILL_CHUNK:
        raise ValueError(f"kv_cache_len must be at least {PREFILL_CHUNK}, not {kv_cache_len}")
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} already exists; pass overwrite=True to replace it")
    started = time.monotonic()
    gguf_src = GGUFSource(src)
    hp = gguf_src.hyperparams_cached
    meta = _tokenizer_meta(gguf_src)
    with staged_folder(dest) as staging:
        _write_bundle(gguf_src, hp, meta, staging, bits, kv_cache_len, q4_form)
    logger.info("converted %s -> %s in %.1fs", src.name, dest, time.monotonic() - started)
    return dest


def _write_bundle(src: GGUFSource, hp: Hyperparams, meta: dict[str, Any], out: Path,
                  bits: int | None, kv_cache_len: int, q4_form: str = "fast") -> None:
    write_tokenizer(meta, out, hp.context_length)
    config = _config(src, hp, meta, kv_cache_len, bits, file_sha256(src.path))
    embed = src.tensor("token_embd.weight")
    if embed.shape != (hp.vocab_size, hp.hidden):
        raise ValueError(f"token_embd.weight has shape {embed.shape}, expected {(hp.vocab_size, hp.hidden)}")
    to_bfloat16_bits(embed).tofile(out / "model.embed_tokens.weight.bfloat16.bin")
    np.save(out / "model.embed_tokens.weight.npy", embed)

    loader = _WeightLoader(src, bits, q4_form)
    shape = LayerShape(hp.hidden, hp.n_heads, hp.n_kv_heads, hp.head_dim, hp.rms_eps, hp.rope_theta)
    twin = TwinGraph(shape, max_positions=kv_cache_len)
    with WeightFile(out / weights_file_name(hp.arch)) as weights:
        for i in range(hp.num_layers):
            w = loader.layer(i)
            model = weights.externalize(build_layer(w, shape, i, max_positions=kv_cache_len))
            onnx.save_model(model, str(out / f"{hp.arch}_p{PREFILL_CHUNK}_l{i}_together.onnx"))
            mark = len(twin.g.inits)
            twin.add(w)  # the same weights: stored once, both graphs point at them
            weights.store(twin.g.inits[mark:])
            logger.info("layer %d/%d converted", i + 1, hp.num_layers)
        onnx.save_model(twin.model(), str(out / twin_file_name(hp.arch)))
    head_name = "token_embd.weight" if hp.tied else "output.weight"
    if bits is None:
        lm_head: Weight = embed if hp.tied else src.tensor(head_name)
    else:
        lm_head = loader.matrix(head_name)
    post = build_post(src.tensor("output_norm.weight"), lm_head, hp.hidden, hp.vocab_size, hp.rms_eps)
    onnx.save_model(post, str(out / f"{hp.arch}_post.onnx"))
    with (out / "config.json").open("w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)
