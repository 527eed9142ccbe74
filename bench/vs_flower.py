"""fedmq vs Flower on the reference workload, side by side in one run (docs/BENCHMARKS.md).

    python bench/vs_flower.py                       # 30 rounds, 8 clients, + slow scenario
    python bench/vs_flower.py --rounds 2 --clients 2 --fedmq-only   # smoke run, seconds

Both systems train the same thing: the split that `ReferenceSplit.save` wrote and
`ReferenceSplit.load` read back (fedmq slaves get their shard as an .npz, the master
evaluates on the saved test set; Flower's apps read the same arrays), the MLP
64-128-10 from ``torch.manual_seed(0)``, 2 local epochs, batch 32, SGD lr 0.1 without
momentum, shuffling seeded with the round number on both sides, FedAvg weighted by
samples over all clients, centralized accuracy on the test set after every round.

* **fedmq**, twice per scenario: uncompressed (``fedmq_dense``) and with the job's
  ``[compression] preset = --compression`` (``fedmq``; default "lean", see
  docs/PROTOCOL.md 8.1). `fedmq.demo.LocalFleet` — one master and N slave processes
  against a Mosquitto started here on a free port. The slaves connect through one
  listener of a counting TCP proxy, the master through another, so bytes from/to slaves
  (up/down) and the master's own traffic are measured separately, on the wire; the
  master's own count by message kind (its status's ``traffic``) comes along.
* **Flower** (``flwr`` as pinned by the ``[bench]`` extra, 1.27.0, deployment engine):
  ``flower-superlink`` with its Fleet, ServerAppIo and Control APIs (gRPC) on free
  loopback ports, N ``flower-supernode`` processes connecting to the Fleet API through
  the counting proxy (their traffic is what is counted), ``flwr run`` of the app in
  bench/flower_app/. Telemetry and update checks are off, so nothing leaves 127.0.0.1.

Per system and scenario: accuracy per round, seconds per round (median; fedmq: the
master's round duration, Flower: the ServerApp's, both from sending the round to
the aggregated model), seconds to 0.90 (sum of round durations, as fedmq's demo report
counts it) and wall seconds from launch to 0.90, bytes up/down (total over the run,
up to the end of the first round at 0.90, and the mean per round over rounds 2..N),
peak RSS of the server side and of one client side (process trees, psutil, sampled
every 0.2 s), machine CPU seconds used.

The **slow scenario** makes `--slow-clients` of the clients (the last ones) stretch
local training by `--slowdown` (fedmq: ``[slave] slowdown``; Flower: the ClientApp
sleeps (slowdown - 1) x its training time, node config ``slowdown``).

SIGTERM or SIGINT stops every process the benchmark started (bench/_procs.py). The
last line of stdout is JSON. Nothing here asserts timings.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _procs import kill_tree, stop_children_on_exit, track  # noqa: E402
from _proxy import CountingProxy, RssSampler  # noqa: E402

from fedmq.broker import free_port, start_broker  # noqa: E402
from fedmq.common.compression_settings import PRESETS  # noqa: E402
from fedmq.common.workload import ReferenceSplit, reference_split  # noqa: E402
from fedmq.demo import LocalFleet, Watcher  # noqa: E402

HERE = Path(__file__).resolve().parent
FLOWER_APP = HERE / "flower_app"
TARGET = 0.90


# ---------------------------------------------------------------- data


def prepare_data(work: Path, clients: int) -> dict[str, Any]:
    """Save the split, read it back, and write what each system's processes load."""
    split_path = work / "split.npz"
    reference_split(num_slaves=clients).save(split_path)
    split = ReferenceSplit.load(split_path)
    shards = []
    for i in range(clients):
        path = work / f"shard-{i}.npz"
        ds = split.slave_dataset(i)
        np.savez(path, x=ds.tensors[0].numpy(), y=ds.tensors[1].numpy())
        shards.append(path)
    test = work / "test.npz"
    np.savez(test, x=split.test_x, y=split.test_y)
    flower_data = work / "flower-data.npz"
    np.savez(flower_data, train_x=split.train_x, train_y=split.train_y, test_x=split.test_x, test_y=split.test_y,
             slave_rows=np.concatenate(split.slave_indices),
             slave_sizes=np.array([len(s) for s in split.slave_indices]))
    return {"split": split_path, "shards": shards, "test": test, "flower": flower_data,
            "sizes": [len(s) for s in split.slave_indices]}


