"""What one slave does in a job: which model parts it trains and holds, whether its data fits, how it trains them.

For a plain job that is the whole model. For a job whose model has parts
(common/layout.py) the slave decides from the instruction and its own data:

* ``[distill]``: it trains one student -- the one its ``[slave] student`` names, or the
  job's first -- and holds the teacher too;
* ``[multitask]``: its samples are queued per task (the data's task column); it trains
  the encoder and the head of every task whose queue holds a training step's worth
  (``min_queue``, default the batch size), and declines if no task does.

The plan is what the confirm states (`confirm_fields`: the parts and their samples) and
what the slave subscribes to (one retained `model/PART` topic per part it holds).
`train` runs in the shell's worker thread, like `run_training`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.utils.data import Dataset

from fedmq.common.errors import ConfigError
from fedmq.common.layout import DISTILL, ENCODER, MULTITASK, TEACHER, Layout
from fedmq.common.modelspec import load_float_state
from fedmq.common.topics import Topics
from fedmq.common.workload import task_subset

from .trainer import LocalResult, distill_local, train_multitask

Misfit = Callable[..., "str | None"]  # (model[, task=...]) -> why the local data cannot train it


@dataclass(frozen=True)
class SlavePlan:
    layout: Layout
    trains: dict[str, int] | None = None  # part -> samples it trains it on; None: the whole model

    @property
    def holds(self) -> list[str] | None:
        """The parts it receives and builds: those it trains and those they need."""
        return None if self.trains is None else self.layout.holds(self.trains)

    def build(self) -> nn.Module:
        return self.layout.build(self.holds)

    def confirm_fields(self) -> dict[str, Any]:
        return {} if self.trains is None else {"parts": dict(self.trains)}

    def model_topics(self, topics: Topics) -> list[str]:
        if self.holds is None:
            return [topics.master("model")]
        return [topics.model_part(p) for p in self.holds]


def queue_need(instruction: Mapping[str, Any], layout: Layout) -> int:
    """Samples a task's queue must hold before the task trains: `min_queue`, or one batch."""
    return layout.min_queue or int(instruction["train"]["batch_size"])


def plan_for(instruction: Mapping[str, Any], *, student: str, samples: int, task_samples: Mapping[str, int],
             misfit: Misfit | None) -> SlavePlan | str:
    """This slave's plan for `instruction`, or why it cannot serve it (its decline)."""
    try:
        layout = Layout.from_instruction(instruction)
        model = layout.build()
    except ConfigError as exc:
        return f"cannot build model: {exc}"
    if layout.kind == DISTILL:
        return _distill(layout, model, student, samples, misfit)
    if layout.kind == MULTITASK:
        return _multitask(instruction, layout, model, task_samples, misfit)
    if instruction["update"] == "student":
        return "a \"student\" update needs the instruction's distill students (a master of this version sends them)"
    why = misfit(model) if misfit is not None else None
    return why or SlavePlan(layout)


def _distill(layout: Layout, model: nn.Module, student: str, samples: int, misfit: Misfit | None) -> SlavePlan | str:
    name = student or layout.students[0]
    if name not in layout.students:
        return f"no student {name!r} in this job (students: {', '.join(layout.students)})"
    part = f"students.{name}"
    for p in (TEACHER, part):
        if misfit is not None and (why := misfit(layout.module(model, p))):
            return f"{p}: {why}"
    return SlavePlan(layout, {part: samples})  # a student trains on every local sample


def _multitask(instruction: Mapping[str, Any], layout: Layout, model: nn.Module, task_samples: Mapping[str, int],
               misfit: Misfit | None) -> SlavePlan | str:
    if not task_samples:
        return (f"the local data has no task column (npz key or csv column 'task'); "
                f"this job's tasks: {', '.join(layout.tasks)}")
    mine = {t: task_samples[t] for t in layout.tasks if task_samples.get(t)}
    if not mine:
        return (f"no samples for any task of this job ({', '.join(layout.tasks)}); "
                f"local data has tasks {', '.join(sorted(task_samples)[:8])}")
    need = queue_need(instruction, layout)
    ready = {t: n for t, n in mine.items() if n >= need}
    if not ready:
        return (f"no task queue holds the {need} samples a training step needs "
                f"({', '.join(f'{t}: {n}' for t, n in mine.items())})")
    for task in ready:
        if misfit is not None and (why := misfit(layout.task_model(model, task), task=task)):
            return f"task {task}: {why}"
    return SlavePlan(layout, {ENCODER: sum(ready.values()), **{f"heads.{t}": n for t, n in ready.items()}})


def train_parts(instruction: Mapping[str, Any], params: Mapping[str, torch.Tensor], dataset: Dataset, *,
                seed: int) -> LocalResult:
    """Train the parts `params` hold (what the slave was sent) with the instruction's settings."""
    layout = Layout.from_instruction(instruction)
    held = sorted({layout.part_of(k) for k in params} - {None})
    model = layout.build(held)
    load_float_state(model, params)
    t = instruction["train"]
    common = dict(epochs=t["epochs"], batch_size=t["batch_size"], lr=t["lr"], momentum=t["momentum"],
                  weight_decay=t["weight_decay"], seed=seed)
    if layout.kind == DISTILL:
        (part,) = [p for p in held if p != TEACHER]
        result = distill_local(layout.module(model, TEACHER), layout.module(model, part), dataset,
                               temperature=t["temperature"], alpha=t["alpha"], **common)
        return LocalResult(result.kind, {f"{part}.{k}": v for k, v in result.tensors.items()},
                           result.num_samples, result.metrics, {part: result.num_samples})
    tasks = [p.removeprefix("heads.") for p in held if p.startswith("heads.")]
    queues = {task: task_subset(dataset, task) for task in tasks}
    need = queue_need(instruction, layout)
    queues = {task: q for task, q in queues.items() if len(q) >= need}
    heads = {task: layout.module(model, f"heads.{task}") for task in queues}
    return train_multitask(layout.module(model, ENCODER), heads, queues, **common)
