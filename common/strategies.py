"""Aggregation strategies: how client updates become the next global model.

Kept apart from transport and round bookkeeping (in the spirit of Flower's `Strategy`),
so the master core can swap rules by configuration and tests can check the arithmetic
alone. Everything follows the FedOpt framework of Reddi et al. 2021, "Adaptive Federated
Optimization" (Algorithm 1 and 2):

1. every `ClientUpdate` becomes a *pseudo-delta* Δᵢ (a step the client suggests);
2. optionally each Δᵢ is clipped to an L2 norm bound (limits what one client can do);
3. the Δᵢ are combined by a rule — sample-weighted mean, or the coordinate-wise median or
   trimmed mean, which tolerate a minority of arbitrarily bad clients;
4. a *server optimizer* applies the combined Δ: plain or momentum SGD (FedAvg, FedAvgM),
   or Adagrad/Adam/Yogi (FedAdagrad, FedAdam, FedYogi).

Parameters are `dict[str, Tensor]` as returned by `modelspec.float_state`. Asynchronous
and buffered strategies can implement the same `Strategy` protocol: each update carries
its `base_version`, so `staleness(version)` is available to weight it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from fedmq.common.errors import ConfigError, ProtocolError, Reason

Params = dict[str, Tensor]

#: "delta": trained − received weights; "gradient": mean loss gradient at the received
#: weights; "params"/"student": full trained parameters (e.g. a distilled student of the
#: same architecture), turned into a delta against the current global parameters.
UPDATE_KINDS = ("delta", "gradient", "params", "student")
RULES = ("mean", "median", "trimmed_mean")


@dataclass(frozen=True)
class ClientUpdate:
    """One slave's contribution to a round, already verified and shape-checked."""

    sender: str
    kind: str
    tensors: Mapping[str, Tensor]
    num_samples: int
    base_version: int

    def __post_init__(self) -> None:
        if self.kind not in UPDATE_KINDS:
            raise ProtocolError(Reason.BAD_KIND, f"update kind {self.kind!r} "
                                f"(expected one of {', '.join(UPDATE_KINDS)})")
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) \
                or self.num_samples < 1:
            raise ProtocolError(Reason.BAD_BODY,
                                f"num_samples must be a positive int, got {self.num_samples!r}")

    def staleness(self, version: int) -> int:
        """How many global versions were published since the slave's starting point."""
        return version - self.base_version


class Strategy(Protocol):
    """What the master core needs from an aggregation rule."""

    def aggregate(self, params: Params, updates: Sequence[ClientUpdate],
                  version: int) -> Params:
        """Return the new global parameters; `params` is not modified."""

    def state_dict(self) -> dict[str, Any]:
        """Server-optimizer state (tensors and numbers only) for checkpoints."""

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned."""


def pseudo_delta(update: ClientUpdate, params: Params, gradient_lr: float | None) -> Params:
    """The step an update suggests: a delta as is, −lr·g for a gradient, or w − x for
    full parameters. `gradient_lr` is the slaves' local learning rate, so one gradient
    update moves the model as far as one local SGD step would."""
    if update.kind == "delta":
        return {k: update.tensors[k] for k in params}
    if update.kind == "gradient":
        if gradient_lr is None:
            raise ConfigError("strategy: gradient updates need gradient_lr "
                              "(the slaves' learning rate)")
        return {k: -gradient_lr * update.tensors[k] for k in params}
    return {k: update.tensors[k] - params[k] for k in params}


def global_norm(tensors: Mapping[str, Tensor]) -> float:
    """L2 norm of all tensors taken together, as if flattened into one vector."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values()))


def clip_to_norm(delta: Params, max_norm: float) -> Params:
    """Scale `delta` down so its global L2 norm is at most `max_norm` (direction kept)."""
    norm = global_norm(delta)
    if norm <= max_norm:
        return delta
    scale = max_norm / norm
    return {k: v * scale for k, v in delta.items()}