def same_split(a: Path, b: Path) -> bool:
    with np.load(a) as x, np.load(b) as y:
        return set(x.files) == set(y.files) and all(np.array_equal(x[k], y[k]) for k in x.files)


# ---------------------------------------------------------------- measurement helpers


def cpu_busy() -> float:
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def summarize(rows: list[dict[str, Any]], t_launch: float, proxy: CountingProxy, labels: dict[str, str],
              t_done: float) -> dict[str, Any]:
    """Rows: {round, accuracy, seconds, t_end}; labels: output prefix -> proxy label."""
    rows = sorted(rows, key=lambda r: r["round"])
    prev = t_launch
    for r in rows:
        for prefix, label in labels.items():
            for d in ("up", "down"):
                r[f"{prefix}bytes_{d}"] = proxy.bytes_between(label, d, prev, r["t_end"])
        prev = r["t_end"]
    secs = [r["seconds"] for r in rows]
    total, to_target, wall_to_target, hit = 0.0, None, None, None
    for r in rows:
        total += r["seconds"]
        if r["accuracy"] >= TARGET:
            to_target, wall_to_target, hit = round(total, 3), round(r["t_end"] - t_launch, 3), r
            break
    out: dict[str, Any] = {
        "rounds": len(rows),
        "accuracy": [round(r["accuracy"], 4) for r in rows],
        "round_seconds": [round(s, 3) for s in secs],
        "seconds_per_round": round(statistics.median(secs), 3) if secs else None,
        "seconds_to_090": to_target,
        "wall_to_090": wall_to_target,
        "final_accuracy": round(rows[-1]["accuracy"], 4) if rows else None,
        "wall_seconds": round(t_done - t_launch, 2),
        "first_round_end": round(rows[0]["t_end"] - t_launch, 2) if rows else None,
    }
    for prefix, label in labels.items():
        for d in ("up", "down"):
            out[f"{prefix}bytes_{d}"] = proxy.total(label, d)
            # everything from launch to the end of the first round at 0.90 (start-up included)
            out[f"{prefix}bytes_{d}_to_090"] = proxy.bytes_between(label, d, 0.0, hit["t_end"]) if hit else None
            out[f"{prefix}bytes_{d}_per_round"] = [r[f"{prefix}bytes_{d}"] for r in rows]
            # Steady state: everything between the end of round 1 and the end of the last
            # round, over the rounds in between. Per-round windows are racy at their edges
            # (the next round's model leaves as the metrics of this one arrive); this mean
            # is off by at most one round's edge traffic over len(rows) - 1 rounds.
            out[f"{prefix}bytes_{d}_per_round_steady"] = (
                int(proxy.bytes_between(label, d, rows[0]["t_end"], rows[-1]["t_end"]) / (len(rows) - 1))
                if len(rows) > 1 else (out[f"{prefix}bytes_{d}_per_round"] or [None])[0])
        out[f"{prefix}connections"] = proxy.connections.get(label, 0)
    return out


# ---------------------------------------------------------------- fedmq


