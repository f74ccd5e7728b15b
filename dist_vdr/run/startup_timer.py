"""Time to first step, by phase: what a user waits for between launch and step 1.

Each rank's process start is read from the kernel (Linux /proc), so the imports count. The phases
are marked by ``run_training`` as it goes; the first optimizer step closes the record, which rank 0
logs in one line and writes to ``<output_dir>/startup_times.json`` (``dist-vdr bench startup``
reads it).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def process_start_time() -> float:
    """Epoch seconds at which this process started (Linux); now elsewhere."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration, IndexError):
        return time.time()


class Phases:
    def __init__(self) -> None:
        self.start = process_start_time()
        self.last = self.start
        self.times: dict[str, float] = {}
        self.notes: dict[str, object] = {}

    def mark(self, name: str) -> None:
        """The phase ``name`` ends now (it began where the previous one ended)."""
        now = time.time()
        self.times[name] = self.times.get(name, 0.0) + now - self.last
        self.last = now

    @property
    def total(self) -> float:
        return self.last - self.start

    def line(self) -> str:
        parts = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.times.items())
        return f"time to first step {self.total:.1f} s ({parts})"

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"total_s": self.total, "phases_s": self.times, **self.notes}, indent=2))
        os.replace(tmp, path)
