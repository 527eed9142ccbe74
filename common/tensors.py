"""Tensor codec: torch tensors <-> CBOR items, as RFC 8746 typed arrays.

A dense tensor is `40([shape, T(bytes)])` where T is the RFC 8746 typed-array tag
that names the element type (85 = float32 little-endian, 72 = int8, ...), so any
CBOR decoder can tell dtype and shape without knowing fedmq. Three more forms
exist, told apart by their CBOR major type so decoding needs no lookahead:

* `["bfloat16", 40([shape, 69(bytes)])]` — RFC 8746 has no bfloat16 tag; the raw
  16-bit patterns travel as uint16-LE and the leading text says how to read them.
* `{"coo": ...}` — a sparse tensor (flat indices + values), for top-k updates.
* `{"q8": ...}` — an affine-quantized int8 tensor (`value = scale * (q - zero)`),
  with one scale for the tensor or one per block of `block` elements.

Decoding never trusts a length or shape before checking it, and works in two
passes: the first checks every tensor of a message (typed-array tag known,
`prod(shape) * itemsize` equal to the byte length, element counts under `Limits`,
names and shapes equal to an `expected` spec when the receiver has one) and only
views the received bytes; the second builds the tensors. So a small message that
*claims* huge sparse tensors is refused before anything of the claimed size is
allocated, however its claims are spread over the message.

What is lossy (top-k, quantization, error feedback) lives in `compression.py`; this
module only encodes and decodes the forms exactly.
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np
import torch
from cbor2 import CBORTag

from .errors import ProtocolError, Reason

MULTI_DIM_TAG = 40
BFLOAT16 = "bfloat16"

# RFC 8746 typed-array tags we emit and accept (little-endian, plus the big-endian
# twins on input so another implementation may send either).
_TAG_TO_NUMPY: dict[int, np.dtype] = {
    64: np.dtype("u1"),
    65: np.dtype(">u2"), 66: np.dtype(">u4"), 67: np.dtype(">u8"),
    69: np.dtype("<u2"), 70: np.dtype("<u4"), 71: np.dtype("<u8"),
    72: np.dtype("i1"),
    73: np.dtype(">i2"), 74: np.dtype(">i4"), 75: np.dtype(">i8"),
    77: np.dtype("<i2"), 78: np.dtype("<i4"), 79: np.dtype("<i8"),
    80: np.dtype(">f2"), 81: np.dtype(">f4"), 82: np.dtype(">f8"),
    84: np.dtype("<f2"), 85: np.dtype("<f4"), 86: np.dtype("<f8"),
}
TYPED_ARRAY_TAGS = frozenset(_TAG_TO_NUMPY)

# torch dtype -> (typed-array tag, numpy dtype of the wire form)
_TORCH_TO_TAG: dict[torch.dtype, int] = {
    torch.uint8: 64,
    torch.int8: 72,
    torch.int16: 77,
    torch.int32: 78,
    torch.int64: 79,
    torch.float16: 84,
    torch.float32: 85,
    torch.float64: 86,
    torch.bool: 64,  # travels as uint8 0/1; decoded as uint8 (bool has no RFC 8746 tag)
}
_LITTLE_ENDIAN_HOST = sys.byteorder == "little"

# name -> (shape, dtype): what a receiver knows about the tensors it expects
Spec = Mapping[str, tuple[tuple[int, ...], torch.dtype]]

_HALF_FLOATS = (torch.float16, torch.bfloat16)


def spec_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The (shape, dtype) of each tensor, e.g. of `float_state(model)`, as an `expected` spec."""
    return {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}


@dataclass(frozen=True)
class Limits:
    """Bounds a decoder enforces before allocating.

    The defaults bound what any message may claim; `for_model` derives tight bounds
    from the model a receiver expects (use them together with `expected`)."""

    max_elements: int = 64 * 1024 * 1024  # per tensor (dense shape product)
    max_total_elements: int = 256 * 1024 * 1024  # per message
    max_tensors: int = 4096
    max_ndim: int = 8

    @classmethod
    def for_model(cls, model: Mapping[str, torch.Tensor] | Spec) -> Limits:
        """Limits that admit every wire form of an update or model of these tensors
        (name -> tensor, or name -> (shape, dtype)) and nothing much larger.

        Per message, every claimed shape counts (section 8 of PROTOCOL.md): a `coo`
        counts its dense shape plus its indices and values, each at most the tensor's
        size, and a per-block `q8` its scale array, hence 3× the model's elements."""
        shapes = [tuple(v[0]) if isinstance(v, tuple) else tuple(v.shape) for v in model.values()]
        sizes = [math.prod(s) for s in shapes]
        return cls(max_elements=max(sizes, default=1) or 1,
                   max_total_elements=3 * sum(sizes) or 1,
                   max_tensors=max(len(shapes), 1),
                   max_ndim=max((len(s) for s in shapes), default=1) or 1)


