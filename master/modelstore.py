"""The global model's versions: the current parameters, the older bases still needed, the published body.

Version 0 is the initial model; every aggregation adopts new parameters as the next
version. Asynchronous strategies that mix in a slave's model (FedAsync) need the
version an update started from, so the store keeps the last `keep_bases` versions
besides the current one. Parameters are validated against the model template, so
nothing of the wrong shape ever becomes a version.

A model with parts (a fixed teacher and its students, a shared encoder and its task
heads: common/layout.py) is one set of parameters and one version; a slave may update
only the parts it confirmed (`update_parts`, `spec(parts)`, `validate(tensors, parts)`).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import nn

from fedmq.common.layout import Layout
from fedmq.common.modelspec import float_state, validate_tensors
from fedmq.common.tensors import Spec, decode_state_dict, encode_state_dict, spec_of

Params = dict[str, torch.Tensor]


class ModelStore:
    def __init__(self, template: nn.Module, *, keep_bases: int = 0, layout: Layout | None = None) -> None:
        self.template = template  # for validating shapes; the weights live in `params`
        self.layout = layout  # None: one whole model
        self.params: Params = {k: v.detach().clone() for k, v in float_state(template).items()}
        self._reference = {k: v.detach().clone() for k, v in self.params.items()}  # names, shapes, dtypes
        self.version = 0
        self.keep_bases = keep_bases
        self._bases: dict[int, Params] = {}

    def _select(self, tensors: Mapping[str, Any], parts: Iterable[str] | None) -> dict[str, Any]:
        return dict(tensors) if parts is None or self.layout is None else self.layout.select(tensors, parts)

    def spec(self, parts: Iterable[str] | None = None) -> Spec:
        """Names, shapes and dtypes of the model's tensors (of `parts` only, if given)."""
        return spec_of(self._select(self._reference, parts))

    def validate(self, tensors: Mapping[str, torch.Tensor], parts: Iterable[str] | None = None) -> None:
        """Raise ProtocolError unless `tensors` have exactly the names, shapes and dtypes of
        the model (of `parts` only, if given), all finite."""
        validate_tensors(self._select(self._reference, parts), tensors)

    def update_parts(self, claim: Any, confirmed: Mapping[str, int] | None) -> dict[str, int] | None:
        """The parts an update says it trains (its `parts`), checked against those its
        sender `confirmed`, with capped sample counts; None for a whole model (see
        `Layout.update_parts`; raises ProtocolError)."""
        return None if self.layout is None else self.layout.update_parts(claim, confirmed)

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
