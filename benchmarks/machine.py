"""What every benchmark prints beside its figures: the processor (the machine kind changes between sessions)."""
from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    """``model name`` from /proc/cpuinfo, e.g. ``Intel(R) Xeon(R) Processor``."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"
