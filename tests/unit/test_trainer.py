"""Local training: deltas, gradients, FedProx and distillation on small synthetic data."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from fedmq.common.modelspec import build_model, float_state, validate_state_dict
from fedmq.common.strategies import global_norm
from fedmq.slave.trainer import distill_local, train_local

MLP = {"arch": "mlp", "sizes": [8, 16, 3], "seed": 0}


@pytest.fixture(scope="module")
def data() -> TensorDataset:
    """Three linearly separable classes: learnable in a few epochs."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(96) % 3
    x = torch.randn(96, 8, generator=g) * 0.3
    x[torch.arange(96), y] += 2.0
    return TensorDataset(x, y)


def _snapshot(model):
    return {k: v.clone() for k, v in float_state(model).items()}


def _mean_loss(model, dataset, params=None):
    x, y = dataset[:]
    if params is not None:
        model = build_model(MLP)
        model.load_state_dict(params, strict=False)
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


def test_delta_is_nonzero_lowers_the_loss_and_leaves_the_model_alone(data):
    model = build_model(MLP)
    before = _snapshot(model)
    result = train_local(model, data, kind="delta", epochs=3, batch_size=16, lr=0.1, seed=1)
    assert result.kind == "delta" and result.num_samples == 96
    validate_state_dict(model, result.tensors)
    assert global_norm(result.tensors) > 0
    assert all(torch.equal(v, before[k]) for k, v in float_state(model).items())
    trained = {k: before[k] + result.tensors[k] for k in before}
    assert _mean_loss(None, data, trained) < 0.5 * _mean_loss(model, data)
    assert set(result.metrics) == {"train_loss", "samples", "seconds"}
    assert result.metrics["train_loss"] < _mean_loss(model, data)


def test_seeded_training_is_reproducible_and_keeps_the_global_rng(data):
    model = build_model({**MLP, "arch": "mlp", "dropout": 0.5})
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = train_local(model, data, kind="delta", epochs=1, seed=7)
    assert torch.equal(torch.rand(3), expected_next)
    b = train_local(model, data, kind="delta", epochs=1, seed=7)
    c = train_local(model, data, kind="delta", epochs=1, seed=8)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert not torch.equal(a.tensors["0.weight"], c.tensors["0.weight"])


