"""Small messages both ways: settings, lossy tensor encoders, error feedback, model deltas.

Uplink (slave → master): an update is sent as top-k sparse and/or quantized tensors
(`encode_update`). What compression drops is not lost: `ErrorFeedback` keeps it per
tensor and adds it to the next update (EF-SGD: Seide et al. 2014, Karimireddy et al.
2019), so the sum of what was sent tracks the sum of the true updates to within the
current residual.

Downlink (master → devices): instead of a full model every version, the master sends
a compressed *delta* against what devices hold, and a full model (a *keyframe*) every
K versions or when devices have drifted too far (`DeviceModel`). The master tracks the
devices' weights exactly — every encoder returns, next to the wire items, the float32
tensors a receiver will decode, bit for bit (`tensors.dequantize` is the one
definition of what a `q8` means) — so its copy of "what devices hold" is exact and
the downlink needs no separate error feedback: each delta is taken against that copy,
so whatever one delta left out is part of the next.

Everything here is pure (torch and the tensor codec); the cores decide when to call it.
See docs/PROTOCOL.md section 8.1 for the settings and 9.5 for the delta body.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

from .compression_settings import Downlink, Encoding, Uplink
from .errors import FedmqError, ProtocolError, Reason
from .tensors import (
    Limits,
    all_finite,
    as_float32_state,
    decode_state_dict,
    dequantize,
    encode_quantized,
    encode_sparse,
    encode_state_dict,
    encode_tensor,
    spec_of,
)

Params = dict[str, Tensor]

_VALUE_BYTES = {"none": 4, "int8": 1, "float16": 2, "bfloat16": 2}
_FLOAT16_MAX = 65504.0
INT8_MAX = 127  # symmetric codes in [-127, 127]; -128 is never used


# ------------------------------------------------------------------ one tensor


def _index_tensor(positions: Tensor, n: int) -> Tensor:
    """Flat indices in the narrowest integer type that holds every position of an n-entry
    tensor: a top-1 % update is mostly indices, and int16 halves them for tensors of up
    to 32,767 entries."""
    return positions.to(torch.int16 if n <= 2**15 - 1 else torch.int32 if n <= 2**31 - 1 else torch.int64)


def _quantize(values: Tensor, how: str, block: int) -> tuple[Any, Tensor]:
    """Encode float32 `values` (any shape) with `how`; return (item, what it decodes to)."""
    if how == "none":
        return encode_tensor(values), values
    if how == "float16":
        half = values.clamp(-_FLOAT16_MAX, _FLOAT16_MAX).to(torch.float16)
        return encode_tensor(half), half.to(torch.float32)
    if how == "bfloat16":
        half = values.to(torch.bfloat16)
        return encode_tensor(half), half.to(torch.float32)
    flat = values.reshape(-1)
    n = flat.numel()
    size = block if block else max(n, 1)
    blocks = -(-n // size)
    padded = torch.zeros(blocks * size, dtype=torch.float32)
    padded[:n] = flat
    scales = padded.reshape(blocks, size).abs().amax(dim=1) / INT8_MAX
    per_element = torch.where(scales > 0, scales, torch.ones_like(scales)).repeat_interleave(size)[:n]
    codes = torch.round(flat / per_element).clamp(-INT8_MAX, INT8_MAX).to(torch.int8).reshape(values.shape)
    if block:
        return encode_quantized(codes, scales, 0, block), dequantize(codes, scales, 0, block)
    scale = float(scales[0]) if blocks else 0.0
    return encode_quantized(codes, scale, 0), dequantize(codes, scale, 0)


def compress_tensor(t: Tensor, enc: Encoding) -> tuple[Any, Tensor]:
    """One float tensor as a wire item under `enc`, and the float32 tensor of the same
    shape that a receiver decodes from it (exactly)."""
    if not t.is_floating_point():
        raise TypeError(f"only float tensors are compressed, not {t.dtype}")
    values = t.detach().to(torch.float32)
    if not all_finite(values):
        raise ValueError("cannot compress a tensor holding NaN or Inf")
    flat = values.reshape(-1)
    n = flat.numel()
    chosen: Tensor | None = None  # None: every entry (no index array for a dense tensor)
    if enc.topk is not None and n:
        k = min(n, max(1, math.ceil(enc.topk * n)))
        chosen = torch.topk(flat.abs(), k, sorted=False).indices.sort().values
        chosen = chosen[flat[chosen] != 0]
        count = chosen.numel()
    else:
        count = int(torch.count_nonzero(flat))
    vb = _VALUE_BYTES[enc.quantize]
    index_bytes = 4 if n <= 2**31 - 1 else 8
    if count * (index_bytes + vb) < n * vb:
        if chosen is None:
            chosen = torch.nonzero(flat).reshape(-1)
        item, sent_values = _quantize(flat[chosen], enc.quantize, enc.block)
        sent = torch.zeros(n, dtype=torch.float32)
        sent[chosen] = sent_values
        return encode_sparse(values.shape, _index_tensor(chosen, n), item), sent.reshape(values.shape)
    if chosen is not None and count < n:
        kept = torch.zeros(n, dtype=torch.float32)
        kept[chosen] = flat[chosen]
        values = kept.reshape(values.shape)
    return _quantize(values, enc.quantize, enc.block)


def compress_tensors(tensors: Mapping[str, Tensor], enc: Encoding) -> tuple[dict[str, Any], Params]:
    """`compress_tensor` over a state dict: (wire `tensors` map, what it decodes to)."""
    wire, sent = {}, {}
    for name, t in tensors.items():
        wire[name], sent[name] = compress_tensor(t, enc)
    return wire, sent


# ------------------------------------------------------------------ uplink


class ErrorFeedback:
    """Per-tensor residual memory for compressed updates (EF-SGD).

    Each call sends C(update + residual) and keeps residual' = update + residual − sent,
    so after any number of rounds Σ update − Σ sent = residual (per tensor, exactly up
    to float32 rounding of the additions): nothing compression dropped is lost, only
    delayed. A residual whose shape no longer fits (another model) is dropped.

    The residual belongs to the slave and must outlive restarts: `state_dict()` is
    plain CBOR-able data for its state file. It is updated when the update is encoded,
    so persist it together with the pending update (an update that is later not used
    by the master loses what it carried, as a missed round would)."""

    def __init__(self, encoding: Encoding) -> None:
        self.encoding = encoding
        self.residual: Params = {}

    def compress(self, update: Mapping[str, Tensor]) -> tuple[dict[str, Any], Params]:
        """(wire tensors, sent) for `update`; the residual moves on."""
        wire: dict[str, Any] = {}
        sent: Params = {}
        residual: Params = {}
        for name, t in update.items():
            corrected = t.detach().to(torch.float32)
            carried = self.residual.get(name)
            if carried is not None and carried.shape == corrected.shape:
                corrected = corrected + carried
            wire[name], sent[name] = compress_tensor(corrected, self.encoding)
            residual[name] = corrected - sent[name]
        self.residual = residual
        return wire, sent

    def norm(self) -> float:
        """‖residual‖₂ over all tensors: how far Σ sent lags behind Σ update."""
        return _global_norm(self.residual)

    def state_dict(self) -> dict[str, Any]:
        return {"residual": encode_state_dict(self.residual)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from `state_dict()` (as read back from the state file)."""
        if not isinstance(state, Mapping) or not isinstance(state.get("residual"), Mapping):
            raise ValueError("error-feedback state must be a map with a 'residual' map")
        try:
            residual = decode_state_dict(state["residual"])
        except ProtocolError as exc:
            raise ValueError(f"error-feedback state: {exc}") from None
        self.residual = {k: v.to(torch.float32).clone() for k, v in residual.items()}


