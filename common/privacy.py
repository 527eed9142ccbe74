"""User-level differential privacy on the slave: clip and noise each update, and count the ε spent.

DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language
Models") bounds each user's whole update to L2 norm C and adds Gaussian noise of
standard deviation z·C. Here the *slave* adds the noise, before its update leaves the
device ("local noise"), so neither the broker nor the master ever sees an un-noised
update: each round is a Gaussian mechanism with sensitivity C and noise multiplier z on
that slave's data. The ε after T rounds comes from Google's `dp-accounting` RDP
accountant (optional extra: ``pip install 'fedmq[privacy]'``), composing T times a
Gaussian mechanism Poisson-subsampled at rate q.

What q to use is a threat-model question (docs/OPERATIONS.md "Differential privacy"):
against the master and the broker, which see who was selected, q = 1; against whoever
sees only the published models, q = participants / enrolled if the master selects
participants at random. The noise comes from `torch.randn`, a fast generator that is
not cryptographically secure, over floating-point values: the known floating-point
attacks on textbook Gaussian noise (Mironov 2012) are not defended against.
"""

from __future__ import annotations

import functools
import math
import secrets
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .errors import ConfigError
from .privacy_settings import DPSettings
from .strategies import clip_to_norm

def privatize(update: Mapping[str, Tensor], settings: DPSettings,
              generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Clip the whole update to L2 norm C, then add N(0, (z·C)²) to every coordinate.

    `update` is what the slave's data moved: a delta or a gradient (for a student's full
    parameters, privatize w − x and send x plus the result).
    The norm is taken over all tensors together (user-level: the whole contribution of
    one slave is what is bounded). `generator` is for reproducible tests; without it a
    fresh generator is seeded from the operating system's randomness, so the noise of
    one update cannot be predicted from another's.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(secrets.randbits(63))
    clipped = clip_to_norm(dict(update), settings.clip_norm)
    std = settings.noise_std
    out: dict[str, Tensor] = {}
    for name, t in clipped.items():
        if not t.is_floating_point():
            raise ValueError(f"privatize: tensor {name!r} is {t.dtype}, not floating point")
        noise = torch.randn(t.shape, generator=generator, dtype=torch.float64) * std
        out[name] = (t.double() + noise).to(t.dtype)
    return out


def epsilon_spent(noise_multiplier: float, sample_rate: float, rounds: int,
                  delta: float) -> float:
    """ε of (ε, δ)-DP after `rounds` rounds, each a Gaussian mechanism with noise
    multiplier z Poisson-subsampled at `sample_rate` q, by dp-accounting's RDP accountant.

    z = 0 spends an infinite ε; no rounds spend none.
    """
    if not (0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if not (0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if noise_multiplier < 0 or rounds < 0:
        raise ValueError("noise_multiplier and rounds must be non-negative")
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    accounting = _dp_accounting()  # before the cache: a missing extra is always reported
    orders, per_round = _round_rdp(float(noise_multiplier), float(sample_rate))
    return float(accounting.rdp.compute_epsilon(orders, rounds * per_round, delta)[0])


def _dp_accounting() -> Any:
    try:
        import dp_accounting
        import dp_accounting.rdp
    except ImportError as exc:
        raise ConfigError("privacy: reporting ε needs the dp-accounting package: "
                          "pip install 'fedmq[privacy]'") from exc
    return dp_accounting


@functools.lru_cache(maxsize=16)
def _round_rdp(noise_multiplier: float, sample_rate: float) -> tuple[Any, Any]:
    """(orders, RDP of one round at each order) from dp-accounting's RdpAccountant.

    Composing T identical rounds multiplies the RDP by T (what the accountant's own
    compose(event, T) does); one round's RDP of a subsampled Gaussian takes about a
    second to compute, so it is computed once per (z, q), not at every round's report.
    """
    accounting = _dp_accounting()
    accountant = accounting.rdp.RdpAccountant()
    accountant.compose(accounting.PoissonSampledDpEvent(
        sample_rate, accounting.GaussianDpEvent(noise_multiplier)))
    return accountant.orders, accountant.rdp
