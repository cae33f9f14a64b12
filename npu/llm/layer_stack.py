"""Drive a bundle's per-layer models through AXERA's shape groups.

Group 0 is decode (one token against the whole ``kv_cache_len`` cache); group ``s + 1`` is a
128-token prefill chunk with ``128 * s`` tokens of history (a one-row dummy for ``s = 0``). The
same calls work for ``.axmodel`` files on the NPU (static shapes, bf16) and ``.onnx`` files on the
CPU (dynamic shapes, fp32): every feed is built in the dtype the session declares.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from npu.llm.kv_cache import MASKED, LayerKVCache, SequenceCache
from npu.llm.model_args import DEFAULT_KV_CACHE_LEN, ModelArgs
from npu.runtime import Session, open_session

logger = logging.getLogger(__name__)

_LAYER_RE = re.compile(r"^(?P<prefix>.+)_p(?P<chunk>\d+)_l(?P<idx>\d+)_together\.(?:axmodel|onnx)$")
_OUT_NAMES = ("K_cache_out", "V_cache_out", "output")


@dataclass(frozen=True)
class BundleFiles:
    prefix: str
    chunk: int
    layer_stems: list[str]
    post_stem: str


def find_bundle_files(bundle_dir: Path, num_layers: int, extension: str) -> BundleFiles:
    """Locate ``<prefix>_p<chunk>_l<i>_together`` and ``<prefix>_post`` for one backend's extension."""
    found: dict[int, tuple[str, int, str]] = {}
    for path in bundle_dir.glob(f"*{extension}"):
        m = _LAYER_RE.match(path.name)
        if m:
            found[int(m["idx"])] = (m["prefix"], int(m["chunk"]), path.stem)
    missing = [i for i in range(num_layers) if i not in found]
    if missing:
        raise FileNotFoundError(
            f"{bundle_dir} lacks decoder layer files for layers {missing[:8]}"
            f"{'...' if len(missing) > 8 else ''} (expected <prefix>_p128_l<i>_together{extension})"
        )
    prefixes = {found[i][0] for i in range(num_layers)}
    if len(prefixes) != 1:
        raise ValueError(f"{bundle_dir} mixes layer file prefixes {sorted(prefixes)}")
    prefix = prefixes.pop()
    post = bundle_dir / f"{prefix}_post{extension}"
    if not post.is_file():
        raise FileNotFoundError(f"{bundle_dir} lacks the post model {post.name}")
    return BundleFiles(prefix, found[0][1], [found[i][2] for i in range(num_layers)], post.stem)


