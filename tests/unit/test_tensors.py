"""The RFC 8746 tensor codec (common/tensors.py).

Guards: exact round trips for every dtype and for empty, scalar and large tensors;
zero-copy decoding; big-endian input from other implementations; the sparse (coo)
and quantized (q8, per-tensor and per-block) forms; the receiver's expected spec
and per-model limits; and the decoder's refusal of every inconsistent or oversized
input *before* it allocates anything of the claimed size (the sparse bomb of issue
11 included, measured in a subprocess).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from typing import Any

import cbor2
import numpy as np
import pytest
import torch
from cbor2 import CBORTag

from fedmq.common import envelope, messages
from fedmq.common.errors import ProtocolError, Reason
from fedmq.common.tensors import (
    Limits,
    as_float32_state,
    decode_state_dict,
    decode_tensor,
    dequantize,
    describe,
    encode_quantized,
    encode_sparse,
    encode_state_dict,
    encode_tensor,
    spec_of,
)


def wire_roundtrip(item: Any) -> Any:
    """What a receiver sees: the item encoded to bytes and decoded with fedmq's bounded loads."""
    return envelope.loads(cbor2.dumps(item))


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 100).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(dtype)


def buffer_address(b: bytes) -> int:
    """Address of the first byte of a bytes object's buffer (numpy views it without copying)."""
    return np.frombuffer(b, dtype=np.uint8).ctypes.data


def find_tags(obj: Any) -> set[int]:
    """Every tag number that occurs in a plain cbor2-decoded structure."""
    if isinstance(obj, CBORTag):
        return {obj.tag} | find_tags(obj.value)
    if isinstance(obj, dict):
        return set().union(*(find_tags(v) for v in obj.values()), set())
    if isinstance(obj, (list, tuple)):
        return set().union(*(find_tags(v) for v in obj), set())
    return set()


def dense(shape: Any, tag: int, data: bytes) -> CBORTag:
    return CBORTag(40, [shape, CBORTag(tag, data)])


# ------------------------------------------------------------------ round trips

# torch dtype -> (RFC 8746 tag on the wire, dtype after decoding)
DTYPES = {
    torch.float32: (85, torch.float32),
    torch.float16: (84, torch.float16),
    torch.float64: (86, torch.float64),
    torch.int8: (72, torch.int8),
    torch.uint8: (64, torch.uint8),
    torch.int16: (77, torch.int16),
    torch.int32: (78, torch.int32),
    torch.int64: (79, torch.int64),
    torch.bool: (64, torch.uint8),  # bool has no RFC 8746 tag: it travels and decodes as uint8 0/1
}


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("shape", [(3, 4), (0, 5), ()], ids=["3x4", "empty-0x5", "scalar"])
def test_dense_round_trip_every_dtype_and_shape(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = sample(dtype, shape)
    tag, decoded_dtype = DTYPES[dtype]
    item = wire_roundtrip(encode_tensor(t))
    assert item.tag == 40 and item.value[1].tag == tag
    assert list(item.value[0]) == list(shape)
    out = decode_tensor(item)
    assert out.dtype == decoded_dtype and tuple(out.shape) == shape
    assert torch.equal(out, t.to(decoded_dtype))


@pytest.mark.parametrize("shape", [(3, 4), (0, 5), ()], ids=["3x4", "empty-0x5", "scalar"])
def test_bfloat16_round_trip_is_bit_exact(shape: tuple[int, ...]) -> None:
    t = sample(torch.bfloat16, shape)
    item = wire_roundtrip(encode_tensor(t))
    assert item[0] == "bfloat16" and item[1].tag == 40 and item[1].value[1].tag == 69
    out = decode_tensor(item)
    assert out.dtype == torch.bfloat16 and tuple(out.shape) == shape
    assert torch.equal(out.view(torch.int16), t.view(torch.int16))


def test_special_float_values_survive_bit_for_bit() -> None:
    t = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1e-45, 3.4e38])
    out = decode_tensor(wire_roundtrip(encode_tensor(t)))
    assert torch.equal(out.view(torch.int32), t.view(torch.int32))


