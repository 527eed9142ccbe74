"""Master ingest benchmark: verified, decoded, journaled and aggregated updates per second.

    python bench/ingest.py                 # all sizes x modes, about 3 minutes
    python bench/ingest.py --only 1m:dense --profile   # one configuration, with py-spy
    python bench/ingest.py --smoke         # seconds: tiny model, a few updates

For models of 10 K, 100 K, 1 M and 10 M parameters (MLPs), and updates sent dense
(float32), top-1 % sparse (`coo`, int32 indices + float32 values) or int8-quantized
(`q8`), it measures four things in one run:

* **broker** -- the real thing: a Mosquitto of our own (fedmq.broker.start_broker, free
  port), the real master process (`python -m fedmq master run -c job.toml`, i.e.
  MasterDaemon: Transport with manual ack -> Inbox.receive -> MasterCore.on_message ->
  messages.validate, tensors_of, validate_state_dict -> JournalFile.append (fsync) ->
  ack -> FedAvg every K updates, checkpoint, model and round published), and
  publisher processes (bench/_ingest_pub.py) holding K enrolled slave identities
  (allowlist) that publish pre-sealed updates (Sealer: CBOR, SHA-256, Ed25519, 64 KiB
  chunks) QoS 1 as soon as each round is announced. The job has quorum K (every
  identity sends one update per round), so the master aggregates every K updates.
  Rate = updates / seconds over rounds 2..R, from the master's own metrics JSON
  (round announcement -> aggregation, back to back); round 1 is the warm-up.
* **in-process** -- the same functions without broker or sockets: a MasterCore fed by an
  Inbox, its effects carried out as MasterDaemon.apply does (journal with fsync,
  checkpoint, model sealing), timed by stage. The gap to *broker* is MQTT + paho +
  the other processes sharing the two cores.
* **limit** -- a plain copy + SHA-256 of the same number of bytes as one update's
  payloads (best of N): the least any receiver of hash-then-signed messages must do.
  `limit_ratio` = broker time per update / limit time per update.
* **transport floor** -- the same chunk stream through a fresh Mosquitto into a
  subscriber that is the master's Transport with nothing behind it
  (bench/_ingest_floor.py): what paho-mqtt and the broker cost before the master does
  anything. `limit_ratio_lower_bound` = (broker CPU + floor client CPU + limit) /
  cores / limit: the least ratio any master on paho could reach on this machine.

The master's journal and checkpoint live in a temporary directory on the disk that
holds /tmp (use --state-dir to choose); the 1 M dense case is also run with them on
tmpfs (/dev/shm) to separate the disk from the CPU. The last line is JSON.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cbor2  # noqa: E402
import psutil  # noqa: E402

from _procs import stop_children_on_exit  # noqa: E402
from _ingest_common import JOB, MODES, SIZES, encoded_update, model_spec, param_count, seal_update  # noqa: E402

from fedmq.broker import start_broker  # noqa: E402
from fedmq.demo import to_toml  # noqa: E402
from fedmq.common import messages as M  # noqa: E402
from fedmq.common.channel import Inbox, Sealer  # noqa: E402
from fedmq.common.chunks import DEFAULT_CHUNK_SIZE  # noqa: E402
from fedmq.common.effects import (MASTER_EFFECTS, Ack, Checkpoint, Finish, Interpreter, Journal, Log,  # noqa: E402
                                  Publish, PublishJson, Trust)
from fedmq.common.jobconfig import parse_job  # noqa: E402
from fedmq.common.keys import Identity, KeyRing, raw_public_bytes, write_identity  # noqa: E402
from fedmq.common.modelspec import build_model  # noqa: E402
from fedmq.common.shell import GroupCommit, JournalFile, write_atomic  # noqa: E402
from fedmq.common.strategies import make_strategy  # noqa: E402
from fedmq.common.topics import Topics  # noqa: E402
from fedmq.common.brokerconfig import BrokerConfig  # noqa: E402
from fedmq.common.transport import Inbound, Transport# noqa: E402
from fedmq.master.core import MasterCore  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: size -> (K = identities = quorum, rounds incl. the warm-up round)
PLAN = {"10k": (50, 6), "100k": (20, 6), "1m": (20, 6), "10m": (4, 5)}
SMOKE_PLAN = {"10k": (3, 3)}


# ---------------------------------------------------------------- helpers


def job_table(size: str, k: int, rounds: int, state_dir: Path, keys: Path, broker: dict[str, Any]) -> dict:
    return {
        "job": {"id": JOB, "rounds": rounds, "task": JOB, "update": "delta"},
        "model": model_spec(size),
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.1},
        "strategy": {"name": "fedavg"},
        "rounds": {"participants": 0, "quorum": 0, "min_slaves": k, "deadline": 600.0, "start_wait": 3600.0},
        "enrollment": {"mode": "allowlist", "keys": str(keys / "allowlist")},
        "master": {"key": str(keys / "master.key"), "state_dir": str(state_dir)},
        "broker": broker,
    }


def make_keys(root: Path, k: int) -> list[Identity]:
    (root / "allowlist").mkdir(parents=True, exist_ok=True)
    write_identity(Identity.generate("master"), root, overwrite=True)
    idents = []
    for i in range(k):
        ident = Identity.generate(f"pub-{i:03d}")
        write_identity(ident, root, overwrite=True)
        shutil.copy(root / f"{ident.name}.pub", root / "allowlist" / f"{ident.name}.pub")
        idents.append(ident)
    return idents


def best(fn, reps: int) -> float:
    times = []
    gc.collect()
    gc.disable()
    try:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    finally:
        gc.enable()
    return min(times)


def limit_seconds(nbytes: int, reps: int = 20) -> float:
    """Copy + SHA-256 of `nbytes` (one update's payloads), best of `reps`."""
    view = memoryview(os.urandom(nbytes))

    def copy_sha() -> bytes:
        return hashlib.sha256(bytearray(view)).digest()

    return best(copy_sha, reps)


def one_update_payloads(size: str, mode: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> list[bytes]:
    ident = Identity.generate("pub-000")
    topic = Topics(JOB).slave("update", ident.name)
    return seal_update(Sealer(ident, JOB, seq=1, chunk_size=chunk_size), topic, 2, encoded_update(size, mode),
                       time.time())


# ---------------------------------------------------------------- in-process harness


def in_process(size: str, mode: str, k: int, rounds: int, state_dir: Path,
               chunk_size: int = DEFAULT_CHUNK_SIZE) -> dict[str, Any]:
    """MasterCore + Inbox + the daemon's effect handling (group commit included), no
    broker; stage times per update (wall clock, and CPU time of this thread)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    cfg = parse_job(job_table(size, k, rounds, state_dir, state_dir, {"host": "127.0.0.1", "port": 1}), state_dir)
    core = MasterCore(cfg, build_model(cfg.model), make_strategy(cfg.strategy, gradient_lr=cfg.train.lr))
    master = Identity.generate("master")
    sealer = Sealer(master, JOB, seq=1, chunk_size=cfg.chunk_size)
    idents = [Identity.generate(f"pub-{i:03d}") for i in range(k)]
    ring = KeyRing()
    for i in idents:
        ring.add(i.name, i.public_key)
    inbox = Inbox(ring, JOB, self_signed=M.SELF_SIGNED_KINDS)
    journal = JournalFile(state_dir / "journal.cbor")
    topics = cfg.topics
    stage: dict[str, float] = {}
    cpu: dict[str, float] = {}

    def timed(name: str, fn, *args, **kw):
        t, c = time.perf_counter(), time.thread_time()
        try:
            return fn(*args, **kw)
        finally:
            stage[name] = stage.get(name, 0.0) + time.perf_counter() - t
            cpu[name] = cpu.get(name, 0.0) + time.thread_time() - c

    acks = GroupCommit(journal, lambda token: None)

    def append(record: dict, raw_body: bytes) -> None:  # as MasterDaemon, as if messages kept coming
        journal.append(record, raw_body)
        acks.ack(object(), time.monotonic())
        if acks.due(time.monotonic(), idle=False):
            acks.commit()

    aggregate = core.strategy.aggregate
    core.strategy.aggregate = lambda *a, **kw: timed("aggregate (FedAvg)", aggregate, *a, **kw)  # type: ignore[method-assign]

    def checkpoint(fx: Checkpoint) -> None:
        def write() -> None:
            acks.commit()  # as MasterDaemon: sync and release the held acks first
            write_atomic(state_dir / "checkpoint.cbor", cbor2.dumps(fx.state))
            journal.truncate()
        timed("checkpoint (CBOR + write + fsync)", write)

    apply = Interpreter({
        Publish: lambda fx: timed("publish: seal model/round", sealer.seal, fx.topic, fx.kind, fx.body, now=time.time(),
                                  version=fx.version, round=fx.round),
        PublishJson: lambda fx: timed("publish: status/metrics JSON", json.dumps, fx.data, default=str),
        Journal: lambda fx: timed("journal append (write; fsync per batch)", append, fx.record, fx.raw_body),
        Checkpoint: checkpoint,
    }, ignore={Ack, Log, Trust, Finish}, covers=MASTER_EFFECTS)

    now = time.time()
    apply(core.start(now))
    for ident in idents:
        topic = topics.slave("confirm", ident.name)
        (payload,) = Sealer(ident, JOB, seq=1).seal(
            topic, M.CONFIRM, {"public_key": raw_public_bytes(ident.public_key), "samples": 10,
                               "capabilities": {}}, now=now)
        apply(core.on_message(inbox.receive(topic, payload, now), now))
    assert core.round is not None and core.round.number == 1, "round 1 did not start"
    tensors = encoded_update(size, mode)
    sealers = {i.name: Sealer(i, JOB, seq=10, chunk_size=chunk_size) for i in idents}
    updates = 0
    total = 0.0
    for rnd in range(1, rounds + 1):
        batch = [(i.name, topics.slave("update", i.name),
                  seal_update(sealers[i.name], topics.slave("update", i.name), rnd, tensors, now)) for i in idents]
        if rnd == 2:
            stage.clear()
            cpu.clear()
            c_start = time.thread_time()
        t_round = time.perf_counter()
        for _name, topic, payloads in batch:
            got = None
            for p in payloads:
                got = timed("Inbox.receive (parse, verify, reassemble, SHA-256, decode)", inbox.receive, topic, p, now)
            fx = timed("core.on_message (validate, tensors_of, validate_state_dict, aggregate)",
                       core.on_message, got, now, object())
            apply(fx)
        if rnd >= 2:
            total += time.perf_counter() - t_round
            updates += len(batch)
        del batch
    cpu_total = time.thread_time() - c_start
    journal.close()
    assert core.version == rounds, f"{core.version} aggregations, expected {rounds}"
    core_key = "core.on_message (validate, tensors_of, validate_state_dict, aggregate)"
    for d in (stage, cpu):
        d[core_key] -= d.get("aggregate (FedAvg)", 0.0)
        d["core.on_message (validate, tensors_of, validate_state_dict)"] = d.pop(core_key)
    return {"updates": updates, "seconds": total, "cpu_seconds": cpu_total,
            "per_update_s": {s: t / updates for s, t in stage.items()},
            "per_update_cpu_s": {s: t / updates for s, t in cpu.items()}}


# ---------------------------------------------------------------- broker run


class Watch:
    """Metrics JSON of the master (as mosquitto_sub would see it), plus CPU/RSS samples."""

    def __init__(self, broker: BrokerConfig, master: psutil.Process, mosquitto: psutil.Process) -> None:
        self.rows: list[dict[str, Any]] = []
        self.master, self.mosquitto = master, mosquitto
        self.samples: list[tuple[float, float, float, int]] = []  # (time, master cpu, broker cpu, master rss)
        self.done = threading.Event()
        self.rounds = 0
        self.transport = Transport(broker, f"ingest-watch-{os.getpid()}", self._on, clean_start=True)
        self.transport.subscribe(Topics(JOB).master("metrics"))
        self.transport.start()
        if not self.transport.wait_connected(10):
            raise RuntimeError("watcher could not connect")

    def sample(self) -> None:
        try:
            m = self.master.cpu_times()
            rss = self.master.memory_info().rss
            b = self.mosquitto.cpu_times()
        except psutil.Error:
            return
        self.samples.append((time.monotonic(), m.user + m.system, b.user + b.system, rss))

    def _on(self, msg: Inbound) -> None:
        try:
            row = json.loads(msg.payload)
        except ValueError:
            return
        self.sample()
        self.rows.append(row)
        if len(self.rows) >= self.rounds:
            self.done.set()

    def close(self) -> None:
        self.transport.stop()


def _python_child(proc: subprocess.Popen, timeout: float = 10.0) -> psutil.Process:
    """The master's Python process (the child of py-spy when profiling)."""
    p = psutil.Process(proc.pid)
    end = time.monotonic() + timeout
    while "py-spy" in " ".join(p.cmdline()) and time.monotonic() < end:
        kids = p.children()
        if kids:
            return kids[0]
        time.sleep(0.05)
    return p


def broker_run(size: str, mode: str, k: int, rounds: int, work: Path, state_dir: Path, *,
               publishers: int, timeout: float, profile: Path | None = None,
               chunk_size: int = DEFAULT_CHUNK_SIZE) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    keys = work / "keys"
    idents = make_keys(keys, k)
    broker = start_broker("mosquitto", data_dir=work / "broker")
    procs: list[subprocess.Popen] = []
    watch = None
    try:
        settings = broker.settings
        job = work / "job.toml"
        job.write_text(to_toml(job_table(size, k, rounds, state_dir, keys, settings)))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        groups = [idents[i::publishers] for i in range(publishers)]
        pub_cfgs = []
        for n, group in enumerate(groups):
            c = work / f"pub-{n}.json"
            c.write_text(json.dumps({
                "broker": {"host": broker.host, "port": broker.port}, "job": JOB, "size": size, "mode": mode,
                "rounds": rounds, "seed": n, "timeout": timeout, "master_pub": str(keys / "master.pub"),
                "chunk_size": chunk_size,
                "identities": [[i.name, str(keys / f"{i.name}.key")] for i in group]}))
            pub_cfgs.append(c)
        argv = [sys.executable, "-m", "fedmq", "master", "run", "-c", str(job)]  # MasterDaemon, as shipped
        if profile is not None:
            argv = [shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy")), "record", "-r", "250",
                    "--threads", "--nonblocking", "-f", "raw", "-o", str(profile), "--"] + argv
        mlog = open(work / "master.log", "wb")
        master = subprocess.Popen(argv, stdout=mlog, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        procs.append(master)
        watch = Watch(broker.broker_config(), _python_child(master), psutil.Process(broker.pid))
        watch.rounds = rounds
        for c in pub_cfgs:
            procs.append(subprocess.Popen([sys.executable, str(HERE / "_ingest_pub.py"), str(c)],
                                          stdout=subprocess.PIPE, stderr=open(work / f"{c.stem}.log", "wb"),
                                          env=env, cwd=ROOT))
        watch.done.wait(timeout)
        pub_stats = []
        for p in procs[1:]:
            try:
                out, _ = p.communicate(timeout=max(5.0, timeout / 4))
                pub_stats.append(json.loads(out.decode().strip().splitlines()[-1]))
            except (subprocess.TimeoutExpired, ValueError, IndexError):
                pub_stats.append({"error": "no report"})
        try:
            master.wait(timeout=60 if profile else 20)
        except subprocess.TimeoutExpired:
            pass
        mlog.close()
        rows = sorted(watch.rows, key=lambda r: r["round"])
        if len(rows) < rounds:
            tail = (work / "master.log").read_text(errors="replace").splitlines()[-15:]
            raise RuntimeError(f"{size}/{mode}: {len(rows)} of {rounds} rounds within {timeout:g} s:\n" + "\n".join(tail))
        steady = rows[1:] if len(rows) > 1 else rows
        seconds = sum(r["seconds"] for r in steady)
        n = sum(r["updates"] for r in steady)
        s = watch.samples
        first, last = s[0], s[-1]  # CPU at the end of round 1 and of the last round
        return {
            "updates": n, "seconds": seconds, "updates_per_s": n / seconds if seconds else None,
            "bytes_per_update": steady[-1]["bytes_up"] / steady[-1]["updates"],
            "master_cpu_per_update_ms": 1e3 * (last[1] - first[1]) / n,
            "broker_cpu_per_update_ms": 1e3 * (last[2] - first[2]) / n,
            "master_cpu_share": (last[1] - first[1]) / (last[0] - first[0]) if last[0] > first[0] else None,
            "master_rss_mb": max(x[3] for x in s) / 2**20,
            "publishers": pub_stats,
        }
    finally:
        if watch is not None:
            watch.close()
        for p in procs:  # by PID, only our own
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        broker.stop()


def floor_run(payloads: list[bytes], updates: int, work: Path, timeout: float) -> dict[str, Any]:
    """The transport floor: `updates` copies of one update's chunk stream, through a
    Mosquitto of our own, into a subscriber that only receives and acks
    (bench/_ingest_floor.py: the master's Transport, nothing behind it). Publishes
    from this process, as the publishers do from theirs."""
    work.mkdir(parents=True, exist_ok=True)
    broker = start_broker("mosquitto", data_dir=work / "broker")
    sub = None
    pub = None
    try:
        cfg = work / "floor.json"
        cfg.write_text(json.dumps({"broker": {"host": broker.host, "port": broker.port}, "job": JOB,
                                   "messages": updates * len(payloads), "timeout": timeout}))
        sub = subprocess.Popen([sys.executable, str(HERE / "_ingest_floor.py"), str(cfg)], stdout=subprocess.PIPE,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=ROOT)
        assert sub.stdout is not None
        if json.loads(sub.stdout.readline() or b"{}").get("ready") is not True:
            raise RuntimeError("floor subscriber did not start")
        mosq = psutil.Process(broker.pid)
        pub = Transport(broker.broker_config(), f"ingest-floor-pub-{os.getpid()}", lambda _m: None, clean_start=True)
        pub.start()
        if not pub.wait_connected(10):
            raise RuntimeError("floor publisher could not connect")
        topic = Topics(JOB).slave("update", "pub-000")
        b0 = sum(mosq.cpu_times()[:2])
        for _ in range(updates):
            for p in payloads:
                pub.publish(topic, p, qos=1)
        out, _ = sub.communicate(timeout=timeout)
        b1 = sum(mosq.cpu_times()[:2])
        res = json.loads(out.decode().strip().splitlines()[-1])
        if not res.get("complete"):
            raise RuntimeError(f"floor subscriber got {res.get('messages')} of {updates * len(payloads)} messages")
        return {"updates_per_s": updates / res["seconds"], "cpu_ms_per_update": 1e3 * res["cpu_seconds"] / updates,
                "broker_cpu_ms_per_update": 1e3 * (b1 - b0) / updates}
    finally:
        if pub is not None:
            pub.stop()
        if sub is not None and sub.poll() is None:
            sub.kill()
            sub.wait(timeout=10)
        broker.stop()


# ---------------------------------------------------------------- profile summary


_WRAPPERS = ("_run_module_as_main", "_run_code", "<module>", "Group.", "Command.", "Context.", "user_errors",
             "master_run", "main (", "Thread.", "Client.loop_forever", "Client._thread_main", "MasterDaemon.run",
             "Shell.run", "convert_exception")


def summarize_profile(path: Path, top: int = 14) -> dict[str, Any]:
    """Self and inclusive sample shares by function from a py-spy raw (folded) file."""
    self_c: dict[str, int] = {}
    incl: dict[str, int] = {}
    threads: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        c = int(count)
        frames = stack.split(";")
        frames = [f for f in frames if not f.startswith(("thread", "process"))]
        if not frames or not any(f.startswith(("Shell.run", "Client._thread_main")) for f in frames):
            continue  # start-up (imports, model build) and shutdown: not the serving phase
        total += c
        names = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1] + ")" if " (" in f else f
                 for f in frames]
        where = "paho network thread" if any("_thread_main" in f or "loop_forever" in f for f in names) else "main loop"
        threads[where] = threads.get(where, 0) + c
        self_c[names[-1]] = self_c.get(names[-1], 0) + c
        for name in set(names):
            if not name.startswith(_WRAPPERS):
                incl[name] = incl.get(name, 0) + c
    pct = lambda d: [(k, round(100 * v / total, 1)) for k, v in sorted(d.items(), key=lambda kv: -kv[1])]  # noqa: E731
    return {"samples": total, "threads": dict(pct(threads)), "self": pct(self_c)[:top], "inclusive": pct(incl)[: top * 3]}


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", metavar="SIZE:MODE", help="e.g. 1m:dense (repeatable)")
    ap.add_argument("--smoke", action="store_true", help="10 K parameters, dense, 3 identities, 3 rounds")
    ap.add_argument("--publishers", type=int, default=2, help="publisher processes (default 2)")
    ap.add_argument("--state-dir", type=Path, default=None,
                    help="where the master journals (default: a temporary directory under /tmp)")
    ap.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                    help="chunk size the publishers seal updates with (default 64 KiB, what slaves use)")
    ap.add_argument("--no-extra", action="store_true",
                    help="skip the extra 1m:dense run with the journal on tmpfs")
    ap.add_argument("--no-in-process", action="store_true", help="skip the in-process harness")
    ap.add_argument("--no-floor", action="store_true", help="skip the transport floor (receive-and-ack only)")
    ap.add_argument("--profile", action="store_true", help="also run 1m:dense under py-spy and summarize")
    ap.add_argument("--timeout", type=float, default=600.0, help="per broker run, seconds")
    args = ap.parse_args()

    stop_children_on_exit()  # the cleanup below (brokers, processes) runs on SIGTERM and SIGINT too
    plan = SMOKE_PLAN if args.smoke else PLAN
    configs = [(s, m) for s in plan for m in (("dense",) if args.smoke else MODES)]
    if args.only:
        configs = [tuple(o.split(":")) for o in args.only]  # type: ignore[misc]
        for s, m in configs:
            if s not in SIZES or m not in MODES:
                ap.error(f"--only {s}:{m}: sizes {list(SIZES)}, modes {list(MODES)}")
    tmp = Path(tempfile.mkdtemp(prefix="fedmq-ingest-"))
    state_base = args.state_dir or tmp
    results: list[dict[str, Any]] = []
    figures: dict[str, Any] = {"dense_1m_updates_per_s": None, "dense_1m_limit_ratio": None}
    load0 = os.getloadavg()
    profile_summary = None
    try:
        runs = [(s, m, "disk") for s, m in configs]
        if not args.smoke and not args.no_extra and ("1m", "dense") in configs and os.path.isdir("/dev/shm"):
            runs.append(("1m", "dense", "tmpfs"))
        for n, (size, mode, where) in enumerate(runs):
            k, rounds = plan.get(size, PLAN.get(size, (4, 3)))
            payloads = one_update_payloads(size, mode, args.chunk_size)
            wire, chunks = sum(len(p) for p in payloads), len(payloads)
            lim = limit_seconds(wire, 5 if args.smoke else 20)
            sd = (Path(tempfile.mkdtemp(prefix="fedmq-ingest-", dir="/dev/shm")) if where == "tmpfs"
                  else state_base / f"state-{n}")
            row: dict[str, Any] = {"size": size, "params": param_count(size), "mode": mode, "journal": where,
                                   "k": k, "rounds": rounds, "wire_bytes": wire,
                                   "chunks": chunks, "limit_s": lim}
            try:
                if not args.no_in_process:
                    ip = in_process(size, mode, k, min(rounds, 4), sd / "inproc", args.chunk_size)
                    row["in_process_updates_per_s"] = ip["updates"] / ip["seconds"]
                    row["in_process_cpu_ms_per_update"] = 1e3 * ip["cpu_seconds"] / ip["updates"]
                    row["in_process_stages_ms"] = {s: round(t * 1e3, 3) for s, t in ip["per_update_s"].items()}
                    row["in_process_stages_cpu_ms"] = {s: round(t * 1e3, 3) for s, t in ip["per_update_cpu_s"].items()}
                br = broker_run(size, mode, k, rounds, tmp / f"run-{n}", sd / "master",
                                publishers=args.publishers, timeout=args.timeout, chunk_size=args.chunk_size)
                row.update(br)
                row["limit_ratio"] = (1 / br["updates_per_s"]) / lim if br["updates_per_s"] else None
                if not args.no_floor and where == "disk":
                    row["floor"] = fl = floor_run(payloads, k * (rounds - 1), tmp / f"floor-{n}", args.timeout)
                    # Per update, this machine's cores must at least run the broker, the
                    # master's MQTT client and the limit's copy + SHA-256: the least wall
                    # time any master here could take, even with publishers for free.
                    floor_cpu = (fl["broker_cpu_ms_per_update"] + fl["cpu_ms_per_update"]) / 1e3 + lim
                    row["ratio_lower_bound"] = floor_cpu / (os.cpu_count() or 1) / lim
            except RuntimeError as exc:  # reported, and the other configurations still run
                print(f"# {size} {mode} journal={where}: FAILED: {exc}", file=sys.stderr, flush=True)
                continue
            finally:
                del payloads
                if where == "tmpfs":
                    shutil.rmtree(sd, ignore_errors=True)
            results.append(row)
            print(f"# {size:>4} {mode:>5} journal={where:5} K={k} {row['updates']} updates "
                  f"{row['updates_per_s']:.1f}/s  in-process {row.get('in_process_updates_per_s', float('nan')):.1f}/s  "
                  f"limit {1 / lim:.1f}/s  ratio {row['limit_ratio']:.2f}  load {os.getloadavg()[0]:.1f}",
                  file=sys.stderr, flush=True)
        if args.profile:
            prof = tmp / "master-1m-dense.pyspy.txt"
            k, rounds = PLAN["1m"]
            broker_run("1m", "dense", k, rounds, tmp / "run-profile", state_base / "state-profile",
                       publishers=args.publishers, timeout=args.timeout, profile=prof, chunk_size=args.chunk_size)
            profile_summary = summarize_profile(prof)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print_table(results)
    if profile_summary:
        print(f"\nprofile of the master process (py-spy --threads, 1m dense; "
              f"{profile_summary['samples']} non-idle samples while serving), by thread: {profile_summary['threads']}")
        print("  self time (function at the top of the stack; C code counts for its Python caller):")
        for name, p in profile_summary["self"]:
            print(f"    {p:5.1f} %  {name}")
        print("  inclusive:")
        for name, p in profile_summary["inclusive"]:
            if p >= 2:
                print(f"    {p:5.1f} %  {name}")
    for r in results:
        key = f"{r['mode']}_{r['size']}" + ("_tmpfs" if r["journal"] == "tmpfs" else "")
        figures[f"{key}_updates_per_s"] = round(r["updates_per_s"], 2)
        figures[f"{key}_limit_ratio"] = round(r["limit_ratio"], 2)
        figures[f"{key}_limit_updates_per_s"] = round(1 / r["limit_s"], 1)
        figures[f"{key}_master_cpu_ms_per_update"] = round(r["master_cpu_per_update_ms"], 3)
        if "in_process_updates_per_s" in r:
            figures[f"{key}_in_process_updates_per_s"] = round(r["in_process_updates_per_s"], 2)
            figures[f"{key}_in_process_cpu_ms_per_update"] = round(r["in_process_cpu_ms_per_update"], 3)
        if "floor" in r:
            figures[f"{key}_floor_updates_per_s"] = round(r["floor"]["updates_per_s"], 2)
            figures[f"{key}_floor_cpu_ms_per_update"] = round(r["floor"]["cpu_ms_per_update"], 3)
            figures[f"{key}_floor_broker_cpu_ms_per_update"] = round(r["floor"]["broker_cpu_ms_per_update"], 3)
            figures[f"{key}_limit_ratio_lower_bound"] = round(r["ratio_lower_bound"], 2)
    figures["chunk_size"] = args.chunk_size
    figures["smoke"] = args.smoke
    figures["loadavg_before"] = [round(x, 2) for x in load0]
    figures["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    figures["cpus"] = os.cpu_count()
    if profile_summary:
        figures["profile_1m_dense"] = profile_summary
    print(json.dumps(figures, sort_keys=True))


def print_table(results: list[dict[str, Any]]) -> None:
    print("size   params    mode  journal  K  wire/upd  chunks  updates  upd/s    MB/s  in-proc/s  limit/s  "
          "ratio  master ms/upd  broker ms/upd  master RSS MB")
    for r in results:
        print(f"{r['size']:>4} {r['params']:>9,} {r['mode']:>5} {r['journal']:>7} {r['k']:>3} "
              f"{r['wire_bytes'] / 1e6:8.3f}M {r['chunks']:>6} {r['updates']:>8} {r['updates_per_s']:7.1f} "
              f"{r['updates_per_s'] * r['wire_bytes'] / 1e6:7.1f} {r.get('in_process_updates_per_s', math.nan):10.1f} "
              f"{1 / r['limit_s']:8.1f} {r['limit_ratio']:6.2f} {r['master_cpu_per_update_ms']:14.2f} "
              f"{r['broker_cpu_per_update_ms']:14.2f} {r['master_rss_mb']:14.0f}")
    floors = [r for r in results if "floor" in r]
    if floors:
        print("\ntransport floor (receive + ack only, same chunks, same broker) and the least ratio this machine allows:")
        print("size    mode  floor upd/s  client ms/upd  broker ms/upd  limit ms/upd  ratio lower bound  measured ratio")
        for r in floors:
            f = r["floor"]
            print(f"{r['size']:>4} {r['mode']:>7} {f['updates_per_s']:12.1f} {f['cpu_ms_per_update']:14.2f} "
                  f"{f['broker_cpu_ms_per_update']:14.2f} {1e3 * r['limit_s']:13.2f} {r['ratio_lower_bound']:18.2f} "
                  f"{r['limit_ratio']:15.2f}")
    for r in results:
        if "in_process_stages_ms" in r:
            st = r["in_process_stages_ms"]
            tot = sum(st.values())
            cp = r["in_process_stages_cpu_ms"]
            print(f"\nin-process, {r['size']} {r['mode']} (journal on {r['journal']}): "
                  f"ms per update by stage, wall (sum {tot:.3f}) and CPU (sum {sum(cp.values()):.3f})")
            for s, t in sorted(st.items(), key=lambda kv: -kv[1]):
                print(f"  {t:9.3f} {cp.get(s, 0):9.3f}  {100 * t / tot if tot else 0:4.0f} %  {s}")


if __name__ == "__main__":
    main()
