"""Job and slave configuration files (TOML), validated with errors that name the key.

A *job file* is the master's: what to train and how (model, local hyper-parameters,
aggregation, round policy, enrollment, broker, keys). A *slave file* is a device's:
who it is, where its data is, which master it trusts. The slave learns everything
about training from the master's signed instruction, never from its own file, so a
fleet is reconfigured by editing one job file.

Relative paths in a file are resolved against the file's directory, as systemd and
Mosquitto users expect.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError
from .messages import UPDATE_KINDS
from .topics import DEFAULT_PREFIX, Topics, check_id
from .brokerconfig import BrokerConfig


@dataclass(frozen=True)
class TrainSettings:
    """Local-training hyper-parameters, sent to slaves inside the instruction."""

    epochs: int = 2
    batch_size: int = 32
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    prox_mu: float = 0.0  # FedProx proximal term; 0 = plain FedAvg local SGD
    grad_batches: int = 0  # gradient updates: mini-batches to average (0 = one pass)
    temperature: float = 2.0  # distillation ("student" updates)
    alpha: float = 0.5


@dataclass(frozen=True)
class RoundPolicy:
    participants: int = 0  # slaves selected per round; 0 = every enrolled, online slave
    quorum: int = 0  # updates that close a round early; 0 = all selected participants
    deadline: float = 60.0  # seconds a round stays open
    min_updates: int = 1  # fewer than this at the deadline: the round is re-planned
    min_slaves: int = 1  # enrolled, online slaves needed before round 1 starts
    start_wait: float = 30.0  # ...or start with whoever enrolled after this many seconds
    silence_timeout: float = 120.0  # a participant silent this long is presumed offline (0: never)
    seed: int = 0  # participant sampling


@dataclass(frozen=True)
class JobConfig:
    job: str
    rounds: int
    task: str
    update: str
    model: Mapping[str, Any]
    train: TrainSettings
    strategy: Mapping[str, Any]
    policy: RoundPolicy
    enrollment: str  # "allowlist" | "open"
    slave_keys: Path | None
    master_key: Path
    state_dir: Path
    broker: BrokerConfig
    prefix: str = DEFAULT_PREFIX
    chunk_size: int = 64 * 1024
    min_samples: int = 1
    eval_data: str | None = None
    target_accuracy: float | None = None  # stop early once reached (None: run all rounds)
    master_name: str = "master"  # the sender name the master signs as; never the key file's name

    @property
    def topics(self) -> Topics:
        return Topics(self.job, self.prefix)


@dataclass(frozen=True)
class SlaveConfig:
    slave_id: str
    job: str
    key: Path
    master_key: Path
    data: str
    state_dir: Path
    broker: BrokerConfig
    tasks: tuple[str, ...] = ()  # empty: serve any task
    prefix: str = DEFAULT_PREFIX
    update_kinds: tuple[str, ...] = UPDATE_KINDS
    slowdown: float = 1.0  # stretch local training by this factor (to mimic slow devices)
    # Chaos: probability, per local training, of dropping the broker connection
    # uncleanly (the broker sends the will) and reconnecting after 0.5-3 s.
    disconnect_rate: float = 0.0
    seed: int = 0
    master_name: str = "master"  # the name the pinned master key signs as

    @property
    def topics(self) -> Topics:
        return Topics(self.job, self.prefix)


# ------------------------------------------------------------------ parsing


class _Table:
    """Reads one TOML table, remembering which keys were used so leftovers are errors."""

    def __init__(self, data: Any, path: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a table")
        self.data, self.path, self.used = data, path, set()

    def get(self, key: str, typ: type | tuple[type, ...], default: Any = ..., *, check=None) -> Any:
        self.used.add(key)
        if key not in self.data:
            if default is ...:
                raise ConfigError(f"{self.path}.{key}: required")
            return default
        value = self.data[key]
        ok = isinstance(value, typ) and not (isinstance(value, bool) and bool not in _as_tuple(typ))
        if isinstance(value, int) and not isinstance(value, bool) and float in _as_tuple(typ):
            value, ok = float(value), True
        if not ok:
            names = "/".join(t.__name__ for t in _as_tuple(typ))
            raise ConfigError(f"{self.path}.{key}: expected {names}, got {value!r}")
        if check is not None and not check(value):
            raise ConfigError(f"{self.path}.{key}: {value!r} is out of range")
        return value

    def sub(self, key: str) -> "_Table":
        self.used.add(key)
        return _Table(self.data.get(key, {}), f"{self.path}.{key}" if self.path else key)

    def raw(self, key: str) -> dict[str, Any]:
        self.used.add(key)
        value = self.data.get(key, {})
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table")
        return value

    def done(self) -> None:
        extra = sorted(set(self.data) - self.used)
        if extra:
            where = f"{self.path}.{extra[0]}" if self.path else extra[0]
            raise ConfigError(f"{where}: unknown key")


def _as_tuple(typ: type | tuple[type, ...]) -> tuple[type, ...]:
    return typ if isinstance(typ, tuple) else (typ,)


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _dataclass_from(cls: type, table: _Table) -> Any:
    """Fill a flat settings dataclass from a table, with each field's type and default."""
    kwargs = {}
    for f in fields(cls):
        default = f.default
        typ = type(default) if default is not None else (str,)
        kwargs[f.name] = table.get(f.name, typ, default, check=lambda v: not isinstance(v, (int, float)) or v >= 0)
    table.done()
    return cls(**kwargs)