def trim_count(n: int, trim: float) -> int:
    """How many values the trimmed mean drops at *each* end among `n`.

    Rounded up, so a positive `trim` always drops at least one client from each side
    (with 8 clients and trim 0.1, rounding down would drop nothing and silently give the
    plain mean); capped so at least one value remains.
    """
    return min(math.ceil(trim * n - 1e-9), (n - 1) // 2)


def combine(deltas: Sequence[Params], weights: Sequence[float], rule: str = "mean",
            trim: float = 0.1) -> Params:
    """Combine pseudo-deltas into one.

    "mean" weights by `weights` (sample counts: FedAvg). "median" and "trimmed_mean" are
    coordinate-wise and unweighted (Yin et al. 2018): a client could otherwise buy
    influence by claiming a huge sample count. An even count takes the mean of the two
    middle values.
    """
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r} (expected one of {', '.join(RULES)})")
    n = len(deltas)
    out: Params = {}
    total = float(sum(weights))
    for name in deltas[0]:
        if rule == "mean":  # accumulated in place: no K x model stack (K 1 M updates = K x 4 MB)
            first = deltas[0][name]
            acc = torch.zeros(first.shape, dtype=first.dtype if first.is_floating_point() else torch.get_default_dtype())
            for d, w in zip(deltas, weights):
                acc.add_(d[name], alpha=w / total)
            out[name] = acc
            continue
        ordered = torch.stack([d[name] for d in deltas]).sort(dim=0).values
        if rule == "median":
            out[name] = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
        else:  # trimmed_mean
            k = trim_count(n, trim)
            out[name] = ordered[k:n - k].mean(0)
    return out


class ServerOptimizer(Protocol):
    """Applies the combined pseudo-delta to the global parameters (Reddi Alg. 1/2)."""

    def step(self, params: Params, delta: Params) -> Params: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


def _flatten_state(buffers: Mapping[str, Params]) -> dict[str, Any]:
    """{"m": {"0.weight": t}} -> {"m/0.weight": t}: a flat map CBOR and npz both take."""
    return {f"{prefix}/{k}": v.clone() for prefix, tensors in buffers.items()
            for k, v in tensors.items()}


def _unflatten_state(state: Mapping[str, Any], prefixes: Sequence[str]) -> dict[str, Params]:
    buffers: dict[str, Params] = {p: {} for p in prefixes}
    for key, value in state.items():
        prefix, _, name = key.partition("/")
        if prefix not in buffers or not name or not isinstance(value, Tensor):
            raise ValueError(f"unexpected server optimizer state entry {key!r}")
        buffers[prefix][name] = value.clone()
    return buffers


@dataclass
class ServerSGD:
    """x ← x + η·Δ (FedAvg), or with momentum μ: m ← μ·m + Δ, x ← x + η·m (FedAvgM,
    Hsu et al. 2019)."""

    lr: float = 1.0
    momentum: float = 0.0
    _m: Params = field(default_factory=dict, init=False, repr=False)

    def step(self, params: Params, delta: Params) -> Params:
        if self.momentum:
            self._m = {k: self.momentum * self._m[k] + d if k in self._m else d.clone()
                       for k, d in delta.items()}
            delta = self._m
        return {k: params[k] + self.lr * delta[k] for k in params}

    def state_dict(self) -> dict[str, Any]:
        return _flatten_state({"m": self._m})

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._m = _unflatten_state(state, ["m"])["m"]


@dataclass
class ServerAdaptive:
    """FedAdagrad, FedAdam and FedYogi exactly as Reddi et al. 2021, Algorithm 2:

        m ← β₁·m + (1−β₁)·Δ
        v ← v + Δ²                              (adagrad)
        v ← β₂·v + (1−β₂)·Δ²                    (adam)
        v ← v − (1−β₂)·Δ²·sign(v − Δ²)          (yogi)
        x ← x + η·m / (√v + τ)

    with m₀ = 0 and v₀ = τ² (the paper requires v₋₁ ≥ τ²) and no bias correction.
    """

    variant: str
    lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    _m: Params = field(default_factory=dict, init=False, repr=False)
    _v: Params = field(default_factory=dict, init=False, repr=False)

    def step(self, params: Params, delta: Params) -> Params:
        if not self._m:
            self._m = {k: torch.zeros_like(d) for k, d in delta.items()}
            self._v = {k: torch.full_like(d, self.tau ** 2) for k, d in delta.items()}
        out: Params = {}
        for k, d in delta.items():
            m = self.beta1 * self._m[k] + (1 - self.beta1) * d
            d2 = d * d
            v = self._v[k]
            if self.variant == "adagrad":
                v = v + d2
            elif self.variant == "adam":
                v = self.beta2 * v + (1 - self.beta2) * d2
            else:
                v = v - (1 - self.beta2) * d2 * torch.sign(v - d2)
            self._m[k], self._v[k] = m, v
            out[k] = params[k] + self.lr * m / (v.sqrt() + self.tau)
        return out

    def state_dict(self) -> dict[str, Any]:
        return _flatten_state({"m": self._m, "v": self._v})

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        buffers = _unflatten_state(state, ["m", "v"])
        if buffers["m"].keys() != buffers["v"].keys():
            raise ValueError("server optimizer state: 'm' and 'v' name different tensors")
        self._m, self._v = buffers["m"], buffers["v"]