def test_non_contiguous_and_requires_grad_tensors_encode_their_values() -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    t = base.t()  # a strided view
    assert not t.is_contiguous()
    assert torch.equal(decode_tensor(wire_roundtrip(encode_tensor(t))), t)
    p = torch.nn.Parameter(torch.ones(2, 2))
    assert torch.equal(decode_tensor(wire_roundtrip(encode_tensor(p))), torch.ones(2, 2))


def test_large_tensor_round_trip_is_exact_and_zero_copy() -> None:
    t = torch.randn(4 * 1024 * 1024)  # 16 MiB of float32
    raw = cbor2.dumps(encode_tensor(t))
    assert len(raw) > 16 * 1024 * 1024
    item = envelope.loads(raw)
    out = decode_tensor(item)
    assert torch.equal(out, t)
    # cbor2 copies byte strings out of its input, so "received bytes" means the typed
    # array's byte string as decoded: the tensor must be a view of it, not a second copy.
    assert out.untyped_storage().data_ptr() == buffer_address(item.value[1].value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.uint8, torch.float16], ids=str)
def test_decoded_tensor_shares_memory_with_the_received_bytes(dtype: torch.dtype) -> None:
    item = wire_roundtrip(encode_tensor(sample(dtype, (5, 7))))
    out = decode_tensor(item)
    assert out.data_ptr() == buffer_address(item.value[1].value)


def test_state_dict_round_trip_and_describe() -> None:
    sd = {"a.weight": sample(torch.float32, (4, 3)), "a.bias": sample(torch.float16, (3,)),
          "steps": torch.tensor(7), "mask": torch.tensor([True, False]), "bf": sample(torch.bfloat16, (2,))}
    out = decode_state_dict(wire_roundtrip(encode_state_dict(sd)))
    assert list(out) == list(sd)
    for k in sd:
        want = sd[k].to(torch.uint8) if sd[k].dtype == torch.bool else sd[k]
        assert out[k].dtype == want.dtype and torch.equal(out[k], want), k
    assert describe(out)[0] == {"name": "a.weight", "dtype": "float32", "shape": [4, 3]}
    assert describe(out)[3] == {"name": "mask", "dtype": "uint8", "shape": [2]}


# Big-endian tags an independent implementation (e.g. on a big-endian MCU) may send.
BIG_ENDIAN = [
    (65, ">u2", torch.uint16), (66, ">u4", torch.uint32), (67, ">u8", torch.uint64),
    (73, ">i2", torch.int16), (74, ">i4", torch.int32), (75, ">i8", torch.int64),
    (80, ">f2", torch.float16), (81, ">f4", torch.float32), (82, ">f8", torch.float64),
]


@pytest.mark.parametrize(("tag", "np_dtype", "torch_dtype"), BIG_ENDIAN, ids=[str(t[0]) for t in BIG_ENDIAN])
def test_big_endian_typed_arrays_from_another_implementation(tag: int, np_dtype: str, torch_dtype: torch.dtype) -> None:
    values = np.array([[0, 1, 2], [3, 100, 250]]).astype(np_dtype)
    raw = values.tobytes()
    assert raw != values.astype(np.dtype(np_dtype).newbyteorder("<")).tobytes()  # really big-endian
    out = decode_tensor(wire_roundtrip(dense([2, 3], tag, raw)))
    assert out.dtype == torch_dtype and out.shape == (2, 3)
    assert out.tolist() == [[0, 1, 2], [3, 100, 250]]


def test_big_endian_float32_hand_built() -> None:
    out = decode_tensor(wire_roundtrip(dense([2], 81, bytes.fromhex("3fc00000c0200000"))))
    assert out.tolist() == [1.5, -2.5]


def test_bfloat16_bits_may_arrive_big_endian() -> None:
    bits = torch.tensor([1.0, -3.5], dtype=torch.bfloat16).view(torch.int16).numpy().astype(">u2").tobytes()
    out = decode_tensor(wire_roundtrip(["bfloat16", dense([2], 65, bits)]))
    assert out.dtype == torch.bfloat16 and out.tolist() == [1.0, -3.5]


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
def test_sparse_coo_round_trip(index_dtype: torch.dtype) -> None:
    shape = (4, 5)
    idx = torch.tensor([0, 7, 19], dtype=index_dtype)
    val = torch.tensor([1.5, -2.0, 0.25])
    out = decode_tensor(wire_roundtrip(encode_sparse(shape, idx, val)))
    want = torch.zeros(20)
    want[[0, 7, 19]] = val
    assert out.shape == shape and torch.equal(out, want.reshape(shape))


