"""The benchmark script runs (smoke mode); it reports timings and gates on none of them."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO

KEYS = {"throughput_ratio_1w", "throughput_ratio_2w", "check_us", "cleanup_ms_big_heap", "help_s"}


def test_bench_quick_json() -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), "--quick", "--json"],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    data = json.loads(out.stdout)
    assert KEYS <= set(data)
    assert all(isinstance(data[k], float) and data[k] > 0 for k in KEYS)
