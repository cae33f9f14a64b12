"""The layer stack with its KV cache, hidden states and masks resident on the card (pyaxcl).

Through PyAXEngine every decode token ships each layer's whole K and V cache to the card and its
outputs back (about 13 MB per token for Qwen2.5-0.5B). Here, as in ax-llm's card build
(``LLM_decode.cpp`` with ``ax_model_runner_axcl.cpp``), the appliance owns the device buffers:

- each conversation's K and V rows live in one device buffer per layer, bound as ``K_cache`` /
  ``V_cache`` of every group (a group reads the first rows it declares), cleared once at
  allocation; after each layer runs, its new rows are copied device to device into the cache at
  their slot, so history is never uploaded again, prefill chunks included;
- the hidden state passes from layer to layer on the card through two buffers in turn, and the
  post model reads the last one where it lies;
- ``indices`` and the prefill masks are one device buffer per group shared by all layers; a
  decode token's embedding row, position and mask share one buffer per conversation and decode
  capacity (``DecodeBlock``), so a token is one upload, and the logits the one download.

Each conversation binds its own IO per (layer, group) once, so switching between conversations
costs no binding calls. A cache that does not fit the card's memory is refused with how much it
needs; closing frees every buffer and IO (a recovery, a reload and a shutdown leave nothing).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from npu.llm.kv_cache import CacheMemoryError, SequenceCache, prefill_feeds
from npu.llm.model_args import ModelArgs
from npu.llm.shape_groups import GroupPlan, PrefillGroup
from npu.runtime.axcl_backend import AxclDevice, AxclModel, DeviceBuffer, DeviceMemoryError

logger = logging.getLogger(__name__)


@dataclass
class DeviceLayerCache:
    """One layer's K and V rows on the card, ``(1, capacity, kv_dim)`` each."""

    keys: DeviceBuffer
    values: DeviceBuffer
    capacity: int
    row_bytes: int

    @property
    def nbytes(self) -> int:
        return self.keys.size + self.values.size

    def free(self) -> None:
        self.keys.free()
        self.values.free()


@dataclass(frozen=True)
class DeviceHidden:
    """Where a hidden state lies on the card; valid until the stack runs another step."""

    stamp: int


ALIGN = 128  # ax-llm aligns the card's buffers to 128 bytes (AX_CMM_ALIGN_SIZE)


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class DecodeBlock:
    """What a decode token uploads, in one device buffer: embedding row, position, mask.

    Layer 0's ``input``, every layer's ``indices`` and ``mask`` of one decode group are bound
    to parts of it, so a token costs one host-to-device copy: the embedding, the position and
    the mask up to the token's row (the mask's last column, the token itself, never changes).
    """

    buffer: DeviceBuffer
    staging: np.ndarray  # uint8, the same layout on the host
    index_at: int
    mask_at: int
    rows: int
    stale: bool = True  # upload all of it next time (new, or rows were forgotten)