def run_fedmq(work: Path, data: dict[str, Any], clients: int, rounds: int, slow: set[int], slowdown: float,
              timeout: float, compression: str = "none", server_lr: float = 1.0) -> dict[str, Any]:
    """One fedmq run; `compression` is the job's `[compression] preset`, `server_lr` its
    FedAvg server step (1.0: plain FedAvg, as Flower runs it)."""
    root = work
    root.mkdir(parents=True, exist_ok=True)
    broker = start_broker("mosquitto", data_dir=root / "broker", persistence=False)
    proxy = CountingProxy(broker.host, broker.port)
    fleet = watcher = None
    sampler = RssSampler()
    arrivals: list[tuple[float, dict[str, Any]]] = []
    try:
        slave_port, master_port = proxy.listen("slaves"), proxy.listen("master")
        settings = dict(broker.settings)
        overrides = {}
        for i in range(clients):
            table: dict[str, Any] = {"data": str(data["shards"][i])}
            if i in slow:
                table["slowdown"] = float(slowdown)
            overrides[f"slave-{i:02d}"] = {"slave": table}
        fleet = LocalFleet(root / "fleet", {**settings, "port": slave_port}, slaves=clients, rounds=rounds,
                           job={"broker": {"port": master_port}, "master": {"eval": str(data["test"])},
                                "compression": {"preset": compression},
                                "strategy": {"name": "fedavg", "server_lr": server_lr}},
                           slave_overrides=overrides)
        split_ok = same_split(root / "fleet" / "split.npz", data["split"])
        watcher = Watcher(settings, lambda row: arrivals.append((time.time(), row)))  # direct, not counted
        cpu0, t_launch = cpu_busy(), time.time()
        fleet.start_all()
        sampler.watch("server", fleet.procs["master"].pid)
        sampler.watch("client", fleet.procs["slave-00"].pid)
        for name in fleet.names[1:]:
            sampler.watch(name, fleet.procs[name].pid)  # CPU only
        broker_proc = getattr(broker, "_proc", None)
        if broker_proc is not None:
            sampler.watch("broker", broker_proc.pid)
        sampler.start()
        try:
            master_exit = fleet.procs["master"].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            master_exit = None
        t_done = time.time()
        cpu = cpu_busy() - cpu0
        time.sleep(0.5)  # the last metrics row and status
        sampler.stop()
        status = watcher.status
    finally:
        if watcher is not None:
            watcher.close()
        if fleet is not None:
            fleet.stop_all()
        proxy.close()
        broker.stop()
    rows = [{"round": r["round"], "accuracy": r.get("accuracy", 0.0), "seconds": r["seconds"], "t_end": t,
             "updates": r.get("updates")} for t, r in arrivals]
    out = summarize(rows, t_launch, proxy, {"": "slaves", "master_": "master"}, t_done)
    out.update({
        "system": "fedmq", "compression": compression, "server_lr": server_lr, "clients": clients,
        "slow_clients": sorted(slow),
        "slowdown": slowdown,
        "master_exit": master_exit, "same_split": split_ok, "broker": f"mosquitto {broker.host}:{broker.port}",
        "updates_per_round": [r["updates"] for r in sorted(rows, key=lambda r: r["round"])],
        "server_peak_rss_mb": round(sampler.peak_tree.get("server", 0) / 2**20, 1),
        "client_peak_rss_mb": round(sampler.peak_tree.get("client", 0) / 2**20, 1),
        "broker_peak_rss_mb": round(sampler.peak_tree.get("broker", 0) / 2**20, 1),
        "cpu_seconds": round(sampler.cpu_seconds(), 1), "machine_cpu_seconds": round(cpu, 1),
        "load_avg_1m_mean": _mean(sampler.loadavg), "logs": str(root / "fleet" / "logs"),
        # the master's own count by message kind (one copy of each publish; the broker fans it out)
        "master_traffic": status.get("traffic"), "downlink": status.get("downlink"),
    })
    return out


# ---------------------------------------------------------------- Flower


def flower_version() -> str | None:
    try:
        from importlib.metadata import version
        return version("flwr")
    except Exception:  # noqa: BLE001
        return None


def _wait_port(port: int, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"flower-superlink did not listen on {port} within {timeout:g} s")


