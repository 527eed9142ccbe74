"""Smoke runs of bench/ingest.py and bench/scale.py: they run end to end against their
own Mosquitto and print the JSON their docs promise. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.broker, pytest.mark.timeout(400)]


def _run(args: list[str], timeout: float) -> dict:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_ingest_smoke(mosquitto_bin: str) -> None:
    out = _run(["bench/ingest.py", "--smoke", "--timeout", "150"], timeout=300)
    assert out["smoke"] is True
    for key in ("dense_1m_updates_per_s", "dense_1m_limit_ratio"):
        assert key in out
    assert out["dense_10k_updates_per_s"] > 0
    assert out["dense_10k_limit_ratio"] > 0
    assert out["dense_10k_in_process_updates_per_s"] > 0
    assert out["dense_10k_floor_updates_per_s"] > 0  # the transport floor ran through its broker
    assert out["dense_10k_limit_ratio_lower_bound"] > 0


def test_ingest_smoke_sharded(mosquitto_bin: str) -> None:
    out = _run(["bench/ingest.py", "--smoke", "--workers", "2", "--timeout", "150"], timeout=300)
    assert out["workers"] == 2
    assert out["dense_10k_updates_per_s"] > 0
    assert out["cpu_ms_per_update"] > 0 and out["root_merge_ms"] > 0  # the root and both workers measured
    for key in ("dense_1m_updates_per_s", "dense_1m_limit_ratio"):
        assert key in out


def test_scale_smoke(mosquitto_bin: str) -> None:
    out = _run(["bench/scale.py", "--slaves", "20", "--rounds", "2", "--timeout", "150"], timeout=300)
    assert out["slaves"] == 20
    assert out["rounds"] == 2
    assert out["round_p50_seconds"] > 0
    assert out["updates_per_round"] == [20, 20]
    for key in ("round_p99_seconds", "master_cpu_seconds_per_round", "master_peak_rss_mb", "broker_peak_rss_mb"):
        assert key in out
    assert all(r.get("rejected") == 0 for r in out["host_reports"])
