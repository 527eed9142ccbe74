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
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from fedmq.common.modelspec import float_state

LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class LocalResult:
    """What a slave sends back: `kind` as in `strategies.UPDATE_KINDS`, the tensors
    named as in `float_state`, the sample count for weighting, and metrics to report."""

    kind: str
    tensors: dict[str, Tensor]
    num_samples: int
    metrics: dict[str, float]


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
                lr: float, momentum: float, weight_decay: float) -> float:
    """Train `model` in place; return the sample-weighted mean loss of the last epoch."""
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
            loss_sum += loss.item() * len(y)
            seen += len(y)
    return loss_sum / seen


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
                weight_decay: float = 0.0, prox_mu: float = 0.0,
                grad_batches: int | None = None, seed: int | None = None) -> LocalResult:
    """Train a copy of `model` on local data and return the update to send.

    ``kind="delta"``: `epochs` of mini-batch SGD; the update is trained − received for
    every float state entry. With ``prox_mu > 0`` the loss gains FedProx's proximal term
    (μ/2)·‖w − w_received‖², which keeps heterogeneous clients near the global model.

    ``kind="gradient"``: no step is taken; the update is the gradient of the mean loss
    over the first `grad_batches` shuffled mini-batches (default and at most: one pass),
    i.e. weighted by samples, and zero for buffers. `num_samples` counts the samples used.
    `epochs`, `momentum`, `weight_decay` and `prox_mu` do not apply to gradients.
    """
    _check(dataset, epochs, batch_size)
    if grad_batches is not None and grad_batches < 1:
        raise ValueError(f"grad_batches must be positive, got {grad_batches}")
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

            loss = _sgd_epochs(work, loader, loss_fn, epochs=epochs, lr=lr,
                               momentum=momentum, weight_decay=weight_decay)
            received = float_state(model)
            tensors = {k: v - received[k] for k, v in float_state(work).items()}
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

    The received model is the frozen `teacher`; a copy of `student` (same or smaller
    architecture) is trained on α·T²·KL(teacher_T ‖ student_T) + (1−α)·CE(student, y),
    where ``_T`` means softmax at temperature T (T² keeps the soft-target gradients on
    the scale of the hard-label ones). The update is the student's full float state,
    kind "student".
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
        return alpha * temperature ** 2 * soft + (1 - alpha) * F.cross_entropy(logits, y)

    try:
        with _seeded(seed) as generator:
            loss = _sgd_epochs(work, _loader(dataset, batch_size, generator), loss_fn,
                               epochs=epochs, lr=lr, momentum=momentum,
                               weight_decay=weight_decay)
    finally:
        teacher.train(was_training)
    return _result("student", float_state(work), len(dataset), loss, start)
