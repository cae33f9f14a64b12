"""The CPU twin on its own graph: one ONNX Runtime run per token, attention on the cache in place.

A converted bundle holds, besides AXERA's per-layer graphs, the twin graph
(``npu.convert.twin_graphs``): every decoder layer in one model, each layer's cache head-major
``(1, kv_heads, capacity, head_dim)`` as ONNX Runtime's ``GroupQueryAttention`` reads it. A
conversation's caches are bound once as both ``past`` and ``present`` of their layer (one
buffer: the operator writes the new rows in place and attends over the rows in use), so a
decode token is one run of the twin graph and one of the post model, and nothing copies the
history. A prefill chunk is one run too, unpadded.

The runner sees the same ``LayerStack`` operations as on the card; the cache keeps the
``LayerCache`` operations in the card's row layout (``history``, ``write``), converting on the
way, which only kept prefixes use.
"""

from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np

from npu.llm.kv_cache import SequenceCache
from npu.llm.layer_stack import LayerStack, find_bundle_files
from npu.llm.model_args import DEFAULT_KV_CACHE_LEN, ModelArgs
from npu.llm.shape_groups import BundleShapeError, GroupPlan, plan_dynamic
from npu.llm.twin_names import TWIN_INPUTS, past_names, present_names, twin_file_name
from npu.runtime import Session
from npu.runtime.onnx_backend import OnnxSession

F32 = np.dtype(np.float32)
# How long the twin graph's pool may spin between operators (it runs alone: one session for every
# layer) instead of sleeping and being woken for each, in microseconds; see docs/PERFORMANCE.md.
TWIN_SPIN_US = 0


