"""Aggregation strategies: how client updates become the next global model.

Kept apart from transport and round bookkeeping (in the spirit of Flower's `Strategy`),
so the master core can swap rules by configuration and tests can check the arithmetic
alone. Everything follows the FedOpt framework of Reddi et al. 2021, "Adaptive Federated
Optimization" (Algorithm 1 and 2):

1. every `ClientUpdate` becomes a *pseudo-delta* Δᵢ (a step the client suggests);
2. optionally each Δᵢ is clipped to an L2 norm bound (limits what one client can do);
3. the Δᵢ are combined by a `Rule` — weighted mean, or one that tolerates a minority of
   arbitrarily bad clients: coordinate-wise median or trimmed mean, or Multi-Krum;
4. a *server optimizer* applies the combined Δ: plain or momentum SGD (FedAvg, FedAvgM),
   or Adagrad/Adam/Yogi (FedAdagrad, FedAdam, FedYogi).

Parameters are `dict[str, Tensor]` as returned by `modelspec.float_state`. The
asynchronous strategies (async_strategies.py) reuse the pseudo-deltas, clipping, rules
and option checking defined here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from .errors import ConfigError, ProtocolError, Reason
from .messages import UPDATE_KINDS
from .options import Option, choice, integer, number, parse_strategy_table

Params = dict[str, Tensor]

RULES = ("mean", "median", "trimmed_mean", "krum")


@dataclass(frozen=True)
class ClientUpdate:
    """One slave's contribution to a round, already verified and shape-checked.

    `kind` is one of messages.UPDATE_KINDS: "delta" (trained − received weights),
    "gradient" (mean loss gradient at the received weights) or "student" (full trained
    parameters, e.g. a distilled student of the same architecture). `num_samples` is
    what the slave claims; `weight`, when the master sets it, is what the mean rule
    weights by instead (the claim capped by what the slave declared at enrollment or
    by a job limit: see update_safety.capped_weight), so a slave cannot buy influence
    by claiming more samples than it has.

    `parts`, in a job whose model has parts (common/layout.py), names the parts the
    update trains and the samples each counts for (capped like `weight`); `tensors` then
    hold exactly those parts. None: the whole model.
    """

    sender: str
    kind: str
    tensors: Mapping[str, Tensor]
    num_samples: int
    base_version: int
    weight: float | None = None
    parts: Mapping[str, int] | None = None

    def __post_init__(self) -> None:
        if self.kind not in UPDATE_KINDS:
            raise ProtocolError(Reason.BAD_KIND, f"update kind {self.kind!r} "
                                f"(expected one of {', '.join(UPDATE_KINDS)})")
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) \
                or self.num_samples < 1:
            raise ProtocolError(Reason.BAD_BODY,
                                f"num_samples must be a positive int, got {self.num_samples!r}")
        if self.weight is not None and not (isinstance(self.weight, (int, float))
                                            and 0 < self.weight < math.inf):
            raise ValueError(f"weight must be a positive finite number, got {self.weight!r}")
        if self.parts is not None and not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1
                                              for n in self.parts.values()):
            raise ValueError(f"parts must map part names to positive sample counts, got {self.parts!r}")

    @property
    def aggregation_weight(self) -> float:
        """What the mean rule weights this update by: `weight` if set, else the claim."""
        return float(self.num_samples if self.weight is None else self.weight)

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
    a student's full parameters. `gradient_lr` is the slaves' local learning rate, so
    one gradient update moves the model as far as one local SGD step would."""
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


def krum_select(deltas: Sequence[Params], f: int, m: int) -> list[int]:
    """Multi-Krum's choice (Blanchard et al. 2017): the `m` deltas with the lowest scores.

    A delta's score is the sum of squared L2 distances to its n − f − 2 nearest other
    deltas: honest updates sit close together, so as long as n ≥ 2f + 3 each honest
    score is bounded by honest distances alone, whereas a Byzantine delta far from the
    crowd scores high. Fewer updates than that (a short round) still get the most
    central ones, with at least one neighbour each, but without the guarantee. Ties go
    to the earlier update. Distances accumulate in float64, one tensor name at a time
    (an n × size stack, not n × model).
    """
    n = len(deltas)
    m = max(1, min(m, n))
    if n <= 2 or m == n:
        return list(range(n))[:m]
    dist = torch.zeros(n, n, dtype=torch.float64)
    for name in deltas[0]:
        x = torch.stack([d[name].reshape(-1) for d in deltas]).double()
        sq = (x * x).sum(1)
        dist += (sq[:, None] + sq[None, :] - 2 * (x @ x.T)).clamp_(min=0)
    dist.fill_diagonal_(math.inf)
    neighbours = min(max(n - f - 2, 1), n - 1)
    scores = dist.sort(dim=1).values[:, :neighbours].sum(1)
    order = sorted(range(n), key=lambda i: (float(scores[i]), i))
    return sorted(order[:m])


