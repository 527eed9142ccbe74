"""`fedmq demo`: the reference workload end to end, with real processes and a real broker.

One master and N slave processes (each `python -m fedmq ... run`, exactly what an
operator would start), a broker (Mosquitto if installed, else the embedded amqtt
one, or an existing `--broker`), keys, configs and a report, all in one directory:

    DIR/keys/        public keys of the master and every slave (to verify captured traffic)
    DIR/private/     their private keys (mode 0700)
    DIR/config/      job.toml and slave-I.toml, as an operator would write them
    DIR/logs/        one log per process
    DIR/state/       checkpoint, journal and slave state files
    DIR/split.npz    the data split (row indices), so another system can rerun it exactly
    DIR/report.json  per-round accuracy, bytes (up and down, and by message kind) and
                     seconds; final accuracy; compression; which broker (rewritten,
                     atomically, after every round: watch it grow)
    DIR/accuracy.png accuracy per round and per byte sent, and bytes per round (with the
                     [plot] extra)
    DIR/teacher.cbor with --update student: the fixed teacher the students distil from

With ``--update student`` (knowledge distillation, docs/PROTOCOL.md section 11.8) the
demo first trains the teacher -- the MLP 64-128-10 -- by in-process FedAvg on the same
shards (standing in for a teacher pretrained elsewhere), then the slaves distil two
students from it over MQTT: the first half of the slaves a student of the teacher's
architecture ("same"), the others one of half its hidden width ("half", the weak
devices). The accuracy per round is the worse student's; report.json has each part's.

The processes run the installed fedmq whatever the working directory: a folder
named `fedmq` in it (a clone, say) must not shadow the package.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from fedmq.broker import BrokerHandle, start_broker
from fedmq.common.keys import Identity, write_identity
from fedmq.common.shell import write_atomic
from fedmq.common.topics import Topics
from fedmq.common.brokerconfig import BrokerConfig
from fedmq.common.compression_settings import preset
from fedmq.common.transport import Inbound, Transport

JOB = "digits"
REPORT = "report.json"
PICTURE = "accuracy.png"

# `python -m fedmq` puts the working directory first on sys.path, where a folder named
# fedmq (a clone, a checkout's parent) would be imported as a namespace package in
# place of the installed one. -P (Python 3.11+) leaves it out; the children also run
# in the fleet's own directory, which holds no such folder.
_PYTHON = [sys.executable, "-P"] if sys.version_info >= (3, 11) else [sys.executable]


@dataclass
class DemoOptions:
    slaves: int = 8
    rounds: int = 30
    report: Path = Path("demo-report")
    broker: tuple[str, int] | None = None  # (host, port) of an existing broker
    broker_kind: str = "auto"  # what to start otherwise: auto | mosquitto | embedded
    update: str = "delta"
    strategy: str = "fedavg"
    compression: str = "none"  # the job's [compression] preset (none, int8, topk, ...)
    deadline: float = 60.0
    timeout: float = 900.0  # the whole run


@dataclass
class DemoResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    broker: dict[str, Any] = field(default_factory=dict)
    status: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    master_exit: int | None = None
    teacher_accuracy: float | None = None  # --update student: the fixed teacher's


TEACHER = "teacher.cbor"
#: --update student: a student of the teacher's architecture and one of half its hidden width
DEMO_STUDENTS = {"same": {"arch": "mlp", "sizes": [64, 128, 10], "seed": 0},
                 "half": {"arch": "mlp", "sizes": [64, 64, 10], "seed": 0}}


def train_reference_teacher(path: Path, slaves: int = 8, rounds: int = 30) -> float:
    """Train the reference MLP by in-process FedAvg on the reference split over `slaves`
    shards (DESIGN.md's workload: 2 epochs, batch 32, lr 0.1), write it as a teacher
    file (`[distill] teacher`) and return its test accuracy. A stand-in for a teacher
    pretrained elsewhere: the demo and the tests distil students from it."""
    import torch

    from fedmq.common.modelspec import build_model, float_state, load_float_state
    from fedmq.common.strategies import ClientUpdate, make_strategy
    from fedmq.common.workload import evaluate, reference_split
    from fedmq.master.jobmodel import write_weights
    from fedmq.slave.trainer import train_local

    split = reference_split(num_slaves=slaves)
    shards = [split.slave_dataset(i) for i in range(slaves)]
    model = build_model({"arch": "mlp", "sizes": [64, 128, 10], "seed": 0})
    strategy = make_strategy({"name": "fedavg"})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small MLP: more threads only spin on a shared machine
    try:
        for version in range(rounds):
            updates = [ClientUpdate(f"slave-{i}", "delta", train_local(model, shard, seed=1000 * version + i).tensors,
                                    len(shard), version) for i, shard in enumerate(shards)]
            load_float_state(model, strategy.aggregate(float_state(model), updates, version))
    finally:
        torch.set_num_threads(threads)
    write_weights(path, model)
    return evaluate(model, split.test_dataset())["accuracy"]


def to_toml(data: dict[str, dict[str, Any]]) -> str:
    """The tiny TOML subset the demo's configs need (tables of scalars and lists, and
    tables in tables, such as [distill.students.same])."""
    out = []

    def table(name: str, values: dict[str, Any]) -> None:
        scalars = [f"{k} = {json.dumps(v)}" for k, v in values.items() if not isinstance(v, dict)]
        if scalars or not values:
            out.extend([f"[{name}]", *scalars, ""])
        for k, v in values.items():
            if isinstance(v, dict):
                table(f"{name}.{k}", v)

    for name, values in data.items():
        table(name, values)
    return "\n".join(out)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class LocalFleet:
    """A master and N slave processes on this machine, in one directory (see module doc).

    `job` and `slave_overrides` are merged into the generated TOML, so tests and
    benchmarks can vary one setting; `not_allowed` slaves get keys the master's
    allowlist does not contain.
    """

    def __init__(self, root: Path, broker: Mapping[str, Any], *, slaves: int = 8, rounds: int = 30,
                 job: dict[str, Any] | None = None, slave_overrides: dict[str, dict[str, Any]] | None = None,
                 not_allowed: tuple[str, ...] = ()) -> None:
        self.root = root.resolve()
        self.broker = dict(broker)  # the [broker] table every process gets
        self.names = [f"slave-{i:02d}" for i in range(slaves)]
        self.procs: dict[str, subprocess.Popen] = {}
        self.configs = self._prepare(rounds, job or {}, slave_overrides or {}, set(not_allowed))

    def _prepare(self, rounds: int, job: dict[str, Any], slave_overrides: dict[str, dict[str, Any]],
                 not_allowed: set[str]) -> dict[str, Path]:
        from fedmq.common.workload import reference_split

        root = self.root
        keys, private, config = root / "keys", root / "private", root / "config"
        for d in (keys, private / "allowlist", config, root / "logs", root / "state"):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(private, 0o700)
        for name in ["master"] + self.names:
            ident = Identity.generate(name)
            write_identity(ident, private, overwrite=True)
            pub = (private / f"{name}.pub").read_bytes()
            (keys / f"{name}.pub").write_bytes(pub)
            if name != "master" and name not in not_allowed:
                (private / "allowlist" / f"{name}.pub").write_bytes(pub)
        n = len(self.names)
        reference_split(num_slaves=n).save(root / "split.npz")
        broker = self.broker
        paths = {"master": config / "job.toml"}
        paths["master"].write_text(to_toml(_merge({
            "job": {"id": JOB, "rounds": rounds, "task": "digits", "update": "delta"},
            "model": {"arch": "mlp", "sizes": [64, 128, 10], "seed": 0},
            "train": {"epochs": 2, "batch_size": 32, "lr": 0.1},
            "strategy": {"name": "fedavg"},
            "rounds": {"min_slaves": n - len(not_allowed), "deadline": 60.0, "start_wait": 120.0},
            "enrollment": {"mode": "allowlist", "keys": "../private/allowlist"},
            "master": {"key": "../private/master.key", "state_dir": "../state/master", "eval": "reference:test"},
            "broker": broker,
        }, job)))
        for i, name in enumerate(self.names):
            paths[name] = config / f"{name}.toml"
            paths[name].write_text(to_toml(_merge({
                "slave": {"id": name, "job": JOB, "key": f"../private/{name}.key", "master_key": "../keys/master.pub",
                          "data": f"reference:{i}/{n}", "state_dir": f"../state/{name}", "tasks": ["digits"]},
                "broker": broker,
            }, slave_overrides.get(name, {}))))
        return paths

    def start(self, name: str) -> subprocess.Popen:
        """Start (or restart) one process: "master" or a slave name."""
        kind = "master" if name == "master" else "slave"
        log = open(self.root / "logs" / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(
            [*_PYTHON, "-m", "fedmq", kind, "run", "--config", str(self.configs[name])],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root)
        log.close()
        return self.procs[name]

    def start_all(self) -> None:
        for name in self.names:
            self.start(name)
        self.start("master")

    def signal(self, name: str, sig: int) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
            if sig == signal.SIGKILL:
                proc.wait(timeout=10)

    def stop_all(self, timeout: float = 15.0) -> None:
        """SIGTERM every process (SIGCONT first: a process a drill had stopped would
        not act on it), SIGKILL those still running after `timeout`."""
        for name in self.procs:
            self.signal(name, signal.SIGCONT)
            self.signal(name, signal.SIGTERM)
        for name, proc in self.procs.items():
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.signal(name, signal.SIGKILL)

    def log(self, name: str) -> str:
        return (self.root / "logs" / f"{name}.log").read_text(errors="replace")


class Watcher:
    """Follows the master's JSON metrics and status topics, as `mosquitto_sub` would."""

    def __init__(self, broker: Mapping[str, Any], on_row: Callable[[dict[str, Any]], None] = lambda row: None) -> None:
        self.topics = Topics(JOB)
        self.status: dict[str, Any] = {}
        self.rows: list[dict[str, Any]] = []
        self.on_row = on_row
        self.transport = Transport(BrokerConfig(**broker), f"fedmq-watch-{os.getpid()}-{id(self)}",
                                   self._on, clean_start=True)
        self.transport.subscribe(self.topics.master("metrics"))
        self.transport.subscribe(self.topics.master("status"))
        self.transport.start()

    def _on(self, msg: Inbound) -> None:
        try:
            data = json.loads(msg.payload)
        except ValueError:
            return
        if msg.topic.endswith("/metrics") and not msg.retain:
            self.rows.append(data)
            self.on_row(data)
        elif msg.topic.endswith("/status"):
            self.status = data

    def close(self) -> None:
        self.transport.stop()