def _path(base: Path, value: str | None) -> Path | None:
    return None if value is None else (base / value).expanduser().resolve()


def broker_settings(table: _Table, base: Path) -> BrokerConfig:
    """The [broker] table (checked by BrokerConfig); file paths are relative to the config file."""
    data = {k: (str(_path(base, v)) if k in _FILE_KEYS and isinstance(v, str) else v) for k, v in table.data.items()}
    return BrokerConfig.from_mapping(data, where="broker")


_FILE_KEYS = ("tls_ca", "tls_cert", "tls_key", "password_file")


def load_job(path: Path | str) -> JobConfig:
    path = Path(path)
    return parse_job(_load_toml(path), path.resolve().parent)


def parse_job(data: Mapping[str, Any], base: Path) -> JobConfig:
    root = _Table(dict(data), "")
    job = root.sub("job")
    job_id = check_id(job.get("id", str), "job.id")
    prefix = job.get("prefix", str, DEFAULT_PREFIX)
    rounds = job.get("rounds", int, 30, check=lambda v: v >= 1)
    task = job.get("task", str, job_id)
    update = job.get("update", str, "delta", check=lambda v: v in UPDATE_KINDS)
    chunk_size = job.get("chunk_size", int, 64 * 1024, check=lambda v: 1024 <= v <= 256 * 1024 * 1024)
    min_samples = job.get("min_samples", int, 1, check=lambda v: v >= 0)
    target = job.get("target_accuracy", float, None, check=lambda v: 0 < v <= 1)
    job.done()
    model = root.raw("model")
    if not model:
        raise ConfigError("model: required (e.g. arch = \"mlp\", sizes = [64, 128, 10])")
    train = _dataclass_from(TrainSettings, root.sub("train"))
    strategy = root.raw("strategy") or {"name": "fedavg"}
    policy = _dataclass_from(RoundPolicy, root.sub("rounds"))
    enroll = root.sub("enrollment")
    mode = enroll.get("mode", str, "allowlist", check=lambda v: v in ("allowlist", "open"))
    keys = enroll.get("keys", str, None)
    enroll.done()
    if mode == "allowlist" and keys is None:
        raise ConfigError("enrollment.keys: required in allowlist mode (a directory of slave NAME.pub files)")
    master = root.sub("master")
    master_key = master.get("key", str)
    # systemd hands the key over as ".../signing.key": the name cannot come from the file
    master_name = check_id(master.get("name", str, "master"), "master.name")
    state_dir = master.get("state_dir", str, f"state/{job_id}")
    eval_data = master.get("eval", str, None)
    master.done()
    broker = broker_settings(root.sub("broker"), base)
    root.done()
    cfg = JobConfig(
        job=job_id, rounds=rounds, task=task, update=update, model=model, train=train, strategy=strategy,
        policy=policy, enrollment=mode, slave_keys=_path(base, keys), master_key=_path(base, master_key),
        state_dir=_path(base, state_dir), broker=broker, prefix=prefix, chunk_size=chunk_size,
        min_samples=min_samples, target_accuracy=target, master_name=master_name,
        # like a slave's data: a file is relative to the job file, not to the working directory
        eval_data=eval_data if eval_data is None or ":" in eval_data else str(_path(base, eval_data)),
    )
    cfg.topics  # validates the prefix
    return cfg


def load_slave(path: Path | str) -> SlaveConfig:
    path = Path(path)
    return parse_slave(_load_toml(path), path.resolve().parent)


def parse_slave(data: Mapping[str, Any], base: Path) -> SlaveConfig:
    root = _Table(dict(data), "")
    s = root.sub("slave")
    slave_id = check_id(s.get("id", str), "slave.id")
    job = check_id(s.get("job", str), "slave.job")
    key = s.get("key", str)
    master_key = s.get("master_key", str)
    master_name = check_id(s.get("master_name", str, "master"), "slave.master_name")
    data_source = s.get("data", str)
    state_dir = s.get("state_dir", str, f"state/{slave_id}")
    tasks = tuple(s.get("tasks", list, []))
    prefix = s.get("prefix", str, DEFAULT_PREFIX)
    kinds = tuple(s.get("update_kinds", list, list(UPDATE_KINDS)))
    slowdown = s.get("slowdown", float, 1.0, check=lambda v: v >= 1.0)
    disconnect_rate = s.get("disconnect_rate", float, 0.0, check=lambda v: 0.0 <= v <= 1.0)
    seed = s.get("seed", int, 0)
    s.done()
    if not all(k in UPDATE_KINDS for k in kinds):
        raise ConfigError(f"slave.update_kinds: {list(kinds)} (allowed: {', '.join(UPDATE_KINDS)})")
    broker = broker_settings(root.sub("broker"), base)
    root.done()
    data_path = data_source if ":" in data_source else str(_path(base, data_source))
    cfg = SlaveConfig(
        slave_id=slave_id, job=job, key=_path(base, key), master_key=_path(base, master_key), data=data_path,
        state_dir=_path(base, state_dir), broker=broker, tasks=tasks, prefix=prefix, update_kinds=kinds,
        slowdown=slowdown, disconnect_rate=disconnect_rate, seed=seed, master_name=master_name,
    )
    cfg.topics
    return cfg
