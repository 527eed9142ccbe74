"""Asynchronous aggregation: apply updates as they arrive, discounted by staleness.

Synchronous rounds wait for the slowest participant; on a fleet of unreliable
devices that is most of the wall time. These strategies never wait: each update is
taken as it comes, and an update computed on an older model version (staleness
τ = current version − the version it started from) counts for less, or not at all
past `max_staleness`.

* **FedBuff** (Nguyen et al. 2022): buffer updates; after K of them, combine the
  staleness-weighted pseudo-deltas (weight 1/√(1+τ)) by the job's rule — the mean, as
  in the paper, or median / trimmed mean / Multi-Krum over the buffer — and apply the
  result times a server learning rate.
* **FedAsync** (Xie et al. 2019): x ← (1−αₜ)·x + αₜ·x_new for every update, with
  αₜ = α·s(τ) and s constant, polynomial (1+τ)^−a or hinge (1 if τ ≤ b, else
  1/(a(τ−b)+1)); x_new is the slave's model, i.e. its base version plus its delta.
* **Gradient push** (the source documents' asynchronous optimizer; Downpour-SGD
  style): slaves fetch the latest parameters, compute a gradient on their own
  batches and push it; the master applies x ← x − lr·s(τ)·g at once.

Like the synchronous strategies, these know nothing of MQTT or rounds: the master
core hands them verified `ClientUpdate`s and the parameters they were based on.

Robustness: FedBuff takes any rule of strategies.RULES over its buffer. FedAsync and
gradient push apply each update alone, the moment it arrives, so there is no set of
updates to take a median or Krum of: they refuse a robust `rule` with a ConfigError,
and what bounds a bad slave there is `clip_norm` (one update moves the model by at
most α·s(τ)·clip_norm, resp. lr·s(τ)·clip_norm) and the master's `max_update_norm`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .options import Option, choice, integer, number, parse_strategy_table
from .strategies import (RULE_OPTIONS, SAFETY_OPTIONS, ClientUpdate, Rule, clip_to_norm,
                         pseudo_delta, rule_from_options)
from .errors import ConfigError

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
    max_update_norm: float | None = None  # applied by the master: see update_safety
    max_weight: int | None = None  # likewise
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

    def state_dict(self) -> dict[str, Any]:
        return {}  # buffered updates are recovered from the master's journal, not here

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


@dataclass
class FedBuff(_AsyncBase):
    buffer_size: int = 4
    server_lr: float = 1.0
    rule: Rule = field(default_factory=Rule)
    _buffer: list[Params] = field(default_factory=list, repr=False)

    def add(self, params: Params, update: ClientUpdate, version: int, base: Params | None) -> Params | None:
        weight = 1.0 / math.sqrt(1.0 + update.staleness(version))
        delta = self._delta(update, base if base is not None else params)
        self._buffer.append({k: weight * v for k, v in delta.items()})
        if len(self._buffer) < self.buffer_size:
            return None
        combined = self.rule.combine(self._buffer, [1.0] * len(self._buffer))
        self._buffer.clear()
        return {k: params[k] + self.server_lr * combined[k] for k in params}


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


_NON_NEGATIVE = number(0)
_PER_UPDATE_RULE = Option("mean", choice(
    "mean", hint="this strategy applies each update alone, so there is no set of updates to "
                 "take a median, trimmed mean or Krum of: use fedbuff for those, or bound each "
                 "update with clip_norm"))
_STALENESS = {"staleness": Option("polynomial", choice(*STALENESS_FUNCTIONS)),
              "a": Option(0.5, _NON_NEGATIVE), "b": Option(4.0, _NON_NEGATIVE)}
_COMMON = {"max_staleness": Option(16, integer(0)), **SAFETY_OPTIONS}
#: asynchronous strategy name -> every option it takes, with defaults and checks
ASYNC_OPTIONS: dict[str, dict[str, Option]] = {
    name: {**_COMMON, **own} for name, own in {
        "fedbuff": {**RULE_OPTIONS, "buffer_size": Option(4, integer(1)),
                    "server_lr": Option(1.0, number(0, open_low=True))},
        "fedasync": {"rule": _PER_UPDATE_RULE, **_STALENESS,
                     "alpha": Option(0.6, number(0, 1, open_low=True, open_high=False))},
        "gradpush": {"rule": _PER_UPDATE_RULE, **_STALENESS,
                     "lr": Option(0.1, number(0, open_low=True))},
    }.items()
}


def make_async_strategy(cfg: Mapping[str, Any], *, gradient_lr: float | None = None,
                        path: str = "strategy") -> _AsyncBase:
    """Build FedBuff / FedAsync / gradient push from a `[strategy]` table."""
    name, opt = parse_strategy_table(cfg, ASYNC_OPTIONS, path=path)
    common = {"max_staleness": opt["max_staleness"], "clip_norm": opt["clip_norm"],
              "gradient_lr": gradient_lr, "max_update_norm": opt["max_update_norm"],
              "max_weight": opt["max_weight"]}
    if name == "fedbuff":
        rule = rule_from_options(opt, path)
        if opt["buffer_size"] < rule.min_updates:
            raise ConfigError(f"{path}.buffer_size: {rule.name} with krum_f = {rule.krum_f} needs "
                              f"a buffer of at least {rule.min_updates} updates (2·krum_f + 3)")
        if rule.krum_m is not None and rule.krum_m > opt["buffer_size"]:
            raise ConfigError(f"{path}.krum_m: cannot select {rule.krum_m} of a buffer of "
                              f"{opt['buffer_size']}")
        return FedBuff(buffer_size=opt["buffer_size"], server_lr=opt["server_lr"], rule=rule, **common)
    staleness = Staleness(opt["staleness"], opt["a"], opt["b"])
    if name == "fedasync":
        return FedAsync(alpha=opt["alpha"], staleness=staleness, **common)
    return GradPush(lr=opt["lr"], staleness=staleness, **common)
