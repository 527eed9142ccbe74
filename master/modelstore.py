"""The global model's versions: the current parameters, the older bases still needed, the published body.

Version 0 is the initial model; every aggregation adopts new parameters as the next
version. Asynchronous strategies that mix in a slave's model (FedAsync) need the
version an update started from, so the store keeps the last `keep_bases` versions
besides the current one. Parameters are validated against the model template, so
nothing of the wrong shape ever becomes a version.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from fedmq.common.modelspec import float_state, validate_state_dict
from fedmq.common.tensors import decode_state_dict, encode_state_dict

Params = dict[str, torch.Tensor]


class ModelStore:
    def __init__(self, template: nn.Module, *, keep_bases: int = 0) -> None:
        self.template = template  # for validating shapes; the weights live in `params`
        self.params: Params = {k: v.detach().clone() for k, v in float_state(template).items()}
        self.version = 0
        self.keep_bases = keep_bases
        self._bases: dict[int, Params] = {}

    def validate(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Raise ProtocolError unless `tensors` have exactly the model's names, shapes and dtypes."""
        validate_state_dict(self.template, tensors)

    def base(self, version: int) -> Params | None:
        """The parameters of `version`, if it is the current one or still kept."""
        return self.params if version == self.version else self._bases.get(version)

    def adopt(self, params: Params) -> int:
        """Make `params` the next version; returns its number."""
        if self.keep_bases:
            self._bases[self.version] = self.params
            for old in [v for v in self._bases if v < self.version - self.keep_bases]:
                del self._bases[old]
        self.params = params
        self.version += 1
        return self.version

    def checkpoint(self) -> dict[str, Any]:
        return {"version": self.version, "params": encode_state_dict(self.params)}

    def restore(self, version: int, params: Any) -> None:
        decoded = decode_state_dict(params)
        self.validate(decoded)
        self.params = {k: v.clone() for k, v in decoded.items()}
        self.version = version
        self._bases.clear()
