"""One weights file a bundle's graphs share (ONNX external data), each tensor stored once.

A CPU bundle holds the same weights twice over: the per-layer graphs (AXERA's contract, what
the simulated card and ``appliance check`` open) and the twin graph (every layer in one model,
what the CPU runs). Both point into one file instead, by offset; a tensor whose bytes were
written already (the same weight in the other graph, the rotary tables every layer repeats) is
not written again. Offsets are page-aligned so ONNX Runtime can map the file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import onnx
from onnx import external_data_helper

ALIGN = 4096
MIN_BYTES = 1024  # smaller tensors (shapes, axes, norms of tiny models) stay inside their graph


class WeightFile:
    """Appends tensors to ``path`` and points graphs at them; use as a context manager."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fh = self.path.open("wb")
        self._stored: dict[bytes, tuple[int, int]] = {}
        self.written = 0

    def __enter__(self) -> WeightFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def externalize(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """Move ``model``'s large initializers into the file (in place); returns ``model``."""
        self.store(model.graph.initializer)
        return model

    def store(self, tensors: Iterable[onnx.TensorProto]) -> None:
        """Move each large tensor's bytes into the file (once per content) and point it there."""
        for tensor in tensors:
            self._store(tensor)

    def _store(self, tensor: onnx.TensorProto) -> None:
        data = tensor.raw_data
        if len(data) < MIN_BYTES or tensor.data_location == onnx.TensorProto.EXTERNAL:
            return
        key = hashlib.blake2b(data, digest_size=20, person=b"npu-weights").digest() + \
            repr((tensor.data_type, tuple(tensor.dims))).encode()
        where = self._stored.get(key)
        if where is None:
            pad = -self.written % ALIGN
            self._fh.write(b"\0" * pad)
            where = self._stored[key] = (self.written + pad, len(data))
            self._fh.write(data)
            self.written += pad + len(data)
        external_data_helper.set_external_data(tensor, self.path.name, offset=where[0], length=where[1])
        tensor.data_location = onnx.TensorProto.EXTERNAL
        tensor.ClearField("raw_data")