class HeadMajorKVCache:
    """One layer's keys and values as the twin graph binds them: ``(1, kv_heads, capacity, head_dim)``."""

    def __init__(self, capacity: int, kv_heads: int, head_dim: int, dtype: np.dtype = F32) -> None:
        self.capacity = capacity
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.keys = np.zeros((1, kv_heads, capacity, head_dim), dtype=dtype)
        self.values = np.zeros((1, kv_heads, capacity, head_dim), dtype=dtype)

    def _rows(self, cache: np.ndarray, n: int) -> np.ndarray:
        return np.ascontiguousarray(cache[0, :, :n].transpose(1, 0, 2)).reshape(1, n, -1)

    def _put(self, cache: np.ndarray, start: int, rows: np.ndarray) -> None:
        n = rows.shape[1]
        cache[0, :, start : start + n] = rows.reshape(n, self.kv_heads, self.head_dim).transpose(1, 0, 2)

    def history(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The first ``n`` rows in the card's layout ``(1, n, kv_dim)`` (copies)."""
        return self._rows(self.keys, n), self._rows(self.values, n)

    def full(self) -> tuple[np.ndarray, np.ndarray]:
        return self.history(self.capacity)

    def write(self, start: int, keys: np.ndarray, values: np.ndarray) -> None:
        """Store rows given in the card's layout ``(1, n, kv_dim)`` at ``start``."""
        self._put(self.keys, start, keys)
        self._put(self.values, start, values)

    def write_row(self, pos: int, keys: np.ndarray, values: np.ndarray) -> None:
        self.write(pos, keys, values)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


class _TwinBinding:
    """One cache's binding of the twin graph: its caches as past and present, the lengths, and a
    one-token input and output kept for decode."""

    def __init__(self, twin: Session, cache: SequenceCache, hidden: int) -> None:
        b = self.binding = twin.binding()  # type: ignore[attr-defined]
        self.seqlens_k = np.zeros(1, dtype=np.int32)
        self.total = np.zeros((), dtype=np.int32)
        b.input("seqlens_k", self.seqlens_k)
        b.input("total_sequence_length", self.total)
        for i, layer in enumerate(cache.layers):
            for past, present, buffer in zip(past_names(i), present_names(i),
                                             (layer.keys, layer.values), strict=True):  # type: ignore[attr-defined]
                value = b.value(buffer)
                b.input(past, buffer, value)
                b.output(present, buffer, value)
        self.token_in = np.zeros((1, 1, hidden), dtype=F32)
        self.token_out = np.zeros((1, 1, hidden), dtype=F32)
        self._token_bound = False

    def run_chunk(self, start: int, x: np.ndarray, out: np.ndarray) -> None:
        self.binding.input("input", x)
        self.binding.output("output", out)
        self._token_bound = False
        self._run(start, x.shape[1])

    def run_token(self, pos: int) -> None:
        if not self._token_bound:
            self.binding.input("input", self.token_in)
            self.binding.output("output", self.token_out)
            self._token_bound = True
        self._run(pos, 1)

    def _run(self, start: int, n: int) -> None:
        self.total[...] = start + n
        self.seqlens_k[0] = start + n - 1
        self.binding.run()


class TwinLayerStack(LayerStack):
    """``LayerStack`` on a bundle's twin graph (CPU, ONNX Runtime): one run per token or chunk."""

    def __init__(self, twin: Session, post: Session, args: ModelArgs, plan: GroupPlan) -> None:
        # Not LayerStack.__init__: there are no per-layer sessions to read the feeds' dtypes from;
        # the twin graph is fp32 throughout.
        names = {t.name for t in twin.get_inputs(0)}
        missing = [n for n in (*TWIN_INPUTS, *past_names(args.num_hidden_layers - 1)) if n not in names]
        if missing or past_names(args.num_hidden_layers)[0] in names:
            raise BundleShapeError(f"{twin.path} is not a twin graph of {args.num_hidden_layers} layers "
                                   f"(inputs {missing} missing or layers beyond)")
        self.layers = [twin]
        self.post = post
        self.args = args
        self.plan = plan
        self.chunk = plan.chunk
        self.dtype = self.cache_dtype = self.mask_dtype = F32
        self.indices_dtype = np.dtype(np.uint32)
        post_input = post.get_inputs(0)[0]
        self.post_dtype = post_input.dtype
        self._post_input = post_input.name
        self.kv_cache_len = plan.capacity
        self.max_prefill_chunks = len(plan.prefill)
        self._placeholders: dict[int, np.ndarray] = {}
        self._bound: weakref.WeakKeyDictionary[SequenceCache, _TwinBinding] = weakref.WeakKeyDictionary()

    @staticmethod
    def present(bundle_dir: Path, args: ModelArgs) -> bool:
        """Whether ``bundle_dir`` holds a twin graph (bundles converted before format 3 do not)."""
        return (Path(bundle_dir) / twin_file_name(args.model_prefix or args.model_type)).is_file()

    @classmethod
    def open(cls, bundle_dir: Path, args: ModelArgs, *, threads: int | None = None) -> TwinLayerStack:
        """Open the twin graph and the post model of ``bundle_dir`` on ONNX Runtime."""
        bundle_dir = Path(bundle_dir)
        files = find_bundle_files(bundle_dir, args.num_hidden_layers, ".onnx")
        twin = OnnxSession(bundle_dir / twin_file_name(files.prefix), threads=threads, spin_us=TWIN_SPIN_US)
        post: OnnxSession | None = None
        try:
            post = OnnxSession(bundle_dir / f"{files.post_stem}.onnx", threads=threads)
            kv_len = args.kv_cache_len or DEFAULT_KV_CACHE_LEN
            chunks = args.max_prefill_chunks or kv_len // args.prefill_chunk
            plan = plan_dynamic(kv_len, args.prefill_chunk, chunks, args.kv_dim)
            return cls(twin, post, args, plan)  # type: ignore[arg-type]
        except BaseException:
            for session in (twin, post):
                if session is not None:
                    session.close()
            raise

    def new_cache(self) -> SequenceCache:
        layers = [
            HeadMajorKVCache(self.kv_cache_len, self.args.num_key_value_heads, self.args.head_dim or 0)
            for _ in range(self.args.num_hidden_layers)
        ]
        return SequenceCache(layers, F32)  # type: ignore[arg-type]

    def prefill_chunk(self, cache: SequenceCache, token_ids: list[int], embeds: np.ndarray) -> np.ndarray:
        """Up to ``chunk`` tokens at ``cache.offset``, unpadded, attending over the stored rows."""
        start, n, size = cache.offset, len(token_ids), self.chunk
        if start % size or not 0 < n <= size:
            raise ValueError(f"prefill chunk must start on a multiple of {size} and hold 1..{size} tokens")
        if start + n > cache.capacity:
            raise ValueError(f"KV cache full: {start + n} rows needed, {cache.capacity} available")
        x = np.ascontiguousarray(embeds, dtype=F32).reshape(1, n, -1)
        out = np.empty_like(x)
        self._binding(cache).run_chunk(start, x, out)
        cache.commit(start, token_ids)
        return out[:, n - 1 : n]

    def decode(self, cache: SequenceCache, token_id: int, embed: np.ndarray) -> np.ndarray:
        """One token at ``cache.offset``, attending over the ``offset`` stored rows and itself."""
        pos = cache.offset
        if pos >= self.kv_cache_len:
            raise ValueError(f"KV cache full ({self.kv_cache_len} rows)")
        bound = self._binding(cache)
        bound.token_in[...] = embed.reshape(1, 1, -1)
        bound.run_token(pos)
        cache.commit(pos, [token_id])
        return bound.token_out.copy()

    def _binding(self, cache: SequenceCache) -> _TwinBinding:
        """The binding of ``cache``, made on its first chunk and kept while it lives."""
        bound = self._bound.get(cache)
        if bound is None:
            bound = self._bound[cache] = _TwinBinding(self.layers[0], cache, self.args.hidden_size)
        return bound
