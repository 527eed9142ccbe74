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

import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from .compression_settings import CompressionSettings, parse_compression
from .errors import ConfigError
from .messages import UPDATE_KINDS
from .partsconfig import DistillConfig, MultitaskConfig, check_name, parse_distill, parse_multitask
from .privacy_settings import DPSettings
from .shardconfig import ShardSettings, parse_shard
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
    offline_grace: float = 5.0  # an "offline" presence takes effect after this (0: at once); see MasterCore.on_connection
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
    compression: CompressionSettings = CompressionSettings()  # [compression]: sent in the instruction
    privacy: DPSettings | None = None  # [privacy]: the slaves clip and noise their updates
    # Model parts (common/partsconfig.py): students of a fixed teacher, or task heads on a shared encoder
    distill: DistillConfig | None = None
    multitask: MultitaskConfig | None = None
    shard: ShardSettings | None = None  # [shard]: aggregator workers share the updates (None: not sharded)

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
    student: str = ""  # distillation jobs: the student this device trains ("": the job's first)

    @property
    def topics(self) -> Topics:
        return Topics(self.job, self.prefix)


# ------------------------------------------------------------------ parsing


class _Table:
    """Reads one TOML table, remembering which keys were used so leftovers are errors.

    Environment overrides live here, so every section gets them at once: the root
    table holds the environment, and each section it hands out (`sub`, `raw`) picks
    its `FEDMQ_SECTION_KEY` variables, which win over the file's values. A variable
    is read as a TOML value when it parses as one, else as the text itself (and as
    the text wherever a string is expected, so a numeric password stays a string).
    Errors about a value that came from a variable name the variable.
    """

    def __init__(self, data: Any, path: str, *, environ: Mapping[str, str] | None = None,
                 env: Mapping[str, tuple[str, str]] | None = None) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a table")
        self.data, self.path, self.used = data, path, set()
        self.environ = environ  # only on the root: the process environment
        self.env = dict(env or {})  # this section's overrides: key -> (variable, text)

    def _lookup(self, key: str, want_text: bool) -> tuple[Any, str]:
        """(value, where it came from) for a key that is set; the environment first."""
        if key in self.env:
            var, text = self.env[key]
            return _env_value(text, want_text), var
        return self.data[key], f"{self.path}.{key}" if self.path else key

    def get(self, key: str, typ: type | tuple[type, ...], default: Any = ..., *, check=None) -> Any:
        self.used.add(key)
        if key not in self.data and key not in self.env:
            if default is ...:
                raise ConfigError(f"{self.path}.{key}: required")
            return default
        value, where = self._lookup(key, str in _as_tuple(typ))
        ok = isinstance(value, typ) and not (isinstance(value, bool) and bool not in _as_tuple(typ))
        if isinstance(value, int) and not isinstance(value, bool) and float in _as_tuple(typ):
            value, ok = float(value), True
        if not ok:
            names = "/".join(t.__name__ for t in _as_tuple(typ))
            raise ConfigError(f"{where}: expected {names}, got {value!r}")
        if check is not None and not check(value):
            raise ConfigError(f"{where}: {value!r} is out of range")
        return value

    def sub(self, key: str) -> "_Table":
        self.used.add(key)
        env = _section_env(self.environ, key) if self.environ is not None else {}
        return _Table(self.data.get(key, {}), f"{self.path}.{key}" if self.path else key, env=env)

    def raw(self, key: str) -> dict[str, Any]:
        """A free-form section (its keys are checked elsewhere), overrides applied."""
        return self.sub(key).merged()

    def merged(self, text_keys: frozenset[str] = frozenset()) -> dict[str, Any]:
        """The whole table with the overrides applied; `text_keys` expect strings."""
        out = dict(self.data)
        for key in self.env:
            self.used.add(key)
            out[key] = self._lookup(key, key in text_keys)[0]
        return out

    def done(self) -> None:
        extra = sorted(set(self.data) - self.used)
        if extra:
            where = f"{self.path}.{extra[0]}" if self.path else extra[0]
            raise ConfigError(f"{where}: unknown key")
        unknown = sorted(set(self.env) - self.used)
        if unknown:
            raise ConfigError(f"{self.env[unknown[0]][0]}: unknown key {self.path}.{unknown[0]}")


ENV_PREFIX = "FEDMQ_"


def _section_env(environ: Mapping[str, str], section: str) -> dict[str, tuple[str, str]]:
    """key -> (variable, text) of the `FEDMQ_SECTION_KEY` variables of one section."""
    head = f"{ENV_PREFIX}{section.upper()}_"
    return {var[len(head):].lower(): (var, text) for var, text in environ.items() if var.startswith(head)}


