"""Bundle layout, config.json schema, 4-bit weights and error handling of ``convert_gguf``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from gguf_factory import OrtBundle, write_tiny_gguf

from npu.convert import convert_gguf
from npu.convert.bundle_writer import to_bfloat16_bits
from npu.convert.gguf_source import GGUFSource
from npu.convert.quant4 import from_q4_1, quantize
from npu.llm.model_args import ModelArgs


@pytest.fixture(scope="module")
def demo_bundle_q4(tmp_path_factory: pytest.TempPathFactory, demo_gguf_path: Path) -> Path:
    return convert_gguf(demo_gguf_path, tmp_path_factory.mktemp("demo-q4") / "smollm2-q4", bits=4)


def test_config_has_model_args_keys(demo_bundle_fp32: Path, demo_gguf_path: Path) -> None:
    config = json.loads((demo_bundle_fp32 / "config.json").read_text())
    fields = {f.name for f in dataclasses.fields(ModelArgs)}
    assert set(config) == fields | {"source"}
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


def _onnx_bytes(bundle: Path) -> int:
    return sum(p.stat().st_size for p in bundle.glob("*.onnx"))


def test_4bit_close_to_fp32_and_smaller(demo_bundle_fp32: Path, demo_bundle_q4: Path) -> None:
    assert ModelArgs.load(demo_bundle_q4).weight_bits == 4
    assert _onnx_bytes(demo_bundle_q4) < 0.3 * _onnx_bytes(demo_bundle_fp32)
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
