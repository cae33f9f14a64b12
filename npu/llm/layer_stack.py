"""Drive a bundle's per-layer models through the shape groups their sessions declare.

Which group is decode and which a prefill chunk, and what each holds, is read from the sessions
(``npu.llm.shape_groups``), never assumed: a decode step runs on the smallest decode group whose
cache holds the sequence, a prefill chunk on the smallest prefill group whose history holds the
rows already stored. The same calls work for ``.axmodel`` files on the NPU (static shapes, bf16)
and ``.onnx`` files on the CPU (dynamic shapes, fp32): every feed is built in the shape and dtype
the session declares for that group.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from npu.llm.kv_cache import LayerKVCache, SequenceCache, prefill_feeds
from npu.llm.model_args import DEFAULT_KV_CACHE_LEN, ModelArgs
from npu.llm.shape_groups import (
    IN_NAMES,
    OUT_NAMES,
    BundleShapeError,
    DecodeGroup,
    GroupPlan,
    PrefillGroup,
    count_groups,
    declared_groups,
    plan_dynamic,
    plan_static,
    same_groups,
)
from npu.runtime import Session, open_session, resolve_backend
from npu.runtime.factory import EXTENSIONS, open_sessions

logger = logging.getLogger(__name__)

_LAYER_RE = re.compile(r"^(?P<prefix>.+)_p(?P<chunk>\d+)_l(?P<idx>\d+)_together\.(?:axmodel|onnx)$")


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

    def __init__(self, layers: list[Session], post: Session, args: ModelArgs, plan: GroupPlan) -> None:
        self.layers = layers
        self.post = post
        self.args = args
        self.plan = plan
        self.chunk = plan.chunk
        first = layers[0]
        decode_gid = plan.decode[0].gid
        inputs = {t.name: t for t in first.get_inputs(decode_gid)}
        self.dtype = inputs["input"].dtype
        self.cache_dtype = inputs["K_cache"].dtype
        self.mask_dtype = inputs["mask"].dtype
        self.indices_dtype = inputs["indices"].dtype
        post_input = post.get_inputs(0)[0]
        self.post_dtype = post_input.dtype
        self._post_input = post_input.name
        self.kv_cache_len = plan.capacity
        self.max_prefill_chunks = len(plan.prefill)
        outputs = [t.name for t in first.get_outputs(decode_gid)]
        self._out_index = tuple(outputs.index(n) for n in OUT_NAMES)
        self._placeholders: dict[int, np.ndarray] = {}

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
        """Open every layer and the post model (``backend`` may be ``auto``), then read their groups."""

        def stems(concrete: str) -> list[str]:
            files = find_bundle_files(bundle_dir, args.num_hidden_layers, EXTENSIONS[concrete])
            return [*files.layer_stems, files.post_stem]

        if resolve_backend(bundle_dir, backend) == "onnx":
            from npu.llm.twin_stack import TwinLayerStack

            if TwinLayerStack.present(bundle_dir, args):  # the CPU twin's own graph: one run per token
                return TwinLayerStack.open(bundle_dir, args, threads=threads)
        concrete, sessions = open_sessions(bundle_dir, stems, backend, device_id=device_id, threads=threads)
        try:
            plan = plan_layers(sessions[:-1], args)
            if concrete == "axcl":  # the card through pyaxcl: caches and hidden states stay on it
                from npu.llm.resident_stack import ResidentLayerStack

                return ResidentLayerStack(sessions[:-1], sessions[-1], args, plan)  # type: ignore[arg-type,return-value]
            if concrete == "onnx" and not plan.static:  # the CPU twin: dynamic shapes, IO binding
                from npu.llm.onnx_stack import OnnxLayerStack

                return OnnxLayerStack(sessions[:-1], sessions[-1], args, plan)
            return cls(sessions[:-1], sessions[-1], args, plan)
        except BaseException:
            for session in sessions:
                session.close()
            raise

    @property
    def backend(self) -> str:
        return self.layers[0].backend

    @property
    def max_prompt_tokens(self) -> int:
        """Prompt tokens that fit: the prefill groups, leaving one cache row to generate into."""
        return self.plan.max_prompt_tokens

    def new_cache(self) -> SequenceCache:
        layers = [
            LayerKVCache(self.kv_cache_len, self.args.kv_dim, self.cache_dtype)
            for _ in range(self.args.num_hidden_layers)
        ]
        return SequenceCache(layers, self.mask_dtype)  # type: ignore[arg-type]

    def _placeholder(self, group: PrefillGroup) -> np.ndarray:
        """Zeros of the declared history shape of a group without history (built once)."""
        zeros = self._placeholders.get(group.gid)
        if zeros is None:
            shape = group.placeholder or (1, 1, self.args.kv_dim)
            zeros = self._placeholders[group.gid] = np.zeros(shape, dtype=self.cache_dtype)
        return zeros

    def prefill_chunk(self, cache: SequenceCache, token_ids: list[int], embeds: np.ndarray) -> np.ndarray:
        """Run up to ``chunk`` tokens appended at ``cache.offset`` (a multiple of ``chunk``).

        The chunk runs on the smallest prefill group whose history holds the stored rows; history
        columns beyond them (a group with more history than used) are masked. Returns the last
        real token's hidden state ``(1, 1, hidden)``.
        """
        start, n, size = cache.offset, len(token_ids), self.chunk
        if start % size or not 0 < n <= size:
            raise ValueError(f"prefill chunk must start on a multiple of {size} and hold 1..{size} tokens")
        if start + n > cache.capacity:
            raise ValueError(f"KV cache full: {start + n} rows needed, {cache.capacity} available")
        group = self.plan.prefill_for(start)
        hist = group.history
        x = np.zeros((1, size, self.args.hidden_size), dtype=self.dtype)
        x[0, :n] = embeds
        indices, mask = prefill_feeds(start, n, size, hist, self.mask_dtype, self.indices_dtype)
        k_out, v_out, h_out = self._out_index
        for layer, layer_cache in zip(self.layers, cache.layers, strict=True):
            if hist:
                k_hist, v_hist = layer_cache.history(hist)
            else:
                k_hist = v_hist = self._placeholder(group)
            feeds = {"K_cache": k_hist, "V_cache": v_hist, "indices": indices, "input": x, "mask": mask}
            outs = layer.run(None, feeds, shape_group=group.gid)
            layer_cache.write(start, outs[k_out][:, :n], outs[v_out][:, :n])
            x = outs[h_out]
        cache.commit(start, token_ids)
        return x[:, n - 1 : n]

    def decode(self, cache: SequenceCache, token_id: int, embed: np.ndarray) -> np.ndarray:
        """One token at position ``cache.offset``; returns its hidden state ``(1, 1, hidden)``.

        It runs on the smallest decode group whose cache holds the row it writes. This is the
        per-token hot path: the feed dicts of each group are built once per cache and reused
        (only ``input`` and the shared ``indices`` change), and one K/V row per layer is written.
        """
        pos = cache.offset
        if pos >= self.kv_cache_len:
            raise ValueError(f"KV cache full ({self.kv_cache_len} rows)")
        group = self.plan.decode_for(pos + 1)
        x = embed.reshape(1, 1, -1).astype(self.dtype, copy=False)
        feeds = self._decode_feeds(cache, group)
        feeds[0]["indices"][0, 0] = pos
        k_out, v_out, h_out = self._out_index
        for layer, layer_cache, feed in zip(self.layers, cache.layers, feeds, strict=True):
            feed["input"] = x
            outs = layer.run(None, feed, shape_group=group.gid)
            layer_cache.write_row(pos, outs[k_out], outs[v_out])
            x = outs[h_out]
        cache.commit(pos, [token_id])
        return x

    def _decode_feeds(self, cache: SequenceCache, group: DecodeGroup) -> list[dict[str, np.ndarray]]:
        """Per-layer decode feeds of one group, bound to this cache's buffers."""
        feeds = cache.decode_feeds.get(group.gid)
        if feeds is None:
            indices = np.zeros((1, 1), dtype=self.indices_dtype)  # shared by every layer
            mask = cache.decode_mask_for(group.capacity)
            feeds = []
            for layer_cache in cache.layers:
                k_all, v_all = layer_cache.history(group.capacity)
                feeds.append({"K_cache": k_all, "V_cache": v_all, "indices": indices, "mask": mask})
            cache.decode_feeds[group.gid] = feeds
        return feeds

    def free_cache(self, cache: SequenceCache) -> None:
        """Host caches are ordinary arrays: nothing to free on a device."""

    def save_rows(self, cache: SequenceCache, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """A copy of every layer's first ``n`` K and V rows (a kept prefix, see ``LLMRunner``)."""
        return [(k.copy(), v.copy()) for k, v in (layer.history(n) for layer in cache.layers)]

    def load_rows(self, cache: SequenceCache, rows: list[tuple[np.ndarray, np.ndarray]], n: int) -> None:
        """Write the first ``n`` of saved rows into a cache's first rows, in place (bound buffers
        stay bound)."""
        for layer, (keys, values) in zip(cache.layers, rows, strict=True):
            layer.write(0, keys[:, :n], values[:, :n])

    def close(self) -> None:
        """Unload every layer and the post model (before a reload or after a card reboot)."""
        for session in [*self.layers, self.post]:
            session.close()

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """Final norm and LM head: float32 logits over the vocabulary."""
        out = self.post.run(None, {self._post_input: hidden.astype(self.post_dtype, copy=False)})
        return np.asarray(out[0], dtype=np.float32).reshape(-1)


def plan_layers(layers: list[Session], args: ModelArgs) -> GroupPlan:
    """The groups every layer offers, checked against ``config.json``; refuses a bundle that differs."""
    if count_groups(layers[0]) is None:
        kv_len = args.kv_cache_len or DEFAULT_KV_CACHE_LEN
        chunks = args.max_prefill_chunks or kv_len // args.prefill_chunk
        plan = plan_dynamic(kv_len, args.prefill_chunk, chunks, args.kv_dim)
        names = {t.name for t in layers[0].get_inputs(0)}
        missing = [n for n in IN_NAMES if n not in names]
        if missing:
            raise BundleShapeError(f"{layers[0].path} has no inputs named {missing}")
        return plan
    reference: GroupPlan | None = None
    for layer in layers:
        plan = plan_static(layer.path, declared_groups(layer), args.hidden_size, args.kv_dim)
        if reference is None:
            reference = plan
        else:
            same_groups(layer.path, plan, reference, layers[0].path)
    assert reference is not None
    return reference


def describe_bundle(bundle_dir: Path, backend: str = "auto") -> str:
    """What a bundle's layers offer, each layer opened and closed in turn (for ``appliance check``)."""
    args = ModelArgs.load(bundle_dir)
    concrete = resolve_backend(bundle_dir, backend)
    files = find_bundle_files(bundle_dir, args.num_hidden_layers, EXTENSIONS[concrete])
    reference: GroupPlan | None = None
    first = ""
    for stem in files.layer_stems:
        session = open_session(bundle_dir, stem, concrete, threads=1)
        try:
            plan = plan_layers([session], args)
            if reference is None:
                reference, first = plan, session.path
            else:
                same_groups(session.path, plan, reference, first)
        finally:
            session.close()
    assert reference is not None
    return f"{concrete}, {reference.describe()}"
