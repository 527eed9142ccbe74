"""Asynchronous aggregation: apply updates as they arrive, discounted by staleness.

Synchronous rounds wait for the slowest participant; on a fleet of unreliable
devices that is most of the wall time. These strategies never wait: each update is
taken as it comes, and an update computed on an older model version (staleness
τ = current version − the version it started from) counts for less, or not at all
past `max_staleness`.

* **FedBuff** (Nguyen et al. 2022): buffer updates; after K of them, apply the mean of
  the staleness-weighted pseudo-deltas, weight 1/√(1+τ), times a server learning rate.
* **FedAsync** (Xie et al. 2019): x ← (1−αₜ)·x + αₜ·x_new for every update, with
  αₜ = α·s(τ) and s constant, polynomial (1+τ)^−a or hinge (1 if τ ≤ b, else
  1/(a(τ−b)+1)); x_new is the slave's model, i.e. its base version plus its delta.
* **Gradient push** (the source documents' asynchronous optimizer; Downpour-SGD
  style): slaves fetch the latest parameters, compute a gradient on their own
  batches and push it; the master applies x ← x − lr·s(τ)·g at once.

Like the synchronous strategies, these know nothing of MQTT or rounds: the master
core hands them verified `ClientUpdate`s and the parameters they were based on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .errors import ConfigError
from .strategies import ClientUpdate, clip_to_norm, pseudo_delta

Params = dict[str, Tensor]
STALENESS_FUNCTIONS = ("constant", "polynomial", "hinge")


@dataclass(frozen=True)
class Staleness:
    """s(τ): how much an update τ versions old still counts (s(0) = 1)."""

    function: str = "polynomial"
    a: float = 0.5
    b: float = 4.0

    def __call__(self, tau: int) -> float:
        if self.function == "constant":
            return 1.0
        if self.function == "polynomial":
            return (1.0 + tau) ** -self.a
        return 1.0 if tau <= self.b else 1.0 / (self.a * (tau - self.b) + 1.0)


@dataclass
class _AsyncBase:
    max_staleness: int = 16
    gradient_lr: float | None = None
    clip_norm: float | None = None
    asynchronous = True
    needs_base_params = False  # whether `add` must see the params the update started from

    def admissible(self, update: ClientUpdate, version: int) -> str | None:
        """Why an update cannot be used (None if it can)."""
        tau = update.staleness(version)
        if tau < 0:
            return f"based on version {update.base_version}, newer than the master's {version}"
        if tau > self.max_staleness:
            return f"staleness {tau} exceeds max_staleness {self.max_staleness}"
        return None

    def _delta(self, update: ClientUpdate, base: Params) -> Params:
        delta = pseudo_delta(update, base, self.gradient_lr)
        return clip_to_norm(delta, self.clip_norm) if self.clip_norm is not None else delta

    def pending(self) -> int:
        return 0

    def state_dict(self) -> dict[str, Any]:
        return {}  # buffered updates are recovered from the master's journal, not here

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


@dataclass
class FedBuff(_AsyncBase):
    buffer_size: int = 4
    server_lr: float = 1.0
    _buffer: list[Params] = field(default_factory=list, repr=False)

    def add(self, params: Params, update: ClientUpdate, version: int, base: Params | None) -> Params | None:
        weight = 1.0 / math.sqrt(1.0 + update.staleness(version))
        delta = self._delta(update, base if base is not None else params)
        self._buffer.append({k: weight * v for k, v in delta.items()})
        if len(self._buffer) < self.buffer_size:
            return None
        scale = self.server_lr / len(self._buffer)
        new = {k: params[k] + scale * sum(d[k] for d in self._buffer) for k in params}
        self._buffer.clear()
        return new

    def pending(self) -> int:
        return len(self._buffer)


@dataclass
class FedAsync(_AsyncBase):
    alpha: float = 0.6
    staleness: Staleness = field(default_factory=Staleness)
    needs_base_params = True

    def add(self, params: Params, update: ClientUpdate, version: int, base: Params | None) -> Params | None:
        assert base is not None, "FedAsync mixes in the slave's model: base params required"
        alpha = self.alpha * self.staleness(update.staleness(version))
        delta = self._delta(update, base)
        return {k: (1 - alpha) * params[k] + alpha * (base[k] + delta[k]) for k in params}


@dataclass
class GradPush(_AsyncBase):
    lr: float = 0.1
    staleness: Staleness = field(default_factory=Staleness)

    def admissible(self, update: ClientUpdate, version: int) -> str | None:
        if update.kind != "gradient":
            return f"gradient push takes gradients, not {update.kind!r} updates"
        return super().admissible(update, version)

    def add(self, params: Params, update: ClientUpdate, version: int, base: Params | None) -> Params | None:
        step = self.lr * self.staleness(update.staleness(version))
        grad = update.tensors
        if self.clip_norm is not None:
            grad = clip_to_norm(dict(grad), self.clip_norm)
        return {k: params[k] - step * grad[k] for k in params}


_COMMON = {"max_staleness": 16, "clip_norm": None}
ASYNC_OPTIONS: dict[str, dict[str, Any]] = {
    "fedbuff": {"buffer_size": 4, "server_lr": 1.0},
    "fedasync": {"alpha": 0.6, "staleness": "polynomial", "a": 0.5, "b": 4.0},
    "gradpush": {"lr": 0.1, "staleness": "polynomial", "a": 0.5, "b": 4.0},
}


def make_async_strategy(cfg: Mapping[str, Any], *, gradient_lr: float | None = None,
                        path: str = "strategy") -> _AsyncBase:
    """Build FedBuff / FedAsync / gradient push from a `[strategy]` table."""
    name = cfg.get("name")
    if name not in ASYNC_OPTIONS:
        raise ConfigError(f"{path}.name: {name!r} is not an asynchronous strategy ({', '.join(ASYNC_OPTIONS)})")
    options = {**_COMMON, **ASYNC_OPTIONS[name]}
    given = {k: v for k, v in cfg.items() if k != "name" and v is not None}
    for key, value in given.items():
        if key not in options:
            raise ConfigError(f"{path}.{key}: not an option of {name!r} (options: {', '.join(options)})")
        if key == "staleness":
            if value not in STALENESS_FUNCTIONS:
                raise ConfigError(f"{path}.staleness: {value!r} is not one of {', '.join(STALENESS_FUNCTIONS)}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"{path}.{key}: expected a non-negative number, got {value!r}")
    opt = {**options, **given}
    if not isinstance(opt["max_staleness"], int):
        raise ConfigError(f"{path}.max_staleness: expected an integer")
    common = {"max_staleness": opt["max_staleness"], "clip_norm": opt["clip_norm"], "gradient_lr": gradient_lr}
    if name == "fedbuff":
        if not isinstance(opt["buffer_size"], int) or opt["buffer_size"] < 1:
            raise ConfigError(f"{path}.buffer_size: expected a positive integer")
        return FedBuff(buffer_size=opt["buffer_size"], server_lr=float(opt["server_lr"]), **common)
    staleness = Staleness(opt["staleness"], float(opt["a"]), float(opt["b"]))
    if name == "fedasync":
        if not 0 < opt["alpha"] <= 1:
            raise ConfigError(f"{path}.alpha: expected a number in (0, 1]")
        return FedAsync(alpha=float(opt["alpha"]), staleness=staleness, **common)
    return GradPush(lr=float(opt["lr"]), staleness=staleness, **common)
