"""Smoke run of bench/stragglers.py: 2 slaves (one 5x slower), 2 versions per strategy,
real processes over a Mosquitto of its own. It finishes, cleans up and prints its JSON
summary with the documented keys; nothing about timings is asserted (0.90 is never
reached in 2 versions, so the seconds are null)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.broker]

ROOT = Path(__file__).resolve().parents[2]
KEYS = {"sync_seconds_to_090", "fedbuff_seconds_to_090", "gradpush_seconds_to_090",
        "ratio_fedbuff_to_sync", "ratio_gradpush_to_sync", "sync_final_accuracy", "fedbuff_final_accuracy",
        "gradpush_final_accuracy", "slow", "slowdown", "seconds_per_pass", "runs"}


@pytest.mark.timeout(600)  # nine process starts (torch imports): slow on a loaded machine
def test_stragglers_smoke(mosquitto_bin: str, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "stragglers.py"), "--smoke", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=540, cwd=ROOT)
    assert proc.returncode == 0, f"stragglers.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert KEYS <= out.keys()
    assert out["smoke"] is True and out["slaves"] == 2 and out["slow"] == ["slave-01"]
    for name in ("sync", "fedbuff", "gradpush"):
        run = out["runs"][name]
        assert run["versions"] == 2 and run["master_exit"] == 0, run
        assert run["t_first_round"] is not None and len(run["received_at"]) == 2
        assert out[f"{name}_final_accuracy"] is not None
    assert (tmp_path / "stragglers.json").exists()
