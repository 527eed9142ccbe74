"""Local training on a slave: pure functions from (model, data, settings) to an update.

The model passed in is never modified: training runs on a deep copy, so the caller keeps
the received global model (needed for the delta and the FedProx anchor) without an extra
snapshot, and a failed run leaves nothing half-trained behind. Updates cover
`float_state(model)` — parameters and float buffers (BatchNorm running statistics);
integer buffers such as ``num_batches_tracked`` are not sent. All training is
cross-entropy classification on CPU or whatever device the model already lives on.

With a `seed`, shuffling and dropout are reproducible and the caller's global torch RNG
is left as it was. The trainer never sleeps; a daemon that simulates slow devices can
wait after the call, using ``metrics["seconds"]``.

Delta training can be *constrained* so the delta is small by construction (the job's
`[compression.constraints]`, see `common.compression_settings.Constraints`): an L1 pull toward
the received weights, a per-tensor budget of changed entries, and a threshold below
which changes are dropped. They act on parameters only; float buffers (BatchNorm
statistics) are sent as computed.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from fedmq.common.modelspec import float_state

LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class LocalResult:
    """What a slave sends back: `kind` as in `strategies.UPDATE_KINDS`, the tensors
    named as in `float_state`, the sample count for weighting, and metrics to report.
    `parts`: in a job whose model has parts, the parts trained and the samples each was
    trained on (the update's `parts`)."""

    kind: str
    tensors: dict[str, Tensor]
    num_samples: int
    metrics: dict[str, float]
    parts: dict[str, int] | None = None


@contextmanager
def _seeded(seed: int | None) -> Iterator[torch.Generator | None]:
    """Seed dropout (global RNG, restored on exit) and yield a generator for shuffling."""
    if seed is None:
        yield None
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield torch.Generator().manual_seed(seed)


def _loader(dataset: Dataset, batch_size: int, generator: torch.Generator | None) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)


