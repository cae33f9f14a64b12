"""GGUF -> ONNX model-bundle converter (the CPU twin of AXERA's per-layer layout)."""

from npu.convert.bundle_writer import bundle_is_current, convert_gguf
from npu.convert.gguf_source import SUPPORTED_ARCHITECTURES

__all__ = ["SUPPORTED_ARCHITECTURES", "bundle_is_current", "convert_gguf"]
