"""What a job file means to the master: the instruction slaves receive and the aggregation rule.

Also the CBOR form of a strategy's state (nested maps of tensors and numbers), which
goes into the master's checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Mapping

import torch

from fedmq.common.async_strategies import ASYNC_OPTIONS, make_async_strategy
from fedmq.common.errors import ConfigError
from fedmq.common.jobconfig import JobConfig
from fedmq.common.layout import Layout
from fedmq.common.strategies import PartStrategies, Strategy, make_strategy
from fedmq.common.tensors import decode_state_dict, encode_state_dict


def instruction_body(cfg: JobConfig, run: str) -> dict[str, Any]:
    """The training instruction: everything a slave needs to build and train the model.

    `run` tells this run of the job from an earlier one with the same id (a job started
    over): a new run is a new instruction, which every slave confirms afresh.
    """
    return {
        "run": run, "task": cfg.task, "model": dict(cfg.model), "train": asdict(cfg.train), "update": cfg.update,
        "requirements": {"min_samples": cfg.min_samples},
        "round_policy": {"deadline": cfg.policy.deadline, "participants": cfg.policy.participants,
                         "asynchronous": is_asynchronous(cfg.strategy),
                         # sharded: aggregator workers share the updates, each must be one MQTT message
                         **({"whole_updates": True} if cfg.shard is not None else {})},
        "compression": cfg.compression.to_wire(),
        **({"privacy": cfg.privacy.to_wire()} if cfg.privacy is not None else {}),
        **Layout.of_job(cfg).instruction_fields(),  # students ("distill") or task heads ("multitask")
    }


def is_asynchronous(strategy_cfg: Mapping[str, Any]) -> bool:
    return strategy_cfg.get("name") in ASYNC_OPTIONS


def make_job_strategy(cfg: JobConfig) -> Strategy:
    """The job's aggregation rule: synchronous (FedOpt family) or asynchronous. A robust
    rule that needs more updates per round than the round policy guarantees is refused.
    A model with parts gets one synchronous strategy per trainable part."""
    layout = Layout.of_job(cfg)
    if is_asynchronous(cfg.strategy):
        if layout.grouped:
            raise ConfigError(f"strategy.name: {cfg.strategy.get('name')!r} is asynchronous; a job with "
                              f"[distill] students or [multitask] heads needs a synchronous strategy")
        return make_async_strategy(cfg.strategy, gradient_lr=cfg.train.lr)
    strategy = make_strategy(cfg.strategy, gradient_lr=cfg.train.lr)
    if strategy.min_updates > cfg.policy.min_updates:
        raise ConfigError(f"rounds.min_updates: rule {strategy.rule.name!r} needs at least {strategy.min_updates} "
                          f"updates per round (2·krum_f + 3); set min_updates = {strategy.min_updates}")
    if layout.grouped:
        return PartStrategies(layout.trainable, layout.part_of,
                              lambda: make_strategy(cfg.strategy, gradient_lr=cfg.train.lr))
    return strategy


def encode_tree(value: Any) -> Any:
    """Strategy state (nested maps of tensors and numbers) in CBOR-friendly form."""
    if isinstance(value, torch.Tensor):
        return {"__tensor__": encode_state_dict({"t": value})["t"]}
    if isinstance(value, Mapping):
        return {k: encode_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_tree(v) for v in value]
    return value


def decode_tree(value: Any) -> Any:
    if isinstance(value, Mapping):
        if set(value) == {"__tensor__"}:
            return decode_state_dict({"t": value["__tensor__"]})["t"].clone()
        return {k: decode_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [decode_tree(v) for v in value]
    return value
