"""Smoke runs of the benchmarks: the scripts start, finish, clean up and print their
JSON summary with the documented keys. Tiny settings, no assertions on timings.

The Flower side of bench/vs_flower.py runs only when ``flwr`` is installed (extra
``[bench]``; it is not in ``[dev]``, see docs/BENCHMARKS.md), otherwise it is skipped.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.broker]

ROOT = Path(__file__).resolve().parents[2]

VS_FLOWER_KEYS = {
    "flower_seconds_per_round", "fedmq_seconds_per_round", "flower_seconds_to_090", "fedmq_seconds_to_090",
    "flower_bytes_up", "fedmq_bytes_up", "flower_bytes_down", "fedmq_bytes_down",
    "flower_final_accuracy", "fedmq_final_accuracy",
    "flower_slow_seconds_per_round", "fedmq_slow_seconds_per_round", "fedmq_slow_seconds_to_090",
    "fedmq_slow_bytes_up", "fedmq_slow_final_accuracy",
    "ratio_seconds_per_round", "ratio_seconds_to_090", "ratio_bytes_up", "ratio_bytes_down",
    "ratio_slow_seconds_per_round", "fedmq_master_bytes_up", "fedmq_server_peak_rss_mb",
    "fedmq_client_peak_rss_mb", "flower_engine",
    # the compressed run is fedmq_*, the uncompressed one fedmq_dense_*
    "compression", "fedmq_compression", "fedmq_dense_bytes_up", "fedmq_dense_bytes_down", "fedmq_dense_final_accuracy",
    "fedmq_dense_seconds_per_round", "fedmq_dense_seconds_to_090", "fedmq_bytes_up_to_090", "flower_bytes_up_to_090",
    "fedmq_master_traffic", "ratio_dense_bytes_up",
}

FOOTPRINT_KEYS = {
    "startup_to_connected_s", "startup_to_confirm_s", "startup_to_first_update_s", "connected_rss_mb",
    "training_peak_rss_mb", "idle_rss_mb", "idle_cpu_percent", "cpu_to_connected_s",
}


def run_script(script: str, *args: str, timeout: float = 240) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_vs_flower_fedmq_only(mosquitto_bin: str, tmp_path: Path) -> None:
    out = run_script("vs_flower.py", "--rounds", "2", "--clients", "2", "--fedmq-only", "--slow-clients", "1",
                     "--slowdown", "1.5", "--workdir", str(tmp_path))
    assert VS_FLOWER_KEYS <= out.keys()
    assert out["flower_skipped"] == "--fedmq-only" and out["flower_seconds_per_round"] is None
    assert len(out["fedmq_accuracy"]) == 2 and len(out["fedmq_slow_accuracy"]) == 2
    assert out["fedmq_same_split"] is True
    assert out["fedmq_bytes_up"] > 0 and out["fedmq_bytes_down"] > 0 and out["fedmq_master_bytes_up"] > 0
    assert out["fedmq_compression"] == out["compression"] != "none" and out["fedmq_dense_compression"] == "none"
    assert len(out["fedmq_dense_accuracy"]) == 2 and out["fedmq_dense_same_split"] is True
    assert out["fedmq_bytes_up"] < out["fedmq_dense_bytes_up"] / 10  # top-1 % updates
    assert out["fedmq_master_traffic"]["up"]["update"] > 0 and out["fedmq_downlink"]["deltas"] > 0


@pytest.mark.skipif(importlib.util.find_spec("flwr") is None, reason="flwr not installed (extra [bench])")
def test_vs_flower_both(mosquitto_bin: str, tmp_path: Path) -> None:
    out = run_script("vs_flower.py", "--rounds", "1", "--clients", "1", "--no-slow", "--workdir", str(tmp_path),
                     timeout=280)
    assert VS_FLOWER_KEYS <= out.keys()
    assert out["flower_engine"] == "deployment"
    assert len(out["flower_accuracy"]) == 1 and len(out["fedmq_accuracy"]) == 1
    assert out["flower_bytes_up"] > 0 and out["flower_bytes_down"] > 0


def test_footprint(mosquitto_bin: str, tmp_path: Path) -> None:
    out = run_script("footprint.py", "--seconds", "2", "--rounds", "2", "--workdir", str(tmp_path))
    assert FOOTPRINT_KEYS <= out.keys()
    assert out["updates_sent"] == 2
    assert all(out[k] is not None for k in FOOTPRINT_KEYS)
