"""A job's model as named parts: the whole model, a fixed teacher and its students, or an encoder and task heads.

The master keeps one global state dict for all parts; every tensor belongs to exactly
one part, and its name says which (docs/PROTOCOL.md, Appendix A):

=============  =========================  ==========================  =================================
job            parts                      tensor names                trained by
=============  =========================  ==========================  =================================
plain          ``""`` (the whole model)   ``0.weight``                every slave, all tensors
``[distill]``  ``teacher`` (fixed)        ``teacher.0.weight``        nobody: a pretrained teacher
               ``students.NAME``          ``students.NAME.0.weight``  slaves that confirmed NAME
``[multitask]`` ``encoder``               ``encoder.0.weight``        every slave
               ``heads.TASK``             ``heads.TASK.0.weight``     slaves with samples of TASK
=============  =========================  ==========================  =================================

A slave confirms the parts it trains (with the samples for each); it *holds* those and
the parts they need (a student needs the teacher, a head the encoder), receives only
those, and sends updates that touch only parts it confirmed. The master aggregates each
part from the updates that contain it (`strategies.PartStrategies`).

The composite module of some parts nests one module per part under the part's name
(`Layout.module(composite, "students.small")`), so PyTorch's own state dict keys are
the tensor names above and the helpers of modelspec apply unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from .errors import ConfigError, ProtocolError, Reason
from .modelspec import build_model, probe_input
from .partsconfig import check_name
from .workload import data_misfit, evaluate, task_counts, task_subset

if TYPE_CHECKING:
    from .jobconfig import JobConfig

PLAIN, DISTILL, MULTITASK = "plain", "distill", "multitask"
TEACHER, ENCODER = "teacher", "encoder"


@dataclass(frozen=True)
class Part:
    name: str  # "" | "teacher" | "students.NAME" | "encoder" | "heads.TASK"
    spec: Mapping[str, Any]  # the model spec it is built from
    key: str  # the job-file key that declares it, for error messages
    trainable: bool = True
    needs: tuple[str, ...] = ()  # parts a slave that trains this one must hold as well


class Layout:
    """The parts of one job and the rules that follow from them (shared by master and slaves)."""

    def __init__(self, kind: str, parts: Iterable[Part], *, min_queue: int = 0) -> None:
        self.kind = kind
        self.parts: dict[str, Part] = {p.name: p for p in parts}
        self.min_queue = min_queue  # multi-task: samples a task's queue needs (0: the batch size)

    # ------------------------------------------------------------ construction

    @classmethod
    def plain(cls, spec: Mapping[str, Any]) -> Layout:
        return cls(PLAIN, [Part("", spec, "model")])

    @classmethod
    def distill(cls, teacher: Mapping[str, Any], students: Mapping[str, Mapping[str, Any]]) -> Layout:
        return cls(DISTILL, [Part(TEACHER, teacher, "model", trainable=False)]
                   + [Part(f"students.{n}", s, f"distill.students.{n}", needs=(TEACHER,)) for n, s in students.items()])

    @classmethod
    def multitask(cls, encoder: Mapping[str, Any], heads: Mapping[str, Mapping[str, Any]],
                  min_queue: int = 0) -> Layout:
        return cls(MULTITASK, [Part(ENCODER, encoder, "model")]
                   + [Part(f"heads.{t}", h, f"multitask.heads.{t}", needs=(ENCODER,)) for t, h in heads.items()],
                   min_queue=min_queue)

    @classmethod
    def of_job(cls, cfg: JobConfig) -> Layout:
        if cfg.distill is not None:
            return cls.distill(cfg.model, cfg.distill.students)
        if cfg.multitask is not None:
            return cls.multitask(cfg.model, cfg.multitask.heads, cfg.multitask.min_queue)
        return cls.plain(cfg.model)

    def instruction_fields(self) -> dict[str, Any]:
        """What the instruction carries besides `model` (its spec of the teacher or encoder)."""
        if self.kind == DISTILL:
            return {"distill": {"students": {n.removeprefix("students."): dict(p.spec)
                                             for n, p in self.parts.items() if p.trainable}}}
        if self.kind == MULTITASK:
            heads = {n.removeprefix("heads."): dict(p.spec) for n, p in self.parts.items() if n != ENCODER}
            return {"multitask": {"tasks": list(heads), "heads": heads, "min_queue": self.min_queue}}
        return {}

    @classmethod
    def from_instruction(cls, body: Mapping[str, Any]) -> Layout:
        """The layout an instruction describes; ConfigError (a slave declines with it) if
        its `distill` / `multitask` fields are not well-formed."""
        distill, multitask = body.get("distill"), body.get("multitask")
        if distill is not None and multitask is not None:
            raise ConfigError("instruction has both distill and multitask")
        if distill is not None:
            return cls.distill(body["model"], _spec_map(distill, "students", "distill.students"))
        if multitask is not None:
            heads = _spec_map(multitask, "heads", "multitask.heads")
            min_queue = multitask.get("min_queue", 0) if isinstance(multitask, Mapping) else None
            if isinstance(min_queue, bool) or not isinstance(min_queue, int) or min_queue < 0:
                raise ConfigError(f"multitask.min_queue: expected a non-negative int, got {min_queue!r}")
            return cls.multitask(body["model"], heads, min_queue)
        return cls.plain(body["model"])

    # ------------------------------------------------------------ names

    @property
    def grouped(self) -> bool:
        """Whether the model has several parts (and messages name the parts they carry)."""
        return self.kind != PLAIN

    @property
    def trainable(self) -> list[str]:
        return [n for n, p in self.parts.items() if p.trainable]

    @property
    def students(self) -> list[str]:
        return [n.removeprefix("students.") for n in self.parts if n.startswith("students.")]

    @property
    def tasks(self) -> list[str]:
        return [n.removeprefix("heads.") for n in self.parts if n.startswith("heads.")]

    def part_of(self, tensor: str) -> str | None:
        """The part a tensor name belongs to (None: none of this job's)."""
        if not self.grouped:
            return ""
        for name in self.parts:
            if tensor.startswith(name + "."):
                return name
        return None

    def split(self, tensors: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """Tensors by part; ProtocolError(BAD_TENSOR) for a name that belongs to none."""
        out: dict[str, dict[str, Any]] = {}
        for name, value in tensors.items():
            part = self.part_of(name)
            if part is None:
                raise ProtocolError(Reason.BAD_TENSOR, f"tensor {name[:80]!r} belongs to no part of this job")
            out.setdefault(part, {})[name] = value
        return out

    def select(self, tensors: Mapping[str, Any], parts: Iterable[str] | None) -> dict[str, Any]:
        """The tensors of `parts` (all with None)."""
        if parts is None:
            return dict(tensors)
        keep = set(parts)
        return {k: v for k, v in tensors.items() if self.part_of(k) in keep}

    def holds(self, trained: Iterable[str]) -> list[str]:
        """What a slave that trains `trained` holds: those and the parts they need, in layout order."""
        want = set(trained)
        want |= {n for t in list(want) if t in self.parts for n in self.parts[t].needs}
        return [n for n in self.parts if n in want]

    # ------------------------------------------------------------ models

    def build(self, parts: Iterable[str] | None = None) -> nn.Module:
        """The model of `parts` (all by default): the model itself for a plain job, else the
        composite that nests each part's module under its name."""
        if not self.grouped:
            return build_model(self.parts[""].spec)
        names = list(self.parts) if parts is None else [n for n in self.parts if n in set(parts)]
        root = Parts()
        for name in names:
            module = build_model(self.parts[name].spec, path=self.parts[name].key)
            group, _, leaf = name.partition(".")
            if leaf:
                root.put(leaf, module, under=group)
            else:
                root.put(name, module)
        return root

    def module(self, composite: nn.Module, part: str) -> nn.Module:
        """The module of one part inside a composite (the composite itself for "")."""
        for level in part.split(".") if part else ():
            composite = composite._modules[level]  # not getattr: a student may be called "half"
        return composite

    def task_model(self, composite: nn.Module, task: str) -> nn.Module:
        """The encoder followed by one task's head: what a sample of that task goes through."""
        return nn.Sequential(self.module(composite, ENCODER), self.module(composite, f"heads.{task}"))

    def check_fit(self) -> None:
        """Raise ConfigError, naming the key, for parts that cannot work together: a student
        whose input or output differs from the teacher's, a head that does not take the
        encoder's output. Checked with a zero batch shaped like the first layer's input
        (skipped when the first layer does not say: convolutions take any image size)."""
        if not self.grouped:
            return
        first = next(iter(self.parts.values()))
        base = build_model(first.spec, path=first.key)
        probe = probe_input(base)
        if probe is None:
            return
        with torch.no_grad():
            out = base.eval()(probe)
        for part in list(self.parts.values())[1:]:
            model = build_model(part.spec, path=part.key).eval()
            if self.kind == DISTILL:
                own = probe_input(model)
                if own is not None and own.shape != probe.shape:
                    raise ConfigError(f"{part.key}: takes inputs of shape {_shape(own)}, the teacher ([model]) "
                                      f"takes {_shape(probe)}")
            given = probe if self.kind == DISTILL else out
            try:
                with torch.no_grad():
                    got = model(given)
            except (RuntimeError, ValueError) as exc:
                what = "the teacher's input" if self.kind == DISTILL else "the encoder's output"
                raise ConfigError(f"{part.key}: does not take {what} of shape {_shape(given)} "
                                  f"({str(exc).splitlines()[0][:120]})") from None
            if got.ndim != 2:
                raise ConfigError(f"{part.key}: outputs shape {_shape(got)}, not [batch, classes]")
            if self.kind == DISTILL and got.shape != out.shape:
                raise ConfigError(f"{part.key}: outputs {_shape(got)}, the teacher ([model]) outputs {_shape(out)}")

    # ------------------------------------------------------------ evaluation

    def evaluate(self, composite: nn.Module, dataset: Dataset) -> dict[str, Any]:
        """Accuracy and loss on `dataset`. With parts: `part_accuracy` of each part that
        can be scored (every model of a distillation job; each head on its task's rows),
        and `accuracy`/`loss` of the worst trained one (a target is met when all meet it)."""
        if not self.grouped:
            return evaluate(composite, dataset)
        scores: dict[str, dict[str, float]] = {}
        if self.kind == DISTILL:
            for name in self.parts:
                scores[name] = evaluate(self.module(composite, name), dataset)
        else:
            have = task_counts(dataset)
            for task in self.tasks:
                if have.get(task):
                    scores[f"heads.{task}"] = evaluate(self.task_model(composite, task), task_subset(dataset, task))
        trained = {n: s for n, s in scores.items() if self.parts[n].trainable}
        if not trained:
            return {}
        worst = min(trained.values(), key=lambda s: s["accuracy"])
        return {"accuracy": worst["accuracy"], "loss": worst["loss"],
                "part_accuracy": {n: round(s["accuracy"], 6) for n, s in scores.items()}}

    def data_misfit(self, composite: nn.Module, dataset: Dataset) -> str | None:
        """Why `dataset` cannot evaluate these parts (the master's evaluation set)."""
        if not self.grouped:
            return data_misfit(composite, dataset)
        if self.kind == DISTILL:
            for name in self.parts:
                if why := data_misfit(self.module(composite, name), dataset):
                    return f"{name}: {why}"
            return None
        have = task_counts(dataset)
        if not have:
            return "no task column (npz key or csv column 'task'): a [multitask] job evaluates each head on its task"
        for task in self.tasks:
            if have.get(task) and (why := data_misfit(self.task_model(composite, task), dataset, task=task)):
                return f"task {task}: {why}"
        return None

    # ------------------------------------------------------------ what slaves may claim

    def confirmed_parts(self, claim: Any) -> tuple[dict[str, int] | None, str | None]:
        """(parts and samples a confirm may enroll with, or why not). A plain job needs no
        claim; a job with parts needs one: one student, or the encoder and some heads."""
        if not self.grouped:
            return None, None
        offered = ", ".join(self.trainable)
        if not _sample_map(claim):
            return None, f"the confirm names no parts to train (a map part -> samples; this job trains {offered})"
        unknown = [p for p in claim if p not in self.trainable]
        if unknown:
            return None, f"cannot train {unknown[0][:80]!r}: not a trainable part of this job ({offered})"
        if self.kind == DISTILL and len(claim) != 1:
            return None, f"a slave trains one student, not {', '.join(sorted(claim))}"
        if self.kind == MULTITASK and (ENCODER not in claim or len(claim) < 2):
            return None, "a slave trains the encoder and at least one task head"
        return dict(claim), None

    def update_parts(self, claim: Any, confirmed: Mapping[str, int] | None) -> dict[str, int] | None:
        """The parts an update trains, each weighted by its samples capped by what the
        slave confirmed for that part. ProtocolError: `bad_body` for a malformed `parts`,
        `unconfirmed_part` for a part its sender did not confirm."""
        if not self.grouped:
            return None
        if not _sample_map(claim):
            raise ProtocolError(Reason.BAD_BODY, "update.parts: required in a job with parts (a map part -> samples)")
        confirmed = confirmed or {}
        for part in claim:
            if part not in confirmed:
                raise ProtocolError(Reason.UNCONFIRMED_PART, f"{part[:80]!r} is not a part this slave confirmed "
                                                             f"({', '.join(confirmed) or 'none'})")
        return {p: max(1, min(n, confirmed[p])) for p, n in claim.items()}


class Parts(nn.Module):
    """The composite of some parts: each part's module nested under its name. Not
    `nn.ModuleDict`, whose `add_module` refuses names of Module attributes (a student
    called "half"); it has no forward of its own."""

    def put(self, name: str, module: nn.Module, under: str | None = None) -> None:
        if under is None:
            self._modules[name] = module
            return
        if under not in self._modules:
            self._modules[under] = Parts()
        self._modules[under]._modules[name] = module


def _sample_map(value: Any) -> bool:
    return (isinstance(value, Mapping) and bool(value) and len(value) <= 4096
            and all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 1
                    for k, v in value.items()))


def _spec_map(table: Any, key: str, where: str) -> dict[str, Mapping[str, Any]]:
    specs = table.get(key) if isinstance(table, Mapping) else None
    if not isinstance(specs, Mapping) or not specs:
        raise ConfigError(f"{where}: expected a non-empty map of model specs")
    for name, spec in specs.items():
        check_name(name, f"{where}.{name}")
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{where}.{name}: expected a model spec")
    return dict(specs)


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(["N", *map(str, t.shape[1:])]) + "]"
