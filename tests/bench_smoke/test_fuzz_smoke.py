"""Smoke run of bench/fuzz.py: 2000 hostile messages against a live master and two live
slaves over a Mosquitto of its own. No daemon crashes (exits or logs a traceback), the
master's model changes only through honest rounds and the slaves adopt only models the
master published, and the job goes on afterwards. Memory is not asserted: the numbers of
the long run are in docs/BENCHMARKS.md, "Fuzzing live daemons"."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.broker]

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(900)  # three daemon starts (torch imports) and a capture phase: slow on a loaded machine
def test_fuzz_smoke(mosquitto_bin: str, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "fuzz.py"), "--messages", "2000", "--seed", "1",
                           "--settle", "2", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=840, cwd=ROOT)
    assert proc.returncode == 0, f"fuzz.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["messages"] >= 2000
    assert out["crashes"] == 0, json.dumps(out["crash_details"], indent=1)[:6000]
    assert out["model_changes"] == 0, json.dumps(out["violations"], indent=1)[:6000]
    assert out["versions_checked"] > 0 and out["progress_after_fuzz"], out
    assert {"rss_growth_mb", "rss_peak_growth_mb"} <= out.keys()
    # every family of hostile input was played, and the master saw and refused it
    assert len(out["games"]) >= 30, out["games"]
    assert sum(out["master_rejected"].values()) > 500, out["master_rejected"]
