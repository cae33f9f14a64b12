"""A numeric parameter's documented range, and the sentence that refuses a value outside it.

One ``Bound`` per parameter is shared by the engine-side params (``npu/llm/params.py``,
``npu/diffusion/params.py``) and the pydantic models of both front doors, so the range a client
reads in a refusal is the range the code enforces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Bound:
    """``low``..``high`` (each end open or closed), finite values only.

    Args:
        text: the range in words, as a refusal says it (``"from 0 (greedy) to 2"``).
        random: a value that means "draw one" (``-1`` for seeds) and is accepted as ``None``.
    """

    low: float
    high: float
    text: str
    low_open: bool = False
    high_open: bool = False
    random: int | None = None

    def admits(self, value: float) -> bool:
        if isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value)):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def must_be(self) -> str:
        return f"must be {self.text}"
