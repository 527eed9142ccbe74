"""A benchmark stopped with SIGTERM (or SIGINT) leaves nothing running (bench/_procs.py).

Each case starts a benchmark as a user would, waits until the processes it starts are
up (broker, master, slaves, hosts, Flower's SuperLink and SuperNodes), keeps a list
of every process below it and of the members of their process groups, signals the
benchmark once, and checks that it exits and that none of those processes survives.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.broker, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]
HAS_FLWR = importlib.util.find_spec("flwr") is not None

# bench script, its arguments (a run far longer than the test), what must be running
# below it (substrings of command lines) before it is signalled
CASES = {
    "vs_flower": ("vs_flower.py", ["--fedmq-only", "--rounds", "500", "--clients", "2", "--no-slow"],
                  ["mosquitto", "master run", "slave run"]),
    "vs_flower_sigint": ("vs_flower.py", ["--fedmq-only", "--rounds", "500", "--clients", "2", "--no-slow"],
                         ["mosquitto", "master run", "slave run"]),
    "footprint": ("footprint.py", ["--rounds", "500", "--seconds", "600"], ["mosquitto", "master run", "slave run"]),
    "stragglers": ("stragglers.py", ["--smoke", "--only", "sync", "--versions", "500", "--timeout", "600"],
                   ["mosquitto", "master run", "--device-slave"]),
    "scale": ("scale.py", ["--slaves", "4", "--per-host", "2", "--rounds", "500", "--train", "synthetic"],
              ["mosquitto", "master run", "_scale_host.py"]),
    "ingest": ("ingest.py", ["--only", "10k:dense", "--no-in-process", "--no-floor", "--no-extra", "--timeout", "600"],
               ["mosquitto", "master run", "_ingest_pub.py"]),
    "fuzz": ("fuzz.py", ["--messages", "1000000"], ["mosquitto", "master run", "slave run"]),
    "fuzz_sigint": ("fuzz.py", ["--messages", "1000000"], ["mosquitto", "master run", "slave run"]),
    "vs_flower_flower": ("vs_flower.py", ["--flower-only", "--rounds", "500", "--clients", "2", "--no-slow"],
                         ["flower-superlink", "flower-supernode", "flwr-clientapp"]),
}


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def _snapshot(root: int, seen: dict[int, float], groups: dict[int, float]) -> list[psutil.Process]:
    """Add every live descendant of `root` (pid -> create time) and its process group
    (pgid -> earliest create time seen in it) to the books; return the descendants."""
    try:
        below = psutil.Process(root).children(recursive=True)
    except psutil.Error:
        return []
    for p in below:
        try:
            created, pgid = p.create_time(), os.getpgid(p.pid)
        except (psutil.Error, ProcessLookupError):
            continue
        seen.setdefault(p.pid, created)
        if pgid != os.getpgid(root):
            groups[pgid] = min(groups.get(pgid, created), created)
    return below


def _survivors(seen: dict[int, float], groups: dict[int, float]) -> list[str]:
    out = []
    for p in psutil.process_iter(["create_time", "status"]):
        try:
            mine = abs(seen.get(p.pid, -1.0) - p.info["create_time"]) < 0.05
            in_group = os.getpgid(p.pid) in groups and p.info["create_time"] >= groups[os.getpgid(p.pid)] - 0.05
        except (ProcessLookupError, PermissionError):
            continue
        if (mine or in_group) and p.info["status"] != psutil.STATUS_ZOMBIE:
            out.append(f"{p.pid} {_cmdline(p)[:160]}")
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_a_signalled_benchmark_leaves_no_process(case: str, mosquitto_bin: str, tmp_path: Path) -> None:
    script, args, needles = CASES[case]
    if case == "vs_flower_flower" and not HAS_FLWR:
        pytest.skip("flwr not installed (extra [bench])")
    workdir = ["--keep", str(tmp_path)] if script == "scale.py" else (
        [] if script == "ingest.py" else ["--workdir", str(tmp_path)])
    log = open(tmp_path / "bench.log", "wb")
    bench = subprocess.Popen([sys.executable, str(ROOT / "bench" / script), *args, *workdir], cwd=ROOT,
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    seen: dict[int, float] = {}
    groups: dict[int, float] = {}
    try:
        deadline = time.monotonic() + 150
        while True:
            below = _snapshot(bench.pid, seen, groups)
            running = " | ".join(_cmdline(p) for p in below)
            if all(n in running for n in needles):
                break
            assert bench.poll() is None, f"{script} exited early:\n{(tmp_path / 'bench.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"{script} did not start {needles}; running: {running[:2000]}"
            time.sleep(0.2)
        _snapshot(bench.pid, seen, groups)
        bench.send_signal(signal.SIGINT if case.endswith("sigint") else signal.SIGTERM)
        code = bench.wait(timeout=120)
        assert code != 0
        assert not _survivors(seen, groups), f"left running by {script}: {_survivors(seen, groups)}"
    finally:
        log.close()
        for line in _survivors(seen, groups) + ([f"{bench.pid} bench"] if bench.poll() is None else []):
            try:
                os.kill(int(line.split()[0]), signal.SIGKILL)  # only what this test started
            except ProcessLookupError:
                pass