@dataclass(frozen=True)
class Rule:
    """How several pseudo-deltas become one.

    * "mean" weights by the updates' aggregation weights (FedAvg);
    * "median" and "trimmed_mean" are coordinate-wise (Yin et al. 2018); an even count
      takes the mean of the two middle values; `trim` is the share dropped at each end;
    * "krum" is Multi-Krum: the unweighted mean of the `krum_m` deltas `krum_select`
      keeps, tolerating `krum_f` Byzantine clients (default m = n − f).

    All but "mean" ignore weights: a client could otherwise buy influence by claiming
    a huge sample count.
    """

    name: str = "mean"
    trim: float = 0.1
    krum_f: int = 0
    krum_m: int | None = None

    def __post_init__(self) -> None:
        if self.name not in RULES:
            raise ValueError(f"unknown rule {self.name!r} (expected one of {', '.join(RULES)})")

    @property
    def min_updates(self) -> int:
        """The fewest updates the rule's robustness guarantee needs (Krum: 2f + 3)."""
        return 2 * self.krum_f + 3 if self.name == "krum" else 1

    def combine(self, deltas: Sequence[Params], weights: Sequence[float]) -> Params:
        if self.name == "krum":
            n = len(deltas)
            m = self.krum_m if self.krum_m is not None else n - self.krum_f
            chosen = krum_select(deltas, self.krum_f, m)
            return _weighted_mean([deltas[i] for i in chosen], [1.0] * len(chosen))
        if self.name == "mean":
            return _weighted_mean(deltas, weights)
        n = len(deltas)
        out: Params = {}
        for name in deltas[0]:
            ordered = torch.stack([d[name] for d in deltas]).sort(dim=0).values
            if self.name == "median":
                out[name] = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
            else:
                k = trim_count(n, self.trim)
                out[name] = ordered[k:n - k].mean(0)
        return out


def _weighted_mean(deltas: Sequence[Params], weights: Sequence[float]) -> Params:
    """Σ wᵢΔᵢ / Σ wᵢ, accumulated in place: no K × model stack (K 1 M updates = K × 4 MB)."""
    total = float(sum(weights))
    out: Params = {}
    for name, first in deltas[0].items():
        acc = torch.zeros(first.shape, dtype=first.dtype if first.is_floating_point()
                          else torch.get_default_dtype())
        for d, w in zip(deltas, weights):
            acc.add_(d[name], alpha=w / total)
        out[name] = acc
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
    """A synchronous strategy: pseudo-deltas → clip → combine → server optimizer.

    `max_update_norm` and `max_weight` are not applied here: the master applies them to
    each update as it arrives (update_safety.bound_client_update, capped_weight), where
    it can name the update it clipped, refused or capped.
    """

    optimizer: ServerOptimizer
    rule: Rule = field(default_factory=Rule)
    clip_norm: float | None = None
    gradient_lr: float | None = None
    max_update_norm: float | None = None
    max_weight: int | None = None

    @property
    def min_updates(self) -> int:
        """The fewest updates per round the rule's robustness needs; the master should
        refuse a `[rounds] min_updates` below it."""
        return self.rule.min_updates

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
        combined = self.rule.combine(deltas, [u.aggregation_weight for u in updates])
        return self.optimizer.step(params, combined)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state)


_POSITIVE = number(0, open_low=True)
_UNIT = number(0, 1)  # [0, 1)
#: how updates are combined (synchronous strategies and FedBuff)
RULE_OPTIONS: dict[str, Option] = {
    "rule": Option("mean", choice(*RULES)),
    "trim": Option(0.1, number(0, 0.5)),
    "krum_f": Option(None, integer(0)),
    "krum_m": Option(None, integer(1)),
}
#: what one update may do (every strategy): clip_norm is applied by the strategy,
#: max_update_norm and max_weight by the master (see update_safety)
SAFETY_OPTIONS: dict[str, Option] = {
    "clip_norm": Option(None, _POSITIVE),
    "max_update_norm": Option(None, number(0, open_low=True, open_high=False)),
    "max_weight": Option(None, integer(1)),
}
_ADAPTIVE = {"beta1": Option(0.9, _UNIT), "beta2": Option(0.99, _UNIT), "tau": Option(1e-3, _POSITIVE)}
#: strategy name -> every option it takes, with defaults and checks
STRATEGY_OPTIONS: dict[str, dict[str, Option]] = {
    name: {**RULE_OPTIONS, **SAFETY_OPTIONS, **own} for name, own in {
        "fedavg": {"server_lr": Option(1.0, _POSITIVE)},
        "fedavgm": {"server_lr": Option(1.0, _POSITIVE), "momentum": Option(0.9, _UNIT)},
        "fedadagrad": {"server_lr": Option(0.01, _POSITIVE), "beta1": _ADAPTIVE["beta1"],
                       "tau": _ADAPTIVE["tau"]},
        "fedadam": {"server_lr": Option(0.01, _POSITIVE), **_ADAPTIVE},
        "fedyogi": {"server_lr": Option(0.01, _POSITIVE), **_ADAPTIVE},
    }.items()
}