def watch_command(settings: Mapping[str, Any]) -> str:
    """The mosquitto_sub line that shows the demo's traffic as it runs."""
    host = "" if settings["host"] in ("127.0.0.1", "localhost") else f"-h {settings['host']} "
    user = f"-u {settings['username']} " if settings.get("username") else ""
    return f"mosquitto_sub {host}-p {settings['port']} {user}-t 'fedmq/#' -v"


def run_demo(opts: DemoOptions, on_row: Callable[[dict[str, Any]], None] = lambda row: None,
             on_start: Callable[[dict[str, Any]], None] = lambda broker: None) -> DemoResult:
    """Run the demo; `on_start` gets the broker (kind, host, port, watch command) before
    training starts, `on_row` each round's metrics. DIR/report.json is rewritten after
    every round and at the end."""
    root = opts.report.resolve()
    result = DemoResult()
    broker: BrokerHandle | None = None
    if opts.broker:
        settings: dict[str, Any] = {"host": opts.broker[0], "port": opts.broker[1]}
        result.broker = {"kind": "external", **settings}
    else:
        broker = start_broker(opts.broker_kind, data_dir=root / "broker")
        settings = broker.settings
        result.broker = {"kind": broker.kind, "host": broker.host, "port": broker.port}
    start = time.monotonic()
    fleet = None
    try:
        job: dict[str, Any] = {"job": {"update": opts.update}, "strategy": {"name": opts.strategy},
                               "rounds": {"deadline": opts.deadline}, "compression": {"preset": opts.compression}}
        students: dict[str, dict[str, Any]] = {}
        if opts.update == "student":
            root.mkdir(parents=True, exist_ok=True)
            result.teacher_accuracy = train_reference_teacher(root / TEACHER, opts.slaves)
            job["distill"] = {"teacher": f"../{TEACHER}", "students": DEMO_STUDENTS}
            students = {f"slave-{i:02d}": {"slave": {"student": "same" if i < (opts.slaves + 1) // 2 else "half"}}
                        for i in range(opts.slaves)}
        fleet = LocalFleet(root, settings, slaves=opts.slaves, rounds=opts.rounds, job=job, slave_overrides=students)
        on_start({**result.broker, "watch": watch_command(settings)})

        def row_arrived(row: dict[str, Any]) -> None:
            result.rows, result.status = list(watcher.rows), watcher.status
            result.seconds = round(time.monotonic() - start, 2)
            write_report(root / REPORT, opts, result)
            on_row(row)

        watcher = Watcher(settings, row_arrived)
        fleet.start_all()
        try:
            result.master_exit = fleet.procs["master"].wait(timeout=opts.timeout)
        except subprocess.TimeoutExpired:
            result.master_exit = None
        time.sleep(0.5)  # let the last metrics/status arrive
        result.rows, result.status = watcher.rows, watcher.status
        watcher.close()
    finally:
        if fleet is not None:
            fleet.stop_all()
        if broker is not None:
            broker.stop()
    result.seconds = round(time.monotonic() - start, 2)
    write_report(root / REPORT, opts, result)
    return result


def seconds_to(rows: list[dict[str, Any]], accuracy: float) -> float | None:
    """Seconds of training (sum of round durations) until the first round at `accuracy`."""
    total = 0.0
    for r in rows:
        total += r["seconds"]
        if r.get("accuracy", 0.0) >= accuracy:
            return round(total, 3)
    return None


#: What the byte counts of report.json are (it carries this text, so it explains itself).
ABOUT_BYTES = {
    "rounds[].bytes_up": "bytes of the updates the master counted in this round, as the slaves published them "
                         "(MQTT payloads: signed envelope and chunks included)",
    "rounds[].bytes_down": "bytes the round's participants say they received during it (their bytes_in: every MQTT "
                           "payload, so the broker's fan-out counts once per slave); round 1 includes start-up "
                           "(instruction, first models)",
    "rounds[].traffic": "the master's own count for this version by direction and message kind, as published or "
                        "received (envelope and chunks included); one copy per publish: a model or delta the "
                        "broker fans out to N slaves is counted once here, N times in bytes_down",
    "traffic": "the master's count since it started (its status): start-up and the last version's publish included",
    "bytes_up, bytes_down": "sums of the rounds' bytes_up and bytes_down",
}


def write_report(path: Path, opts: DemoOptions, result: DemoResult) -> dict[str, Any]:
    rows = [{k: r.get(k) for k in ("round", "version", "accuracy", "loss", "updates", "bytes_up", "bytes_down",
                                   "traffic", "seconds")}
            | ({"part_accuracy": r["part_accuracy"]} if "part_accuracy" in r else {})
            for r in sorted(result.rows, key=lambda r: r["round"])]
    report = {
        "job": JOB, "slaves": opts.slaves, "rounds_planned": opts.rounds, "update": opts.update,
        "strategy": opts.strategy, "compression": opts.compression,
        "compression_settings": preset(opts.compression).to_wire(), "broker": result.broker, "rounds": rows,
        "final_accuracy": rows[-1]["accuracy"] if rows else None,
        "seconds_to_090": seconds_to(rows, 0.90),
        "wall_seconds": result.seconds, "master_exit": result.master_exit,
        "bytes_up": sum(r["bytes_up"] or 0 for r in rows), "bytes_down": sum(r["bytes_down"] or 0 for r in rows),
        "bytes_to_090": bytes_to(rows, 0.90),
        "traffic": result.status.get("traffic", {}), "downlink": result.status.get("downlink", {}),
        "rejected": result.status.get("rejected", {}),
        **({"teacher_accuracy": result.teacher_accuracy} if result.teacher_accuracy is not None else {}),
        "about_bytes": ABOUT_BYTES,
    }
    write_atomic(path, (json.dumps(report, indent=2) + "\n").encode())
    return report


def bytes_to(rows: list[dict[str, Any]], accuracy: float) -> dict[str, int] | None:
    """Bytes up and down (as in the rows) until the first round at `accuracy`."""
    up = down = 0
    for r in rows:
        up, down = up + (r.get("bytes_up") or 0), down + (r.get("bytes_down") or 0)
        if (r.get("accuracy") or 0.0) >= accuracy:
            return {"up": up, "down": down}
    return None


def draw_report(report: Mapping[str, Any], path: Path) -> Path | None:
    """Accuracy per round and per cumulative byte (up + down), and bytes up and down per
    round, as a PNG; None without matplotlib (the [plot] extra). The middle panel is the
    one that compares update encodings and compression presets: the same accuracy for
    fewer bytes; the right one shows where the bytes go."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return None
    rows = [r for r in report["rounds"] if r.get("accuracy") is not None]
    rounds = [r["round"] for r in rows]
    accuracy = [r["accuracy"] for r in rows]
    up = [(r.get("bytes_up") or 0) / 1e3 for r in rows]
    down = [(r.get("bytes_down") or 0) / 1e3 for r in rows]
    sent, total = [], 0.0
    for u, d in zip(up, down):
        total += u + d
        sent.append(total / 1e3)
    fig, (by_round, by_bytes, per_round) = plt.subplots(1, 3, figsize=(15, 4.2))
    title = (f"fedmq demo: {report['slaves']} slaves, {report['update']} updates, {report['strategy']}, "
             f"compression {report.get('compression', 'none')}, broker {report['broker'].get('kind')}")
    fig.suptitle(title)
    by_round.plot(rounds, accuracy, marker="o", markersize=3)
    by_round.set(xlabel="round", ylabel="test accuracy", ylim=(0, 1))
    by_bytes.plot(sent, accuracy, marker="o", markersize=3, color="tab:orange")
    by_bytes.set(xlabel="MB sent, up + down (cumulative)", ylabel="test accuracy", ylim=(0, 1))
    for ax in (by_round, by_bytes):
        ax.axhline(0.9, color="grey", linestyle=":", linewidth=1)
    per_round.plot(rounds, up, marker="^", markersize=3, label="up: updates the master counted")
    per_round.plot(rounds, down, marker="v", markersize=3, label="down: received by the participants")
    per_round.set(xlabel="round", ylabel="KB per round (log)", yscale="log")
    per_round.legend(fontsize="small")
    for ax in (by_round, per_round):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (by_round, by_bytes, per_round):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
