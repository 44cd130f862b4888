"""One measured figure of a benchmark: its samples, their median, and its row beside a baseline."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


@dataclass
class Figure:
    """Repeated measurements of one thing, in seconds."""

    name: str
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def row(self, baseline: Figure | None = None) -> str:
        ratio = f"{self.median / baseline.median:.1f}x" if baseline and baseline.median else ""
        return (f"| {self.name} | {self.median:.3f} | {min(self.samples):.3f} | {max(self.samples):.3f} "
                f"| {len(self.samples)} | {ratio} |")
