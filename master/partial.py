"""Partial sums of weighted update steps: what an aggregator worker adds up and the root combines.

A synchronous strategy with the weighted-mean rule (FedOpt with `Rule("mean")`:
FedAvg, FedAvgM, FedAdagrad, FedAdam, FedYogi) aggregates a sum: each update i
becomes its pseudo-delta Δᵢ (clipped to `clip_norm` if the strategy says so), the
round's step is Σ wᵢΔᵢ / Σ wᵢ, and the server optimizer applies it. A
`PartialSum` holds Σ wᵢΔᵢ, Σ wᵢ and which updates are in it. Sums over disjoint
sets of updates add up to the sum over their union, so the root's new version
equals a single master's up to float rounding (the additions happen in another
order). Also here: the checked wire form of the entries of `tally`, `partial` and
`collect` bodies (docs/PROTOCOL.md section 11.10).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from fedmq.common.errors import ProtocolError, Reason
from fedmq.common.messages import UPDATE_KINDS
from fedmq.common.strategies import ClientUpdate, FedOpt, Params, clip_to_norm, pseudo_delta
from fedmq.common.tensors import encode_state_dict


def weighted_step(update: ClientUpdate, params: Params, strategy: FedOpt) -> Params:
    """Δᵢ as the strategy's `aggregate` makes it: pseudo-delta, then clipped."""
    delta = pseudo_delta(update, params, strategy.gradient_lr)
    return clip_to_norm(delta, strategy.clip_norm) if strategy.clip_norm is not None else delta


@dataclass
class PartialSum:
    """Σ wᵢΔᵢ over some updates, Σ wᵢ, and the updates' ids with their weights."""

    tensors: Params
    weight: float = 0.0
    weights: dict[str, float] = field(default_factory=dict)  # update id -> its weight

    @classmethod
    def zeros_like(cls, params: Params) -> PartialSum:
        return cls({k: torch.zeros_like(v) for k, v in params.items()})

    def add(self, uid: str, step: Params, weight: float) -> None:
        """Add one update's step with `weight` (in place)."""
        for name, acc in self.tensors.items():
            acc.add_(step[name], alpha=weight)
        self.weight += weight
        self.weights[uid] = weight

    def merge(self, other: PartialSum) -> None:
        """Add another partial sum over other updates (in place)."""
        overlap = self.weights.keys() & other.weights.keys()
        if overlap:
            raise ValueError(f"partial sums overlap: {sorted(overlap)[:5]}")
        for name, acc in self.tensors.items():
            acc.add_(other.tensors[name])
        self.weight += other.weight
        self.weights.update(other.weights)


def combine(params: Params, total: PartialSum, strategy: FedOpt) -> Params:
    """The new global parameters from the sum of a round's partial sums: the weighted
    mean step, applied by the server optimizer. No updates: the parameters unchanged
    (as `FedOpt.aggregate`: an empty round is not a zero step)."""
    if total.weight <= 0:
        return dict(params)
    return strategy.optimizer.step(params, {k: v / total.weight for k, v in total.tensors.items()})


# ---------------------------------------------------------------- wire form of the entries


@dataclass(frozen=True)
class Tallied:
    """One update a worker holds, as its `tally` reports it to the root."""

    update_id: str
    sender: str
    kind: str
    samples: int
    bytes: int

    def to_wire(self) -> dict[str, Any]:
        return {"update_id": self.update_id, "sender": self.sender, "kind": self.kind, "samples": self.samples,
                "bytes": self.bytes}


def parse_tally(entries: Any) -> list[Tallied]:
    """The `updates` of a `tally` body, checked (ProtocolError BAD_BODY otherwise)."""
    out = []
    for e in _entries(entries, "tally"):
        uid, sender, kind, samples, nbytes = (e.get(k) for k in ("update_id", "sender", "kind", "samples", "bytes"))
        if not (isinstance(uid, str) and isinstance(sender, str) and kind in UPDATE_KINDS and _count(samples, 1)
                and _count(nbytes, 0)):
            raise ProtocolError(Reason.BAD_BODY, f"tally entry {e!r:.120}")
        out.append(Tallied(uid, sender, kind, samples, nbytes))
    return out


def weights_to_wire(weights: Mapping[str, float]) -> list[dict[str, Any]]:
    """Update ids and weights, sorted by id: the `updates` of a `partial`, a worker's part of a `collect`."""
    return [{"update_id": uid, "weight": float(w)} for uid, w in sorted(weights.items())]


def parse_weights(entries: Any, what: str) -> dict[str, float]:
    """The reverse of `weights_to_wire`, checked: distinct ids, positive finite weights."""
    out: dict[str, float] = {}
    for e in _entries(entries, what):
        uid, w = e.get("update_id"), e.get("weight")
        if not isinstance(uid, str) or uid in out or isinstance(w, bool) or not isinstance(w, (int, float)) \
                or not 0 < w < math.inf:
            raise ProtocolError(Reason.BAD_BODY, f"{what} entry {e!r:.120}")
        out[uid] = float(w)
    return out


def partial_body(run: str, collect: int, total: PartialSum) -> dict[str, Any]:
    """The body of a `partial` message."""
    return {"run": run, "collect": collect, "updates": weights_to_wire(total.weights), "weight": total.weight,
            "tensors": encode_state_dict(total.tensors)}


def same_weights(a: Mapping[str, float], b: Mapping[str, float]) -> bool:
    """Whether two id -> weight maps name the same updates with the same weights (to float rounding)."""
    return a.keys() == b.keys() and all(math.isclose(a[k], b[k], rel_tol=1e-9) for k in a)


def _entries(entries: Any, what: str) -> Iterable[Mapping[str, Any]]:
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ProtocolError(Reason.BAD_BODY, f"{what}: a list of maps expected")
    return entries


def _count(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low