DEFAULT_LIMITS = Limits()


class _Budget:
    """Counts elements across one message so many small tensors can't add up to a bomb."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.total = 0

    def take(self, shape: tuple[int, ...]) -> int:
        n = _check_shape(shape, self.limits)
        self.total += n
        if self.total > self.limits.max_total_elements:
            raise ProtocolError(Reason.TOO_LARGE, f"message holds more than {self.limits.max_total_elements} elements")
        return n


def _check_shape(shape: Any, limits: Limits) -> int:
    if not isinstance(shape, (list, tuple)) or len(shape) > limits.max_ndim:
        raise ProtocolError(Reason.BAD_TENSOR, f"shape must be an array of at most {limits.max_ndim} dims")
    n = 1
    for d in shape:
        if type(d) is not int or d < 0:
            # no repr(d): a huge CBOR bignum would make the error message itself raise
            raise ProtocolError(Reason.BAD_TENSOR, f"dimension must be a non-negative int, not {type(d).__name__}")
        # Each dimension on its own, not only the product: a zero anywhere makes the
        # product 0, and numpy/torch cannot even represent a shape like [0, 10**30].
        if d > limits.max_elements:
            raise ProtocolError(Reason.TOO_LARGE, f"dimension exceeds {limits.max_elements}")
        n *= d
        if n > limits.max_elements:
            raise ProtocolError(Reason.TOO_LARGE, f"tensor exceeds {limits.max_elements} elements")
    return n


# ---------------------------------------------------------------- encoding


def _dense_item(t: torch.Tensor) -> CBORTag:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    tag = _TORCH_TO_TAG.get(t.dtype)
    if tag is None:
        raise TypeError(f"fedmq cannot encode dtype {t.dtype}")
    arr = t.contiguous().numpy()
    if not _LITTLE_ENDIAN_HOST:
        arr = arr.astype(_TAG_TO_NUMPY[tag])
    return CBORTag(MULTI_DIM_TAG, [list(t.shape), CBORTag(tag, arr.tobytes())])


def encode_tensor(t: torch.Tensor) -> Any:
    """A dense tensor as a CBOR item (`cbor2.dumps`-able)."""
    if t.dtype == torch.bfloat16:
        bits = t.detach().cpu().contiguous().view(torch.int16).numpy().astype("<u2", copy=False)
        return [BFLOAT16, CBORTag(MULTI_DIM_TAG, [list(t.shape), CBORTag(69, bits.tobytes())])]
    return _dense_item(t)


def encode_sparse(shape: tuple[int, ...] | torch.Size, indices: torch.Tensor, values: Any) -> dict:
    """A sparse tensor: flat (row-major) int16/int32/int64 `indices` and matching `values`
    (a 1-D tensor, or an already encoded item such as a `q8`)."""
    vals = encode_tensor(values) if isinstance(values, torch.Tensor) else values
    return {"coo": {"shape": list(shape), "indices": _dense_item(indices), "values": vals}}


def encode_quantized(q: torch.Tensor, scale: float | torch.Tensor, zero: int, block: int | None = None) -> dict:
    """An int8 tensor `q` meaning `scale * (q - zero)` as float32.

    With `block`, `scale` is a 1-D float32 tensor holding one scale per run of `block`
    consecutive (row-major) elements, the last run possibly shorter."""
    if q.dtype != torch.int8:
        raise TypeError("quantized tensors carry int8 codes")
    if block is None:
        return {"q8": {"scale": float(scale), "zero": int(zero), "codes": _dense_item(q)}}
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 or scale.dim() != 1 \
            or block < 1 or scale.numel() != _blocks(q.numel(), block):
        raise ValueError(f"per-block q8 needs block >= 1 and a 1-D float32 scale per block of {block}")
    return {"q8": {"scale": _dense_item(scale), "zero": int(zero), "codes": _dense_item(q), "block": int(block)}}


def encode_state_dict(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Name -> tensor item. Values already encoded (sparse/quantized dicts) pass through."""
    return {name: (t if isinstance(t, Mapping) else encode_tensor(t)) for name, t in tensors.items()}


