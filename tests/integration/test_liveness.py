"""An operator's view of a running job: `fedmq status` while it trains, and after its master dies (kill -9)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedmq.demo import LocalFleet

from support import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.broker]


def status(broker, *args: str) -> tuple[int, list]:
    out = subprocess.run([sys.executable, "-m", "fedmq", "status", "--broker", f"127.0.0.1:{broker.port}", "--json",
                          "--timeout", "5", *args], capture_output=True, text=True, timeout=60)
    return out.returncode, (json.loads(out.stdout) if out.stdout.strip().startswith("[") else [])




def _job(report: list) -> dict:
    jobs = report if isinstance(report, list) else []
    return next((j for j in jobs if j.get("job") == "digits"), {})


@pytest.mark.timeout(300)
def test_status_shows_the_job_and_reports_its_master_gone_after_kill_9(mosquitto, tmp_path: Path) -> None:
    fleet = LocalFleet(tmp_path / "fleet", mosquitto.settings, slaves=2, rounds=500,
                       job={"rounds": {"min_slaves": 2, "deadline": 30.0}})
    try:
        fleet.start_all()

        def training() -> dict | None:
            code, report = status(mosquitto)
            job = _job(report)
            return job if code == 0 and job.get("version", 0) >= 1 else None

        job = wait_for(training, 180, "the job at version 1 in `fedmq status`")
        assert job["state"] == "training" and job["slaves_enrolled"] == 2 and job["slaves_online"] == 2
        fleet.signal("master", signal.SIGKILL)
        killed = time.monotonic()

        def gone() -> dict | None:
            code, report = status(mosquitto, "--job", "digits")
            return _job(report) if code == 3 else None

        job = wait_for(gone, 120, "`fedmq status` to report the master gone")
        print(f"\nmaster reported gone {time.monotonic() - killed:.1f} s after kill -9: {job.get('master')}")
        assert job.get("master") == "gone"
    finally:
        fleet.stop_all()
