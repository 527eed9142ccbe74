"""Asynchronous strategies: robust rules over FedBuff's buffer, and their option checks."""

from __future__ import annotations

import pytest
import torch

from fedmq.common.async_strategies import FedAsync, FedBuff, GradPush, make_async_strategy
from fedmq.common.errors import ConfigError
from fedmq.common.strategies import ClientUpdate, Rule


def _update(value: float, sender: str = "s", base: int = 3, kind: str = "delta") -> ClientUpdate:
    return ClientUpdate(sender, kind, {"w": torch.full((3,), value)}, 10, base)


@pytest.mark.parametrize("cfg", [
    {"rule": "median"}, {"rule": "trimmed_mean", "trim": 0.2}, {"rule": "krum", "krum_f": 1},
])
def test_fedbuff_applies_the_jobs_rule_over_its_buffer(cfg):
    fb = make_async_strategy({"name": "fedbuff", "buffer_size": 5, **cfg})
    params = {"w": torch.zeros(3)}
    values = [1.0, 1.1, 0.9, 1.05, -1e6]  # one wild update among five
    results = [fb.add(params, _update(v, f"s{i}"), version=3, base=None) for i, v in enumerate(values)]
    assert results[:4] == [None] * 4
    assert torch.all((results[4]["w"] - 1.0).abs() <= 0.1), results[4]


def test_fedbuff_mean_is_still_the_default():
    fb = make_async_strategy({"name": "fedbuff", "buffer_size": 2})
    assert isinstance(fb, FedBuff) and fb.rule == Rule("mean")
    fb.add({"w": torch.zeros(3)}, _update(1.0), version=3, base=None)
    new = fb.add({"w": torch.zeros(3)}, _update(3.0), version=3, base=None)
    assert torch.allclose(new["w"], torch.full((3,), 2.0))


def test_make_async_strategy_reads_every_option():
    fa = make_async_strategy({"name": "fedasync", "alpha": 1, "staleness": "hinge", "a": 2,
                              "b": 1, "clip_norm": 3, "max_staleness": 5, "max_update_norm": 7,
                              "max_weight": 100}, gradient_lr=0.1)
    assert isinstance(fa, FedAsync) and fa.alpha == 1.0 and fa.staleness.function == "hinge"
    assert (fa.clip_norm, fa.max_staleness, fa.max_update_norm, fa.max_weight) == (3.0, 5, 7.0, 100)
    gp = make_async_strategy({"name": "gradpush", "rule": "mean"})
    assert isinstance(gp, GradPush) and gp.lr == 0.1 and gp.max_update_norm is None


@pytest.mark.parametrize("cfg, message", [
    ({"name": "fedsgd"}, "strategy.name: unknown strategy 'fedsgd'"),
    ({"name": "fedasync", "rule": "krum", "krum_f": 1}, "strategy.rule: 'krum' is not one of mean (this strategy applies each update alone"),
    ({"name": "gradpush", "rule": "median"}, "strategy.rule: 'median' is not one of mean"),
    ({"name": "fedasync", "krum_f": 1}, "strategy.krum_f: not an option of 'fedasync'"),
    ({"name": "fedbuff", "rule": "krum", "krum_f": 1}, "strategy.buffer_size: krum with krum_f = 1 needs a buffer of at least 5"),
    ({"name": "fedbuff", "buffer_size": 5, "rule": "krum", "krum_f": 1, "krum_m": 6}, "strategy.krum_m: cannot select 6"),
    ({"name": "fedbuff", "rule": "mean", "krum_m": 2}, "strategy.krum_m: only used with rule = \"krum\""),
    ({"name": "fedbuff", "buffer_size": 0}, "strategy.buffer_size: expected an integer >= 1"),
    ({"name": "fedbuff", "max_staleness": 1.5}, "strategy.max_staleness: expected an integer >= 0"),
    ({"name": "fedasync", "alpha": 0}, "strategy.alpha: expected a number in (0, 1]"),
    ({"name": "gradpush", "lr": True}, "strategy.lr: expected a number in (0, inf)"),
    ({"name": "gradpush", "a": -1}, "strategy.a: expected a number in [0, inf)"),
])
def test_config_errors_name_the_key(cfg, message):
    with pytest.raises(ConfigError) as info:
        make_async_strategy(cfg)
    assert str(info.value).startswith(message), str(info.value)
