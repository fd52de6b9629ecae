"""bench/scale.py measures what its probe process itself uses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHILD = (
    "import json, resource, sys; sys.path.insert(0, 'bench'); import scale; "
    "print(json.dumps([scale.peak_rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]))"
)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc only")
def test_peak_rss_of_a_probe_is_its_own_not_its_parents():
    """Linux carries the parent's high-water mark into a child's ru_maxrss: a probe started by
    a parent that had generated a large set reported the parent's peak (1169 MB at 1M)."""
    big = np.ones(400 * 2**20 // 8)  # 400 MB touched by this (the parent) process
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, cwd=ROOT, check=True)
    del big
    own, inherited = json.loads(done.stdout)
    assert inherited >= 400  # what getrusage says in the child: the parent's peak
    assert own < 300  # the child's own: Python, numpy and the bench module