def run_flower(work: Path, data: dict[str, Any], clients: int, rounds: int, slow: set[int], slowdown: float,
               timeout: float) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    home, logs = work / "flwr-home", work / "logs"
    home.mkdir(exist_ok=True)
    logs.mkdir(exist_ok=True)
    bindir = Path(sys.executable).parent
    fleet_port, control_port = free_port(), free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{control_port}"\ninsecure = true\n')
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", "FLWR_HOME": str(home),
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1"}
    out_path = work / "rounds.jsonl"
    out_path.unlink(missing_ok=True)
    proxy = CountingProxy("127.0.0.1", fleet_port)
    sampler = RssSampler()
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str, argv: list[str]) -> subprocess.Popen:
        with open(logs / f"{name}.log", "wb") as log:
            procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work,
                                           start_new_session=True)
        track(procs[name])  # its group, for the cleanup at exit (a ClientApp may outlive its SuperNode)
        return procs[name]

    run_exit = None
    try:
        node_port = proxy.listen("clients")
        cpu0, t_launch = cpu_busy(), time.time()
        link = start("superlink", [str(bindir / "flower-superlink"), "--insecure",
                                   "--fleet-api-address", f"127.0.0.1:{fleet_port}",
                                   "--serverappio-api-address", f"127.0.0.1:{free_port()}",
                                   "--control-api-address", f"127.0.0.1:{control_port}"])
        sampler.watch("server", link.pid)
        sampler.start()
        for port in (fleet_port, control_port):
            _wait_port(port, 60, link)
        for i in range(clients):
            cfg = f"partition-id={i} num-partitions={clients}" + (f" slowdown={float(slowdown)}" if i in slow else "")
            node = start(f"supernode-{i}", [str(bindir / "flower-supernode"), "--insecure",
                                            "--superlink", f"127.0.0.1:{node_port}",
                                            "--clientappio-api-address", f"127.0.0.1:{free_port()}",
                                            "--node-config", cfg])
            sampler.watch("client" if i == 0 else f"supernode-{i}", node.pid)  # others: CPU only
        run_config = (f'num-server-rounds={rounds} num-clients={clients} '
                      f'data-path="{data["flower"]}" out-path="{out_path}"')
        run = start("flwr-run", [str(bindir / "flwr"), "run", str(FLOWER_APP), "--stream",
                                 "--run-config", run_config])
        sampler.watch("cli", run.pid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _flower_rows(out_path, rounds) >= rounds or run.poll() is not None:
                break
            time.sleep(0.2)
        t_done = time.time()
        cpu = cpu_busy() - cpu0
        try:
            run_exit = run.wait(timeout=30)
        except subprocess.TimeoutExpired:
            run_exit = None
        sampler.stop()
    finally:
        sampler.stop()
        for name, proc in procs.items():
            group = {"supernode-0": "client", "superlink": "server", "flwr-run": "cli"}.get(name, name)
            kill_tree(proc, known=sampler.seen.get(group, {}))
        proxy.close()
    raw = [json.loads(line) for line in out_path.read_text().splitlines() if line.strip()] if out_path.exists() else []
    rows = [{"round": r["round"], "accuracy": r["accuracy"], "seconds": r["end"] - r["start"], "t_end": r["end"],
             "updates": r["updates"]} for r in raw if r["round"] >= 1]
    out = summarize(rows, t_launch, proxy, {"": "clients"}, t_done)
    out.update({
        "system": "flower", "engine": "deployment", "flwr_version": flower_version(), "clients": clients,
        "slow_clients": sorted(slow), "slowdown": slowdown, "flwr_run_exit": run_exit,
        "updates_per_round": [r["updates"] for r in sorted(rows, key=lambda r: r["round"])],
        "server_peak_rss_mb": round(sampler.peak_tree.get("server", 0) / 2**20, 1),
        "client_peak_rss_mb": round(sampler.peak_tree.get("client", 0) / 2**20, 1),
        "client_peak_single_process_rss_mb": round(sampler.peak_single.get("client", 0) / 2**20, 1),
        "cpu_seconds": round(sampler.cpu_seconds([g for g in sampler.roots if g != "cli"]), 1),
        "cli_cpu_seconds": round(sampler.cpu_seconds(["cli"]), 1), "machine_cpu_seconds": round(cpu, 1),
        "load_avg_1m_mean": _mean(sampler.loadavg), "logs": str(logs),
    })
    if len(rows) < rounds:
        out["error"] = f"only {len(rows)} of {rounds} rounds finished; see {logs}"
    return out


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 2) if values else None


def _flower_rows(path: Path, rounds: int) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if line.strip() and json.loads(line)["round"] >= 1)
    except (OSError, ValueError):
        return 0


# ---------------------------------------------------------------- report


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch
    return {"nproc": os.cpu_count(), "cpu": cpu, "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "torch": torch.__version__, "flwr": flower_version(),
            "mosquitto": _mosquitto_version()}


def _mosquitto_version() -> str | None:
    from fedmq.broker import find_mosquitto
    binary = find_mosquitto()
    if not binary:
        return None
    try:
        out = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=5).stdout
        return out.splitlines()[0].strip() if out else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def _kb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1000:.1f}"