def rule_from_options(opt: Mapping[str, Any], path: str) -> Rule:
    """The `Rule` that checked RULE_OPTIONS describe; krum_f/krum_m only go with krum.

    krum_f has no default: how many Byzantine slaves to tolerate is the operator's
    call, and each one costs two more updates per aggregation (n ≥ 2f + 3).
    """
    if opt["rule"] != "krum":
        for key in ("krum_f", "krum_m"):
            if opt[key] is not None:
                raise ConfigError(f"{path}.{key}: only used with rule = \"krum\"")
        return Rule(opt["rule"], trim=opt["trim"])
    if opt["krum_f"] is None:
        raise ConfigError(f"{path}.krum_f: required with rule = \"krum\" (how many Byzantine "
                          f"slaves to tolerate; Krum then needs at least 2·krum_f + 3 updates)")
    return Rule("krum", trim=opt["trim"], krum_f=opt["krum_f"], krum_m=opt["krum_m"])


def make_strategy(cfg: Mapping[str, Any], *, gradient_lr: float | None = None,
                  path: str = "strategy") -> FedOpt:
    """Build a strategy from a config table such as
    ``{"name": "fedadam", "server_lr": 0.01, "rule": "krum", "krum_f": 2}``.

    Keys with value None count as absent; a key the named strategy does not use is an
    error (see options.parse_table). `gradient_lr` is the slaves' local learning rate,
    needed only if slaves send gradients.
    """
    name, opt = parse_strategy_table(cfg, STRATEGY_OPTIONS, path=path, default_name="fedavg")
    if gradient_lr is not None:
        gradient_lr = _POSITIVE("gradient_lr", gradient_lr)
    optimizer: ServerOptimizer
    if name in ("fedavg", "fedavgm"):
        optimizer = ServerSGD(lr=opt["server_lr"], momentum=opt.get("momentum", 0.0))
    else:
        optimizer = ServerAdaptive(variant=name.removeprefix("fed"), lr=opt["server_lr"],
                                   tau=opt["tau"],
                                   **{k: opt[k] for k in ("beta1", "beta2") if k in opt})
    return FedOpt(optimizer=optimizer, rule=rule_from_options(opt, path),
                  clip_norm=opt["clip_norm"], gradient_lr=gradient_lr,
                  max_update_norm=opt["max_update_norm"], max_weight=opt["max_weight"])


class PartStrategies:
    """One synchronous strategy per model part (common/layout.py), the same rule for each.

    Each part is aggregated from the updates that train it, weighted by the samples
    they trained it on (`ClientUpdate.parts`): a shared encoder from every contributor,
    a task head or a student only from the slaves of that task or student. A part no
    update touched keeps its parameters bit for bit, and its server-optimizer state
    does not move. Each part has its own strategy, so momentum or Adam moments never
    mix tensors of different parts.
    """

    asynchronous = False

    def __init__(self, parts: Sequence[str], part_of: Callable[[str], str | None],
                 make: Callable[[], FedOpt]) -> None:
        self.part_of = part_of
        self.strategies = {p: make() for p in parts}
        first = self.strategies[parts[0]]
        self.max_update_norm, self.max_weight = first.max_update_norm, first.max_weight
        self.min_updates = first.min_updates

    def aggregate(self, params: Params, updates: Sequence[ClientUpdate], version: int) -> Params:
        names: dict[str | None, list[str]] = {}
        for k in params:
            names.setdefault(self.part_of(k), []).append(k)
        out = dict(params)
        for part, strategy in self.strategies.items():
            own = names.get(part, [])
            mine = [ClientUpdate(u.sender, u.kind, {k: u.tensors[k] for k in own}, u.parts[part], u.base_version)
                    for u in updates if u.parts and part in u.parts]
            if mine:
                out.update(strategy.aggregate({k: params[k] for k in own}, mine, version))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {part: s.state_dict() for part, s in self.strategies.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for part, s in self.strategies.items():
            s.load_state_dict(state.get(part, {}))