def test_sparse_coo_with_no_entries_and_bfloat16_values() -> None:
    empty = decode_tensor(wire_roundtrip(encode_sparse((3, 3), torch.zeros(0, dtype=torch.int64), torch.zeros(0))))
    assert torch.equal(empty, torch.zeros(3, 3))
    bf = decode_tensor(wire_roundtrip(encode_sparse((4,), torch.tensor([2]), torch.tensor([0.5], dtype=torch.bfloat16))))
    assert bf.dtype == torch.bfloat16 and bf.tolist() == [0, 0, 0.5, 0]


def test_q8_round_trip() -> None:
    codes = torch.tensor([[-128, -1, 0], [1, 5, 127]], dtype=torch.int8)
    out = decode_tensor(wire_roundtrip(encode_quantized(codes, 0.5, 3)))
    assert out.dtype == torch.float32
    assert torch.equal(out, (codes.to(torch.float32) - 3) * 0.5)


def test_plain_cbor2_sees_rfc8746_tags_without_any_hook() -> None:
    sd = {"f32": torch.ones(2), "i8": torch.ones(2, dtype=torch.int8), "f16": torch.ones(1, dtype=torch.float16),
          "bf": torch.ones(1, dtype=torch.bfloat16), "i64": torch.ones(1, dtype=torch.int64),
          "coo": encode_sparse((3,), torch.tensor([1], dtype=torch.int32), torch.ones(1)),
          "q8": encode_quantized(torch.ones(2, dtype=torch.int8), 0.1, 0)}
    decoded = cbor2.loads(cbor2.dumps(encode_state_dict(sd)))
    assert isinstance(decoded["f32"], CBORTag) and decoded["f32"].tag == 40
    assert decoded["f32"].value[1].tag == 85 and decoded["f32"].value[1].value == torch.ones(2).numpy().tobytes()
    assert find_tags(decoded) == {40, 85, 72, 84, 69, 79, 78}


# ------------------------------------------------------------------ rejections


def reject(item: Any, reason: str, limits: Limits | None = None) -> ProtocolError:
    with pytest.raises(ProtocolError) as exc:
        if limits is None:
            decode_tensor(wire_roundtrip(item))
        else:
            decode_tensor(wire_roundtrip(item), limits)
    assert exc.value.reason == reason, exc.value
    return exc.value


@pytest.mark.parametrize("tag", [68, 76, 83, 87, 88, 63, 1, 40])
def test_unknown_typed_array_tag_is_rejected(tag: int) -> None:
    # 68 = clamped uint8, 76 = reserved, 83/87 = float128: RFC 8746 tags fedmq does not use
    reject(dense([1], tag, b"\x00" * 16), Reason.BAD_TENSOR)


@pytest.mark.parametrize(("shape", "nbytes"), [([2, 3], 23), ([2, 3], 25), ([0, 5], 4), ([], 0), ([4], 0)])
def test_shape_times_itemsize_must_equal_byte_length(shape: list[int], nbytes: int) -> None:
    reject(dense(shape, 85, b"\x00" * nbytes), Reason.BAD_TENSOR)


@pytest.mark.parametrize("shape", [[-1], [2, -3], [1.5], ["3"], [True], [None], [[2]], 3, "2x3", None, {}],
                         ids=repr)
def test_negative_and_non_integer_dims_are_rejected(shape: Any) -> None:
    reject(dense(shape, 85, b"\x00" * 12), Reason.BAD_TENSOR)


