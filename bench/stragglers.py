"""Stragglers: synchronous FedAvg vs FedBuff vs asynchronous gradient push (docs/BENCHMARKS.md).

    python bench/stragglers.py             # the three, one after the other: ~4-6 min
    python bench/stragglers.py --smoke     # 2 slaves, 2 versions each: a smoke run

The reference workload (DESIGN.md: load_digits, 8 slaves on Dirichlet(0.5) shards, MLP
64-128-10 from seed 0, 2 local epochs, batch 32, SGD lr 0.1) as real processes over a
Mosquitto started here on a free port (`fedmq.demo.LocalFleet`: one master, 8 slaves,
`python -m fedmq ... run`), with 2 of the 8 slaves 5x slower (``[slave] slowdown = 5.0``).
For each strategy, a fresh broker and fleet, stopped ``--after`` versions (default 5)
after the first one whose test accuracy reaches 0.90, or at the version cap or timeout.

**Device time.** Two local epochs of this MLP on a ~180-sample shard take ~0.03 s here,
so "5x slower" would be a tenth of a second, lost in messaging and in the noise of a
shared 2-core machine running 9 processes. Each slave process therefore simulates a
device whose local computation takes ``--seconds-per-pass`` per pass over its data
(default 0.5 s): 2 epochs take 1.0 s, a one-pass gradient 0.5 s. It is a floor applied in
the slave process around the real training (which still runs, on the real data), and the
daemon's ``slowdown`` then stretches the whole of it, so the 2 slow slaves take 5.0 s
(2.5 s per gradient). Sleeping rather than computing keeps the 8 simulated devices
independent of each other, as separate devices are, instead of queueing on 2 shared
cores. The slave processes run ``bench/stragglers.py --device-slave SECONDS slave run
...``, which wraps `run_training` and then is exactly ``fedmq slave run``.

**Measured**: wall time from the first round announcement (received on the round topic
by a subscriber of the same broker) to the receipt of the first metrics row with
accuracy >= 0.90; the absolute receive times are in the JSON too. Also the master's own
``seconds`` per version summed up to that row, versions and updates used, staleness,
and the lowest accuracy of the ``--after`` versions that follow (did it stay there?).

The last line of stdout is JSON (``sync_seconds_to_090``, ``fedbuff_seconds_to_090``,
``gradpush_seconds_to_090``: null where 0.90 was never reached; ratios; per-strategy
details). Nothing here asserts timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

TARGET = 0.90
SLOWDOWN = 5.0


# ---------------------------------------------------------------- the simulated device (slave side)


def device_slave(seconds_per_pass: float, argv: list[str]) -> None:
    """`fedmq <argv>` (a slave) whose local training takes at least `seconds_per_pass`
    per pass over the local data; the daemon's `slowdown` stretches that in turn."""
    import fedmq.slave.daemon as daemon

    real = daemon.run_training

    def timed(instruction, params, dataset, *, seed):
        start = time.monotonic()
        result = real(instruction, params, dataset, seed=seed)
        t = instruction["train"]
        if instruction["update"] == "gradient":  # one pass, or its first grad_batches mini-batches
            batches = -(-len(dataset) // t["batch_size"])
            passes = min(1.0, t["grad_batches"] / batches) if t["grad_batches"] else 1.0
        else:
            passes = float(t["epochs"])
        rest = seconds_per_pass * passes - (time.monotonic() - start)
        if rest > 0:
            threading.Event().wait(rest)
        return result

    daemon.run_training = timed
    from fedmq.cli import main

    main(args=argv, prog_name="fedmq")


# ---------------------------------------------------------------- the run


def _fleet_classes():
    from fedmq.common.transport import Inbound
    from fedmq.demo import LocalFleet, Watcher

    class DeviceFleet(LocalFleet):
        """LocalFleet whose slaves run as simulated devices (see the module doc)."""

        seconds_per_pass = 0.5

        def start(self, name: str) -> subprocess.Popen:
            if name == "master":
                return super().start(name)
            log = open(self.root / "logs" / f"{name}.log", "ab")
            self.procs[name] = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--device-slave", str(self.seconds_per_pass),
                 "slave", "run", "--config", str(self.configs[name])],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            log.close()
            return self.procs[name]

    class Clock(Watcher):
        """Watcher that also timestamps the first round announcement and every metrics row."""

        def __init__(self, broker: dict[str, Any]) -> None:
            self.first_round: float | None = None
            self.arrivals: list[tuple[float, dict[str, Any]]] = []
            super().__init__(broker)
            self.transport.subscribe(self.topics.master("round"))

        def _on(self, msg: Inbound) -> None:
            now = time.time()
            if msg.topic == self.topics.master("round"):
                if self.first_round is None and not msg.retain:
                    self.first_round = now
                return
            if msg.topic.endswith("/metrics") and not msg.retain:
                try:
                    self.arrivals.append((now, json.loads(msg.payload)))
                except ValueError:
                    pass
            super()._on(msg)

    return DeviceFleet, Clock


