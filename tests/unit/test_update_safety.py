"""What one signed update can do to the model: norm bounds, capped weights, finiteness."""

from __future__ import annotations

import math

import pytest
import torch

from fedmq.common.errors import ProtocolError, Reason
from fedmq.common.strategies import ClientUpdate, global_norm, make_strategy
from fedmq.common.update_safety import (
    DEFAULT_MAX_UPDATE_NORM,
    REFUSE_FACTOR,
    all_finite_params,
    bound_client_update,
    bound_update,
    capped_weight,
)


def _vec(*values: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([values[0], values[1]]), "b": torch.tensor([values[2]])}


def test_bound_update_passes_clips_or_refuses_by_norm():
    small = _vec(3.0, 4.0, 0.0)
    assert bound_update(small, 5.0) == (small, False, pytest.approx(5.0))
    clipped, was_clipped, norm = bound_update(_vec(30.0, 40.0, 0.0), 5.0)
    assert was_clipped and norm == pytest.approx(50.0)
    assert global_norm(clipped) == pytest.approx(5.0) and torch.allclose(clipped["w"], torch.tensor([3.0, 4.0]))
    for bad in (_vec(3e6, 4e6, 0.0), _vec(math.nan, 0.0, 0.0), _vec(math.inf, 0.0, 0.0)):
        with pytest.raises(ProtocolError) as info:
            bound_update(bad, 5.0)
        assert info.value.reason == Reason.TOO_LARGE
    assert bound_update(_vec(3e30, 0, 0), math.inf)[1] is False  # inf disables the bound


def test_bound_client_update_bounds_a_student_as_the_step_it_suggests():
    params = _vec(100.0, 0.0, 0.0)
    student = ClientUpdate("s", "student", _vec(100.0, 30.0, 40.0), 5, 0, weight=2)
    bounded, clipped, norm = bound_client_update(student, params, max_norm=5.0)
    assert clipped and norm == pytest.approx(50.0) and bounded.kind == "student" and bounded.weight == 2
    assert torch.allclose(bounded.tensors["w"], torch.tensor([100.0, 3.0]))
    assert torch.allclose(bounded.tensors["b"], torch.tensor([4.0]))
    # defaults per kind: a gradient of norm 20 passes, a delta of norm 20 is clipped to 10
    g = ClientUpdate("s", "gradient", _vec(12.0, 16.0, 0.0), 5, 0)
    assert bound_client_update(g, params)[0] is g
    d = ClientUpdate("s", "delta", _vec(12.0, 16.0, 0.0), 5, 0)
    assert global_norm(bound_client_update(d, params)[0].tensors) == pytest.approx(DEFAULT_MAX_UPDATE_NORM["delta"])
    assert REFUSE_FACTOR * DEFAULT_MAX_UPDATE_NORM["delta"] < 1e6


def test_finite_updates_can_overflow_the_model_and_the_helper_names_the_tensors():
    """Two validly signed constant deltas of 3e38 each (float32 max is 3.4e38): one FedAvg
    round makes every weight about 3e38 (still finite); the next overflows to inf."""
    strategy = make_strategy({"name": "fedavg"})
    huge = [ClientUpdate(f"s{i}", "delta", _vec(3e38, 3e38, 3e38), 10, 0) for i in range(2)]
    params = _vec(0.1, -0.2, 0.3)
    first = strategy.aggregate(params, huge, version=1)
    assert all_finite_params(first) == []
    second = strategy.aggregate(first, huge, version=2)
    assert all_finite_params(second) == ["b", "w"]
    assert all_finite_params({**params, "steps": torch.tensor([2**40])}) == []
    with pytest.raises(ProtocolError):  # the norm bound refuses such an update in the first place
        bound_client_update(huge[0], params)


def test_capped_weight_takes_the_smallest_cap():
    assert capped_weight(10**15, declared=200) == 200
    assert capped_weight(150, declared=200, job_limit=100) == 100
    assert capped_weight(150, declared=None, job_limit=None) == 150
    assert capped_weight(50, declared=200, job_limit=1000) == 50


def test_an_inflated_sample_count_cannot_zero_the_model_once_capped():
    """delta = −params with a claimed 10^15 samples: uncapped, FedAvg lands on (almost)
    zero; with the weight capped by the declared 200 samples it moves the model by 200/1000."""
    torch.manual_seed(0)
    params = {"w": torch.randn(10, 10), "b": torch.randn(10)}
    honest = [ClientUpdate(f"h{i}", "delta", {k: 0.01 * torch.randn_like(v) for k, v in params.items()},
                           200, 0) for i in range(4)]
    attack = {k: -v for k, v in params.items()}
    strategy = make_strategy({"name": "fedavg"})
    uncapped = strategy.aggregate(params, honest + [ClientUpdate("evil", "delta", attack, 10**15, 0)], 1)
    assert global_norm(uncapped) < 1e-6 * global_norm(params)
    capped = ClientUpdate("evil", "delta", attack, 10**15, 0, weight=capped_weight(10**15, declared=200))
    kept = strategy.aggregate(params, honest + [capped], 1)
    assert global_norm(kept) == pytest.approx(0.8 * global_norm(params), rel=0.02)