def test_typed_array_content_must_be_a_byte_string_and_the_form_known() -> None:
    reject(CBORTag(40, [[1], CBORTag(85, [1.0])]), Reason.BAD_TENSOR)
    reject(CBORTag(40, [[1], b"\x00" * 4]), Reason.BAD_TENSOR)
    reject(CBORTag(40, [[1]]), Reason.BAD_TENSOR)
    reject(CBORTag(41, [[1], CBORTag(85, b"\x00" * 4)]), Reason.BAD_TENSOR)
    reject({"csr": {}}, Reason.BAD_TENSOR)
    reject(["bfloat16", dense([1], 85, b"\x00" * 4)], Reason.BAD_TENSOR)  # 16-bit patterns only
    reject([1, 2, 3], Reason.BAD_TENSOR)


def test_too_many_dims() -> None:
    reject(dense([1] * 9, 85, b"\x00" * 4), Reason.BAD_TENSOR)
    reject(dense([1] * 3, 85, b"\x00" * 4), Reason.BAD_TENSOR, Limits(max_ndim=2))
    assert decode_tensor(wire_roundtrip(dense([1] * 8, 85, b"\x00" * 4))).dim() == 8


def test_per_tensor_element_limit() -> None:
    limits = Limits(max_elements=100)
    assert decode_tensor(wire_roundtrip(dense([10, 10], 72, b"\x00" * 100)), limits).numel() == 100
    reject(dense([101], 72, b"\x00" * 101), Reason.TOO_LARGE, limits)


def test_element_limit_is_checked_before_the_byte_length() -> None:
    # The claimed shape is refused as too large even though the bytes are absent:
    # nothing sized by the claim is ever looked at or allocated.
    reject(dense([2**40, 2**40], 85, b""), Reason.TOO_LARGE)


def test_total_element_limit_across_a_message() -> None:
    limits = Limits(max_elements=100, max_total_elements=150)
    sd = {"a": torch.zeros(80), "b": torch.zeros(80)}
    with pytest.raises(ProtocolError) as exc:
        decode_state_dict(wire_roundtrip(encode_state_dict(sd)), limits)
    assert exc.value.reason == Reason.TOO_LARGE
    assert set(decode_state_dict(wire_roundtrip(encode_state_dict({"a": torch.zeros(80)})), limits)) == {"a"}


def test_tensor_count_limit() -> None:
    with pytest.raises(ProtocolError) as exc:
        decode_state_dict(wire_roundtrip(encode_state_dict({f"t{i}": torch.zeros(1) for i in range(5)})),
                          Limits(max_tensors=4))
    assert exc.value.reason == Reason.TOO_LARGE


def test_sparse_claiming_a_huge_dense_shape_is_refused_before_allocation() -> None:
    # Densifying would allocate 4 TB; the claim must be refused instead of attempted.
    item = encode_sparse((10**12,), torch.tensor([0]), torch.ones(1))
    reject(item, Reason.TOO_LARGE)
    reject(encode_sparse((10**6, 10**6), torch.tensor([0]), torch.ones(1)), Reason.TOO_LARGE)


def test_sparse_counts_against_the_message_total() -> None:
    limits = Limits(max_elements=1000, max_total_elements=1500)
    sd = {"a": encode_sparse((1000,), torch.tensor([0]), torch.ones(1)),
          "b": encode_sparse((1000,), torch.tensor([0]), torch.ones(1))}
    with pytest.raises(ProtocolError) as exc:
        decode_state_dict(wire_roundtrip(sd), limits)
    assert exc.value.reason == Reason.TOO_LARGE


@pytest.mark.parametrize("index", [20, 10**6, -1], ids=["n", "far", "negative"])
def test_sparse_index_out_of_range(index: int) -> None:
    reject(encode_sparse((4, 5), torch.tensor([0, index]), torch.ones(2)), Reason.BAD_TENSOR)


