"""Aggregation arithmetic checked against hand-written references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmq.common.errors import ConfigError, ProtocolError, Reason
from fedmq.common.strategies import (
    ClientUpdate,
    FedOpt,
    Rule,
    ServerSGD,
    clip_to_norm,
    global_norm,
    krum_select,
    make_strategy,
    trim_count,
)


def _params(*values):
    """A two-tensor model whose every coordinate is given (for hand computations)."""
    return {"w": torch.tensor([[values[0], values[1]]]), "b": torch.tensor([values[2]])}


def _update(values, kind="delta", n=10, sender="s"):
    return ClientUpdate(sender=sender, kind=kind, tensors=_params(*values),
                        num_samples=n, base_version=0)


def _flat(params):
    return torch.cat([params["w"].flatten(), params["b"]]).numpy().astype(np.float64)


X0 = _params(1.0, -2.0, 0.5)


def test_fedavg_is_the_sample_weighted_mean_of_deltas():
    strategy = make_strategy({"name": "fedavg"})
    new = strategy.aggregate(X0, [_update([1, 2, 3], n=1), _update([5, 6, -1], n=3)], version=1)
    expected = _flat(X0) + (1 * np.array([1, 2, 3]) + 3 * np.array([5, 6, -1])) / 4
    np.testing.assert_allclose(_flat(new), expected, rtol=1e-6)
    assert torch.equal(X0["w"], torch.tensor([[1.0, -2.0]])), "input params must not change"
    assert all(v.dtype == torch.float32 for v in new.values())


def test_server_lr_scales_the_step():
    strategy = make_strategy({"name": "fedavg", "server_lr": 0.5})
    new = strategy.aggregate(X0, [_update([2, 2, 2])], version=1)
    np.testing.assert_allclose(_flat(new), _flat(X0) + 1.0)


def test_gradient_kind_applies_minus_lr_times_gradient():
    strategy = make_strategy({"name": "fedavg"}, gradient_lr=0.1)
    new = strategy.aggregate(X0, [_update([1, -2, 4], kind="gradient")], version=1)
    np.testing.assert_allclose(_flat(new), _flat(X0) - 0.1 * np.array([1, -2, 4]), rtol=1e-6)


def test_gradient_kind_without_gradient_lr_is_a_config_error():
    with pytest.raises(ConfigError, match="gradient_lr"):
        make_strategy({"name": "fedavg"}).aggregate(
            X0, [_update([1, 1, 1], kind="gradient")], version=1)


def test_student_updates_average_the_client_models():
    strategy = make_strategy({"name": "fedavg"})
    new = strategy.aggregate(X0, [_update([1, 1, 1], kind="student"),
                                  _update([3, 3, 3], kind="student")], version=1)
    np.testing.assert_allclose(_flat(new), [2, 2, 2])


def test_mixed_kinds_in_one_round():
    strategy = make_strategy({"name": "fedavg"}, gradient_lr=1.0)
    new = strategy.aggregate(X0, [_update([1, 1, 1]), _update([1, 1, 1], kind="gradient")],
                             version=1)
    np.testing.assert_allclose(_flat(new), _flat(X0))


def test_no_updates_returns_params_unchanged_and_keeps_momentum():
    strategy = make_strategy({"name": "fedavgm"})
    strategy.aggregate(X0, [_update([1, 1, 1])], version=1)
    before = strategy.state_dict()
    assert strategy.aggregate(X0, [], version=2) == X0
    assert all(torch.equal(before[k], v) for k, v in strategy.state_dict().items())


DELTAS = [np.array([0.5, -1.0, 2.0]), np.array([-0.25, 0.75, 0.125])]


def _two_steps(cfg):
    strategy = make_strategy(cfg)
    x = X0
    for d in DELTAS:
        x = strategy.aggregate(x, [_update(d)], version=1)
    return _flat(x)


def test_fedavgm_matches_hand_reference():
    lr, mu = 0.7, 0.9
    x, m = _flat(X0), np.zeros(3)
    for d in DELTAS:
        m = mu * m + d
        x = x + lr * m
    np.testing.assert_allclose(_two_steps({"name": "fedavgm", "server_lr": lr, "momentum": mu}),
                               x, rtol=1e-6)


@pytest.mark.parametrize("name", ["fedadagrad", "fedadam", "fedyogi"])
def test_adaptive_strategies_match_reddi_algorithm_2(name):
    lr, b1, b2, tau = 0.1, 0.8, 0.95, 0.01
    x, m, v = _flat(X0), np.zeros(3), np.full(3, tau ** 2)
    for d in DELTAS:
        m = b1 * m + (1 - b1) * d
        if name == "fedadagrad":
            v = v + d ** 2
        elif name == "fedadam":
            v = b2 * v + (1 - b2) * d ** 2
        else:
            v = v - (1 - b2) * d ** 2 * np.sign(v - d ** 2)
        x = x + lr * m / (np.sqrt(v) + tau)
    cfg = {"name": name, "server_lr": lr, "beta1": b1, "tau": tau}
    if name != "fedadagrad":
        cfg["beta2"] = b2
    np.testing.assert_allclose(_two_steps(cfg), x, rtol=1e-5)


def test_yogi_and_adam_differ():
    assert not np.allclose(_two_steps({"name": "fedadam"}), _two_steps({"name": "fedyogi"}))


HONEST = [[1.0, 1.1, 0.9], [0.9, 1.0, 1.1], [1.1, 0.9, 1.0], [1.0, 1.0, 1.0]]
ATTACK = [1e6, -1e6, 1e6]


@pytest.mark.parametrize("cfg", [{"rule": "median"}, {"rule": "trimmed_mean", "trim": 0.2},
                                 {"rule": "trimmed_mean", "trim": 0.1},
                                 {"rule": "krum", "krum_f": 1}])
def test_robust_rules_resist_one_outlier_client(cfg):
    zero = _params(0.0, 0.0, 0.0)
    updates = [_update(v, sender=f"h{i}") for i, v in enumerate(HONEST)]
    updates.append(_update(ATTACK, n=1000, sender="evil"))
    robust = make_strategy({"name": "fedavg", **cfg}).aggregate(zero, updates, version=1)
    assert np.all(np.abs(_flat(robust) - 1.0) <= 0.1)
    naive = make_strategy({"name": "fedavg"}).aggregate(zero, updates, version=1)
    assert np.abs(_flat(naive)).max() > 1e5


def test_krum_scores_by_the_nearest_n_minus_f_minus_2_neighbours():
    # 1-D points 0, 1, 2, 10, 11 with f = 1: two neighbours each; squared distances give
    # scores 0: 1+4=5, 1: 1+1=2, 2: 1+4=5, 10: 1+64=65, 11: 1+81=82
    deltas = [_params(v, 0.0, 0.0) for v in (10.0, 0.0, 11.0, 1.0, 2.0)]
    assert krum_select(deltas, f=1, m=3) == [1, 3, 4]
    assert krum_select(deltas, f=1, m=1) == [3]
    assert krum_select(deltas, f=1, m=4) == [0, 1, 3, 4]
    out = Rule("krum", krum_f=1, krum_m=3).combine(deltas, [1, 1, 1000, 1, 1])
    np.testing.assert_allclose(_flat(out), [1.0, 0.0, 0.0])  # unweighted mean of 0, 1, 2


def test_multi_krum_drops_colluding_sign_flipped_clients():
    honest = [_update([1 + 0.05 * i, 1 - 0.05 * i, 1.0], sender=f"h{i}") for i in range(5)]
    flipped = [_update([-10.0, -10.0, -10.0], n=10_000, sender=f"evil{i}") for i in range(2)]
    strategy = make_strategy({"rule": "krum", "krum_f": 2})
    assert strategy.min_updates == 7
    new = strategy.aggregate(_params(0, 0, 0), honest + flipped, version=1)
    # m = n − f = 5: exactly the honest ones
    np.testing.assert_allclose(_flat(new), [1.1, 0.9, 1.0], atol=1e-6)


def test_krum_with_fewer_updates_than_its_guarantee_needs_still_aggregates():
    rule = Rule("krum", krum_f=2)
    assert rule.min_updates == 7
    out = rule.combine([_params(1, 1, 1), _params(1.2, 1, 1), _params(50, 50, 50)], [1, 1, 1])
    assert np.all(_flat(out) < 2)
    assert krum_select([_params(3, 3, 3)], f=2, m=5) == [0]


def test_mean_weights_by_the_capped_weight_when_the_master_sets_one():
    zero = _params(0.0, 0.0, 0.0)
    inflated = ClientUpdate("evil", "delta", _params(9, 9, 9), num_samples=10**15,
                            base_version=0, weight=10)
    honest = _update([1, 1, 1], n=10)
    new = make_strategy({}).aggregate(zero, [honest, inflated], version=1)
    np.testing.assert_allclose(_flat(new), [5, 5, 5])
    assert inflated.aggregation_weight == 10 and honest.aggregation_weight == 10
    with pytest.raises(ValueError, match="weight"):
        ClientUpdate("s", "delta", _params(0, 0, 0), 1, 0, weight=0)


def test_median_of_even_count_averages_the_middle_pair():
    out = Rule("median").combine([_params(v, v, v) for v in (4.0, 1.0, 3.0, 10.0)], [1] * 4)
    np.testing.assert_allclose(_flat(out), [3.5] * 3)


@pytest.mark.parametrize("n, trim, k", [(8, 0.1, 1), (10, 0.1, 1), (10, 0.3, 3), (5, 0.2, 1),
                                        (3, 0.45, 1), (2, 0.4, 0), (8, 0.0, 0)])
def test_trim_count(n, trim, k):
    assert trim_count(n, trim) == k


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.floats(-1e3, 1e3), min_size=3, max_size=3), min_size=1, max_size=7),
       st.sampled_from(["mean", "median", "trimmed_mean", "krum"]))
def test_every_rule_stays_within_the_coordinatewise_range(rows, rule):
    deltas = [_params(*r) for r in rows]
    out = _flat(Rule(rule, trim=0.2, krum_f=1).combine(deltas, [i + 1 for i in range(len(rows))]))
    stacked = np.array(rows, dtype=np.float32)
    assert np.all(out >= stacked.min(0) - 1e-3) and np.all(out <= stacked.max(0) + 1e-3)


def test_clip_norm_bounds_each_client_and_keeps_direction():
    big = _params(30.0, 40.0, 0.0)
    clipped = clip_to_norm(big, 5.0)
    assert math.isclose(global_norm(clipped), 5.0, rel_tol=1e-6)
    np.testing.assert_allclose(_flat(clipped), [3.0, 4.0, 0.0], rtol=1e-6)
    small = _params(0.3, 0.4, 0.0)
    assert clip_to_norm(small, 5.0) is small

    strategy = make_strategy({"name": "fedavg", "clip_norm": 1.0})
    new = strategy.aggregate(_params(0, 0, 0), [_update([300, 400, 0]), _update([0, 0, 0.5])],
                             version=1)
    np.testing.assert_allclose(_flat(new), [0.3, 0.4, 0.25], rtol=1e-6)


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi"])
def test_state_dict_round_trip_continues_identically(name):
    first = make_strategy({"name": name})
    x = first.aggregate(X0, [_update(DELTAS[0])], version=1)
    state = first.state_dict()
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    assert all("/" in k for k in state)

    second = make_strategy({"name": name})
    second.load_state_dict(state)
    a = first.aggregate(x, [_update(DELTAS[1])], version=2)
    b = second.aggregate(x, [_update(DELTAS[1])], version=2)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_state_dict_is_a_copy_and_empty_for_fedavg():
    assert make_strategy({"name": "fedavg"}).state_dict() == {}
    strategy = make_strategy({"name": "fedavgm"})
    strategy.aggregate(X0, [_update([1, 1, 1])], version=1)
    strategy.state_dict()["m/w"].add_(100)
    assert strategy.state_dict()["m/w"].max() < 100


def test_load_state_dict_rejects_foreign_entries():
    with pytest.raises(ValueError, match="unexpected"):
        make_strategy({"name": "fedadam"}).load_state_dict({"q/w": torch.zeros(1)})


def test_client_update_validation_and_staleness():
    for kind in ("weights", "params"):  # "params" cannot travel on the wire: not a kind
        with pytest.raises(ProtocolError) as info:
            _update([1, 1, 1], kind=kind)
        assert info.value.reason == Reason.BAD_KIND
    with pytest.raises(ProtocolError) as info:
        _update([1, 1, 1], n=0)
    assert info.value.reason == Reason.BAD_BODY
    update = ClientUpdate("s", "delta", _params(0, 0, 0), num_samples=3, base_version=4)
    assert update.staleness(7) == 3


def test_make_strategy_defaults():
    strategy = make_strategy({})
    assert isinstance(strategy, FedOpt) and strategy.rule == Rule("mean")
    assert strategy.min_updates == 1 and strategy.max_update_norm is None
    assert strategy.optimizer == ServerSGD(lr=1.0, momentum=0.0)
    cfg = {"name": "fedavgm", "server_lr": 1.0, "momentum": 0.9, "rule": "mean",
           "trim": 0.1, "clip_norm": None, "beta1": None}
    assert make_strategy(cfg).optimizer == ServerSGD(lr=1.0, momentum=0.9)


@pytest.mark.parametrize("cfg, message", [
    ({"name": "fedprox"}, "strategy.name: unknown strategy 'fedprox'"),
    ({"name": "fedavg", "momentum": 0.9}, "strategy.momentum: not an option of 'fedavg'"),
    ({"name": "fedadam", "lr": 0.1}, "strategy.lr: not an option of 'fedadam'"),
    ({"name": "fedadagrad", "beta2": 0.9}, "strategy.beta2: not an option"),
    ({"server_lr": 0}, "strategy.server_lr: expected a number in (0, inf)"),
    ({"server_lr": "1"}, "strategy.server_lr: expected a number"),
    ({"name": "fedavgm", "momentum": 1.0}, "strategy.momentum: expected a number in [0, 1)"),
    ({"name": "fedyogi", "beta2": True}, "strategy.beta2: expected a number"),
    ({"name": "fedyogi", "tau": -1}, "strategy.tau: expected a number in (0, inf)"),
    ({"rule": "mode"}, "strategy.rule: 'mode' is not one of"),
    ({"rule": "trimmed_mean", "trim": 0.5}, "strategy.trim: expected a number in [0, 0.5)"),
    ({"clip_norm": 0}, "strategy.clip_norm: expected a number in (0, inf)"),
    ({"rule": "krum"}, "strategy.krum_f: required with rule = \"krum\""),
    ({"rule": "krum", "krum_f": -1}, "strategy.krum_f: expected an integer >= 0"),
    ({"rule": "krum", "krum_f": 1, "krum_m": 0}, "strategy.krum_m: expected an integer >= 1"),
    ({"rule": "median", "krum_f": 2}, "strategy.krum_f: only used with rule = \"krum\""),
    ({"max_update_norm": -1}, "strategy.max_update_norm: expected a number in (0, inf]"),
    ({"max_weight": 0.5}, "strategy.max_weight: expected an integer >= 1"),
])
def test_make_strategy_errors_name_the_key(cfg, message):
    with pytest.raises(ConfigError) as info:
        make_strategy(cfg)
    assert str(info.value).startswith(message), str(info.value)