def strategies(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Job-file overrides per strategy (the tuned settings; --fedbuff-* / --gradpush-* change them)."""
    cap = args.versions
    return {
        "sync": {"job": {"rounds": cap or 40}, "strategy": {"name": "fedavg"}},
        "fedbuff": {"job": {"rounds": cap or 400},
                    "strategy": {"name": "fedbuff", "buffer_size": args.fedbuff_buffer,
                                 "server_lr": args.fedbuff_server_lr, "max_staleness": args.fedbuff_max_staleness}},
        "gradpush": {"job": {"rounds": cap or 2000, "update": "gradient"},
                     "train": {"grad_batches": args.gradpush_batches},
                     "strategy": {"name": "gradpush", "lr": args.gradpush_lr,
                                  "max_staleness": args.gradpush_max_staleness, "staleness": args.gradpush_staleness}},
    }


def describe(name: str, over: dict[str, Any]) -> str:
    s = dict(over["strategy"])
    s.pop("name")
    extra = {k: v for k, v in over.get("train", {}).items()}
    return " ".join(f"{k}={v}" for k, v in {**s, **extra}.items()) or "-"


def sent_per_slave(logs: Path, names: list[str]) -> dict[str, int]:
    """Updates each slave sent (its log's "sent ... update" lines)."""
    pattern = re.compile(r"round \d+: sent \w+ update")
    out = {}
    for name in names:
        path = logs / f"{name}.log"
        out[name] = len(pattern.findall(path.read_text(errors="replace"))) if path.exists() else 0
    return out


def run_one(name: str, over: dict[str, Any], args: argparse.Namespace, work: Path,
            slow: list[str]) -> dict[str, Any]:
    from fedmq.broker import start_broker

    DeviceFleet, Clock = _fleet_classes()
    root = work / name
    broker = start_broker("mosquitto", data_dir=root / "broker", persistence=False)
    fleet = clock = None
    job = over
    try:
        fleet = DeviceFleet(root / "fleet", broker.settings, slaves=args.slaves, rounds=job["job"]["rounds"],
                            job=job, slave_overrides={n: {"slave": {"slowdown": SLOWDOWN}} for n in slow})
        fleet.seconds_per_pass = args.seconds_per_pass
        clock = Clock(broker.settings)
        t_launch = time.time()
        fleet.start_all()
        master = fleet.procs["master"]
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline and master.poll() is None:
            rows_seen = [r for _, r in sorted(clock.arrivals, key=lambda a: a[1]["version"])]
            hit_at = next((i for i, r in enumerate(rows_seen) if r.get("accuracy", 0.0) >= TARGET), None)
            if hit_at is not None and len(rows_seen) - 1 - hit_at >= args.after:
                break
            time.sleep(0.1)
        exit_code = master.poll()  # None: stopped here, after the target (or at the timeout)
        t_end = time.time()
        time.sleep(0.5)  # the last metrics row
        arrivals = sorted(clock.arrivals, key=lambda a: a[1]["version"])
        first_round = clock.first_round
    finally:
        if clock is not None:
            clock.close()
        if fleet is not None:
            fleet.stop_all()
        broker.stop()
    rows = [r for _, r in arrivals]
    t0 = first_round if first_round is not None else (arrivals[0][0] - arrivals[0][1]["seconds"] if arrivals else None)
    hit = next(((t, r) for t, r in arrivals if r.get("accuracy", 0.0) >= TARGET), None)
    seconds_sum, summed = 0.0, None
    for r in rows:
        seconds_sum += r["seconds"]
        if r.get("accuracy", 0.0) >= TARGET:
            summed = round(seconds_sum, 2)
            break
    taus = [r["staleness_mean"] for r in rows if "staleness_mean" in r]
    secs = [r["seconds"] for r in rows]
    return {
        "strategy": name, "settings": describe(name, over), "master_exit": exit_code,
        "seconds_to_090": round(hit[0] - t0, 2) if hit and t0 else None,
        "master_seconds_to_090": summed,
        "version_at_090": hit[1]["version"] if hit else None,
        "updates_to_090": sum(r["updates"] for r in rows[: rows.index(hit[1]) + 1]) if hit else None,
        "versions": len(rows), "updates": sum(r["updates"] for r in rows),
        "final_accuracy": round(rows[-1]["accuracy"], 4) if rows else None,
        "min_accuracy_after_090": (round(min(r["accuracy"] for r in rows[rows.index(hit[1]) + 1:]), 4)
                                   if hit and hit[1] is not rows[-1] else None),
        "best_accuracy": round(max(r["accuracy"] for r in rows), 4) if rows else None,
        "seconds_per_version_median": round(statistics.median(secs), 3) if secs else None,
        "staleness_mean": round(statistics.mean(taus), 2) if taus else None,
        "staleness_max": max((r["staleness_max"] for r in rows if "staleness_max" in r), default=None),
        "sent_per_slave": sent_per_slave(root / "fleet" / "logs", [f"slave-{i:02d}" for i in range(args.slaves)]),
        "t_launch": round(t_launch, 3), "t_first_round": round(t0, 3) if t0 else None,
        "t_090": round(hit[0], 3) if hit else None, "t_end": round(t_end, 3),
        "accuracy": [round(r["accuracy"], 4) for r in rows],
        "received_at": [round(t - t0, 3) for t, _ in arrivals] if t0 else [],
        "logs": str(root / "fleet" / "logs"),
    }


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--device-slave":
        device_slave(float(sys.argv[2]), sys.argv[3:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="2 slaves (1 slow), 2 versions per strategy, tiny device time")
    ap.add_argument("--only", nargs="+", choices=("sync", "fedbuff", "gradpush"), help="run only these")
    ap.add_argument("--slaves", type=int, default=8)
    ap.add_argument("--slow", type=int, default=2, help="how many slaves are slow (the last ones)")
    ap.add_argument("--seconds-per-pass", type=float, default=0.5, help="simulated device time per pass over the data")
    ap.add_argument("--versions", type=int, default=None, help="cap on versions (default 40 / 400 / 2000)")
    ap.add_argument("--timeout", type=float, default=300.0, help="per strategy")
    ap.add_argument("--after", type=int, default=5, help="versions to watch after the first at 0.90")
    ap.add_argument("--fedbuff-buffer", type=int, default=4)
    ap.add_argument("--fedbuff-server-lr", type=float, default=1.0)
    ap.add_argument("--fedbuff-max-staleness", type=int, default=16)
    ap.add_argument("--gradpush-lr", type=float, default=0.2)
    ap.add_argument("--gradpush-batches", type=int, default=0, help="grad_batches (0: one pass over the shard)")
    ap.add_argument("--gradpush-max-staleness", type=int, default=16)
    ap.add_argument("--gradpush-staleness", default="polynomial")
    ap.add_argument("--workdir", type=Path, default=None, help="keep logs and reports here (default: a temp dir)")
    args = ap.parse_args()
    if args.smoke:
        args.slaves, args.slow, args.versions = 2, 1, args.versions or 2
        args.seconds_per_pass = min(args.seconds_per_pass, 0.05)
        args.timeout = min(args.timeout, 120.0)
    from _procs import stop_children_on_exit
    from fedmq.broker import find_mosquitto

    stop_children_on_exit()
    if find_mosquitto() is None:
        sys.exit("stragglers: needs the mosquitto binary (apt-get install mosquitto)")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fedmq-stragglers-"))
    work.mkdir(parents=True, exist_ok=True)
    slow = [f"slave-{i:02d}" for i in range(args.slaves - args.slow, args.slaves)]
    configs = strategies(args)
    names = args.only or list(configs)
    results: dict[str, dict[str, Any]] = {}
    load0 = os.getloadavg()[0]
    for name in names:
        print(f"--- {name}: {describe(name, configs[name])}", flush=True)
        results[name] = r = run_one(name, configs[name], args, work, slow)
        print(f"    {r['versions']} versions, {r['updates']} updates, seconds to {TARGET:.2f}: {r['seconds_to_090']}, "
              f"final accuracy {r['final_accuracy']}", flush=True)
    from fedmq.common.workload import reference_split

    sizes = [len(ix) for ix in reference_split(num_slaves=args.slaves).slave_indices]
    print()
    print(f"{args.slaves} slaves (samples {sizes}); slow: {', '.join(slow)} (slowdown {SLOWDOWN:g}); "
          f"device time {args.seconds_per_pass:g} s per pass over the data")
    header = f"{'strategy':9} {'settings':44} {'to 0.90 s':>9} {'vs sync':>7} {'version':>7} {'updates':>7} " \
             f"{'s/version':>9} {'tau mean':>8} {'min after':>9}"
    print(header)
    sync = results.get("sync", {}).get("seconds_to_090")
    for name, r in results.items():
        ratio = round(r["seconds_to_090"] / sync, 3) if sync and r["seconds_to_090"] else None
        r["ratio_to_sync"] = ratio
        print(f"{name:9} {r['settings'][:44]:44} {_f(r['seconds_to_090']):>9} {_f(ratio):>7} "
              f"{_f(r['version_at_090']):>7} {_f(r['updates_to_090']):>7} {_f(r['seconds_per_version_median']):>9} "
              f"{_f(r['staleness_mean']):>8} {_f(r['min_accuracy_after_090']):>9}")
    for name, r in results.items():
        print(f"  {name}: updates sent per slave {r['sent_per_slave']}")
    summary: dict[str, Any] = {
        "slaves": args.slaves, "slow": slow, "slowdown": SLOWDOWN, "seconds_per_pass": args.seconds_per_pass,
        "smoke": args.smoke, "workdir": str(work), "load_avg_1m_start": round(load0, 2),
        "load_avg_1m_end": round(os.getloadavg()[0], 2), "nproc": os.cpu_count(), "python": platform.python_version(),
    }
    for name in ("sync", "fedbuff", "gradpush"):
        r = results.get(name, {})
        summary[f"{name}_seconds_to_090"] = r.get("seconds_to_090")
        summary[f"{name}_master_seconds_to_090"] = r.get("master_seconds_to_090")
        summary[f"{name}_version_at_090"] = r.get("version_at_090")
        summary[f"{name}_final_accuracy"] = r.get("final_accuracy")
        summary[f"{name}_min_accuracy_after_090"] = r.get("min_accuracy_after_090")
        if name != "sync":
            summary[f"ratio_{name}_to_sync"] = r.get("ratio_to_sync")
    summary["runs"] = results
    (work / "stragglers.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not args.workdir and not args.smoke:
        print(f"logs and stragglers.json in {work}")
    elif args.smoke and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(summary))


def _f(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if isinstance(v, float) and v < 10 else (f"{v:.1f}" if isinstance(v, float) else str(v))


if __name__ == "__main__":
    main()
