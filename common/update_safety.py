"""Bounds on what one signed update can do to the global model: its norm, its weight, finiteness.

A valid signature says who sent an update, not that it is sane. The master applies
these to every update before a strategy sees it, and to every aggregate before it
checkpoints or publishes it, so it can name the update it clipped, refused or capped:

* `bound_client_update` / `bound_update`: an update's L2 norm is clipped to
  `max_update_norm`, and refused outright above `REFUSE_FACTOR` times that;
* `capped_weight`: the sample count an update claims counts for no more than what
  the slave declared at enrollment, nor a job limit;
* `all_finite_params`: the tensors of a new version that hold NaN or Inf (finite
  updates can still overflow float32 when combined and applied).

The default bounds were measured on the reference workload (DESIGN.md; docs/OPERATIONS.md
"Robust aggregation"): over 30 rounds of FedAvg, 8 slaves, 2 epochs at lr 0.1, the
largest delta norm was 1.21 and the largest full-pass gradient norm 2.46. The defaults
leave a margin of 8x and 10x, so that workload never trips them, while an update
scaled by 10^6 is refused. Another model's honest norms can differ a lot: measure them
(`strategies.global_norm`) and set `[strategy] max_update_norm`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace

from torch import Tensor

from .errors import ProtocolError, Reason
from .strategies import ClientUpdate, Params, clip_to_norm, global_norm
from .tensors import all_finite

#: default `max_update_norm` per update kind; a student's bound applies to w − x
DEFAULT_MAX_UPDATE_NORM: dict[str, float] = {"delta": 10.0, "student": 10.0, "gradient": 25.0}
#: an update whose norm exceeds REFUSE_FACTOR × max_update_norm is refused, not clipped
REFUSE_FACTOR = 100.0


def bound_update(delta: Params, max_norm: float) -> tuple[Params, bool, float]:
    """(delta clipped to `max_norm`, whether it was clipped, its norm before clipping).

    Clipping, not refusal, up to REFUSE_FACTOR × max_norm: an honest slave with a larger
    learning rate or more local epochs than the bound was measured with still counts,
    with a bounded step. Beyond that, or with a non-finite norm, the update cannot be
    an honest step of the same job (a broken device or an attack) and clipping would
    still let it pull a full bound in its direction: ProtocolError(TOO_LARGE).
    """
    norm = global_norm(delta)
    if not math.isfinite(norm) or norm > REFUSE_FACTOR * max_norm:
        raise ProtocolError(Reason.TOO_LARGE, f"update norm {norm:.4g} exceeds "
                            f"{REFUSE_FACTOR:g} x max_update_norm {max_norm:g}")
    if norm <= max_norm:
        return delta, False, norm
    return clip_to_norm(delta, max_norm), True, norm


def bound_client_update(update: ClientUpdate, params: Params,
                        max_norm: float | None = None) -> tuple[ClientUpdate, bool, float]:
    """`bound_update` applied to a ClientUpdate of any kind, kind kept.

    A delta or gradient is bounded as sent; a student's parameters w are bounded as the
    step w − `params` they suggest (pass the parameters the update was based on). With
    `max_norm` None the kind's DEFAULT_MAX_UPDATE_NORM applies; `math.inf` disables
    the bound (non-finite norms are still refused).
    """
    bound = DEFAULT_MAX_UPDATE_NORM[update.kind] if max_norm is None else max_norm
    # (an update of some model parts holds only their tensors: iterate over its own)
    step = {k: update.tensors[k] - params[k] for k in update.tensors} if update.kind == "student" \
        else dict(update.tensors)
    bounded, clipped, norm = bound_update(step, bound)
    if not clipped:
        return update, False, norm
    if update.kind == "student":
        bounded = {k: params[k] + bounded[k] for k in bounded}
    return replace(update, tensors=bounded), True, norm


def capped_weight(claimed: int, declared: int | None, job_limit: int | None = None) -> int:
    """The weight an update's sample count may carry: `claimed`, but at most what the
    slave `declared` at enrollment (its confirm's `samples`) and at most `job_limit`
    (`[strategy] max_weight`); None means no such cap. Always at least 1."""
    caps = [c for c in (declared, job_limit) if c is not None]
    return max(1, min([claimed, *caps]))


def all_finite_params(params: Mapping[str, Tensor]) -> list[str]:
    """Names of the floating-point tensors in `params` that hold NaN or Inf (sorted);
    empty if the version is safe to checkpoint and publish."""
    return sorted(name for name, t in params.items()
                  if t.is_floating_point() and not all_finite(t))
