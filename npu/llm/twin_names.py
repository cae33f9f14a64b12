"""The twin graph's contract: its file name and tensor names, written by ``npu.convert`` and run
by ``npu.llm.twin_stack``."""

from __future__ import annotations

TWIN_INPUTS = ("input", "seqlens_k", "total_sequence_length")


def twin_file_name(prefix: str) -> str:
    """The twin graph of a bundle whose layer files are ``<prefix>_p<chunk>_l<i>_together.onnx``."""
    return f"{prefix}_twin.onnx"


def weights_file_name(prefix: str) -> str:
    """The weights file the bundle's graphs share."""
    return f"{prefix}_weights.bin"


def past_names(i: int) -> tuple[str, str]:
    """Layer ``i``'s cache fed in (key, value)."""
    return f"past_key_{i}", f"past_value_{i}"


def present_names(i: int) -> tuple[str, str]:
    """Layer ``i``'s cache bound as output, the same buffers as ``past_names(i)``."""
    return f"present_key_{i}", f"present_value_{i}"