def _sgd_epochs(model: nn.Module, loader: DataLoader, loss_fn: LossFn, *, epochs: int,
                lr: float, momentum: float, weight_decay: float,
                after_step: Callable[[], None] | None = None) -> float:
    """Train `model` in place; return the sample-weighted mean loss of the last epoch.
    `after_step` runs after every optimizer step (a projection onto constraints)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                                weight_decay=weight_decay)
    model.train()
    loss_sum, seen = 0.0, 0
    for _ in range(epochs):
        loss_sum, seen = 0.0, 0
        for x, y in loader:
            optimizer.zero_grad()
            loss = loss_fn(model, x, y)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step()
            loss_sum += loss.item() * len(y)
            seen += len(y)
    return loss_sum / seen


def _constrain(pairs: list[tuple[Tensor, Tensor]], *, shrink: float,
               budget: float) -> Callable[[], None]:
    """A projection run after each SGD step on (parameter, received value) pairs.

    `shrink` > 0: the proximal step of `l1_mu·‖w − w_received‖₁` (soft-threshold the
    change by lr·l1_mu), which makes changes that do not pay for themselves exactly 0.
    `budget` > 0: keep the ceil(budget·n) largest changes of each tensor, reset the
    rest to the received values (iterative hard thresholding), so the trained delta is
    sparse at every step and the kept entries compensate for the dropped ones. Entries
    reset are *exactly* the received values, so their delta is exactly 0."""

    def project() -> None:
        with torch.no_grad():
            for p, received in pairs:
                if shrink > 0:
                    change = p - received
                    shrunk = torch.sign(change) * (change.abs() - shrink).clamp_min(0)
                    p.copy_(torch.where(shrunk == 0, received, received + shrunk))
                if budget > 0:
                    n = p.numel()
                    k = min(n, max(1, math.ceil(budget * n)))
                    if k < n:
                        keep = torch.zeros(n, dtype=torch.bool)
                        keep[torch.topk((p - received).abs().reshape(-1), k, sorted=False).indices] = True
                        p.copy_(torch.where(keep.reshape(p.shape), p, received))

    return project


def _check(dataset: Dataset, epochs: int, batch_size: int) -> None:
    if len(dataset) == 0:
        raise ValueError("cannot train on an empty dataset")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be positive, got {epochs}, {batch_size}")


def _result(kind: str, tensors: dict[str, Tensor], num_samples: int, loss: float,
            start: float) -> LocalResult:
    metrics = {"train_loss": loss, "samples": num_samples,
               "seconds": time.perf_counter() - start}
    return LocalResult(kind=kind, tensors=tensors, num_samples=num_samples, metrics=metrics)


def _cross_entropy(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model(x), y)


def train_local(model: nn.Module, dataset: Dataset, *, kind: str = "delta", epochs: int = 2,
                batch_size: int = 32, lr: float = 0.1, momentum: float = 0.0,
                weight_decay: float = 0.0, prox_mu: float = 0.0, l1_mu: float = 0.0,
                change_budget: float = 0.0, change_threshold: float = 0.0,
                grad_batches: int | None = None, seed: int | None = None) -> LocalResult:
    """Train a copy of `model` on local data and return the update to send.

    ``kind="delta"``: `epochs` of mini-batch SGD; the update is trained − received for
    every float state entry. With ``prox_mu > 0`` the loss gains FedProx's proximal term
    (μ/2)·‖w − w_received‖², which keeps heterogeneous clients near the global model.
    Constraints that make the delta small (all off by default): ``l1_mu`` adds
    l1_mu·‖w − w_received‖₁, minimised by a soft-threshold after every step;
    ``change_budget`` (a fraction) lets at most ceil(budget·n) entries of each parameter
    tensor differ from the received ones, enforced after every step; after training,
    parameter changes with |Δ| < ``change_threshold`` are dropped (sent as 0).

    ``kind="gradient"``: no step is taken; the update is the gradient of the mean loss
    over the first `grad_batches` shuffled mini-batches (default and at most: one pass),
    i.e. weighted by samples, and zero for buffers. `num_samples` counts the samples used.
    `epochs`, `momentum`, `weight_decay`, `prox_mu` and the constraints do not apply to
    gradients.
    """
    _check(dataset, epochs, batch_size)
    if grad_batches is not None and grad_batches < 1:
        raise ValueError(f"grad_batches must be positive, got {grad_batches}")
    if not (l1_mu >= 0 and 0 <= change_budget <= 1 and change_threshold >= 0):
        raise ValueError(f"need l1_mu >= 0, 0 <= change_budget <= 1, change_threshold >= 0; "
                         f"got {l1_mu}, {change_budget}, {change_threshold}")
    start = time.perf_counter()
    work = copy.deepcopy(model)
    with _seeded(seed) as generator:
        loader = _loader(dataset, batch_size, generator)
        if kind == "delta":
            loss_fn = _cross_entropy
            if prox_mu > 0:
                anchor = {k: p.detach() for k, p in model.named_parameters()}

                def loss_fn(m: nn.Module, x: Tensor, y: Tensor) -> Tensor:
                    prox = sum((p - anchor[k]).pow(2).sum() for k, p in m.named_parameters())
                    return _cross_entropy(m, x, y) + prox_mu / 2 * prox

            received = dict(model.named_parameters())
            pairs = [(p, received[k].detach()) for k, p in work.named_parameters()]
            project = _constrain(pairs, shrink=lr * l1_mu, budget=change_budget) \
                if l1_mu > 0 or change_budget > 0 else None
            loss = _sgd_epochs(work, loader, loss_fn, epochs=epochs, lr=lr, momentum=momentum,
                               weight_decay=weight_decay, after_step=project)
            before = float_state(model)
            tensors = {k: v - before[k] for k, v in float_state(work).items()}
            if change_threshold > 0:
                for k in received:
                    tensors[k] = torch.where(tensors[k].abs() < change_threshold, 0.0, tensors[k])
            num_samples = len(dataset)
        elif kind == "gradient":
            tensors, loss, num_samples = _mean_gradient(work, loader, grad_batches)
        else:
            raise ValueError(f"kind must be 'delta' or 'gradient', got {kind!r}")
    return _result(kind, tensors, num_samples, loss, start)


def _mean_gradient(model: nn.Module, loader: DataLoader,
                   grad_batches: int | None) -> tuple[dict[str, Tensor], float, int]:
    """Gradient of the mean loss over the first `grad_batches` batches of `loader`."""
    model.train()
    model.zero_grad()
    loss_sum, seen = 0.0, 0
    for i, (x, y) in enumerate(loader):
        if grad_batches is not None and i >= grad_batches:
            break
        loss = F.cross_entropy(model(x), y, reduction="sum")
        loss.backward()
        loss_sum += loss.item()
        seen += len(y)
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    tensors = {k: grads[k] / seen if k in grads else torch.zeros_like(v)
               for k, v in float_state(model).items()}
    return tensors, loss_sum / seen, seen


def distill_local(teacher: nn.Module, student: nn.Module, dataset: Dataset, *,
                  epochs: int = 2, batch_size: int = 32, lr: float = 0.1,
                  momentum: float = 0.0, weight_decay: float = 0.0,
                  temperature: float = 2.0, alpha: float = 0.5,
                  seed: int | None = None) -> LocalResult:
    """Knowledge distillation on local data (Hinton et al. 2015).

    `teacher` is frozen; a copy of `student` (same or smaller architecture, as received:
    the global model of that student) is trained on
    α·CE(student, y) + (1−α)·T²·KL(teacher_T ‖ student_T), where ``_T`` means softmax
    at temperature T (T² keeps the soft-target gradients on the scale of the hard-label
    ones): α weighs the labels, 1 − α the teacher. The update is the student's full
    float state, kind "student".
    """
    _check(dataset, epochs, batch_size)
    start = time.perf_counter()
    work = copy.deepcopy(student)
    was_training = teacher.training
    teacher.eval()

    def loss_fn(m: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            soft_targets = F.log_softmax(teacher(x) / temperature, dim=1)
        logits = m(x)
        soft = F.kl_div(F.log_softmax(logits / temperature, dim=1), soft_targets,
                        reduction="batchmean", log_target=True)
        return alpha * F.cross_entropy(logits, y) + (1 - alpha) * temperature ** 2 * soft

    try:
        with _seeded(seed) as generator:
            loss = _sgd_epochs(work, _loader(dataset, batch_size, generator), loss_fn,
                               epochs=epochs, lr=lr, momentum=momentum,
                               weight_decay=weight_decay)
    finally:
        teacher.train(was_training)
    return _result("student", float_state(work), len(dataset), loss, start)


def train_multitask(encoder: nn.Module, heads: dict[str, nn.Module], queues: dict[str, Dataset], *,
                    epochs: int = 2, batch_size: int = 32, lr: float = 0.1, momentum: float = 0.0,
                    weight_decay: float = 0.0, seed: int | None = None) -> LocalResult:
    """A shared encoder and task heads, trained from per-task sample queues.

    `queues[task]` holds that task's samples (each a full training step or more: the
    caller leaves out tasks whose queue is too short). Every step takes one batch from
    one task's queue and trains the encoder plus that task's head only: the other
    heads get no gradient, so a step of one task never moves another task's head.
    Within an epoch the tasks take turns, batch by batch, until every queue is spent
    (each reshuffled per epoch, short last batch kept), so the encoder sees the tasks
    interleaved rather than one after the other. The update is the delta of the
    encoder and of the trained heads, with tensor names "encoder.*" and "heads.TASK.*";
    `parts` counts the samples behind each (the encoder: all of them).
    """
    if not queues or any(len(q) == 0 for q in queues.values()):
        raise ValueError("cannot train without samples in every task queue")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be positive, got {epochs}, {batch_size}")
    start = time.perf_counter()
    tasks = sorted(queues)
    work_enc, work_heads = copy.deepcopy(encoder), {t: copy.deepcopy(heads[t]) for t in tasks}
    params = [*work_enc.parameters(), *(p for t in tasks for p in work_heads[t].parameters())]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    for m in (work_enc, *work_heads.values()):
        m.train()
    loss_sum, seen = 0.0, 0
    with _seeded(seed) as generator:
        for _ in range(epochs):
            loss_sum, seen = 0.0, 0
            batches = {t: iter(_loader(queues[t], batch_size, generator)) for t in tasks}
            while batches:
                for task in list(batches):
                    batch = next(batches[task], None)
                    if batch is None:
                        del batches[task]
                        continue
                    x, y = batch
                    optimizer.zero_grad()  # set_to_none: the heads of other tasks keep no gradient
                    loss = F.cross_entropy(work_heads[task](work_enc(x)), y)
                    loss.backward()
                    optimizer.step()  # SGD skips parameters without a gradient
                    loss_sum += loss.item() * len(y)
                    seen += len(y)
    tensors = _prefixed("encoder", _delta(encoder, work_enc))
    for t in tasks:
        tensors.update(_prefixed(f"heads.{t}", _delta(heads[t], work_heads[t])))
    counts = {t: len(queues[t]) for t in tasks}
    parts = {"encoder": sum(counts.values()), **{f"heads.{t}": n for t, n in counts.items()}}
    result = _result("delta", tensors, parts["encoder"], loss_sum / seen, start)
    return replace(result, parts=parts, metrics={**result.metrics, **{f"samples_{t}": n for t, n in counts.items()}})


def _delta(received: nn.Module, trained: nn.Module) -> dict[str, Tensor]:
    before = float_state(received)
    return {k: v - before[k] for k, v in float_state(trained).items()}


def _prefixed(prefix: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {f"{prefix}.{k}": v for k, v in tensors.items()}
