"""Will the resident models fit the card's CMM? A plan checked before anything is loaded.

A bundle's size on disk is a fair estimate of the CMM its weights take; the runtime also needs
IO buffers and the KV cache, hence the reserve.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RESERVE_MIB = 512.0


def bundle_mib(path: Path) -> float:
    """The compiled models' size on disk, a fair estimate of the card memory their weights take.

    Only ``.axmodel`` files go to the card (the embedding table and the tokenizer stay on the
    host); a CPU-twin bundle without them counts every file.
    """
    files = [f for f in Path(path).rglob("*") if f.is_file()]
    compiled = [f for f in files if f.suffix == ".axmodel"]
    return sum(f.stat().st_size for f in compiled or files) / 2**20


@dataclass(frozen=True)
class CmmPlan:
    needs_mib: dict[str, float]
    total_mib: float | None
    free_mib: float | None
    reserve_mib: float = RESERVE_MIB

    @property
    def need_mib(self) -> float:
        return sum(self.needs_mib.values())

    @property
    def fits(self) -> bool | None:
        """``None`` when the card's CMM is unknown (no card, or an unreadable tool)."""
        if self.total_mib is None:
            return None
        return self.need_mib + self.reserve_mib <= self.total_mib

    def describe(self) -> str:
        parts = ", ".join(f"{name} {mib:.0f}" for name, mib in self.needs_mib.items()) or "nothing"
        if self.total_mib is None:
            return f"models need about {self.need_mib:.0f} MiB ({parts}); the card's CMM is unknown here"
        verdict = "fits" if self.fits else "DOES NOT FIT"
        free = f", {self.free_mib:.0f} MiB free now" if self.free_mib is not None else ""
        return (f"models need about {self.need_mib:.0f} MiB ({parts}) + {self.reserve_mib:.0f} MiB reserve "
                f"of {self.total_mib:.0f} MiB{free}: {verdict}")