def test_sparse_structure_errors() -> None:
    ok_idx, ok_val = encode_tensor(torch.tensor([1])), encode_tensor(torch.ones(1))
    reject({"coo": {"shape": [4], "indices": ok_idx}}, Reason.BAD_TENSOR)
    reject({"coo": {"shape": [4], "indices": ok_idx, "values": ok_val, "extra": 1}}, Reason.BAD_TENSOR)
    reject({"coo": {"shape": [4], "indices": encode_tensor(torch.tensor([1.0])), "values": ok_val}}, Reason.BAD_TENSOR)
    reject({"coo": {"shape": [4], "indices": encode_tensor(torch.tensor([1, 2])), "values": ok_val}}, Reason.BAD_TENSOR)
    reject({"coo": {"shape": [4], "indices": encode_tensor(torch.tensor([[1]])), "values": ok_val}}, Reason.BAD_TENSOR)
    reject({"coo": {"shape": -4, "indices": ok_idx, "values": ok_val}}, Reason.BAD_TENSOR)
    reject({"coo": [1, 2, 3]}, Reason.BAD_TENSOR)


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_q8_with_non_finite_scale_is_rejected(scale: float) -> None:
    reject(encode_quantized(torch.ones(2, dtype=torch.int8), scale, 0), Reason.BAD_TENSOR)


def test_q8_structure_errors() -> None:
    codes = encode_tensor(torch.ones(2, dtype=torch.int8))
    reject({"q8": {"scale": 1.0, "zero": 128, "codes": codes}}, Reason.BAD_TENSOR)
    reject({"q8": {"scale": 1.0, "zero": 1.0, "codes": codes}}, Reason.BAD_TENSOR)
    reject({"q8": {"scale": 1, "zero": 0, "codes": codes}}, Reason.BAD_TENSOR)  # scale must be a float
    reject({"q8": {"scale": 1.0, "zero": 0, "codes": encode_tensor(torch.ones(2, dtype=torch.uint8))}},
           Reason.BAD_TENSOR)
    reject({"q8": {"scale": 1.0, "zero": 0}}, Reason.BAD_TENSOR)
    with pytest.raises(TypeError):
        encode_quantized(torch.ones(2), 1.0, 0)


def test_state_dict_must_be_a_map_of_text_names() -> None:
    for items in ([encode_tensor(torch.ones(1))], {1: encode_tensor(torch.ones(1))}, None, b"x"):
        with pytest.raises(ProtocolError) as exc:
            decode_state_dict(wire_roundtrip(items))
        assert exc.value.reason == Reason.BAD_TENSOR


def test_encoder_refuses_dtypes_without_a_wire_form() -> None:
    with pytest.raises(TypeError):
        encode_tensor(torch.ones(2, dtype=torch.complex64))


@pytest.mark.parametrize("shape", [[0, 2**64 - 1], [0, 2**63], [0, 2**62], [0] + [2**40] * 7, [2**40, 0]], ids=repr)
def test_empty_tensor_with_an_absurd_dimension_is_refused(shape: list[int]) -> None:
    # prod(shape) == 0 matches the empty byte string, but no such array can exist
    reject(dense(shape, 85, b""), Reason.TOO_LARGE)
    reject(encode_sparse(tuple(shape), torch.zeros(0, dtype=torch.int64), torch.zeros(0)), Reason.TOO_LARGE)


@pytest.mark.parametrize("dim", [-(10**5000), 10**5000, 10**30, -(2**64)], ids=["-huge", "+huge", "1e30", "-2^64"])
def test_bignum_dimensions_are_rejected_cleanly(dim: int) -> None:
    # cbor2 encodes these as tag 2/3 bignums (or a 64-bit negative int); none is a dimension
    item = dense([0, dim], 85, b"")
    with pytest.raises(ProtocolError) as exc:
        decode_tensor(wire_roundtrip(item))
    assert exc.value.reason == Reason.BAD_TENSOR
    assert str(exc.value)  # the message itself must be printable


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_tensors_of_rejects_non_finite_values_in_every_float_dtype(dtype: torch.dtype, bad: float) -> None:
    t = torch.ones(3, 5, dtype=dtype)
    t[2, 4] = bad
    body = wire_roundtrip({"tensors": encode_state_dict({"ok": torch.ones(2, dtype=dtype), "t": t})})
    with pytest.raises(ProtocolError) as exc:
        messages.tensors_of(body)
    assert exc.value.reason == Reason.NON_FINITE and "'t'" in exc.value.detail
    assert messages.tensors_of(body, finite=False)["t"].isnan().any() == math.isnan(bad)