def print_tables(results: dict[str, dict[str, Any]]) -> None:
    print()
    print("s/round: median; s to .90: sum of round durations; wall to .90: from launch; KB/rnd: rounds 2..N; "
          "CPU s: the system's processes; load: mean 1-min load average of the machine during the run")
    header = (f"{'system':<16} {'rounds':>6} {'final acc':>9} {'s/round':>8} {'s to .90':>8} {'wall to .90':>11} "
              f"{'KB up':>9} {'KB down':>9} {'KB up/rnd':>9} {'KB dn/rnd':>9} {'KB up .90':>9} {'KB dn .90':>9} "
              f"{'srv RSS MB':>10} {'cli RSS MB':>10} {'CPU s':>7} {'load':>5}")
    print(header)
    for key, r in results.items():
        if not r or "rounds" not in r:
            continue
        print(f"{key:<16} {r['rounds']:>6} {r['final_accuracy'] or 0:>9.4f} {r['seconds_per_round'] or 0:>8.3f} "
              f"{r['seconds_to_090'] if r['seconds_to_090'] is not None else '-':>8} "
              f"{r['wall_to_090'] if r['wall_to_090'] is not None else '-':>11} "
              f"{_kb(r['bytes_up']):>9} {_kb(r['bytes_down']):>9} {_kb(r['bytes_up_per_round_steady']):>9} "
              f"{_kb(r['bytes_down_per_round_steady']):>9} {_kb(r['bytes_up_to_090']):>9} "
              f"{_kb(r['bytes_down_to_090']):>9} {r['server_peak_rss_mb']:>10} "
              f"{r['client_peak_rss_mb']:>10} {r['cpu_seconds']:>7} {r['load_avg_1m_mean'] or 0:>5.1f}")
    for key, r in results.items():
        if r and r.get("system") == "fedmq":
            print(f"{key}: master's own traffic {_kb(r['master_bytes_up'])} KB up, {_kb(r['master_bytes_down'])} KB "
                  f"down ({_kb(r['master_bytes_up_per_round_steady'])} / "
                  f"{_kb(r['master_bytes_down_per_round_steady'])} KB per round); "
                  f"broker peak RSS {r['broker_peak_rss_mb']} MB; compression {r['compression']}")
            traffic = r.get("master_traffic") or {}
            for d in ("up", "down"):
                kinds = ", ".join(f"{kind} {_kb(n)}" for kind, n in sorted(traffic.get(d, {}).items()))
                print(f"  master's count {d} by kind, KB (one copy per publish): {kinds or '-'}")
            if r.get("downlink"):
                print(f"  downlink: {r['downlink']}")
    print()
    print("accuracy per round:")
    for key, r in results.items():
        if r and "accuracy" in r:
            print(f"  {key:<16} " + " ".join(f"{a:.3f}" for a in r["accuracy"]))
    print("seconds per round:")
    for key, r in results.items():
        if r and "round_seconds" in r:
            print(f"  {key:<16} " + " ".join(f"{s:.2f}" for s in r["round_seconds"]))


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 2)


SYSTEMS = ("flower", "fedmq", "fedmq_dense")  # fedmq = the compressed run, fedmq_dense = no compression
SUMMARY_KEYS = ["seconds_per_round", "seconds_to_090", "wall_to_090", "bytes_up", "bytes_down",
                "bytes_up_to_090", "bytes_down_to_090", "bytes_up_per_round_steady", "bytes_down_per_round_steady",
                "final_accuracy", "server_peak_rss_mb", "client_peak_rss_mb", "cpu_seconds", "machine_cpu_seconds",
                "load_avg_1m_mean", "wall_seconds"]
RATIO_KEYS = ["seconds_per_round", "seconds_to_090", "wall_to_090", "bytes_up", "bytes_down", "bytes_up_to_090",
              "bytes_down_to_090", "bytes_up_per_round_steady", "bytes_down_per_round_steady",
              "server_peak_rss_mb", "client_peak_rss_mb", "cpu_seconds"]
FEDMQ_KEYS = ["master_bytes_up", "master_bytes_down", "master_bytes_up_per_round_steady",
              "master_bytes_down_per_round_steady", "broker_peak_rss_mb", "same_split", "compression", "server_lr",
              "master_traffic", "downlink"]
DEFAULT_COMPRESSION = "lean"


