"""Footprint of one fedmq slave against Mosquitto: start-up time, RSS, idle CPU.

    python bench/footprint.py                 # 5 rounds, 10 s idle window
    python bench/footprint.py --seconds 2 --rounds 2   # smoke run

A Mosquitto on a free loopback port and a master (the reference job, 1 slave) are
started first; then the slave process (``python -m fedmq slave run``, as an operator
starts it) with shard 0 of the 8-way reference split, read from an ``.npz`` file as a
device would (``--reference-data``: the slave builds the shard itself, which imports
scikit-learn). Measured:

* start-up, from just before the slave process is spawned to the slave's own log
  lines (millisecond time stamps): ``connecting to broker`` (imports, config, keys and
  data loaded), ``connected to broker`` (MQTT CONNACK), ``confirming instruction``
  (the master's signed instruction received and verified, the confirm about to be
  published), and the first ``sent delta update`` (model received, first local
  training — a cold one — encoded, signed, published);
* RSS (psutil, every 50 ms): when connected, the peak over the job (training), and
  after the job while idle;
* CPU seconds the slave process used until connected and until its first update
  was sent (sampled every 50 ms): unlike the start-up times, these hardly depend on
  what else the machine is running;
* idle CPU: the slave's user+system CPU time over ``--seconds`` after the job, while it
  stays connected with nothing to do, as a percentage of one core;
* for scale: the RSS of a bare ``python -c "import torch"``.

The last line of stdout is JSON. Nothing here asserts anything about the figures.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

import numpy as np

from _procs import stop_children_on_exit

from fedmq.broker import start_broker
from fedmq.common.workload import reference_split
from fedmq.demo import LocalFleet

LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\S+) (\w+) (.*)$")


def log_events(text: str) -> list[tuple[float, str]]:
    """(epoch seconds, message) of every line of a fedmq log (local-time stamps)."""
    out = []
    for line in text.splitlines():
        m = LINE.match(line)
        if m:
            out.append((datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp(), m.group(4)))
    return out


def first(events: list[tuple[float, str]], needle: str) -> float | None:
    return next((t for t, msg in events if needle in msg), None)


def wait_for_log(fleet: LocalFleet, name: str, needle: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in fleet.log(name):
            return True
        time.sleep(0.02)
    return False


class Sampler(threading.Thread):
    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.proc, self.interval = psutil.Process(pid), interval
        self.samples: list[tuple[float, int, float]] = []  # (time, RSS, CPU seconds so far)
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                cpu = self.proc.cpu_times()
                self.samples.append((time.time(), self.proc.memory_info().rss, cpu.user + cpu.system))
            except psutil.Error:
                return
            self.halt.wait(self.interval)

    def at(self, t: float | None, field: int = 1) -> Any:
        """The first sample's RSS (field 1) or CPU seconds (field 2) at or after `t`."""
        if t is None:
            return None
        after = [sample[field] for sample in self.samples if sample[0] >= t]
        return after[0] if after else None


def torch_baseline_rss() -> int | None:
    code = "import sys, torch, numpy; print('ready', flush=True); sys.stdin.read()"
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        if proc.stdout is not None and proc.stdout.readline().strip() == b"ready":
            return psutil.Process(proc.pid).memory_info().rss
        return None
    finally:
        proc.kill()
        proc.wait()


def mb(n: int | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)


def delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(b - a, 3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="idle window for RSS and CPU")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--reference-data", action="store_true",
                    help="let the slave build its shard itself (data = reference:0/8, imports scikit-learn) "
                         "instead of reading it from an .npz file")
    args = ap.parse_args(argv)
    stop_children_on_exit()
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="fedmq-footprint-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"work dir: {work}", flush=True)

    if args.reference_data:
        data = "reference:0/8"
    else:
        shard = reference_split(num_slaves=8).slave_dataset(0)
        data = str(work / "shard-0.npz")
        np.savez(data, x=shard.tensors[0].numpy(), y=shard.tensors[1].numpy())
    broker = start_broker("mosquitto", data_dir=work / "broker", persistence=False)
    fleet = LocalFleet(work / "fleet", broker.settings, slaves=1, rounds=args.rounds,
                       slave_overrides={"slave-00": {"slave": {"data": data}}})
    sampler = None
    try:
        fleet.start("master")
        if not wait_for_log(fleet, "master", "connected to broker", 60):
            raise SystemExit(f"master did not connect:\n{fleet.log('master')}")
        t_spawn = time.time()
        slave = fleet.start("slave-00")
        sampler = Sampler(slave.pid)
        sampler.start()
        try:
            master_exit = fleet.procs["master"].wait(timeout=60 + 60 * args.rounds)
        except subprocess.TimeoutExpired:
            master_exit = None
        time.sleep(1.0)  # the last model reaches the slave; then it has nothing to do
        t_idle = time.time()
        proc = psutil.Process(slave.pid)
        cpu0 = proc.cpu_times()
        time.sleep(args.seconds)
        cpu1 = proc.cpu_times()
        t_idle_end = time.time()
        sampler.halt.set()
        sampler.join(timeout=5)
        idle_rss = proc.memory_info().rss
        threads = proc.num_threads()
    finally:
        if sampler is not None:
            sampler.halt.set()
        fleet.stop_all()
        broker.stop()

    events = log_events(fleet.log("slave-00"))
    t_connecting = first(events, "connecting to broker")
    t_connected = first(events, "connected to broker")
    t_confirm = first(events, "confirming instruction")
    t_model0 = first(events, "model version 0")
    sent = [t for t, msg in events if "sent delta update" in msg]
    models = {int(m.group(1)): t for t, msg in events if (m := re.search(r"model version (\d+)", msg))}
    # slave-side work per round: model version k-1 received -> update for round k sent
    work_s = [round(t - models[k - 1], 3) for k, t in enumerate(sent, 1) if k - 1 in models]
    during = [rss for ts, rss, _cpu in sampler.samples if ts <= t_idle]

    def cpu_at(t: float | None) -> float | None:
        value = sampler.at(t, 2)
        return None if value is None else round(value, 2)

    idle_cpu = max(0.0, (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)) / (t_idle_end - t_idle)
    result: dict[str, Any] = {
        "rounds": args.rounds, "idle_seconds": args.seconds, "data": data, "master_exit": master_exit,
        "updates_sent": len(sent),
        "startup_to_connecting_s": delta(t_spawn, t_connecting),
        "startup_to_connected_s": delta(t_spawn, t_connected),
        "startup_to_confirm_s": delta(t_spawn, t_confirm),
        "startup_to_first_update_s": delta(t_spawn, sent[0] if sent else None),
        "cpu_to_connected_s": cpu_at(t_connected),
        "cpu_to_first_update_s": cpu_at(sent[0] if sent else None),
        "first_round_slave_seconds": work_s[0] if work_s else None,
        "later_rounds_slave_seconds_median": round(statistics.median(work_s[1:]), 3) if len(work_s) > 1 else None,
        "connected_rss_mb": mb(sampler.at(t_connected)),
        "before_training_rss_mb": mb(sampler.at(t_model0)),
        "training_peak_rss_mb": mb(max(during) if during else None),
        "idle_rss_mb": mb(idle_rss),
        "idle_cpu_percent": round(100 * idle_cpu, 3),
        "threads": threads,
        "torch_baseline_rss_mb": mb(torch_baseline_rss()),
        "broker": f"mosquitto {broker.host}:{broker.port}", "work_dir": str(work),
    }
    width = max(len(k) for k in result)
    for k, v in result.items():
        print(f"{k:<{width}}  {v}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
