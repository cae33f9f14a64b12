"""Bundle layout, config.json schema, 4-bit weights and error handling of ``convert_gguf``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from gguf_factory import OrtBundle, write_tiny_gguf

from npu.convert import bundle_is_current, convert_gguf
from npu.convert.bundle_writer import to_bfloat16_bits
from npu.convert.gguf_source import GGUFSource
from npu.convert.quant4 import from_q4_1, from_q4_1_offsets, from_q8_0, quantize, quantize_int
from npu.llm.model_args import BUNDLE_FORMAT, ModelArgs


def args_format(bundle: Path) -> int | None:
    return ModelArgs.load(bundle).bundle_format


@pytest.fixture(scope="module")
def demo_bundle_q4(tmp_path_factory: pytest.TempPathFactory, demo_gguf_path: Path) -> Path:
    return convert_gguf(demo_gguf_path, tmp_path_factory.mktemp("demo-q4") / "smollm2-q4", bits=4)


def test_config_has_model_args_keys(demo_bundle_fp32: Path, demo_gguf_path: Path) -> None:
    config = json.loads((demo_bundle_fp32 / "config.json").read_text())
    fields = {f.name for f in dataclasses.fields(ModelArgs)}
    assert set(config) == fields | {"source"}
    assert args_format(demo_bundle_fp32) == BUNDLE_FORMAT and bundle_is_current(demo_bundle_fp32)
    args = ModelArgs.load(demo_bundle_fp32)
    assert (args.model_type, args.num_hidden_layers, args.hidden_size) == ("llama", 30, 576)
    assert (args.num_attention_heads, args.num_key_value_heads, args.head_dim) == (9, 3, 64)
    assert args.vocab_size == 49152 and args.tie_word_embeddings
    assert args.kv_cache_len == 2047 and args.max_prefill_chunks == 15 and args.prefill_chunk == 128
    assert args.max_position_embeddings == 8192 and args.weight_bits is None
    assert args.eos_token_id == [2, 0]  # <|im_end|> (GGUF eos) and <|endoftext|>
    assert config["source"]["gguf"] == demo_gguf_path.name and len(config["source"]["sha256"]) == 64
    names = {p.name for p in demo_bundle_fp32.iterdir()}
    assert {f"llama_p128_l{i}_together.onnx" for i in range(30)} <= names
    assert {"llama_post.onnx", "tokenizer.json", "tokenizer_config.json"} <= names


def test_embedding_files(demo_bundle_fp32: Path) -> None:
    embed = np.load(demo_bundle_fp32 / "model.embed_tokens.weight.npy")
    assert embed.shape == (49152, 576) and embed.dtype == np.float32
    bf16 = np.fromfile(demo_bundle_fp32 / "model.embed_tokens.weight.bfloat16.bin", dtype=np.uint16)
    assert bf16.size == embed.size
    back = (bf16.astype(np.uint32) << 16).view(np.float32).reshape(embed.shape)
    assert np.all(np.abs(back - embed) <= np.abs(embed) * 2.0**-8)


def test_bfloat16_rounds_to_nearest_even() -> None:
    x = np.array([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -2.5, 1 + 2**-7 + 2**-9], dtype=np.float32)
    got = (to_bfloat16_bits(x).astype(np.uint32) << 16).view(np.float32)
    assert got.tolist() == [1.0, 1.0, 1.0 + 2 * 2**-7, -2.5, 1 + 2**-7]


def test_q4_1_maps_exactly(demo_gguf_path: Path) -> None:
    src = GGUFSource(demo_gguf_path)
    raw = src.raw("blk.0.ffn_up.weight")
    k, n = (int(d) for d in raw.shape.tolist())
    q = from_q4_1(np.asarray(raw.data), n, k)
    np.testing.assert_allclose(q.dequantize(), src.tensor("blk.0.ffn_up.weight"), rtol=0, atol=1e-5)
    w = np.random.default_rng(0).standard_normal((8, 96)).astype(np.float32)
    err = np.abs(quantize(w).dequantize() - w).max()
    assert err <= (w.max() - w.min()) / 15


def test_fast_4bit_forms_keep_the_gguf_weights_exactly(demo_gguf_path: Path) -> None:
    """Q4_1 as integer-zero-point codes plus block offsets, Q8_0 as 8-bit codes: no requantization."""
    src = GGUFSource(demo_gguf_path)
    for name in ("blk.0.ffn_up.weight", "blk.3.attn_q.weight"):  # attn_q: rows un-permuted
        raw = src.raw(name)
        k, n = (int(d) for d in raw.shape.tolist())
        order = None
        if src.is_permuted(name):
            from npu.convert.gguf_source import unpermute_llama

            order = unpermute_llama(np.arange(n)[:, None], src.permuted_heads(name))[:, 0]
        q = from_q4_1_offsets(np.asarray(raw.data), n, k, order)
        assert q.base.zero_point_codes().max() <= 15
        np.testing.assert_allclose(q.dequantize(), src.tensor(name), rtol=0, atol=1e-6)
    raw = src.raw("token_embd.weight")
    k, n = (int(d) for d in raw.shape.tolist())
    head = from_q8_0(np.asarray(raw.data), n, k)
    np.testing.assert_array_equal(head.dequantize(), src.tensor("token_embd.weight"))


def test_integer_zero_points_fit_better_than_min_max() -> None:
    """Requantized matrices (sources that are neither Q4_1 nor Q8_0): the fitted scale beats min/max."""
    w = np.random.default_rng(1).standard_normal((64, 160)).astype(np.float32)
    fitted = quantize_int(w)
    assert fitted.zero_point_codes().max() <= 15 and fitted.dequantize().shape == w.shape
    err = np.linalg.norm(fitted.dequantize() - w)
    assert err < np.linalg.norm(quantize(w).dequantize() - w) * 1.02
    assert err < 0.12 * np.linalg.norm(w)


def test_old_bundle_format_is_told_apart(tiny_bundles: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    _, bundle = tiny_bundles["llama"]
    assert bundle_is_current(bundle)
    config = json.loads((bundle / "config.json").read_text())
    del config["bundle_format"]
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text(json.dumps(config))
    assert not bundle_is_current(old) and ModelArgs.load(old).converted_before_current_format
    assert not bundle_is_current(tmp_path / "missing")


def _onnx_bytes(bundle: Path) -> int:
    """The graphs and the weights file they share."""
    return sum(p.stat().st_size for p in [*bundle.glob("*.onnx"), *bundle.glob("*_weights.bin")])


def test_4bit_close_to_fp32_and_smaller(demo_bundle_fp32: Path, demo_bundle_q4: Path) -> None:
    assert ModelArgs.load(demo_bundle_q4).weight_bits == 4
    assert _onnx_bytes(demo_bundle_q4) < 0.3 * _onnx_bytes(demo_bundle_fp32)
    import onnx

    for name in ("llama_p128_l0_together.onnx", "llama_post.onnx"):  # on the fast kernels only
        graph = onnx.load(str(demo_bundle_q4 / name)).graph
        floats = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
        nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
        assert nbits and all(len(n.input) < 4 or n.input[3] not in floats for n in nbits)
        assert all(a.i == 4 for n in nbits for a in n.attribute if a.name == "accuracy_level")
    fp32, q4 = OrtBundle(demo_bundle_fp32), OrtBundle(demo_bundle_q4)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(demo_bundle_fp32 / "tokenizer.json"))
    texts = [
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
        "The quick brown fox jumps over the lazy",
        "def fibonacci(n):\n    if n < 2:\n        return",
    ]
    for ids in (tok.encode(t).ids for t in texts):
        a, b = fp32.prefill(ids), q4.prefill(ids)
        cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        assert cos > 0.98, cos  # measured 0.988-0.998
        assert int(np.argmax(a)) == int(np.argmax(b))


def test_unsupported_architecture(tmp_path: Path) -> None:
    gguf_path = write_tiny_gguf(tmp_path / "gemma.gguf", "gemma")
    with pytest.raises(ValueError, match=r"unsupported GGUF architecture 'gemma'.*llama, qwen2, qwen3"):
        convert_gguf(gguf_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_not_a_gguf(tmp_path: Path) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 definitely a zip")
    with pytest.raises(ValueError, match="not a GGUF"):
        convert_gguf(bogus, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


def test_existing_destination(tiny_bundles: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    gguf_path, _ = tiny_bundles["qwen2"]
    dest = tmp_path / "bundle"
    dest.mkdir()
    (dest / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        convert_gguf(gguf_path, dest)
    assert (dest / "keep.txt").exists()
    convert_gguf(gguf_path, dest, overwrite=True, kv_cache_len=256)
    assert not (dest / "keep.txt").exists()
    args = ModelArgs.load(dest)
    assert (args.kv_cache_len, args.max_prefill_chunks, args.model_type) == (256, 2, "qwen2")
    assert not args.tie_word_embeddings
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no temp dirs left behind
