"""The master's model of a job at start: the whole model, or all its parts with the fixed teacher's weights read in.

Built once when the master starts (a checkpoint, if any, then replaces the weights):
the parts are checked against each other first (`Layout.check_fit`: a student that
does not take the teacher's input or give its output, a head that does not take the
encoder's output), so a bad job file stops `fedmq master run` with one line naming
the key, before anything is published.

A distillation job's teacher is pretrained elsewhere and never changes during the
job; `[distill] teacher` names its weights: a fedmq master checkpoint (its "params",
e.g. the checkpoint.cbor of a job that trained the same `[model]`) or a CBOR map
``{"tensors": {name: tensor}}`` as in a `model` message body (`write_weights`). Both
are decoded with fedmq's own tensor codec: nothing is unpickled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import cbor2
import torch
from torch import nn

from fedmq.common.errors import ConfigError, FedmqError
from fedmq.common.jobconfig import JobConfig
from fedmq.common.layout import TEACHER, Layout
from fedmq.common.modelspec import float_state, load_float_state, validate_state_dict
from fedmq.common.shell import write_atomic
from fedmq.common.tensors import decode_state_dict, encode_state_dict


def job_model(cfg: JobConfig) -> nn.Module:
    """The model the master starts from (see the module docstring); ConfigError names the key."""
    layout = Layout.of_job(cfg)
    layout.check_fit()
    model = layout.build()
    if cfg.distill is not None:
        teacher = layout.module(model, TEACHER)
        load_float_state(teacher, read_weights(cfg.distill.teacher, teacher, "distill.teacher"))
    return model


def read_weights(path: Path, model: nn.Module, key: str) -> dict[str, torch.Tensor]:
    """The float tensors of `model` from a checkpoint or weights file, checked against it."""
    try:
        data: Any = cbor2.loads(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"{key}: {path} does not exist") from None
    except (OSError, ValueError, cbor2.CBORDecodeError) as exc:
        raise ConfigError(f"{key}: {path} is not a CBOR file: {exc}") from None
    items = data.get("tensors", data.get("params")) if isinstance(data, Mapping) else None
    if items is None:
        raise ConfigError(f"{key}: {path} holds neither \"tensors\" (weights) nor \"params\" (a master checkpoint)")
    try:
        tensors = decode_state_dict(items)
        validate_state_dict(model, tensors)  # names, shapes, dtypes and finiteness, before use
    except FedmqError as exc:
        raise ConfigError(f"{key}: {path} does not fit [model]: {exc}") from None
    return tensors


def write_weights(path: Path, model: nn.Module) -> None:
    """Save a model's float tensors in the form `read_weights` takes (a teacher file)."""
    write_atomic(path, cbor2.dumps({"tensors": encode_state_dict(float_state(model))}))