@dataclass
class FedOpt:
    """A synchronous strategy: pseudo-deltas → clip → combine → server optimizer."""

    optimizer: ServerOptimizer
    rule: str = "mean"
    trim: float = 0.1
    clip_norm: float | None = None
    gradient_lr: float | None = None

    def aggregate(self, params: Params, updates: Sequence[ClientUpdate],
                  version: int) -> Params:
        """New global parameters from one round's updates.

        With no updates the parameters come back unchanged and the optimizer state does
        not move (an empty round is not a zero step). `version` is unused here: a
        synchronous round only aggregates updates for the current version.
        """
        if not updates:
            return dict(params)
        deltas = [pseudo_delta(u, params, self.gradient_lr) for u in updates]
        if self.clip_norm is not None:
            deltas = [clip_to_norm(d, self.clip_norm) for d in deltas]
        combined = combine(deltas, [u.num_samples for u in updates], self.rule, self.trim)
        return self.optimizer.step(params, combined)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state)


_COMMON_OPTIONS = {"rule": "mean", "trim": 0.1, "clip_norm": None}
_ADAPTIVE = {"beta1": 0.9, "beta2": 0.99, "tau": 1e-3}
#: strategy name -> its own options with defaults (besides the common ones)
STRATEGY_OPTIONS: dict[str, dict[str, Any]] = {
    "fedavg": {"server_lr": 1.0},
    "fedavgm": {"server_lr": 1.0, "momentum": 0.9},
    "fedadagrad": {"server_lr": 0.01, "beta1": 0.9, "tau": 1e-3},
    "fedadam": {"server_lr": 0.01, **_ADAPTIVE},
    "fedyogi": {"server_lr": 0.01, **_ADAPTIVE},
}


def _number(path: str, value: Any, low: float, high: float, *, open_low: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and (value > low if open_low else value >= low) and value < high:
        return float(value)
    bounds = f"{'(' if open_low else '['}{low}, {high})"
    raise ConfigError(f"{path}: expected a number in {bounds}, got {value!r}")


def make_strategy(cfg: Mapping[str, Any], *, gradient_lr: float | None = None,
                  path: str = "strategy") -> FedOpt:
    """Build a strategy from a config table such as
    ``{"name": "fedadam", "server_lr": 0.01, "rule": "median", "clip_norm": 5.0}``.

    Keys with value None count as absent. A key that the named strategy does not use is
    an error (``momentum`` on fedadam would silently do nothing otherwise). `gradient_lr`
    is the slaves' local learning rate, needed only if slaves send gradients.
    """
    name = cfg.get("name", "fedavg")
    if name not in STRATEGY_OPTIONS:
        raise ConfigError(f"{path}.name: unknown strategy {name!r} "
                          f"(known: {', '.join(STRATEGY_OPTIONS)})")
    options = {**_COMMON_OPTIONS, **STRATEGY_OPTIONS[name]}
    given = {k: v for k, v in cfg.items() if k != "name" and v is not None}
    for key in given:
        if key not in options:
            raise ConfigError(f"{path}.{key}: not an option of {name!r} "
                              f"(options: {', '.join(options)})")
    opt = {**options, **given}
    inf = math.inf
    server_lr = _number(f"{path}.server_lr", opt["server_lr"], 0, inf, open_low=True)
    if opt["rule"] not in RULES:
        raise ConfigError(f"{path}.rule: {opt['rule']!r} is not one of {', '.join(RULES)}")
    trim = _number(f"{path}.trim", opt["trim"], 0, 0.5, open_low=False)
    clip_norm = opt["clip_norm"]
    if clip_norm is not None:
        clip_norm = _number(f"{path}.clip_norm", clip_norm, 0, inf, open_low=True)
    if gradient_lr is not None:
        gradient_lr = _number("gradient_lr", gradient_lr, 0, inf, open_low=True)

    optimizer: ServerOptimizer
    if name in ("fedavg", "fedavgm"):
        momentum = _number(f"{path}.momentum", opt.get("momentum", 0.0), 0, 1, open_low=False)
        optimizer = ServerSGD(lr=server_lr, momentum=momentum)
    else:
        betas = {k: _number(f"{path}.{k}", opt[k], 0, 1, open_low=False)
                 for k in ("beta1", "beta2") if k in opt}
        tau = _number(f"{path}.tau", opt["tau"], 0, inf, open_low=True)
        optimizer = ServerAdaptive(variant=name.removeprefix("fed"), lr=server_lr,
                                   tau=tau, **betas)
    return FedOpt(optimizer=optimizer, rule=opt["rule"], trim=trim, clip_norm=clip_norm,
                  gradient_lr=gradient_lr)