def test_tensors_of_checks_sparse_and_quantized_results_too() -> None:
    overflow = {"q": encode_quantized(torch.tensor([127], dtype=torch.int8), 1e308, 0)}  # -> inf in float32
    sparse_nan = {"s": encode_sparse((4,), torch.tensor([1]), torch.tensor([math.nan]))}
    for sd in (overflow, sparse_nan):
        with pytest.raises(ProtocolError) as exc:
            messages.tensors_of(wire_roundtrip({"tensors": sd}))
        assert exc.value.reason == Reason.NON_FINITE
    ints = {"i": torch.tensor([1, 2]), "u": torch.tensor([255], dtype=torch.uint8)}
    assert set(messages.tensors_of(wire_roundtrip({"tensors": encode_state_dict(ints)}))) == {"i", "u"}


# ------------------------------------------------------------------ per-block q8


def q8_blocks(codes: torch.Tensor, scales: torch.Tensor, block: int, zero: int = 0) -> dict:
    return encode_quantized(codes, scales, zero, block)


def test_q8_per_block_round_trip_including_a_short_last_block() -> None:
    codes = torch.arange(-50, 50, dtype=torch.int8).reshape(10, 10)
    scales = torch.tensor([0.5, 0.25, 2.0, 1e-3], dtype=torch.float32)  # blocks of 32: 32, 32, 32, 4
    item = wire_roundtrip(q8_blocks(codes, scales, 32, zero=1))
    assert set(item["q8"]) == {"scale", "zero", "codes", "block"} and item["q8"]["scale"].value[1].tag == 85
    out = decode_tensor(item)
    flat = codes.reshape(-1).to(torch.float32) - 1
    want = torch.cat([flat[0:32] * 0.5, flat[32:64] * 0.25, flat[64:96] * 2.0, flat[96:] * torch.tensor(1e-3)])
    assert out.dtype == torch.float32 and out.shape == (10, 10)
    assert torch.equal(out, want.reshape(10, 10))
    assert torch.equal(out, dequantize(codes, scales, 1, 32))
    empty = decode_tensor(wire_roundtrip(q8_blocks(torch.zeros(0, dtype=torch.int8), torch.zeros(0), 8)))
    assert empty.numel() == 0


def test_q8_per_tensor_scale_is_applied_in_float32() -> None:
    # PROTOCOL.md 8: the CBOR float64 scale is rounded to float32 first, then multiplied
    codes = torch.tensor([127, -3, 1], dtype=torch.int8)
    out = decode_tensor(wire_roundtrip(encode_quantized(codes, 0.1, 0)))
    assert torch.equal(out, codes.to(torch.float32) * torch.tensor(0.1, dtype=torch.float32))


def test_q8_per_block_rejections() -> None:
    codes = torch.ones(10, dtype=torch.int8)
    item = encode_quantized(codes, torch.ones(3), 0, 4)["q8"]
    dense_scale = item["scale"]
    reject({"q8": {**item, "block": 0}}, Reason.BAD_TENSOR)
    reject({"q8": {**item, "block": 1.0}}, Reason.BAD_TENSOR)
    reject({"q8": {**item, "block": 5}}, Reason.BAD_TENSOR)  # 2 blocks, 3 scales
    reject({"q8": {**item, "scale": 1.0}}, Reason.BAD_TENSOR)  # block needs a scale array
    reject({"q8": {k: v for k, v in item.items() if k != "block"}}, Reason.BAD_TENSOR)  # an array needs block
    reject({"q8": {**item, "scale": encode_tensor(torch.ones(3, dtype=torch.float64))}}, Reason.BAD_TENSOR)
    reject({"q8": {**item, "scale": encode_tensor(torch.ones(1, 3))}}, Reason.BAD_TENSOR)
    reject({"q8": {**item, "scale": encode_tensor(torch.tensor([1.0, math.inf, 1.0]))}}, Reason.BAD_TENSOR)
    reject({"q8": {**item, "extra": 1}}, Reason.BAD_TENSOR)
    assert dense_scale.value[1].tag == 85
    with pytest.raises(ValueError):
        encode_quantized(codes, torch.ones(2), 0, 4)


