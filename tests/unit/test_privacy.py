"""Differential privacy on the slave: settings, clip-and-noise, and the ε accountant."""

from __future__ import annotations

import math

import pytest
import torch

from fedmq.common.errors import ConfigError, ProtocolError, Reason
from fedmq.common.modelspec import build_model, float_state, load_float_state
from fedmq.common.privacy import epsilon_spent, privatize
from fedmq.common.privacy_settings import DPSettings
from fedmq.common.strategies import ClientUpdate, global_norm, make_strategy
from fedmq.common.workload import evaluate, reference_split
from fedmq.slave.trainer import train_local


def test_settings_from_a_privacy_table_and_over_the_wire():
    settings = DPSettings.from_table({"clip_norm": 1, "noise_multiplier": 0.5})
    assert settings == DPSettings(clip_norm=1.0, noise_multiplier=0.5, delta=1e-5)
    assert settings.noise_std == 0.5
    wire = settings.to_wire()
    assert wire == {"clip_norm": 1.0, "noise_multiplier": 0.5, "delta": 1e-5}
    assert DPSettings.from_wire(wire) == settings


@pytest.mark.parametrize("table, message", [
    ({"noise_multiplier": 1.0}, "privacy.clip_norm: required"),
    ({"clip_norm": 1.0}, "privacy.noise_multiplier: required"),
    ({"clip_norm": 0, "noise_multiplier": 1.0}, "privacy.clip_norm: expected a number in (0, inf)"),
    ({"clip_norm": 1, "noise_multiplier": -1}, "privacy.noise_multiplier: expected a number in [0, inf)"),
    ({"clip_norm": 1, "noise_multiplier": 1, "delta": 1}, "privacy.delta: expected a number in (0, 1)"),
    ({"clip_norm": 1, "noise_multiplier": 1, "epsilon": 3}, "privacy.epsilon: not an option"),
])
def test_settings_errors_name_the_key(table, message):
    with pytest.raises(ConfigError) as info:
        DPSettings.from_table(table)
    assert str(info.value).startswith(message), str(info.value)


def test_malformed_wire_settings_are_a_protocol_error():
    for body in (["clip_norm", 1], {"clip_norm": "1", "noise_multiplier": 1}):
        with pytest.raises(ProtocolError) as info:
            DPSettings.from_wire(body)
        assert info.value.reason == Reason.BAD_BODY


def test_privatize_clips_the_whole_update_then_adds_gaussian_noise():
    update = {"w": torch.full((200, 100), 0.5), "b": torch.full((1000,), -0.5)}  # norm ~72
    no_noise = privatize(update, DPSettings(clip_norm=2.0, noise_multiplier=0.0))
    assert global_norm(no_noise) == pytest.approx(2.0, rel=1e-5)
    assert torch.allclose(no_noise["w"] / no_noise["w"][0, 0], torch.ones(200, 100))  # direction kept
    settings = DPSettings(clip_norm=2.0, noise_multiplier=0.5)
    noisy = privatize(update, settings, torch.Generator().manual_seed(1))
    noise = torch.cat([(noisy[k] - no_noise[k]).flatten() for k in update])
    assert noise.std().item() == pytest.approx(1.0, rel=0.02)  # z·C = 1 on 21,000 coordinates
    assert abs(noise.mean().item()) < 0.03
    assert all(noisy[k].dtype == update[k].dtype and noisy[k].shape == update[k].shape for k in update)
    again = privatize(update, settings, torch.Generator().manual_seed(1))
    assert all(torch.equal(noisy[k], again[k]) for k in update)
    fresh = [privatize(update, settings) for _ in range(2)]  # no generator: OS-seeded, differs
    assert not torch.equal(fresh[0]["w"], fresh[1]["w"])


@pytest.mark.parametrize("z, q, rounds", [(1.0, 1.0, 1), (1.0, 0.25, 30), (5.0, 1.0, 30)])
def test_epsilon_matches_the_accountant_library(z, q, rounds):
    dp_accounting = pytest.importorskip("dp_accounting")
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    assert epsilon_spent(z, q, rounds, 1e-5) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    one_at_a_time = rdp.RdpAccountant()  # as a running job spends it, round after round
    for _ in range(3):
        one_at_a_time.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)))
    assert epsilon_spent(z, q, 3, 1e-5) == pytest.approx(one_at_a_time.get_epsilon(1e-5), rel=1e-9)


def test_epsilon_grows_with_rounds_and_shrinks_with_noise_and_sampling():
    pytest.importorskip("dp_accounting")
    per_round = [epsilon_spent(1.0, 1.0, t, 1e-5) for t in (1, 10, 30)]
    assert per_round == sorted(per_round) and per_round[0] > 0
    assert epsilon_spent(2.0, 1.0, 30, 1e-5) < per_round[2]
    assert epsilon_spent(1.0, 0.1, 30, 1e-5) < per_round[2]
    assert epsilon_spent(1.0, 1.0, 0, 1e-5) == 0.0
    assert epsilon_spent(0.0, 1.0, 3, 1e-5) == math.inf


def test_epsilon_without_the_extra_is_a_config_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_dp_accounting(name, *args, **kwargs):
        if name.startswith("dp_accounting"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_dp_accounting)
    with pytest.raises(ConfigError, match=r"pip install 'fedmq\[privacy\]'"):
        epsilon_spent(1.0, 1.0, 3, 1e-5)


def test_reference_workload_learns_with_noise_and_reports_epsilon_per_round():
    """DP-FedAvg with local noise on the reference workload (DESIGN.md; 8 slaves, all
    in every round: q = 1). C = 0.3 clips most updates (honest norms 0.2-1.2), z = 0.3
    adds N(0, 0.09²) per coordinate on each slave. Measured: 0.89 at round 30, with
    ε = 20.4 after one round and 253 after 30 (δ = 1e-5): it learns, but at a privacy
    cost no one would call private: eight slaves are far too few for DP-FedAvg
    (docs/BENCHMARKS.md, "Differential privacy")."""
    pytest.importorskip("dp_accounting")
    settings = DPSettings(clip_norm=0.3, noise_multiplier=0.3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small MLP: more threads only add overhead
    try:
        split = reference_split(num_slaves=8, alpha=0.5, seed=0)
        shards, test = [split.slave_dataset(i) for i in range(8)], split.test_dataset()
        model = build_model({"arch": "mlp", "sizes": [64, 128, 10], "seed": 0})
        strategy = make_strategy({"name": "fedavg"})
        accuracy, epsilon = [], []
        for version in range(30):
            updates = []
            for i, shard in enumerate(shards):
                result = train_local(model, shard, kind="delta", epochs=2, batch_size=32, lr=0.1,
                                     seed=1000 * version + i)
                noised = privatize(result.tensors, settings,
                                   torch.Generator().manual_seed(1000 * version + i))
                updates.append(ClientUpdate(f"slave-{i}", "delta", noised, result.num_samples, version))
            load_float_state(model, strategy.aggregate(float_state(model), updates, version + 1))
            accuracy.append(evaluate(model, test)["accuracy"])
            epsilon.append(epsilon_spent(settings.noise_multiplier, 1.0, version + 1, settings.delta))
    finally:
        torch.set_num_threads(threads)
    assert sum(accuracy[-5:]) / 5 >= 0.8, accuracy  # measured 0.87
    assert epsilon[0] == pytest.approx(20.39, rel=1e-3) and epsilon[-1] == pytest.approx(252.7, rel=1e-3)
    assert epsilon == sorted(epsilon)