def summarize_all(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The flat keys of the last line: `SYSTEM[_slow]_KEY` for each system and scenario,
    `ratio[_slow]_KEY` = Flower / fedmq (compressed), `ratio_dense[_slow]_KEY` = Flower / fedmq dense."""
    summary: dict[str, Any] = {}
    for suffix in ("", "_slow"):
        for system in SYSTEMS:
            r = results.get(system + suffix, {})
            for k in SUMMARY_KEYS:
                summary[f"{system}{suffix}_{k}"] = r.get(k)
            summary[f"{system}{suffix}_accuracy"] = r.get("accuracy")
            summary[f"{system}{suffix}_round_seconds"] = r.get("round_seconds")
            if r.get("error"):
                summary[f"{system}{suffix}_error"] = r["error"]
            if system != "flower":
                for k in FEDMQ_KEYS:
                    summary[f"{system}{suffix}_{k}"] = r.get(k)
        for ratio, system in (("ratio", "fedmq"), ("ratio_dense", "fedmq_dense")):
            for k in RATIO_KEYS:
                summary[f"{ratio}{suffix}_{k}"] = _ratio(summary[f"flower{suffix}_{k}"],
                                                         summary[f"{system}{suffix}_{k}"])
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--compression", choices=[p for p in PRESETS if p != "none"], default=DEFAULT_COMPRESSION,
                    help=f"the [compression] preset of the compressed fedmq run (default {DEFAULT_COMPRESSION})")
    ap.add_argument("--compressed-server-lr", type=float, default=2.0,
                    help="FedAvg server step of the compressed run (default 2.0: sparse updates with error feedback "
                         "deliver each coordinate late and in lumps; the dense runs and Flower use 1.0)")
    ap.add_argument("--slow-clients", type=int, default=2, help="how many clients are slow in the slow scenario")
    ap.add_argument("--slowdown", type=float, default=5.0)
    ap.add_argument("--slow-rounds", type=int, default=None, help="rounds of the slow scenario (default: --rounds)")
    ap.add_argument("--no-slow", action="store_true", help="skip the slow scenario")
    ap.add_argument("--fedmq-only", action="store_true")
    ap.add_argument("--flower-only", action="store_true")
    ap.add_argument("--workdir", type=Path, default=None, help="where logs and data go (default: a new temp dir)")
    ap.add_argument("--round-timeout", type=float, default=240.0, help="seconds allowed per round before giving up")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.clients < 1:
        ap.error("--rounds and --clients must be positive")
    stop_children_on_exit()
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="fedmq-vs-flower-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"work dir: {work}", flush=True)

    flower_skip = None
    if args.fedmq_only:
        flower_skip = "--fedmq-only"
    elif importlib.util.find_spec("flwr") is None or not shutil.which("flower-superlink", path=str(Path(sys.executable).parent)):
        flower_skip = "flwr is not installed (pip install 'fedmq[bench]')"
    if flower_skip:
        print(f"Flower skipped: {flower_skip}", flush=True)

    data = prepare_data(work, args.clients)
    slow = set(range(max(0, args.clients - args.slow_clients), args.clients))
    slow_rounds = args.slow_rounds or args.rounds
    scenarios = [("base", set(), args.rounds)] + ([] if args.no_slow or not slow else [("slow", slow, slow_rounds)])
    results: dict[str, dict[str, Any]] = {}
    for scenario, slow_set, rounds in scenarios:
        suffix = "" if scenario == "base" else "_slow"
        timeout = 60 + rounds * args.round_timeout
        if not args.flower_only:
            for system, preset, server_lr in (("fedmq_dense", "none", 1.0),
                                              ("fedmq", args.compression, args.compressed_server_lr)):
                print(f"fedmq {scenario}, compression {preset}, server_lr {server_lr}: {args.clients} slaves, "
                      f"{rounds} rounds ...", flush=True)
                results[system + suffix] = r = run_fedmq(work / f"{system}-{scenario}", data, args.clients, rounds,
                                                         slow_set, args.slowdown, timeout, compression=preset,
                                                         server_lr=server_lr)
                print(f"  done: {r['rounds']} rounds, final accuracy {r['final_accuracy']}, "
                      f"{r['seconds_per_round']} s/round, {_kb(r['bytes_up'])} KB up, {_kb(r['bytes_down'])} KB down, "
                      f"wall {r['wall_seconds']} s", flush=True)
        if flower_skip is None:
            print(f"Flower {scenario}: {args.clients} supernodes, {rounds} rounds (deployment engine) ...", flush=True)
            try:
                results["flower" + suffix] = run_flower(work / f"flower-{scenario}", data, args.clients, rounds,
                                                        slow_set, args.slowdown, timeout)
            except (OSError, RuntimeError) as exc:
                results["flower" + suffix] = {"system": "flower", "error": f"{type(exc).__name__}: {exc}"}
            r = results["flower" + suffix]
            print(f"  done: {r.get('rounds')} rounds, final accuracy {r.get('final_accuracy')}, "
                  f"{r.get('seconds_per_round')} s/round, wall {r.get('wall_seconds')} s {r.get('error', '')}",
                  flush=True)

    print_tables(results)
    summary: dict[str, Any] = {"rounds": args.rounds, "clients": args.clients, "compression": args.compression,
                               "slow_rounds": slow_rounds, "slow_clients": sorted(slow), "slowdown": args.slowdown,
                               "flower_engine": None if flower_skip else "deployment", "flower_skipped": flower_skip,
                               "machine": machine(), "work_dir": str(work), **summarize_all(results)}
    (work / "results.json").write_text(json.dumps({"summary": summary, "results": results}, indent=2) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
