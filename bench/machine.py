"""What machine a benchmark ran on, and how busy it was: shared by the scripts in bench/.

CPU flags come from retrieval.embedding.devices.cpu_flags, the reading the precision choice
itself uses, so a report names exactly the features clipdex decided on.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as plain scripts

from retrieval.embedding.devices import cpu_flags  # noqa: E402  (no torch: a text file is read)

# The features that decide bf16 / int8 speed.
FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def flags_of_interest() -> list[str]:
    return [flag for flag in FLAGS_OF_INTEREST if flag in cpu_flags()]


def machine_facts() -> dict[str, Any]:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    present = cpu_flags()
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "flags": {flag: flag in present for flag in FLAGS_OF_INTEREST},
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def busy_cpu_seconds() -> float | None:
    """CPU-seconds the whole machine has been busy since boot (steal included: time taken from
    us), from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