@pytest.mark.parametrize("block", [2**40, 2**63 - 1, 2**64 - 1], ids=["2^40", "2^63-1", "2^64-1"])
def test_q8_with_a_huge_block_allocates_nothing_of_that_size(block: int) -> None:
    item = {"q8": {"scale": encode_tensor(torch.tensor([0.5])), "zero": 0,
                   "codes": encode_tensor(torch.tensor([2, -4], dtype=torch.int8)), "block": block}}
    assert decode_tensor(wire_roundtrip(item)).tolist() == [1.0, -2.0]
    reject({"q8": {**item["q8"], "block": 2**64 + 1}}, Reason.BAD_TENSOR)  # a bignum is no uint


# ------------------------------------------------------------------ expected spec, limits per model

MODEL = {"0.weight": torch.zeros(16, 64), "0.bias": torch.zeros(16), "2.weight": torch.zeros(10, 16),
         "2.bias": torch.zeros(10)}
SPEC = spec_of(MODEL)


def every_form(shape: tuple[int, ...]) -> dict[str, Any]:
    n = math.prod(shape)
    all_idx = torch.arange(n, dtype=torch.int32)
    return {
        "f32": encode_tensor(torch.ones(shape)),
        "f16": encode_tensor(torch.ones(shape, dtype=torch.float16)),
        "bf16": encode_tensor(torch.ones(shape, dtype=torch.bfloat16)),
        "q8": encode_quantized(torch.ones(shape, dtype=torch.int8), 0.5, 0),
        "q8-blocks": encode_quantized(torch.ones(shape, dtype=torch.int8), torch.ones(-(-n // 4)), 0, 4),
        "coo-dense": encode_sparse(shape, all_idx, torch.ones(n)),  # k = n: the largest legit claim
        "coo-q8": encode_sparse(shape, all_idx[:3], encode_quantized(torch.ones(3, dtype=torch.int8), 0.5, 0)),
        "coo-f16": encode_sparse(shape, all_idx[:3], torch.ones(3, dtype=torch.float16)),
    }


@pytest.mark.parametrize("form", list(every_form((2,))))
def test_every_wire_form_of_the_model_fits_tight_limits_and_the_spec(form: str) -> None:
    limits = Limits.for_model(MODEL)
    items = {name: every_form(shape)[form] for name, (shape, _) in SPEC.items()}
    out = as_float32_state(decode_state_dict(wire_roundtrip(items), limits, expected=SPEC))
    assert spec_of(out) == SPEC


def test_limits_for_model() -> None:
    limits = Limits.for_model(MODEL)
    assert limits == Limits(max_elements=1024, max_total_elements=3 * (1024 + 16 + 160 + 10),
                            max_tensors=4, max_ndim=2)
    assert Limits.for_model(SPEC) == limits
    assert Limits.for_model({}) == Limits(max_elements=1, max_total_elements=1, max_tensors=1, max_ndim=1)
    with pytest.raises(ProtocolError) as exc:  # a fifth tensor
        decode_state_dict(wire_roundtrip(encode_state_dict({**MODEL, "x": torch.zeros(1)})), limits)
    assert exc.value.reason == Reason.TOO_LARGE


@pytest.mark.parametrize(("change", "why"), [
    (lambda sd: {k: v for k, v in sd.items() if k != "0.bias"}, "missing"),
    (lambda sd: {**sd, "3.weight": torch.zeros(1)}, "unexpected"),
    (lambda sd: {**sd, "0.bias": torch.zeros(17)}, "shape"),
    (lambda sd: {**sd, "0.bias": torch.zeros(4, 4)}, "same size, other shape"),
    (lambda sd: {**sd, "0.bias": torch.zeros(16, dtype=torch.float64)}, "float64"),
    (lambda sd: {**sd, "0.bias": torch.zeros(16, dtype=torch.int32)}, "int"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_expected_spec_rejects_names_shapes_and_dtypes(change: Any, why: str) -> None:
    with pytest.raises(ProtocolError) as exc:
        decode_state_dict(wire_roundtrip(encode_state_dict(change(dict(MODEL)))), expected=SPEC)
    assert exc.value.reason == Reason.BAD_TENSOR, why


def test_partial_admits_a_subset_and_messages_pass_the_spec_through() -> None:
    sub = {"2.bias": torch.ones(10)}
    assert set(decode_state_dict(wire_roundtrip(encode_state_dict(sub)), expected=SPEC, partial=True)) == {"2.bias"}
    body = wire_roundtrip({"tensors": encode_state_dict(sub)})
    with pytest.raises(ProtocolError):
        messages.tensors_of(body, expected=SPEC)
    assert set(messages.tensors_of(body, expected=SPEC, partial=True)) == {"2.bias"}


def test_as_float32_state_widens_16_bit_floats_only() -> None:
    sd = {"h": torch.tensor([1.5], dtype=torch.float16), "b": torch.tensor([-2.0], dtype=torch.bfloat16),
          "f": torch.tensor([3.0]), "d": torch.tensor([4.0], dtype=torch.float64), "i": torch.tensor([5])}
    out = as_float32_state(sd)
    assert {k: v.dtype for k, v in out.items()} == {"h": torch.float32, "b": torch.float32, "f": torch.float32,
                                                    "d": torch.float64, "i": torch.int64}
    assert [float(v) for v in out.values()] == [1.5, -2.0, 3.0, 4.0, 5.0]
    assert out["f"] is sd["f"]


def test_coo_with_more_indices_than_elements_is_refused() -> None:
    reject(encode_sparse((2,), torch.tensor([0, 1, 1]), torch.ones(3)), Reason.BAD_TENSOR)


def test_sparse_claims_are_all_counted_before_any_is_densified() -> None:
    # Three coo claims fit the budget, the fourth does not: nothing may be built before
    # the fourth is seen (the claims, not the allocations, exhaust the budget).
    limits = Limits(max_elements=1000, max_total_elements=3500)
    sd = {f"t{i}": encode_sparse((1000,), torch.tensor([0]), torch.ones(1)) for i in range(4)}
    built = []
    real_zeros = torch.zeros

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        built.append(args)
        return real_zeros(*args, **kwargs)

    torch.zeros = spy
    try:
        with pytest.raises(ProtocolError) as exc:
            decode_state_dict(wire_roundtrip(sd), limits)
    finally:
        torch.zeros = real_zeros
    assert exc.value.reason == Reason.TOO_LARGE and built == []


# ------------------------------------------------------------------ the decompression bomb (issue 11, item 6)

BOMB_SCRIPT = r"""
import json, resource, sys
import cbor2, torch
from fedmq.common import envelope, messages
from fedmq.common.errors import ProtocolError
from fedmq.common.tensors import Limits, encode_sparse, spec_of

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB

# the model the master expects (the reference MLP) and the attack: four coo tensors
# of shape [8192, 8192] float64 with a handful of indices, under the model's names
model = {"0.weight": torch.zeros(128, 64), "0.bias": torch.zeros(128), "2.weight": torch.zeros(10, 128),
         "2.bias": torch.zeros(10)}
idx = torch.tensor([0, 1, 8192 * 8192 - 1], dtype=torch.int32)
bomb = {name: encode_sparse((8192, 8192), idx, torch.ones(3, dtype=torch.float64)) for name in model}
raw = cbor2.dumps({"tensors": bomb})
body = envelope.loads(raw)
results = {"bytes": len(raw)}
before = peak_mb()
for label, kwargs in [("defaults", {}), ("spec", {"expected": spec_of(model)}),
                      ("model", {"limits": Limits.for_model(model), "expected": spec_of(model)})]:
    try:
        messages.tensors_of(body, **kwargs)
        results[label] = "accepted"
    except ProtocolError as exc:
        results[label] = exc.reason
results["growth_mb"] = peak_mb() - before
print(json.dumps(results))
"""


def test_the_sparse_decompression_bomb_is_refused_before_allocation() -> None:
    proc = subprocess.run([sys.executable, "-c", BOMB_SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["bytes"] < 1024  # ~ the 719-byte signed update of the report, minus the envelope
    assert result["defaults"] == Reason.TOO_LARGE  # 4 × 64 Mi claimed + indices > 256 Mi per message
    assert result["spec"] == Reason.BAD_TENSOR  # shapes are not the model's
    assert result["model"] == Reason.TOO_LARGE  # larger than any tensor of the model
    assert result["growth_mb"] < 50, result  # was +1.5 GB