def encode_update(tensors: Mapping[str, Tensor], settings: Uplink,
                  residual: ErrorFeedback | None = None) -> dict[str, Any]:
    """The wire `tensors` map of an update under `settings` (with `residual`'s error
    feedback when given). For `delta` and `gradient` updates; never apply `topk` to a
    `student` update, which carries whole weights."""
    if residual is not None:
        return residual.compress(tensors)[0]
    return compress_tensors(tensors, settings)[0]


# ------------------------------------------------------------------ downlink


class WrongBase(FedmqError):
    """A model delta was made against weights this device does not hold (another
    version, or another run of the job): it cannot be applied; wait for a full model."""


def params_digest(params: Mapping[str, Tensor]) -> bytes:
    """16 bytes naming a set of weights exactly: SHA-256 over, for each tensor in
    order of its name's UTF-8 bytes, the name, a 0x00 byte and the float32
    little-endian elements in row-major order; first 16 bytes."""
    h = hashlib.sha256()
    for name in sorted(params, key=lambda s: s.encode()):
        h.update(name.encode() + b"\0")
        h.update(params[name].detach().to(torch.float32).contiguous().numpy().astype("<f4", copy=False).tobytes())
    return h.digest()[:16]


def _global_norm(tensors: Mapping[str, Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values()))