def _autograd_mean_gradient(model, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return {k: p.grad.clone() for k, p in model.named_parameters()}


def test_gradient_over_one_pass_equals_full_batch_autograd(data):
    model = build_model(MLP)
    before = _snapshot(model)
    result = train_local(model, data, kind="gradient", batch_size=20, seed=3)
    assert result.kind == "gradient" and result.num_samples == 96
    expected = _autograd_mean_gradient(build_model(MLP), *data[:])
    for name, grad in expected.items():
        torch.testing.assert_close(result.tensors[name], grad, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(v, before[k]) for k, v in float_state(model).items())


def test_gradient_over_some_batches_uses_the_seeded_shuffle(data):
    seed, batch_size = 5, 16
    result = train_local(build_model(MLP), data, kind="gradient", batch_size=batch_size,
                         grad_batches=2, seed=seed)
    assert result.num_samples == 32 and result.metrics["samples"] == 32
    loader = DataLoader(data, batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    batches = [b for _, b in zip(range(2), loader)]
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    expected = _autograd_mean_gradient(build_model(MLP), x, y)
    for name, grad in expected.items():
        torch.testing.assert_close(result.tensors[name], grad, rtol=1e-5, atol=1e-6)


def test_batchnorm_running_stats_move_in_deltas_and_are_zero_in_gradients(data):
    spec = {"seed": 0, "layers": [{"type": "Linear", "in_features": 8, "out_features": 4},
                                  {"type": "BatchNorm1d", "num_features": 4},
                                  {"type": "ReLU"},
                                  {"type": "Linear", "in_features": 4, "out_features": 3}]}
    model = build_model(spec)
    delta = train_local(model, data, kind="delta", epochs=1, seed=0)
    gradient = train_local(model, data, kind="gradient", seed=0)
    for result in (delta, gradient):
        validate_state_dict(model, result.tensors)
        assert "1.num_batches_tracked" not in result.tensors
    assert delta.tensors["1.running_mean"].abs().sum() > 0
    assert gradient.tensors["1.running_mean"].abs().sum() == 0


def test_prox_term_pulls_toward_the_global_model(data):
    model = build_model(MLP)
    free = train_local(model, data, kind="delta", epochs=3, lr=0.2, seed=2)
    prox = train_local(model, data, kind="delta", epochs=3, lr=0.2, seed=2, prox_mu=5.0)
    assert global_norm(prox.tensors) < 0.6 * global_norm(free.tensors)


@pytest.mark.parametrize("kwargs", [{"kind": "weights"}, {"epochs": 0}, {"batch_size": 0},
                                    {"kind": "gradient", "grad_batches": 0}])
def test_bad_arguments(data, kwargs):
    with pytest.raises(ValueError):
        train_local(build_model(MLP), data, **kwargs)


def test_distillation_trains_a_smaller_student_towards_the_teacher(data):
    teacher = build_model(MLP)
    taught = train_local(teacher, data, kind="delta", epochs=5, lr=0.2, seed=0)
    teacher.load_state_dict({k: v + taught.tensors[k] for k, v in _snapshot(teacher).items()},
                            strict=False)
    teacher.train()
    student = build_model({"arch": "mlp", "sizes": [8, 4, 3], "seed": 1})
    before = _snapshot(student)

    result = distill_local(teacher, student, data, epochs=5, batch_size=16, lr=0.2,
                           temperature=2.0, alpha=0.9, seed=0)
    assert result.kind == "student" and result.num_samples == 96
    validate_state_dict(student, result.tensors)
    assert all(torch.equal(v, before[k]) for k, v in float_state(student).items())
    assert teacher.training, "the teacher's mode is restored"

    x, _ = data[:]
    distilled = build_model({"arch": "mlp", "sizes": [8, 4, 3]})
    distilled.load_state_dict(result.tensors, strict=False)
    with torch.no_grad():
        agree = (distilled(x).argmax(1) == teacher(x).argmax(1)).float().mean()
        agree_before = (student(x).argmax(1) == teacher(x).argmax(1)).float().mean()
    assert agree > 0.9 > agree_before


# ------------------------------------------------------------------ constrained delta training

PARAMS = ("0.weight", "0.bias", "2.weight", "2.bias")


def _changed(result) -> dict[str, int]:
    return {k: int((result.tensors[k] != 0).sum()) for k in PARAMS}


def test_l1_toward_the_received_weights_makes_exact_zeros_and_more_with_a_larger_mu(data):
    model = build_model(MLP)
    free = train_local(model, data, epochs=3, lr=0.2, seed=2)
    mild = train_local(model, data, epochs=3, lr=0.2, seed=2, l1_mu=0.01)
    strong = train_local(model, data, epochs=3, lr=0.2, seed=2, l1_mu=0.05)
    total = sum(free.tensors[k].numel() for k in PARAMS)
    assert sum(_changed(free).values()) > 0.9 * total  # (dead ReLUs aside, everything moves)
    assert sum(_changed(strong).values()) < sum(_changed(mild).values()) < total
    assert sum(_changed(strong).values()) < 0.5 * total
    # still learns: the constrained delta lowers the loss
    before = _snapshot(model)
    trained = {k: before[k] + strong.tensors[k] for k in before}
    assert _mean_loss(None, data, trained) < 0.8 * _mean_loss(model, data)


@pytest.mark.parametrize("budget", [0.05, 0.2])
def test_change_budget_caps_the_changed_entries_of_every_parameter_tensor(data, budget):
    model = build_model(MLP)
    result = train_local(model, data, epochs=3, lr=0.2, seed=4, change_budget=budget)
    for k, changed in _changed(result).items():
        assert 0 < changed <= math.ceil(budget * result.tensors[k].numel()), k
    before = _snapshot(model)
    trained = {k: before[k] + result.tensors[k] for k in before}
    assert _mean_loss(None, data, trained) < 0.8 * _mean_loss(model, data)


def test_change_threshold_drops_small_changes_only(data):
    model = build_model(MLP)
    free = train_local(model, data, epochs=2, seed=5)
    cut = train_local(model, data, epochs=2, seed=5, change_threshold=0.01)
    for k in PARAMS:
        d, f = cut.tensors[k], free.tensors[k]
        assert torch.equal(d, torch.where(f.abs() < 0.01, torch.zeros_like(f), f)), k
    assert sum(_changed(cut).values()) < sum(_changed(free).values())


def test_constraints_leave_buffers_and_gradients_alone(data):
    spec = {"seed": 0, "layers": [{"type": "Linear", "in_features": 8, "out_features": 4},
                                  {"type": "BatchNorm1d", "num_features": 4},
                                  {"type": "ReLU"},
                                  {"type": "Linear", "in_features": 4, "out_features": 3}]}
    model = build_model(spec)
    free = train_local(model, data, epochs=1, seed=0)
    tight = train_local(model, data, epochs=1, seed=0, change_budget=0.01, change_threshold=10.0)
    # parameters: every change is below 10, so all are dropped; buffers are not parameters
    assert all(not tight.tensors[k].any() for k in ("0.weight", "0.bias", "3.weight", "3.bias"))
    assert tight.tensors["1.running_mean"].abs().sum() > 0  # buffers are sent as computed
    plain = train_local(model, data, kind="gradient", seed=3)
    constrained = train_local(model, data, kind="gradient", seed=3, l1_mu=1.0, change_budget=0.1)
    assert all(torch.equal(plain.tensors[k], constrained.tensors[k]) for k in plain.tensors)
    assert free.tensors["1.running_mean"].abs().sum() > 0


@pytest.mark.parametrize("kwargs", [{"l1_mu": -1.0}, {"change_budget": 1.5}, {"change_budget": -0.1},
                                    {"change_threshold": -1.0}])
def test_bad_constraints(data, kwargs):
    with pytest.raises(ValueError):
        train_local(build_model(MLP), data, **kwargs)
