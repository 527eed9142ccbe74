"""Fleet-scale benchmark: one Mosquitto, one real master, hundreds to a thousand slaves.

    python bench/scale.py                      # fleets of 100, 300 and 1,000 slaves
    python bench/scale.py --slaves 1000        # only the largest fleet run: 1,000
    python bench/scale.py --slaves 20 --rounds 2   # a smoke run, seconds

Per fleet size it starts its own Mosquitto (fedmq.broker.start_broker on a free
loopback port, file-descriptor limit raised), the real master process (`python -m
fedmq master run -c job.toml`: MasterDaemon, allowlist of the fleet's generated keys,
every enrolled slave a participant, quorum = all, FedAvg), and host processes
(bench/_scale_host.py) that each run a few hundred lightweight slaves speaking the
real protocol -- SlaveCore, Sealer/Inbox, Ed25519 on every message, presence and
will, one MQTT client and persistent session per slave -- on one selector loop per
process. The model is an MLP 8 -> 4 -> 2 (46 parameters); each slave trains it for
one epoch on 8 random samples of its own (slave.core.run_training).

It reports, from the master's own metrics JSON (one message per aggregation): round
latency (round announcement -> aggregation) p50 / p99 / max over the rounds; how long
enrollment took (hosts started -> round 1 announced); master CPU (seconds per round,
share of one core) and peak RSS; Mosquitto peak RSS and CPU; the slave hosts' CPU.
The last line is JSON for the largest fleet run (`slaves`, `round_p50_seconds`, ...),
with every fleet's figures under "fleets".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil  # noqa: E402
from _procs import stop_children_on_exit  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402

from fedmq.broker import start_broker  # noqa: E402
from fedmq.demo import to_toml  # noqa: E402
from fedmq.common.keys import Identity, public_pem, write_identity  # noqa: E402
from fedmq.common.topics import Topics  # noqa: E402
from fedmq.common.brokerconfig import BrokerConfig  # noqa: E402
from fedmq.common.transport import Inbound, Transport# noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
JOB = "fleet"
MODEL = {"arch": "mlp", "sizes": [8, 4, 2], "seed": 0}
FLEETS = (100, 300, 1000)


def raise_fd_limit(need: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, need)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


class Sampler:
    """Peak RSS and CPU seconds of a few processes, sampled every `period` seconds."""

    def __init__(self, procs: dict[str, psutil.Process], period: float = 0.25) -> None:
        self.procs = procs
        self.peak_rss: dict[str, int] = {k: 0 for k in procs}
        self.cpu: dict[str, float] = {k: 0.0 for k in procs}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def cpu_now(self, name: str) -> float:
        try:
            t = self.procs[name].cpu_times()
            self.cpu[name] = t.user + t.system
        except psutil.Error:
            pass
        return self.cpu[name]

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            for name, p in self.procs.items():
                try:
                    self.peak_rss[name] = max(self.peak_rss[name], p.memory_info().rss)
                    t = p.cpu_times()
                    self.cpu[name] = t.user + t.system
                except psutil.Error:
                    pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


class Metrics:
    def __init__(self, broker: BrokerConfig, on_row) -> None:
        self.rows: list[dict[str, Any]] = []
        self.arrived: list[float] = []
        self.arrived_wall: list[float] = []
        self.on_row = on_row
        self.transport = Transport(broker, f"scale-watch-{os.getpid()}", self._on, clean_start=True)
        self.transport.subscribe(Topics(JOB).master("metrics"))
        self.transport.start()
        if not self.transport.wait_connected(15):
            raise RuntimeError("metrics watcher could not connect to the broker")

    def _on(self, msg: Inbound) -> None:
        try:
            row = json.loads(msg.payload)
        except ValueError:
            return
        self.arrived.append(time.monotonic())
        self.arrived_wall.append(time.time())
        self.rows.append(row)
        self.on_row(row)

    def close(self) -> None:
        self.transport.stop()


def fleet_run(n: int, rounds: int, work: Path, *, per_host: int, train: str, timeout: float,
              deadline: float) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    keys = work / "keys"
    (keys / "allowlist").mkdir(parents=True)
    write_identity(Identity.generate("master"), keys, overwrite=True)
    names = [f"dev-{i:04d}" for i in range(n)]
    seeds: list[tuple[str, str]] = []
    for name in names:
        ident = Identity.generate(name)
        (keys / "allowlist" / f"{name}.pub").write_bytes(public_pem(ident.public_key))
        raw = ident.private_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                              serialization.NoEncryption())
        seeds.append((name, raw.hex()))
    t_setup = time.monotonic()
    broker = start_broker("mosquitto", data_dir=work / "broker")
    procs: dict[str, subprocess.Popen] = {}
    metrics = sampler = None
    try:
        settings = broker.settings
        job = work / "job.toml"
        job.write_text(to_toml({
            "job": {"id": JOB, "rounds": rounds, "task": JOB, "update": "delta"},
            "model": MODEL,
            "train": {"epochs": 1, "batch_size": 8, "lr": 0.1},
            "strategy": {"name": "fedavg"},
            "rounds": {"participants": 0, "quorum": 0, "min_slaves": n, "deadline": deadline,
                       "start_wait": timeout},
            "enrollment": {"mode": "allowlist", "keys": str(keys / "allowlist")},
            "master": {"key": str(keys / "master.key"), "state_dir": str(work / "state")},
            "broker": settings,
        }))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        argv = [sys.executable, "-m", "fedmq", "master", "run", "-c", str(job)]
        mlog = open(work / "master.log", "wb")
        procs["master"] = subprocess.Popen(argv, stdout=mlog, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        mlog.close()
        done = threading.Event()
        metrics = Metrics(broker.broker_config(), lambda row: done.set() if row["round"] >= rounds else None)
        hosts = max(1, math.ceil(n / per_host))
        t_hosts = time.monotonic()
        for h in range(hosts):
            part = seeds[h::hosts]
            cfg = work / f"host-{h}.json"
            cfg.write_text(json.dumps({
                "broker": {"host": broker.host, "port": broker.port}, "job": JOB, "timeout": timeout,
                "master_pub": str(keys / "master.pub"), "slaves": part, "first_index": h * 100_000,
                "samples": 8, "features": MODEL["sizes"][0], "classes": MODEL["sizes"][-1], "train": train}))
            procs[f"host-{h}"] = subprocess.Popen([sys.executable, str(HERE / "_scale_host.py"), str(cfg)],
                                                  stdout=subprocess.PIPE, stderr=open(work / f"host-{h}.log", "wb"),
                                                  env=env, cwd=ROOT)
        watched = {k: psutil.Process(p.pid) for k, p in procs.items()}
        watched["broker"] = psutil.Process(broker.pid)
        sampler = Sampler(watched)
        cpu_marks: list[dict[str, float]] = []

        def mark(_row: dict[str, Any]) -> None:
            cpu_marks.append({k: sampler.cpu_now(k) for k in watched})
            if _row["round"] >= rounds:
                done.set()

        metrics.on_row = mark
        finished = done.wait(timeout)
        t_end = time.monotonic()
        rows = sorted(metrics.rows, key=lambda r: r["round"])
        host_reports = []
        for k, p in procs.items():
            if k.startswith("host-") and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for k, p in procs.items():
            if k.startswith("host-"):
                try:
                    out, _ = p.communicate(timeout=20)
                    host_reports.append(json.loads(out.decode().strip().splitlines()[-1]))
                except (subprocess.TimeoutExpired, ValueError, IndexError):
                    host_reports.append({"error": "no report"})
        if not finished:
            tail = (work / "master.log").read_text(errors="replace").splitlines()[-12:]
            raise RuntimeError(f"{n} slaves: {len(rows)} of {rounds} rounds within {timeout:g} s "
                               f"(hosts: {host_reports}):\n" + "\n".join(tail))
        lat = [float(r["seconds"]) for r in rows]
        # round 1 was announced when the last slave enrolled: row 1 arrived `seconds` after that
        enrolled_at = metrics.arrived[0] - lat[0]
        first, last = cpu_marks[0], cpu_marks[-1]
        # Split each round at the moment the last slave published its update (same clock):
        # before it the fleet is still training/sending, after it the master drains its backlog.
        fleet_phase, drain, announce = [], [], []
        for i, r in enumerate(rows):
            marks = [h.get("round_marks", {}).get(str(r["round"])) for h in host_reports]
            sent = [m[1] for m in marks if m and m[1]]
            if sent:
                start = metrics.arrived_wall[i] - r["seconds"]
                announce.append(max(m[0] for m in marks if m) - start)
                fleet_phase.append(max(sent) - start)
                drain.append(metrics.arrived_wall[i] - max(sent))
        measured = len(rows) - 1
        span = metrics.arrived[-1] - metrics.arrived[0]
        return {
            "slaves": n, "rounds": len(rows), "hosts": hosts, "train": train,
            "round_seconds": lat,
            "round_p50_seconds": percentile(lat, 0.5), "round_p99_seconds": percentile(lat, 0.99),
            "round_max_seconds": max(lat),
            "fleet_phase_seconds": fleet_phase, "master_drain_seconds": drain,
            "announce_seconds": announce,
            "enrollment_seconds": enrolled_at - t_hosts,
            "updates_per_round": [r["updates"] for r in rows],
            "master_cpu_seconds_per_round": ((last["master"] - first["master"]) / measured if measured
                                             else first["master"] / max(1, len(rows))),
            "master_cpu_share": (last["master"] - first["master"]) / span if measured and span else None,
            "master_cpu_seconds_total": sampler.cpu_now("master"),
            "master_peak_rss_mb": sampler.peak_rss["master"] / 2**20,
            "broker_peak_rss_mb": sampler.peak_rss.get("broker", 0) / 2**20,
            "broker_cpu_seconds_per_round": ((last.get("broker", 0) - first.get("broker", 0)) / measured
                                             if measured else None),
            "hosts_cpu_seconds_per_round": (sum(last[k] - first[k] for k in last if k.startswith("host-")) / measured
                                            if measured else None),
            "hosts_peak_rss_mb": sum(v for k, v in sampler.peak_rss.items() if k.startswith("host-")) / 2**20,
            "host_reports": host_reports,
            "setup_seconds": t_hosts - t_setup, "wall_seconds": t_end - t_setup,
        }
    finally:
        if sampler is not None:
            sampler.stop()
        if metrics is not None:
            metrics.close()
        for p in procs.values():  # by PID, only our own
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        broker.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slaves", type=int, default=None,
                    help="run only this fleet size (default: 100, 300 and 1000 in turn)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds per fleet run (default 5)")
    ap.add_argument("--per-host", type=int, default=250, help="slaves per host process (default 250)")
    ap.add_argument("--train", choices=("real", "synthetic"), default="real",
                    help="real: run_training on the tiny model; synthetic: a constant delta (protocol only)")
    ap.add_argument("--deadline", type=float, default=120.0, help="round deadline of the job, seconds")
    ap.add_argument("--timeout", type=float, default=None, help="per fleet run, seconds (default 60 + 0.5 s per slave)")
    ap.add_argument("--keep", type=Path, default=None, help="keep logs, configs and state in this directory")
    args = ap.parse_args()

    stop_children_on_exit()
    fleets = [args.slaves] if args.slaves else list(FLEETS)
    fd = raise_fd_limit(4 * max(fleets) + 256)
    load0 = os.getloadavg()
    tmp = args.keep.resolve() if args.keep else Path(tempfile.mkdtemp(prefix="fedmq-scale-"))
    results = []
    try:
        for n in fleets:
            timeout = args.timeout or 60 + 0.5 * n
            r = fleet_run(n, args.rounds, tmp / f"fleet-{n}", per_host=args.per_host, train=args.train,
                          timeout=timeout, deadline=args.deadline)
            results.append(r)
            print(f"# {n} slaves: rounds {[round(x, 2) for x in r['round_seconds']]} s; enrollment "
                  f"{r['enrollment_seconds']:.1f} s; load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    print("round latency = round announcement -> aggregation (master metrics); it splits into 'fleet' (until the "
          "last slave published its update) and 'drain' (master catching up after that); 'announced': until the\n"
          "round announcement reached the last host; medians")
    print(f"{'slaves':>6} {'hosts':>5} {'rounds':>6} {'p50 s':>7} {'p99 s':>7} {'max s':>7} {'announced':>9} {'fleet s':>7} {'drain s':>7} {'enroll s':>8} "
          f"{'master cpu s/rnd':>16} {'master RSS MB':>13} {'broker RSS MB':>13} {'broker cpu s/rnd':>16} "
          f"{'slaves cpu s/rnd':>16}")
    for r in results:
        f = lambda x, w, p=2: f"{x:{w}.{p}f}" if x is not None else f"{'-':>{w}}"  # noqa: E731
        print(f"{r['slaves']:>6} {r['hosts']:>5} {r['rounds']:>6} {f(r['round_p50_seconds'], 7)} "
              f"{f(r['round_p99_seconds'], 7)} {f(r['round_max_seconds'], 7)} "
              f"{f(percentile(r['announce_seconds'], 0.5), 9)} {f(percentile(r['fleet_phase_seconds'], 0.5), 7)} {f(percentile(r['master_drain_seconds'], 0.5), 7)} "
              f"{f(r['enrollment_seconds'], 8, 1)} "
              f"{f(r['master_cpu_seconds_per_round'], 16)} {f(r['master_peak_rss_mb'], 13, 0)} "
              f"{f(r['broker_peak_rss_mb'], 13, 0)} {f(r['broker_cpu_seconds_per_round'], 16)} "
              f"{f(r['hosts_cpu_seconds_per_round'], 16)}")
    big = results[-1]
    out = {k: v for k, v in big.items() if k != "host_reports"}
    out.update({
        "fleets": [{k: v for k, v in r.items() if k not in ("host_reports",)} for r in results],
        "host_reports": big["host_reports"], "fd_limit": fd, "cpus": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load0], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    })
    print(json.dumps(out, sort_keys=True, default=str))


if __name__ == "__main__":
    main()