class DeviceSequenceCache(SequenceCache):
    """A sequence's device rows, its decode blocks and its bound IOs."""

    def __init__(self, layers: list[DeviceLayerCache], dtype: np.dtype, device: AxclDevice) -> None:
        super().__init__(layers, dtype)  # type: ignore[arg-type]
        self.device_layers = layers
        self.device = device
        self.blocks: dict[int, DecodeBlock] = {}  # by decode capacity
        self.ios: dict[tuple[int, int], int] = {}  # (layer, group) -> io, made on first use

    def trim(self, n: int) -> None:
        super().trim(n)
        for block in self.blocks.values():
            block.stale = True

    def block(self, rows: int, embed_bytes: int, index_dtype: np.dtype) -> DecodeBlock:
        found = self.blocks.get(rows)
        if found is None:
            mask = self.decode_mask_for(rows)
            index_at = _aligned(embed_bytes)
            mask_at = index_at + _aligned(index_dtype.itemsize)
            size = mask_at + mask.nbytes
            found = DecodeBlock(self.device.malloc(size, "a decode block"), np.zeros(size, np.uint8),
                                index_at, mask_at, rows)
            self.blocks[rows] = found
        return found

    def upload_token(self, block: DecodeBlock, embed: np.ndarray, pos: int, index_dtype: np.dtype) -> None:
        """One host-to-device copy: the embedding row, the position and the mask up to ``pos``."""
        staging = block.staging
        staging[: embed.nbytes] = np.ascontiguousarray(embed).view(np.uint8).reshape(-1)
        position = np.array([pos], index_dtype).view(np.uint8)
        staging[block.index_at : block.index_at + position.size] = position
        mask = self.decode_mask_for(block.rows)
        width = mask.itemsize
        end = block.mask_at + (mask.size if block.stale else pos + 1) * width
        staging[block.mask_at : end] = mask.reshape(-1)[: (end - block.mask_at) // width].view(np.uint8)
        self.device.upload(block.buffer.ptr, staging[:end])
        block.stale = False

    def release(self, models: Sequence[AxclModel]) -> None:
        for (layer, _), io in self.ios.items():
            models[layer].drop_io(io)
        self.ios.clear()
        for layer in self.device_layers:
            layer.free()
        for block in self.blocks.values():
            block.buffer.free()
        self.blocks.clear()


class ResidentLayerStack:
    """The decoder layers and the post model of a bundle on one card, buffers owned on the card."""

    def __init__(self, layers: list[AxclModel], post: AxclModel, args: ModelArgs, plan: GroupPlan) -> None:
        self.layers, self.post, self.args, self.plan = layers, post, args, plan
        self.device = layers[0].device
        self.chunk = plan.chunk
        self.kv_cache_len = plan.capacity
        self.max_prefill_chunks = len(plan.prefill)
        first = layers[0]
        decode = {t.name: t for t in first.get_inputs(plan.decode[0].gid)}
        self.dtype, self.cache_dtype = decode["input"].dtype, decode["K_cache"].dtype
        self.mask_dtype, self.indices_dtype = decode["mask"].dtype, decode["indices"].dtype
        self.row_bytes = args.kv_dim * self.cache_dtype.itemsize
        self.embed_bytes = args.hidden_size * self.dtype.itemsize
        self.index = {n: first.input_index(n) for n in ("K_cache", "V_cache", "indices", "input", "mask")}
        self.out_index = {n: first.output_index(n) for n in ("K_cache_out", "V_cache_out", "output")}
        self._caches: list[DeviceSequenceCache] = []
        self._stamp = 0
        self._buffers: list[DeviceBuffer] = []
        try:
            self._allocate()
        except BaseException:
            self._free_shared()
            raise

    def _alloc(self, size: int, what: str, *, zero: bool = False) -> DeviceBuffer:
        buffer = self.device.malloc(size, what)
        self._buffers.append(buffer)
        if zero:
            buffer.zero()
        return buffer

    def _allocate(self) -> None:
        hidden_bytes = self.chunk * self.args.hidden_size * self.dtype.itemsize
        self.hidden = [self._alloc(hidden_bytes, "hidden states") for _ in range(2)]
        self.k_out = self._alloc(self.chunk * self.row_bytes, "new K rows")
        self.v_out = self._alloc(self.chunk * self.row_bytes, "new V rows")
        self.group_indices: dict[int, DeviceBuffer] = {}
        self.prefill_masks: dict[int, DeviceBuffer] = {}
        self.placeholders: dict[int, DeviceBuffer] = {}
        for group in self.plan.prefill:
            self.group_indices[group.gid] = self._alloc(group.chunk * self.indices_dtype.itemsize, "indices")
            mask_bytes = group.chunk * group.total * self.mask_dtype.itemsize
            self.prefill_masks[group.gid] = self._alloc(mask_bytes, "prefill mask")
            if not group.history:
                shape = group.placeholder or (1, 1, self.args.kv_dim)
                size = math.prod(shape) * self.cache_dtype.itemsize
                self.placeholders[group.gid] = self._alloc(size, "history placeholder", zero=True)
        post_in, post_out = self.post.get_inputs(0)[0], self.post.get_outputs(0)[0]
        self.logits_host = np.empty(post_out.shape, post_out.dtype)  # type: ignore[arg-type]
        self.logits_device = self._alloc(self.logits_host.nbytes, "logits")
        last = self.hidden[len(self.layers) % 2]
        if post_in.dtype != self.dtype:
            raise ValueError(f"{self.post.path} takes {post_in.dtype}, the layers give {self.dtype}")
        self.post_io = self.post.new_io()
        self.post.bind(self.post_io, inputs={0: last}, outputs={0: self.logits_device})

    @property
    def backend(self) -> str:
        return "axcl"

    @property
    def max_prompt_tokens(self) -> int:
        return self.plan.max_prompt_tokens

    # caches -------------------------------------------------------------------------------------
    def new_cache(self) -> DeviceSequenceCache:
        size = self.kv_cache_len * self.row_bytes
        layers: list[DeviceLayerCache] = []
        try:
            for _ in self.layers:
                keys = self.device.malloc(size, "a KV cache")
                try:
                    values = self.device.malloc(size, "a KV cache")
                except DeviceMemoryError:
                    keys.free()
                    raise
                layer = DeviceLayerCache(keys, values, self.kv_cache_len, self.row_bytes)
                layers.append(layer)
                keys.zero()
                values.zero()
        except DeviceMemoryError as exc:
            for layer in layers:
                layer.free()
            total = 2 * size * len(self.layers) / 2**20
            raise CacheMemoryError(
                f"the card's memory is full: one more conversation's KV cache needs {total:.0f} MiB "
                f"({exc}); lower engine.max_active or preload fewer models"
            ) from exc
        cache = DeviceSequenceCache(layers, self.mask_dtype, self.device)
        self._caches.append(cache)
        return cache

    def free_cache(self, cache: SequenceCache) -> None:
        if isinstance(cache, DeviceSequenceCache) and cache in self._caches:
            self._caches.remove(cache)
            cache.release(self.layers)

    def _io(self, cache: DeviceSequenceCache, layer: int, gid: int, history: int) -> int:
        io = cache.ios.get((layer, gid))
        if io is not None:
            return io
        model, rows = self.layers[layer], cache.device_layers[layer]
        if history or gid not in self.placeholders:
            k: DeviceBuffer = rows.keys
            v: DeviceBuffer = rows.values
        else:
            k = v = self.placeholders[gid]
        i, o = self.index, self.out_index
        hidden_in: DeviceBuffer | tuple[int, int] = self.hidden[layer % 2]
        if gid in self.prefill_masks:
            indices: DeviceBuffer | tuple[int, int] = self.group_indices[gid]
            mask: DeviceBuffer | tuple[int, int] = self.prefill_masks[gid]
        else:  # a decode group: parts of this conversation's decode block of that capacity
            capacity = next(d.capacity for d in self.plan.decode if d.gid == gid)
            block = cache.block(capacity, self.embed_bytes, self.indices_dtype)
            base, size = block.buffer.ptr, block.buffer.size
            indices = (base + block.index_at, size - block.index_at)
            mask = (base + block.mask_at, size - block.mask_at)
            if layer == 0:
                hidden_in = (base, size)
        io = model.new_io()
        cache.ios[(layer, gid)] = io
        model.bind(
            io,
            inputs={i["K_cache"]: k, i["V_cache"]: v, i["indices"]: indices,
                    i["input"]: hidden_in, i["mask"]: mask},
            outputs={o["K_cache_out"]: self.k_out, o["V_cache_out"]: self.v_out,
                     o["output"]: self.hidden[(layer + 1) % 2]},
        )
        return io

    def save_rows(self, cache: SequenceCache, n: int) -> list[tuple[DeviceBuffer, DeviceBuffer]]:
        """A copy of every layer's first ``n`` K and V rows, on the card (copied device to device;
        freed with the stack)."""
        assert isinstance(cache, DeviceSequenceCache)
        size = n * self.row_bytes
        saved = []
        for rows in cache.device_layers:
            keys, values = self._alloc(size, "a kept prefix"), self._alloc(size, "a kept prefix")
            self.device.copy(keys.ptr, rows.keys.ptr, size)
            self.device.copy(values.ptr, rows.values.ptr, size)
            saved.append((keys, values))
        return saved

    def load_rows(self, cache: SequenceCache, saved: list[tuple[DeviceBuffer, DeviceBuffer]], n: int) -> None:
        """Copy the first ``n`` saved rows into a cache's first rows, device to device."""
        assert isinstance(cache, DeviceSequenceCache)
        for rows, (keys, values) in zip(cache.device_layers, saved, strict=True):
            self.device.copy(rows.keys.ptr, keys.ptr, n * self.row_bytes)
            self.device.copy(rows.values.ptr, values.ptr, n * self.row_bytes)

    # steps --------------------------------------------------------------------------------------
    def _run_layers(self, cache: DeviceSequenceCache, gid: int, history: int, start: int, n: int) -> None:
        for index, (model, rows) in enumerate(zip(self.layers, cache.device_layers, strict=True)):
            model.execute(gid, self._io(cache, index, gid, history))
            offset = start * self.row_bytes
            self.device.copy(rows.keys.ptr + offset, self.k_out.ptr, n * self.row_bytes)
            self.device.copy(rows.values.ptr + offset, self.v_out.ptr, n * self.row_bytes)
        self._stamp += 1

    def prefill_chunk(self, cache: SequenceCache, token_ids: list[int], embeds: np.ndarray) -> DeviceHidden:
        """Up to ``chunk`` tokens at ``cache.offset``; the history is the rows already on the card."""
        assert isinstance(cache, DeviceSequenceCache)
        start, n, size = cache.offset, len(token_ids), self.chunk
        if start % size or not 0 < n <= size:
            raise ValueError(f"prefill chunk must start on a multiple of {size} and hold 1..{size} tokens")
        if start + n > cache.capacity:
            raise ValueError(f"KV cache full: {start + n} rows needed, {cache.capacity} available")
        group: PrefillGroup = self.plan.prefill_for(start)
        hist = group.history
        x = np.zeros((1, size, self.args.hidden_size), dtype=self.dtype)
        x[0, :n] = embeds
        indices, mask = prefill_feeds(start, n, size, hist, self.mask_dtype, self.indices_dtype)
        self.device.upload(self.hidden[0].ptr, x)
        self.device.upload(self.group_indices[group.gid].ptr, indices)
        self.device.upload(self.prefill_masks[group.gid].ptr, mask)
        self._run_layers(cache, group.gid, hist, start, n)
        cache.commit(start, token_ids)
        if n > 1:  # the post model reads the first row of the last layer's output
            last = self.hidden[len(self.layers) % 2]
            row = self.args.hidden_size * self.dtype.itemsize
            self.device.copy(last.ptr, last.ptr + (n - 1) * row, row)
        return DeviceHidden(self._stamp)

    def decode(self, cache: SequenceCache, token_id: int, embed: np.ndarray) -> DeviceHidden:
        """One token at ``cache.offset`` on the smallest decode group that holds it."""
        assert isinstance(cache, DeviceSequenceCache)
        pos = cache.offset
        if pos >= self.kv_cache_len:
            raise ValueError(f"KV cache full ({self.kv_cache_len} rows)")
        group = self.plan.decode_for(pos + 1)
        block = cache.block(group.capacity, self.embed_bytes, self.indices_dtype)
        cache.upload_token(block, embed.reshape(-1).astype(self.dtype, copy=False), pos, self.indices_dtype)
        self._run_layers(cache, group.gid, group.capacity, pos, 1)
        cache.commit(pos, [token_id])
        return DeviceHidden(self._stamp)

    def logits(self, hidden: DeviceHidden) -> np.ndarray:
        """The post model on the last hidden state where it lies; float32 logits."""
        if not isinstance(hidden, DeviceHidden) or hidden.stamp != self._stamp:
            raise RuntimeError("the hidden state on the card was overwritten by another step")
        self.post.execute(0, self.post_io)
        self.device.download(self.logits_host, self.logits_device.ptr)
        return self.logits_host.astype(np.float32).reshape(-1)

    # lifetime -----------------------------------------------------------------------------------
    def _free_shared(self) -> None:
        for buffer in self._buffers:
            buffer.free()
        self._buffers.clear()

    def close(self) -> None:
        """Free every cache, IO and buffer, then unload the models."""
        for cache in list(self._caches):
            self.free_cache(cache)
        self._free_shared()
        for model in [*self.layers, self.post]:
            model.close()
