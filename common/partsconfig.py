"""The `[distill]` and `[multitask]` tables of a job file: a fixed teacher's students, or task heads on an encoder.

Both turn the job's one model into named *parts* (common/layout.py builds them):

* ``[distill]`` (with ``job.update = "student"``): ``[model]`` is a fixed, pretrained
  teacher whose weights the master reads from ``teacher`` and distributes; each
  ``students.NAME`` is a model spec of a student (same or smaller) that slaves distil
  from it and the master keeps one global model of.
* ``[multitask]``: ``[model]`` is a shared encoder; ``tasks`` names the tasks and each
  ``heads.TASK`` is the model spec of that task's head, which takes the encoder's output.

Only structure is checked here (names, keys, which update kind goes with which): this
module is read before torch is loaded, so a typo costs nothing. Whether the specs fit
together (a student's input and output, a head's input) is checked when the master
builds the parts (`layout.check_fit`), still before it connects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol

from .errors import ConfigError

# Student and task names become part names ("students.NAME", "heads.TASK"), module
# names (no '.') and topic levels (model/heads.TASK): letters, digits, '_' and '-'.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,31}\Z")


class Table(Protocol):
    """What jobconfig's `_Table` offers (its `get` records the keys README must show)."""

    path: str

    def get(self, key: str, typ: type | tuple[type, ...], default: Any = ..., *, check: Any = None) -> Any: ...
    def raw(self, key: str) -> dict[str, Any]: ...
    def done(self) -> None: ...


@dataclass(frozen=True)
class DistillConfig:
    teacher: Path  # the fixed teacher's weights: a fedmq master checkpoint or a CBOR map of tensors
    students: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # name -> model spec


@dataclass(frozen=True)
class MultitaskConfig:
    tasks: tuple[str, ...]
    heads: Mapping[str, Mapping[str, Any]]  # task -> model spec of its head
    min_queue: int = 0  # samples a task's queue needs before it trains; 0 = the batch size


def check_name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ConfigError(f"{where}: {value!r} must be 1-32 letters, digits, '_' or '-'")
    return value


def _specs(table: Mapping[str, Any], where: str) -> dict[str, Mapping[str, Any]]:
    out = {}
    for name, spec in table.items():
        check_name(name, f"{where}.{name}")
        if not isinstance(spec, Mapping) or not spec:
            raise ConfigError(f"{where}.{name}: expected a model spec table (e.g. arch = \"mlp\", sizes = [...])")
        out[name] = dict(spec)
    return out


def parse_distill(table: Table, base: Path, update: str) -> DistillConfig | None:
    teacher = table.get("teacher", str, None)
    students = _specs(table.raw("students"), f"{table.path}.students")
    table.done()
    if update != "student":
        if students or teacher is not None:
            raise ConfigError(f"{table.path}: only used with job.update = \"student\" (got {update!r})")
        return None
    if not students:
        raise ConfigError(f"{table.path}.students: required with job.update = \"student\" "
                          f"(e.g. [{table.path}.students.small] arch = \"mlp\", sizes = [64, 64, 10])")
    if teacher is None:
        raise ConfigError(f"{table.path}.teacher: required with job.update = \"student\": the pretrained "
                          f"teacher's weights (a fedmq master checkpoint, or a CBOR map of tensors)")
    return DistillConfig(teacher=(base / teacher).expanduser().resolve(), students=students)


def parse_multitask(table: Table, update: str) -> MultitaskConfig | None:
    tasks = table.get("tasks", list, [])
    min_queue = table.get("min_queue", int, 0, check=lambda v: v >= 0)
    heads = _specs(table.raw("heads"), f"{table.path}.heads")
    table.done()
    if not tasks and not heads:
        return None
    names = tuple(check_name(t, f"{table.path}.tasks") for t in tasks)
    if not names:
        raise ConfigError(f"{table.path}.tasks: required with [{table.path}.heads] (the names of the tasks)")
    if len(set(names)) != len(names):
        raise ConfigError(f"{table.path}.tasks: {list(names)} names a task twice")
    for task in heads:
        if task not in names:
            raise ConfigError(f"{table.path}.heads.{task}: names no task of {table.path}.tasks ({', '.join(names)})")
    for task in names:
        if task not in heads:
            raise ConfigError(f"{table.path}.tasks: task {task!r} has no head (add [{table.path}.heads.{task}])")
    if update != "delta":
        raise ConfigError(f"job.update: a [{table.path}] job trains with \"delta\" updates, not {update!r}")
    return MultitaskConfig(tasks=names, heads={t: heads[t] for t in names}, min_queue=min_queue)