class LayerStack:
    """The decoder layers and the post model of one bundle, loaded on one device."""

    def __init__(self, layers: list[Session], post: Session, args: ModelArgs, chunk: int) -> None:
        self.layers = layers
        self.post = post
        self.args = args
        self.chunk = chunk
        decode_inputs = {t.name: t for t in layers[0].get_inputs(0)}
        for name in ("K_cache", "V_cache", "indices", "input", "mask"):
            if name not in decode_inputs:
                raise ValueError(f"{layers[0].path} has no input named {name!r}")
        self.dtype = decode_inputs["input"].dtype
        self.cache_dtype = decode_inputs["K_cache"].dtype
        self.mask_dtype = decode_inputs["mask"].dtype
        post_input = post.get_inputs(0)[0]
        self.post_dtype = post_input.dtype
        self._post_input = post_input.name
        self.kv_cache_len = self._kv_cache_len(decode_inputs["K_cache"].shape)
        self.max_prefill_chunks = self._max_prefill_chunks()
        outputs = [t.name for t in layers[0].get_outputs(0)]
        missing = [n for n in _OUT_NAMES if n not in outputs]
        if missing:
            raise ValueError(f"{layers[0].path} lacks outputs {missing}")
        self._out_index = tuple(outputs.index(n) for n in _OUT_NAMES)
        self._dummy = np.zeros((1, 1, args.kv_dim), dtype=self.cache_dtype)

    @classmethod
    def load(
        cls,
        bundle_dir: Path,
        args: ModelArgs,
        backend: str,
        *,
        device_id: int = 0,
        threads: int | None = None,
    ) -> LayerStack:
        ext = ".axmodel" if backend == "axengine" else ".onnx"
        files = find_bundle_files(bundle_dir, args.num_hidden_layers, ext)
        layers = [
            open_session(bundle_dir, stem, backend, device_id=device_id, threads=threads)
            for stem in files.layer_stems
        ]
        post = open_session(bundle_dir, files.post_stem, backend, device_id=device_id, threads=threads)
        return cls(layers, post, args, files.chunk)

    def _kv_cache_len(self, shape: tuple[int | str | None, ...]) -> int:
        if isinstance(shape[1], int) and shape[1] > 0:
            return shape[1]
        return self.args.kv_cache_len or DEFAULT_KV_CACHE_LEN

    def _max_prefill_chunks(self) -> int:
        """How many prefill groups the compiled models hold (static), or what the config says."""
        configured = self.args.max_prefill_chunks or self.kv_cache_len // self.chunk
        shape = self.layers[0].get_inputs(0)[0].shape
        if all(isinstance(d, int) for d in shape):  # static shapes: count the groups present
            groups = 0
            while groups < configured:
                try:
                    self.layers[0].get_inputs(groups + 1)
                except (ValueError, IndexError):
                    break
                groups += 1
            return groups
        return configured

    @property
    def max_prompt_tokens(self) -> int:
        """Prompt tokens that fit: the prefill groups, leaving one cache row to generate into."""
        return min(self.max_prefill_chunks * self.chunk, self.kv_cache_len - 1)

    def new_cache(self) -> SequenceCache:
        layers = [
            LayerKVCache(self.kv_cache_len, self.args.kv_dim, self.cache_dtype)
            for _ in range(self.args.num_hidden_layers)
        ]
        return SequenceCache(layers, self.mask_dtype)  # type: ignore[arg-type]

    def prefill_chunk(self, cache: SequenceCache, token_ids: list[int], embeds: np.ndarray) -> np.ndarray:
        """Run up to ``chunk`` tokens appended at ``cache.offset`` (a multiple of ``chunk``).

        Returns the last real token's hidden state ``(1, 1, hidden)``.
        """
        start, n, size = cache.offset, len(token_ids), self.chunk
        if start % size or not 0 < n <= size:
            raise ValueError(f"prefill chunk must start on a multiple of {size} and hold 1..{size} tokens")
        s = start // size
        if s >= self.max_prefill_chunks:
            raise ValueError(f"prefill chunk {s} is beyond the {self.max_prefill_chunks} the model holds")
        x = np.zeros((1, size, self.args.hidden_size), dtype=self.dtype)
        x[0, :n] = embeds
        indices = np.zeros((1, size), dtype=np.uint32)
        indices[0, :n] = np.arange(start, start + n, dtype=np.uint32)
        width = start + size
        rows = np.arange(size)[:, None]
        cols = np.arange(width)[None, :]
        attend = (cols <= start + rows) & (rows < n)
        mask = np.where(attend, 0.0, MASKED).astype(self.mask_dtype)[None]
        k_out, v_out, h_out = self._out_index
        group = s + 1
        for layer, layer_cache in zip(self.layers, cache.layers, strict=True):
            k_hist, v_hist = layer_cache.history(start) if s else (self._dummy, self._dummy)
            feeds = {"K_cache": k_hist, "V_cache": v_hist, "indices": indices, "input": x, "mask": mask}
            outs = layer.run(None, feeds, shape_group=group)
            layer_cache.write(start, outs[k_out][:, :n], outs[v_out][:, :n])
            x = outs[h_out]
        cache.commit(start, token_ids)
        return x[:, n - 1 : n]

    def decode(self, cache: SequenceCache, token_id: int, embed: np.ndarray) -> np.ndarray:
        """One token at position ``cache.offset``; returns its hidden state ``(1, 1, hidden)``.

        This is the per-token hot path: one feed dict per layer is reused across tokens (only
        ``input`` changes) and one K/V row per layer is written back.
        """
        pos = cache.offset
        if pos >= self.kv_cache_len:
            raise ValueError(f"KV cache full ({self.kv_cache_len} rows)")
        x = embed.reshape(1, 1, -1).astype(self.dtype, copy=False)
        feeds = self._decode_feeds(cache)
        feeds[0]["indices"][0, 0] = pos
        k_out, v_out, h_out = self._out_index
        for layer, layer_cache, feed in zip(self.layers, cache.layers, feeds, strict=True):
            feed["input"] = x
            outs = layer.run(None, feed)
            layer_cache.write_row(pos, outs[k_out], outs[v_out])
            x = outs[h_out]
        cache.commit(pos, [token_id])
        return x

    def _decode_feeds(self, cache: SequenceCache) -> list[dict[str, np.ndarray]]:
        """Per-layer decode feeds bound to this cache's buffers, built once per cache."""
        feeds = cache.decode_feeds
        if feeds is None:
            indices = np.zeros((1, 1), dtype=np.uint32)  # shared by every layer
            feeds = []
            for layer_cache in cache.layers:
                k_all, v_all = layer_cache.full()
                feeds.append(
                    {"K_cache": k_all, "V_cache": v_all, "indices": indices, "mask": cache.decode_mask}
                )
            cache.decode_feeds = feeds
        return feeds

    def close(self) -> None:
        """Unload every layer and the post model (before a reload or after a card reboot)."""
        for session in [*self.layers, self.post]:
            session.close()

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """Final norm and LM head: float32 logits over the vocabulary."""
        out = self.post.run(None, {self._post_input: hidden.astype(self.post_dtype, copy=False)})
        return np.asarray(out[0], dtype=np.float32).reshape(-1)
