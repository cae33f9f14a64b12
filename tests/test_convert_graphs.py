"""Graph contract: the converted ONNX layers, fed AXERA-style, reproduce transformers' logits.

Tolerance: max |logit difference| <= 1e-3 (measured ~2e-5 on the tiny models, ~8e-5 on the demo,
whose logits reach ~180); both sides are fp32 from the same dequantized weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf_factory import OrtBundle, reference_logits

ATOL = 1e-3
ARCHS = ("llama", "qwen2", "qwen3")


def _ids(n: int, seed: int, vocab: int = 49152) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


def _close(a: np.ndarray, b: np.ndarray, atol: float = ATOL) -> None:
    np.testing.assert_allclose(a, b, rtol=0, atol=atol)


@pytest.mark.reference
@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_chunk_matches_transformers(tiny_bundles: dict[str, tuple[Path, Path]], arch: str) -> None:
    gguf_path, bundle = tiny_bundles[arch]
    ids = _ids(100, seed=1)  # 100 real tokens, 28 padding rows masked out
    ref = reference_logits(gguf_path, ids)
    _close(OrtBundle(bundle).prefill(ids), ref[-1])


@pytest.mark.reference
@pytest.mark.parametrize("arch", ARCHS)
def test_decode_matches_transformers(tiny_bundles: dict[str, tuple[Path, Path]], arch: str) -> None:
    gguf_path, bundle = tiny_bundles[arch]
    ids = _ids(40, seed=2)
    ref = reference_logits(gguf_path, ids)
    steps = OrtBundle(bundle).decode_all(ids)
    _close(np.stack(steps), ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_two_prefill_chunks_equal_decode(tiny_bundles: dict[str, tuple[Path, Path]], arch: str) -> None:
    _, bundle = tiny_bundles[arch]
    ids = _ids(200, seed=3)
    ob = OrtBundle(bundle)
    prefill = ob.prefill(ids)
    k_prefill, v_prefill = [k[:, :200].copy() for k in ob.k], [v[:, :200].copy() for v in ob.v]
    decoded = ob.decode_all(ids)[-1]
    _close(prefill, decoded, atol=1e-4)
    for i in range(len(ob.layers)):
        _close(k_prefill[i], ob.k[i][:, :200], atol=1e-4)
        _close(v_prefill[i], ob.v[i][:, :200], atol=1e-4)


def _demo_prompts(bundle: Path) -> list[list[int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    texts = [
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
        "Once upon a time, in a small village by the sea, there lived",
    ]
    return [tok.encode(t).ids for t in texts]


@pytest.mark.reference
def test_demo_prefill_and_decode_match_transformers(demo_gguf_path: Path, demo_bundle_fp32: Path) -> None:
    ob = OrtBundle(demo_bundle_fp32)
    for ids in _demo_prompts(demo_bundle_fp32):
        ref = reference_logits(demo_gguf_path, ids)
        _close(ob.prefill(ids), ref[-1])
        steps = ob.decode_all(ids)
        _close(np.stack(steps), ref)
        assert int(np.argmax(steps[-1])) == int(np.argmax(ref[-1]))


def test_demo_two_chunks_equal_chunk_plus_decode(demo_bundle_fp32: Path) -> None:
    """200 tokens: two prefill chunks == one chunk of 128 then 72 decode steps."""
    ids = _ids(200, seed=4)
    ob = OrtBundle(demo_bundle_fp32)
    two_chunks = ob.prefill(ids)
    ob.prefill(ids[:128])
    last = np.empty(0)
    for t in ids[128:]:
        last = ob.decode(t)
    _close(two_chunks, last)


def test_layer_graph_contract(tiny_bundles: dict[str, tuple[Path, Path]]) -> None:
    import onnx

    _, bundle = tiny_bundles["qwen3"]
    model = onnx.load(str(bundle / "qwen3_p128_l0_together.onnx"))
    names = [i.name for i in model.graph.input]
    assert names == ["K_cache", "V_cache", "indices", "input", "mask"]
    assert [o.name for o in model.graph.output] == ["K_cache_out", "V_cache_out", "output"]
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input]
    assert dims == [[1, "P", 64], [1, "P", 64], [1, "T"], [1, "T", 64], [1, "T", "W"]]
    assert model.graph.input[2].type.tensor_type.elem_type == onnx.TensorProto.UINT32
    onnx.checker.check_model(model)