def _env_value(text: str, want_text: bool) -> Any:
    """A variable's value: a TOML value if it is one (`30`, `true`, `[1, 2]`, `"x"`), else the text."""
    try:
        parsed = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        return text
    if set(parsed) != {"v"} or (want_text and not isinstance(parsed["v"], str)):
        return text  # "1\nw = 2" is not one value; a password "123456" stays text
    return parsed["v"]


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
    kinds = {f.name: f.type for f in fields(BrokerConfig)} | {"password_file": "str"}
    for key in sorted(table.env):
        if key not in kinds:
            raise ConfigError(f"{table.env[key][0]}: unknown key broker.{key}")
        # a type error names the variable; the field annotations are strings
        table.get(key, {"int": int, "bool": bool}.get(kinds[key], str))
    data = table.merged(frozenset(k for k, kind in kinds.items() if "str" in kind))
    data = {k: (str(_path(base, v)) if k in _FILE_KEYS and isinstance(v, str) else v) for k, v in data.items()}
    try:
        return BrokerConfig.from_mapping(data, where="broker")
    except ConfigError as exc:
        if not table.env:
            raise
        names = ", ".join(var for var, _ in table.env.values())
        raise ConfigError(f"{exc} (from the environment: {names})") from None


_FILE_KEYS = ("tls_ca", "tls_cert", "tls_key", "password_file")


def tool_broker(options: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> BrokerConfig:
    """The broker settings of a command without a config file (`fedmq status`, `monitor`):
    the `FEDMQ_BROKER_*` variables, overridden by `options` (its command-line flags).
    Relative paths are relative to the working directory."""
    table = _Table({}, "", environ=os.environ if environ is None else environ).sub("broker")
    table.data = dict(options)
    for key in options:
        table.env.pop(key, None)
    for either, other in (("password", "password_file"), ("password_file", "password")):
        if either in options:
            table.env.pop(other, None)
    return broker_settings(table, Path.cwd())


def load_job(path: Path | str, environ: Mapping[str, str] | None = None) -> JobConfig:
    """A job file, with `FEDMQ_SECTION_KEY` overrides from `environ` (default: os.environ)."""
    path = Path(path)
    return parse_job(_load_toml(path), path.resolve().parent, os.environ if environ is None else environ)


def parse_job(data: Mapping[str, Any], base: Path, environ: Mapping[str, str] | None = None) -> JobConfig:
    root = _Table(dict(data), "", environ=environ or {})
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
    compression = parse_compression(root.raw("compression"))
    privacy_table = root.raw("privacy")
    privacy = DPSettings.from_table(privacy_table) if privacy_table else None
    distill = parse_distill(root.sub("distill"), base, update)
    multitask = parse_multitask(root.sub("multitask"), update)
    if (distill or multitask) and compression.downlink.delta:
        raise ConfigError("compression.downlink.delta: not supported with [distill] or [multitask] "
                          "(a model with parts is published part by part)")
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
    shard = parse_shard(root.sub("shard"), base, job_id, _path(base, master_key))
    root.done()
    cfg = JobConfig(
        job=job_id, rounds=rounds, task=task, update=update, model=model, train=train, strategy=strategy,
        policy=policy, enrollment=mode, slave_keys=_path(base, keys), master_key=_path(base, master_key),
        state_dir=_path(base, state_dir), broker=broker, prefix=prefix, chunk_size=chunk_size,
        min_samples=min_samples, target_accuracy=target, master_name=master_name, compression=compression,
        privacy=privacy, distill=distill, multitask=multitask, shard=shard,
        # like a slave's data: a file is relative to the job file, not to the working directory
        eval_data=eval_data if eval_data is None or ":" in eval_data else str(_path(base, eval_data)),
    )
    cfg.topics  # validates the prefix
    return cfg


def load_slave(path: Path | str, environ: Mapping[str, str] | None = None) -> SlaveConfig:
    """A slave file, with `FEDMQ_SECTION_KEY` overrides from `environ` (default: os.environ)."""
    path = Path(path)
    return parse_slave(_load_toml(path), path.resolve().parent, os.environ if environ is None else environ)


def parse_slave(data: Mapping[str, Any], base: Path, environ: Mapping[str, str] | None = None) -> SlaveConfig:
    root = _Table(dict(data), "", environ=environ or {})
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
    student = s.get("student", str, "")
    s.done()
    if student:
        check_name(student, "slave.student")
    if not all(k in UPDATE_KINDS for k in kinds):
        raise ConfigError(f"slave.update_kinds: {list(kinds)} (allowed: {', '.join(UPDATE_KINDS)})")
    broker = broker_settings(root.sub("broker"), base)
    root.done()
    data_path = data_source if ":" in data_source else str(_path(base, data_source))
    cfg = SlaveConfig(
        slave_id=slave_id, job=job, key=_path(base, key), master_key=_path(base, master_key), data=data_path,
        state_dir=_path(base, state_dir), broker=broker, tasks=tasks, prefix=prefix, update_kinds=kinds,
        slowdown=slowdown, disconnect_rate=disconnect_rate, seed=seed, master_name=master_name, student=student,
    )
    cfg.topics
    return cfg