def drift(device: Mapping[str, Tensor], master: Mapping[str, Tensor]) -> float:
    """How far the devices' weights are from the master's: ‖device − master‖₂ / ‖master‖₂
    over all tensors (relative, so one bound suits any model; absolute if the master's
    weights are all zero)."""
    diff = _global_norm({k: device[k].double() - master[k].double() for k in master})
    scale = _global_norm(master)
    return diff / scale if scale > 0 else diff


def encode_model_delta(prev: Mapping[str, Tensor], new: Mapping[str, Tensor],
                       settings: Encoding) -> tuple[dict[str, Any], Params]:
    """(wire `tensors` of a delta from `prev` to `new`, the weights a device holding
    `prev` will have after applying it — bit for bit what `apply_model_delta` returns).
    Tensors whose delta encodes to all zeros are left out."""
    wire: dict[str, Any] = {}
    applied: Params = {}
    for name, target in new.items():
        base = prev[name].to(torch.float32)
        item, sent = compress_tensor(target.to(torch.float32) - base, settings)
        if bool(sent.any()):
            wire[name] = item
            applied[name] = base + sent
        else:
            applied[name] = base.clone()
    return wire, applied


def delta_body(base_version: int, base: Mapping[str, Tensor], tensors: Mapping[str, Any]) -> dict[str, Any]:
    """The body of a `delta` message (PROTOCOL.md 9.5)."""
    return {"base_version": base_version, "base_digest": params_digest(base), "tensors": dict(tensors)}


def apply_model_delta(base: Mapping[str, Tensor], body: Mapping[str, Any], *, held_version: int,
                      limits: Limits | None = None) -> Params:
    """The weights after applying a received `delta` body to `base` (held at
    `held_version`). Raises `WrongBase` if the delta was made against anything else,
    `ProtocolError` if its tensors do not fit the model (checked before anything is
    built) or the result is not finite."""
    if body.get("base_version") != held_version:
        raise WrongBase(f"delta is against version {body.get('base_version')!r}, this device holds {held_version}")
    digest = body.get("base_digest")
    if digest is not None and bytes(digest) != params_digest(base):
        raise WrongBase(f"delta is against other weights at version {held_version} (base_digest differs)")
    spec = spec_of(base)
    decoded = as_float32_state(decode_state_dict(body.get("tensors"), limits or Limits.for_model(spec),
                                                 expected=spec, partial=True))
    out = {name: (t.to(torch.float32) + decoded[name] if name in decoded else t.to(torch.float32).clone())
           for name, t in base.items()}
    for name in decoded:
        if not all_finite(out[name]):
            raise ProtocolError(Reason.NON_FINITE, f"{name}: the delta makes it NaN or Inf")
    return out


@dataclass(frozen=True)
class Keyframe:
    """Send the full model (`params`, the master's weights) as version `version`."""

    version: int
    params: Params


@dataclass(frozen=True)
class Delta:
    """Send a `delta` message with `body` as version `version`."""

    version: int
    body: dict[str, Any]


class DeviceModel:
    """The master's exact copy of what devices hold: the last keyframe plus every delta
    sent since; decides per version whether a delta or a keyframe goes out.

    A device that lags (missed a delta, joins late) must be given `params` at
    `version` as a full model (e.g. `model` on `to/SLAVE`), not the master's own
    weights: the next delta is made against this copy, and its `base_digest` says so."""

    def __init__(self, settings: Downlink) -> None:
        self.settings = settings
        self.version: int | None = None
        self.params: Params | None = None
        self.since_keyframe = 0

    def publish(self, version: int, master: Mapping[str, Tensor]) -> Keyframe | Delta:
        """What to send for the master's new weights `master` at `version`."""
        s = self.settings
        if s.delta and self.params is not None and self.since_keyframe + 1 < s.keyframe_every:
            wire, applied = encode_model_delta(self.params, master, s)
            if drift(applied, master) <= s.max_drift:
                body = delta_body(self.version, self.params, wire)
                self.version, self.params = version, applied
                self.since_keyframe += 1
                return Delta(version, body)
        self.version = version
        self.params = {k: v.detach().to(torch.float32).clone() for k, v in master.items()}
        self.since_keyframe = 0
        return Keyframe(version, self.params)

    def state_dict(self) -> dict[str, Any]:
        """Plain CBOR-able data for the master's checkpoint."""
        return {"version": self.version, "since_keyframe": self.since_keyframe,
                "params": None if self.params is None else encode_state_dict(self.params)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        params = state.get("params")
        self.params = None if params is None else {k: v.clone() for k, v in decode_state_dict(params).items()}
        self.version = state.get("version")
        self.since_keyframe = int(state.get("since_keyframe", 0))

