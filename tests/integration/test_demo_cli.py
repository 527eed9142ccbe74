"""`fedmq demo` as a user runs it: from any directory, telling how to watch it, leaving a report and a picture."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedmq.demo import PICTURE, REPORT, DemoOptions, run_demo

pytestmark = [pytest.mark.slow, pytest.mark.broker, pytest.mark.timeout(240)]

FEDMQ = Path(sys.executable).parent / "fedmq"  # the console script of this environment


def _clone_folder(where: Path) -> None:
    """What `git clone .../fedmq` leaves: a folder named fedmq without an __init__.py."""
    (where / "fedmq" / "common").mkdir(parents=True)
    (where / "fedmq" / "README.md").write_text("# fedmq\n")


def test_demo_runs_from_the_folder_above_a_clone(tmp_path: Path, mosquitto_bin: str) -> None:
    _clone_folder(tmp_path)
    proc = subprocess.run([str(FEDMQ), "demo", "--slaves", "2", "--rounds", "2", "--report", "out"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=200)
    logs = "\n".join(p.read_text(errors="replace") for p in (tmp_path / "out" / "logs").glob("*.log"))
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs
    assert "cannot import name" not in logs
    out = proc.stdout
    watch = re.search(r"watch it live: mosquitto_sub -p (\d+) -t 'fedmq/#' -v\n", out)
    assert watch, out
    assert out.index("watch it live") < out.index("round version"), "the watch command comes at the start"
    report = json.loads((tmp_path / "out" / REPORT).read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert report["broker"]["port"] == int(watch.group(1))
    picture = tmp_path / "out" / PICTURE
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_is_rewritten_after_every_round(tmp_path: Path, mosquitto_bin: str) -> None:
    """And the children ignore a `fedmq` folder in their working directory (-P)."""
    root = tmp_path / "report"
    _clone_folder(root)
    seen: list[list[int]] = []
    started = []

    def on_row(row: dict) -> None:
        seen.append([r["round"] for r in json.loads((root / REPORT).read_text())["rounds"]])

    result = run_demo(DemoOptions(slaves=1, rounds=2, report=root, broker_kind="mosquitto", timeout=180),
                      on_row=on_row, on_start=started.append)
    assert result.master_exit == 0, (root / "logs" / "master.log").read_text(errors="replace")
    assert seen == [[1], [1, 2]]
    assert started and started[0]["watch"] == f"mosquitto_sub -p {started[0]['port']} -t 'fedmq/#' -v"
    assert not list(root.glob("*.tmp"))


def test_demo_with_compression_reports_deltas_and_small_updates(tmp_path: Path, mosquitto_bin: str) -> None:
    """`fedmq demo --compression topk`: updates travel top-k, the model as deltas; the report says so."""
    proc = subprocess.run([str(FEDMQ), "demo", "--slaves", "2", "--rounds", "3", "--report", "out",
                           "--compression", "topk"], cwd=tmp_path, capture_output=True, text=True, timeout=200)
    logs = "\n".join(p.read_text(errors="replace") for p in (tmp_path / "out" / "logs").glob("*.log"))
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs
    assert "compression topk" in proc.stdout and "bytes up " in proc.stdout and "master published" in proc.stdout
    report = json.loads((tmp_path / "out" / REPORT).read_text())
    assert report["compression"] == "topk" and report["compression_settings"]["uplink"]["topk"] == 0.01
    rows = report["rounds"]
    assert all(r["traffic"]["up"]["update"] == r["bytes_up"] for r in rows)  # both count what the slaves sent
    assert all("delta" in r["traffic"]["down"] for r in rows[1:])  # version 1 on went out as a delta
    assert report["downlink"]["deltas"] == 3 and report["traffic"]["down"]["delta"] > 0
    assert all(r["bytes_up"] < 2 * 1500 for r in rows)  # 2 top-1 % updates, not 2 x 39 KB
    assert "(delta)" in logs