def _blocks(n: int, block: int) -> int:
    return -(-n // block)


def dequantize(codes: torch.Tensor, scale: float | torch.Tensor, zero: int, block: int | None = None) -> torch.Tensor:
    """The float32 values a `q8` item means — the one definition both the decoder and
    the lossy encoders use, so a sender knows bit for bit what a receiver will get.

    float32 throughout: `(float32(code) − zero) × float32(scale)`."""
    centred = codes.to(torch.float32) - zero
    if block is None:
        return centred * torch.tensor(float(scale), dtype=torch.float32)
    # indexing, not repeat_interleave: a huge claimed `block` must not size anything
    n = codes.numel()
    per_element = scale.to(torch.float32)[torch.arange(n) // min(block, max(n, 1))]
    return (centred.reshape(-1) * per_element).reshape(codes.shape)


# ---------------------------------------------------------------- decoding


class _Checked(NamedTuple):
    """A tensor item that passed every check: its decoded shape and dtype, and how to
    build it (the only step that may allocate memory of the claimed size)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    build: Callable[[], torch.Tensor]


def _array_from(tag: CBORTag, shape: tuple[int, ...], n: int) -> np.ndarray:
    if not isinstance(tag, CBORTag) or tag.tag not in _TAG_TO_NUMPY:
        raise ProtocolError(Reason.BAD_TENSOR, "element array is not an RFC 8746 typed array")
    data = tag.value
    if not isinstance(data, (bytes, bytearray)):
        raise ProtocolError(Reason.BAD_TENSOR, "typed array content must be a byte string")
    dt = _TAG_TO_NUMPY[tag.tag]
    if n * dt.itemsize != len(data):
        raise ProtocolError(Reason.BAD_TENSOR, f"shape {list(shape)} x {dt.itemsize} B != {len(data)} B")
    arr = np.frombuffer(data, dtype=dt)
    if not dt.isnative:
        arr = arr.astype(dt.newbyteorder("="))  # a copy no larger than the bytes received
    return arr.reshape(shape)


def _to_torch(arr: np.ndarray) -> torch.Tensor:
    # Zero-copy over the received bytes: they are immutable, and torch warns about
    # that; fedmq never writes into decoded tensors in place (aggregation allocates).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


def _shape_of(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _dense(item: Any, budget: _Budget) -> torch.Tensor:
    """A tag-40 item as a tensor viewing the received bytes (nothing is allocated)."""
    if not isinstance(item, CBORTag) or item.tag != MULTI_DIM_TAG:
        raise ProtocolError(Reason.BAD_TENSOR, "tensor must be tag 40 [shape, typed array]")
    v = item.value
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise ProtocolError(Reason.BAD_TENSOR, "tag 40 content must be [shape, typed array]")
    shape = _shape_of(v[0])
    n = budget.take(shape)
    return _to_torch(_array_from(v[1], shape, n))


def _ready(t: torch.Tensor) -> _Checked:
    return _Checked(tuple(t.shape), t.dtype, lambda: t)


def _check_sparse(body: Any, budget: _Budget) -> _Checked:
    if not isinstance(body, Mapping) or set(body) != {"shape", "indices", "values"}:
        raise ProtocolError(Reason.BAD_TENSOR, "coo needs exactly shape, indices, values")
    shape = _shape_of(body["shape"])
    n = budget.take(shape)
    idx = _dense(body["indices"], budget)
    val = _check(body["values"], budget)
    if idx.dtype not in (torch.int16, torch.int32, torch.int64) or idx.dim() != 1 or len(val.shape) != 1 \
            or idx.numel() != val.shape[0]:
        raise ProtocolError(Reason.BAD_TENSOR, "coo indices must be 1-D int16/int32/int64 matching 1-D values")
    if idx.numel() > n:
        raise ProtocolError(Reason.BAD_TENSOR, "coo holds more indices than the tensor has elements")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ProtocolError(Reason.BAD_TENSOR, "coo index out of range")

    def build() -> torch.Tensor:
        values = val.build()
        out = torch.zeros(n, dtype=values.dtype)
        out[idx.to(torch.int64)] = values
        return out.reshape(shape)

    return _Checked(shape, val.dtype, build)


def _check_quantized(body: Any, budget: _Budget) -> _Checked:
    if not isinstance(body, Mapping) or set(body) not in ({"scale", "zero", "codes"}, {"scale", "zero", "codes", "block"}):
        raise ProtocolError(Reason.BAD_TENSOR, "q8 needs exactly scale, zero, codes (and block for per-block scales)")
    zero = body["zero"]
    if type(zero) is not int or not -128 <= zero <= 127:
        raise ProtocolError(Reason.BAD_TENSOR, "q8 zero must be an int8")
    codes = _dense(body["codes"], budget)
    if codes.dtype != torch.int8:
        raise ProtocolError(Reason.BAD_TENSOR, "q8 codes must be int8")
    block = body.get("block")
    if block is None:
        scale = body["scale"]
        if not isinstance(scale, float) or not math.isfinite(scale):
            raise ProtocolError(Reason.BAD_TENSOR, "q8 scale must be a finite float")
    else:
        if type(block) is not int or block < 1:
            raise ProtocolError(Reason.BAD_TENSOR, "q8 block must be a positive int")
        scale = _dense(body["scale"], budget)
        if scale.dtype != torch.float32 or scale.dim() != 1 or scale.numel() != _blocks(codes.numel(), block):
            raise ProtocolError(Reason.BAD_TENSOR, "q8 per-block scale must be 1-D float32, one per block")
        if not all_finite(scale):
            raise ProtocolError(Reason.BAD_TENSOR, "q8 scales must be finite")
    return _Checked(tuple(codes.shape), torch.float32, lambda: dequantize(codes, scale, zero, block))


def _check(item: Any, budget: _Budget) -> _Checked:
    """First pass over one tensor item: every check, no allocation of claimed sizes."""
    if isinstance(item, CBORTag):
        return _ready(_dense(item, budget))
    if isinstance(item, (list, tuple)) and len(item) == 2 and item[0] == BFLOAT16:
        raw = _dense(item[1], budget)
        if raw.dtype not in (torch.uint16, torch.int16):
            raise ProtocolError(Reason.BAD_TENSOR, "bfloat16 bits must travel as a 16-bit integer array")
        return _ready(raw.view(torch.bfloat16))
    if isinstance(item, Mapping) and len(item) == 1:
        (form, body), = item.items()
        if form == "coo":
            return _check_sparse(body, budget)
        if form == "q8":
            return _check_quantized(body, budget)
    raise ProtocolError(Reason.BAD_TENSOR, "unknown tensor form")


def decode_tensor(item: Any, limits: Limits = DEFAULT_LIMITS, *, budget: _Budget | None = None) -> torch.Tensor:
    """Any tensor item (dense, bfloat16, coo, q8) -> a dense torch tensor."""
    return _check(item, budget or _Budget(limits)).build()


def admissible(decoded: torch.dtype, expected: torch.dtype) -> bool:
    """May a tensor that decodes to `decoded` stand for one of dtype `expected`?

    A float tensor may travel at its own precision or as float16/bfloat16 (and as
    q8/coo forms that decode to those); the receiver widens it (`as_float32_state`).
    Other dtypes must match exactly."""
    if expected.is_floating_point and decoded in _HALF_FLOATS:
        return True
    return decoded == expected


def decode_state_dict(items: Any, limits: Limits = DEFAULT_LIMITS, *, expected: Spec | None = None,
                      partial: bool = False) -> dict[str, torch.Tensor]:
    """A name -> tensor-item map -> name -> dense tensor, within one element budget.

    With `expected` (name -> (shape, dtype), e.g. `spec_of(float_state(model))`), the
    names must be exactly those (a subset with `partial`, as in a model delta that
    leaves tensors out), and each tensor's shape and decoded dtype (`admissible`) must
    match — all checked, with the budget, before any tensor is built."""
    if not isinstance(items, Mapping):
        raise ProtocolError(Reason.BAD_TENSOR, "tensors must be a map")
    if len(items) > limits.max_tensors:
        raise ProtocolError(Reason.TOO_LARGE, f"more than {limits.max_tensors} tensors")
    if not all(isinstance(name, str) for name in items):
        raise ProtocolError(Reason.BAD_TENSOR, "tensor names must be text")
    if expected is not None:
        unexpected = sorted(set(items) - set(expected))
        missing = [] if partial else sorted(set(expected) - set(items))
        if unexpected or missing:
            raise ProtocolError(Reason.BAD_TENSOR, f"tensor names differ from the model: missing {missing[:8]}, "
                                                   f"unexpected {unexpected[:8]}")
    budget = _Budget(limits)
    checked: dict[str, _Checked] = {}
    for name, item in items.items():
        c = checked[name] = _check(item, budget)
        if expected is not None:
            shape, dtype = expected[name]
            if c.shape != tuple(shape) or not admissible(c.dtype, dtype):
                raise ProtocolError(Reason.BAD_TENSOR, f"{name}: {str(c.dtype).removeprefix('torch.')} {list(c.shape)}, "
                                                       f"expected {str(dtype).removeprefix('torch.')} {list(shape)}")
    return {name: c.build() for name, c in checked.items()}


def as_float32_state(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """float16/bfloat16 tensors widened to float32 (exactly); every other tensor as is.

    A receiver calls it on decoded update/model tensors before checking them against
    a float32 model, since senders may use 16-bit floats on the wire."""
    return {name: (t.to(torch.float32) if t.dtype in _HALF_FLOATS else t) for name, t in tensors.items()}


def describe(items: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Name, dtype and shape of each decoded tensor, for `fedmq decode` and logs."""
    return [{"name": k, "dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)} for k, v in items.items()]


_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in `t`. numpy's isfinite is used where it can see the data: on
    float32 it is ~10x faster than torch.isfinite(t).all() here (0.02 vs 0.25 ms per
    MiB), which was a sixth of the cost of receiving and decoding a large update."""
    if t.dtype in _NUMPY_FLOATS and not t.requires_grad:
        return bool(np.isfinite(t.numpy()).all())
    return bool(torch.isfinite(t).all())
