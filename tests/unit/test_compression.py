"""Compression (common/compression.py): settings, lossy encoders, error feedback, model deltas.

Guards: the `[compression]` table and its wire form; that every compressed form
survives encode → cbor2 → decode and decodes to exactly what the sender says it
sent; the error-feedback invariant Σ update − Σ sent = residual and its bound, also
across a save/restore; and the downlink chain: keyframe + deltas reproduce the
master's copy of the devices' weights bit for bit, within the drift bound, and a
delta against the wrong base is refused.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import cbor2
import pytest
import torch

from fedmq.common import envelope, messages
from fedmq.common.channel import Inbox
from fedmq.common.compression import (
    Delta,
    DeviceModel,
    ErrorFeedback,
    Keyframe,
    WrongBase,
    apply_model_delta,
    compress_tensor,
    compress_tensors,
    delta_body,
    drift,
    encode_model_delta,
    encode_update,
    params_digest,
)
from fedmq.common.compression_settings import (
    PRESETS,
    CompressionSettings,
    Constraints,
    Downlink,
    Encoding,
    Uplink,
    parse_compression,
    preset,
)
from fedmq.common.errors import ConfigError, ProtocolError, Reason
from fedmq.common.keys import KeyRing, load_public_key
from fedmq.common.tensors import (
    Limits,
    as_float32_state,
    decode_state_dict,
    decode_tensor,
    encode_state_dict,
    spec_of,
)


def wire_roundtrip(item: Any) -> Any:
    return envelope.loads(cbor2.dumps(item))


def randn(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def mlp_params(seed: int = 0) -> dict[str, torch.Tensor]:
    return {"0.weight": randn(16, 64, seed=seed, scale=0.1), "0.bias": randn(16, seed=seed + 1, scale=0.1),
            "2.weight": randn(10, 16, seed=seed + 2, scale=0.1), "2.bias": randn(10, seed=seed + 3, scale=0.1)}


# ------------------------------------------------------------------ settings


def test_defaults_and_presets() -> None:
    assert parse_compression({}) == CompressionSettings() == preset("none")
    assert not CompressionSettings().uplink.lossy and not CompressionSettings().downlink.delta
    topk = preset("topk")
    assert topk.uplink == Uplink(topk=0.01, quantize="int8", block=256, error_feedback=True)
    assert topk.downlink.delta and topk.downlink.topk is not None
    assert preset("int8").uplink.quantize == "int8" and preset("int8").uplink.error_feedback
    lean = preset("lean")  # topk with rare keyframes
    assert lean.uplink == topk.uplink and lean.downlink.keyframe_every == 100
    assert lean.downlink == Downlink(delta=True, topk=topk.downlink.topk, quantize="int8", block=256, keyframe_every=100)
    assert set(PRESETS) == {"none", "int8", "topk", "lean"}
    with pytest.raises(ConfigError, match="preset 'zip'"):
        preset("zip")


def test_table_overrides_a_preset_and_error_feedback_defaults_to_lossy() -> None:
    s = parse_compression({"preset": "topk", "uplink": {"topk": 0.05}, "downlink": {"keyframe_every": 4},
                           "constraints": {"l1_mu": 1e-3, "change_budget": 0.1, "change_threshold": 1}})
    assert s.uplink == Uplink(topk=0.05, quantize="int8", block=256, error_feedback=True)
    assert s.downlink.keyframe_every == 4 and s.downlink.delta
    assert s.constraints == Constraints(l1_mu=1e-3, change_budget=0.1, change_threshold=1.0)
    assert isinstance(s.constraints.change_threshold, float)
    # error feedback: on when the uplink becomes lossy, off when it becomes lossless, unless said
    assert parse_compression({"uplink": {"quantize": "float16"}}).uplink.error_feedback is True
    assert parse_compression({"preset": "int8", "uplink": {"quantize": "none"}}).uplink.error_feedback is False
    assert parse_compression({"uplink": {"topk": 0.1, "error_feedback": False}}).uplink.error_feedback is False
    # a preset's int8 block goes away when quantize is overridden; an explicit one is an error
    assert parse_compression({"preset": "int8", "uplink": {"quantize": "bfloat16"}}).uplink.block == 0
    assert s.constraints.train_kwargs() == {"l1_mu": 1e-3, "change_budget": 0.1, "change_threshold": 1.0}


@pytest.mark.parametrize(("table", "key"), [
    ({"uplink": {"topk": 0}}, "compression.uplink.topk"),
    ({"uplink": {"topk": 1.5}}, "compression.uplink.topk"),
    ({"uplink": {"topk": True}}, "compression.uplink.topk"),
    ({"uplink": {"topk": "1%"}}, "compression.uplink.topk"),
    ({"uplink": {"quantize": "int4"}}, "compression.uplink.quantize"),
    ({"uplink": {"block": -1}}, "compression.uplink.block"),
    ({"uplink": {"block": 64, "quantize": "float16"}}, "compression.uplink.block"),
    ({"uplink": {"error_feedback": 1}}, "compression.uplink.error_feedback"),
    ({"uplink": {"delta": True}}, "compression.uplink.delta"),
    ({"downlink": {"keyframe_every": 0}}, "compression.downlink.keyframe_every"),
    ({"downlink": {"max_drift": -0.1}}, "compression.downlink.max_drift"),
    ({"downlink": {"max_drift": math.nan}}, "compression.downlink.max_drift"),
    ({"downlink": {"error_feedback": True}}, "compression.downlink.error_feedback"),
    ({"constraints": {"l1_mu": -1}}, "compression.constraints.l1_mu"),
    ({"constraints": {"change_budget": 2}}, "compression.constraints.change_budget"),
    ({"constraints": {"change_threshold": math.inf}}, "compression.constraints.change_threshold"),
    ({"preset": "zip"}, "compression.preset"),
    ({"uplinks": {}}, "compression.uplinks"),
    ({"uplink": 3}, "compression.uplink"),
])
def test_bad_settings_name_the_key(table: dict, key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_compression(table)
    assert str(exc.value).startswith(f"{key}:"), exc.value


def test_wire_form_round_trips_through_cbor_and_is_plain() -> None:
    custom = parse_compression({"uplink": {"topk": 0.2, "quantize": "bfloat16"},
                                "downlink": {"delta": True, "quantize": "float16", "max_drift": 0.5},
                                "constraints": {"change_budget": 0.25}})
    for settings in [*PRESETS.values(), custom]:
        raw = cbor2.dumps(settings.to_wire())
        assert json.loads(json.dumps(settings.to_wire())) == cbor2.loads(raw)  # plain data, no tags
        back = CompressionSettings.from_wire(cbor2.loads(raw))
        assert back == settings
    assert "topk" not in preset("none").to_wire()["uplink"]  # absent = dense


def test_from_wire_ignores_unknown_keys_and_rejects_bad_values_as_bad_body() -> None:
    wire = preset("topk").to_wire()
    wire["uplink"]["future_knob"] = 1
    wire["sideways"] = {}
    assert CompressionSettings.from_wire(wire) == preset("topk")
    wire["uplink"]["topk"] = 7.0
    with pytest.raises(ProtocolError) as exc:
        CompressionSettings.from_wire(wire)
    assert exc.value.reason == Reason.BAD_BODY and "topk" in exc.value.detail
    for junk in ([1, 2], {"preset": [1]}, {"uplink": {"quantize": [1]}}, {"downlink": 5}):
        with pytest.raises(ProtocolError) as exc:
            CompressionSettings.from_wire(junk)
        assert exc.value.reason == Reason.BAD_BODY
    assert CompressionSettings.from_wire({"uplink": {1: 2, "topk": 0.5}}).uplink.topk == 0.5


# ------------------------------------------------------------------ one tensor, every form

ENCODINGS = [Encoding(topk=t, quantize=q, block=b)
             for t in (None, 0.01, 0.3, 1.0) for q in ("none", "int8", "float16", "bfloat16")
             for b in ((0, 64) if q == "int8" else (0,))]


@pytest.mark.parametrize("enc", ENCODINGS, ids=repr)
@pytest.mark.parametrize("shape", [(32, 40), (7,), (), (0, 3)], ids=["32x40", "7", "scalar", "empty"])
def test_every_form_decodes_to_exactly_what_was_sent(enc: Encoding, shape: tuple[int, ...]) -> None:
    t = randn(*shape, seed=3)
    item, sent = compress_tensor(t, enc)
    assert sent.dtype == torch.float32 and sent.shape == t.shape
    decoded = as_float32_state({"t": decode_tensor(wire_roundtrip(item))})["t"]
    assert decoded.shape == t.shape and torch.equal(decoded, sent)
    n = t.numel()
    if enc.topk is not None and n:
        assert int((sent != 0).sum()) <= max(1, math.ceil(enc.topk * n))
    if enc.quantize == "none" and enc.topk is None:
        assert torch.equal(sent, t)  # lossless


def test_forms_on_the_wire() -> None:
    t = randn(64, 64, seed=1)
    item, _ = compress_tensor(t, Encoding(topk=0.01, quantize="int8", block=256))
    coo = item["coo"]
    assert coo["indices"].value[1].tag == 77  # int16 indices: the tensor has fewer than 32,768 entries
    assert set(coo["values"]["q8"]) == {"scale", "zero", "codes", "block"}
    item, _ = compress_tensor(t, Encoding(quantize="int8"))
    assert set(item["q8"]) == {"scale", "zero", "codes"} and isinstance(item["q8"]["scale"], float)
    item, _ = compress_tensor(t, Encoding(quantize="float16"))
    assert item.value[1].tag == 84
    item, _ = compress_tensor(t, Encoding(quantize="bfloat16"))
    assert item[0] == "bfloat16"
    item, _ = compress_tensor(t, Encoding(topk=0.9))  # sparse would be larger: dense, unselected zeroed
    assert item.tag == 40
    # lossless settings still send a mostly-zero tensor as coo
    sparse = torch.zeros(64, 64)
    sparse[3, 5] = 1.5
    item, sent = compress_tensor(sparse, Encoding())
    assert "coo" in item and torch.equal(sent, sparse)
    item, sent = compress_tensor(torch.zeros(100), Encoding(quantize="int8", block=8))
    assert "coo" in item and not sent.any()


def test_int8_error_is_half_a_step_per_block() -> None:
    t = randn(4096, seed=2)
    t[:256] *= 100  # one loud block must not blur the others
    for block in (0, 256):
        _, sent = compress_tensor(t, Encoding(quantize="int8", block=block))
        size = block or t.numel()
        for start in range(0, t.numel(), size):
            chunk = t[start:start + size]
            step = float(chunk.abs().max()) / 127
            assert float((sent[start:start + size] - chunk).abs().max()) <= step / 2 * (1 + 1e-5) + 1e-12
    _, per_tensor = compress_tensor(t, Encoding(quantize="int8"))
    _, per_block = compress_tensor(t, Encoding(quantize="int8", block=256))
    assert (per_block - t)[256:].abs().max() < 0.05 * (per_tensor - t)[256:].abs().max()


def test_float16_clamps_instead_of_overflowing_and_bad_input_is_refused() -> None:
    _, sent = compress_tensor(torch.tensor([1e6, -1e6, 1.0]), Encoding(quantize="float16"))
    assert sent.tolist() == [65504.0, -65504.0, 1.0]
    with pytest.raises(ValueError):
        compress_tensor(torch.tensor([1.0, math.nan]), Encoding())
    with pytest.raises(TypeError):
        compress_tensor(torch.tensor([1, 2]), Encoding())


def test_encode_update_decodes_through_tensors_of_with_the_model_spec() -> None:
    update = {k: v * 0.01 for k, v in mlp_params(5).items()}
    spec = spec_of(update)
    for settings in [p.uplink for p in PRESETS.values()] + [Uplink(quantize="float16"), Uplink(quantize="bfloat16")]:
        body = wire_roundtrip({"tensors": encode_update(update, settings)})
        got = as_float32_state(messages.tensors_of(body, expected=spec))
        assert spec_of(got) == spec
        _, sent = compress_tensors(update, settings)
        assert all(torch.equal(got[k], sent[k]) for k in update)


# ------------------------------------------------------------------ error feedback


def _rounds(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Updates with a persistent direction plus noise: what compression without
    feedback keeps getting wrong the same way."""
    drift_dir = {"w": randn(40, 50, seed=seed, scale=0.01), "b": randn(50, seed=seed + 1, scale=0.01)}
    return [{k: d + randn(*d.shape, seed=seed + 100 + r, scale=0.01) for k, d in drift_dir.items()}
            for r in range(n)]


def _norm(tensors: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values()))


def test_error_feedback_sum_of_sent_tracks_sum_of_updates() -> None:
    """Σ update − Σ sent = residual exactly (up to float32 rounding of the sums), and for
    top-k, a δ-contraction with δ = k/n: ‖x − C(x)‖ ≤ √(1−δ)‖x‖, the residual stays below
    √(1−δ)/(1−√(1−δ)) · max‖update‖ (Karimireddy et al. 2019, lemma 3) — per tensor,
    however many rounds. Without feedback the gap grows with the rounds."""
    enc = Uplink(topk=0.05, error_feedback=True)
    ef = ErrorFeedback(enc)
    updates = _rounds(200)
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in updates[0].items()}
    sent_total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in total.items()}
    no_feedback_gap = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in total.items()}
    for u in updates:
        wire, sent = ef.compress(u)
        assert all(torch.equal(decode_tensor(wire_roundtrip(wire[k])), sent[k]) for k in u)
        for k in u:
            total[k] += u[k].double()
            sent_total[k] += sent[k].double()
            no_feedback_gap[k] += (u[k] - compress_tensor(u[k], enc)[1]).double()
    for k in total:
        gap = total[k] - sent_total[k]
        assert torch.allclose(gap, ef.residual[k].double(), atol=1e-4), k
        delta = math.ceil(0.05 * gap.numel()) / gap.numel()
        q = math.sqrt(1 - delta)
        bound = q / (1 - q) * max(float(u[k].norm()) for u in updates)
        assert float(gap.norm()) <= bound, k
    assert ef.norm() == pytest.approx(_norm({k: total[k] - sent_total[k] for k in total}), rel=1e-4)
    assert _norm(no_feedback_gap) > 5 * ef.norm()  # what feedback saves, here


def test_error_feedback_with_int8_top_k_stays_bounded() -> None:
    ef = ErrorFeedback(preset("topk").uplink)
    updates = _rounds(300, seed=7)
    total = sent_total = 0.0
    norms = []
    for u in updates:
        _, sent = ef.compress(u)
        norms.append(ef.norm())
        total = total + u["w"].double()
        sent_total = sent_total + sent["w"].double()
    assert torch.allclose(total - sent_total, ef.residual["w"].double(), atol=1e-4)
    assert max(norms[150:]) < 1.5 * max(norms[:150])  # saturates instead of growing with the rounds


def test_error_feedback_survives_a_save_and_restore_bit_for_bit() -> None:
    enc = preset("topk").uplink
    updates = _rounds(60, seed=3)
    straight = ErrorFeedback(enc)
    expected = [straight.compress(u)[1] for u in updates]

    first = ErrorFeedback(enc)
    got = [first.compress(u)[1] for u in updates[:30]]
    saved = cbor2.dumps({"ef": first.state_dict()})  # as in the slave's state file
    second = ErrorFeedback(enc)
    second.load_state_dict(cbor2.loads(saved)["ef"])
    got += [second.compress(u)[1] for u in updates[30:]]
    assert all(torch.equal(g[k], e[k]) for g, e in zip(got, expected) for k in e)
    assert all(torch.equal(second.residual[k], straight.residual[k]) for k in straight.residual)


def test_error_feedback_state_errors_and_a_new_model_drops_the_residual() -> None:
    ef = ErrorFeedback(preset("topk").uplink)
    ef.compress({"w": torch.ones(100)})
    assert ef.norm() > 0
    for bad in (None, {"residual": [1]}, {"residual": {"w": b"junk"}}):
        with pytest.raises(ValueError):
            ErrorFeedback(ef.encoding).load_state_dict(bad)
    wire, sent = ef.compress({"w": torch.zeros(3, 3)})  # shape changed: old residual does not apply
    assert not sent["w"].any() and ef.norm() == 0


def test_encode_update_with_and_without_feedback() -> None:
    update = {"w": randn(50, 50, seed=9)}
    settings = preset("topk").uplink
    plain = encode_update(update, settings)
    ef = ErrorFeedback(settings)
    assert cbor2.dumps(encode_update(update, settings, ef)) == cbor2.dumps(plain)  # first round: nothing carried
    assert ef.norm() > 0
    assert cbor2.dumps(encode_update(update, settings, ef)) != cbor2.dumps(plain)


# ------------------------------------------------------------------ downlink deltas


def _device_receives(sent: Keyframe | Delta, held: dict[str, torch.Tensor] | None,
                     held_version: int | None) -> dict[str, torch.Tensor]:
    """What a device does with what the master sent (over CBOR)."""
    if isinstance(sent, Keyframe):
        return decode_state_dict(wire_roundtrip(encode_state_dict(sent.params)))
    assert held is not None and held_version is not None
    return apply_model_delta(held, wire_roundtrip(sent.body), held_version=held_version)


def _walk(versions: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Master weights moving as under training: a dense drift plus a few large changes."""
    w = mlp_params(seed)
    out = []
    for v in range(versions):
        w = {k: t + randn(*t.shape, seed=1000 * v + i, scale=0.002) for i, (k, t) in enumerate(w.items())}
        w["0.weight"][v % 16, :8] += 0.05
        out.append(w)
    return out


@pytest.mark.parametrize("settings", [preset("topk").downlink, preset("int8").downlink,
                                      Downlink(delta=True, quantize="float16", keyframe_every=5),
                                      Downlink(delta=True, topk=0.02, max_drift=0.2, keyframe_every=100)],
                         ids=["topk", "int8", "f16", "top2%"])
def test_keyframe_plus_deltas_reproduce_the_masters_device_copy_within_the_bound(settings: Downlink) -> None:
    tracker = DeviceModel(settings)
    held, held_version, since = None, None, 0
    kinds = []
    for version, master in enumerate(_walk(40)):
        sent = tracker.publish(version, master)
        kinds.append(type(sent).__name__)
        held = _device_receives(sent, held, held_version)
        held_version = version
        assert tracker.version == version
        assert all(torch.equal(held[k], tracker.params[k]) for k in master), version  # bit for bit
        assert drift(held, master) <= settings.max_drift
        since = 0 if isinstance(sent, Keyframe) else since + 1
        assert since < settings.keyframe_every
        if isinstance(sent, Keyframe):
            assert all(torch.equal(held[k], master[k]) for k in master)
    assert kinds[0] == "Keyframe" and "Delta" in kinds


def test_a_tight_drift_bound_forces_keyframes_and_no_delta_mode_sends_only_keyframes() -> None:
    walk = _walk(12)
    tight = DeviceModel(Downlink(delta=True, topk=0.01, max_drift=1e-6))
    assert all(isinstance(tight.publish(v, w), Keyframe) for v, w in enumerate(walk))
    off = DeviceModel(Downlink())
    assert all(isinstance(off.publish(v, w), Keyframe) for v, w in enumerate(walk))
    every = DeviceModel(Downlink(delta=True, keyframe_every=3, max_drift=math.inf))
    kinds = [type(every.publish(v, w)).__name__ for v, w in enumerate(walk)]
    assert kinds == ["Keyframe", "Delta", "Delta"] * 4


def test_device_model_checkpoint_round_trip() -> None:
    walk = _walk(15)
    a = DeviceModel(preset("topk").downlink)
    for v, w in enumerate(walk[:7]):
        a.publish(v, w)
    b = DeviceModel(preset("topk").downlink)
    b.load_state_dict(cbor2.loads(cbor2.dumps(a.state_dict())))
    for v, w in enumerate(walk[7:], start=7):
        x, y = a.publish(v, w), b.publish(v, w)
        assert type(x) is type(y) and cbor2.dumps(getattr(x, "body", None)) == cbor2.dumps(getattr(y, "body", None))


def test_a_delta_against_the_wrong_base_is_refused() -> None:
    prev, new = mlp_params(0), {k: v + 0.01 for k, v in mlp_params(0).items()}
    wire, applied = encode_model_delta(prev, new, preset("topk").downlink)
    body = wire_roundtrip(delta_body(4, prev, wire))
    assert set(body) == {"base_version", "base_digest", "tensors"} and len(body["base_digest"]) == 16
    got = apply_model_delta(prev, body, held_version=4)
    assert all(torch.equal(got[k], applied[k]) for k in prev)
    with pytest.raises(WrongBase, match="version 4"):
        apply_model_delta(prev, body, held_version=5)  # the device missed a delta
    other_run = mlp_params(1)  # same version number, other weights (e.g. a new run of the job)
    with pytest.raises(WrongBase, match="base_digest"):
        apply_model_delta(other_run, body, held_version=4)
    without_digest = {k: v for k, v in body.items() if k != "base_digest"}
    assert torch.equal(apply_model_delta(prev, without_digest, held_version=4)["0.bias"], applied["0.bias"])


def test_delta_leaves_out_unchanged_tensors_and_checks_tensors_against_the_model() -> None:
    prev = mlp_params(0)
    new = dict(prev, **{"2.bias": prev["2.bias"] + 1.0})
    wire, applied = encode_model_delta(prev, new, Downlink(delta=True, quantize="int8"))
    assert set(wire) == {"2.bias"}
    assert torch.equal(applied["0.weight"], prev["0.weight"])
    base_body = {"base_version": 1, "tensors": wire}
    bad_bodies = {
        "unknown name": {"x": wire["2.bias"]},
        "wrong shape": {"2.bias": compress_tensor(torch.ones(11), Encoding())[0]},
        "int values": {"2.bias": encode_state_dict({"t": torch.ones(10, dtype=torch.int32)})["t"]},
    }
    for what, tensors in bad_bodies.items():
        with pytest.raises(ProtocolError) as exc:
            apply_model_delta(prev, wire_roundtrip({**base_body, "tensors": tensors}), held_version=1)
        assert exc.value.reason == Reason.BAD_TENSOR, what
    overflow = {"2.bias": {"q8": {"scale": 3e38, "zero": 0,
                                  "codes": encode_state_dict({"c": torch.full((10,), 127, dtype=torch.int8)})["c"]}}}
    with pytest.raises(ProtocolError) as exc:
        apply_model_delta(prev, wire_roundtrip({**base_body, "tensors": overflow}), held_version=1)
    assert exc.value.reason == Reason.NON_FINITE


def test_drift_and_digest() -> None:
    m = mlp_params(0)
    assert drift(m, m) == 0.0
    shifted = {k: v * 1.1 for k, v in m.items()}
    assert drift(shifted, m) == pytest.approx(0.1, rel=1e-5)
    zeros = {k: torch.zeros_like(v) for k, v in m.items()}
    assert drift(m, zeros) == pytest.approx(_norm(m), rel=1e-6)  # absolute when the master is all zero
    assert params_digest(m) == params_digest(dict(reversed(list(m.items()))))  # order of the map does not matter
    nudged = dict(m, **{"2.bias": m["2.bias"].clone()})
    nudged["2.bias"][0] = torch.nextafter(nudged["2.bias"][0], torch.tensor(math.inf))
    assert params_digest(nudged) != params_digest(m)


# ------------------------------------------------------------------ the committed vectors (docs/vectors)

VECTORS = Path(__file__).resolve().parents[2] / "docs" / "vectors"


def _received(name: str):
    index = [e for e in json.loads((VECTORS / "index.json").read_text()) if e["file"].split(".")[0] == name]
    ring = KeyRing()
    ring.add(Path(index[0]["public_key"]).stem, load_public_key(VECTORS / index[0]["public_key"]))
    inbox = Inbox(ring, "digits")
    got = None
    for entry in index:
        got = inbox.receive(entry["topic"], (VECTORS / entry["file"]).read_bytes(), now=0.0)
    assert got is not None
    return got


def test_compressed_update_vectors_decode_to_the_vector_models_float32_state() -> None:
    model = as_float32_state(messages.tensors_of(_received("model").body))
    spec = spec_of(model)
    forms = {}
    for name in ("update-topk", "update-int8", "update-half"):
        body = _received(name).body
        got = as_float32_state(messages.tensors_of(body, Limits.for_model(spec), expected=spec))
        assert spec_of(got) == spec, name
        forms[name] = {k: next(iter(v)) if isinstance(v, dict) else type(v).__name__ for k, v in body["tensors"].items()}
    assert set(forms["update-topk"].values()) == {"coo"}
    assert set(forms["update-int8"].values()) == {"q8"}
    assert "coo" in forms["update-half"].values()


def test_the_delta_vector_applies_to_the_model_vector() -> None:
    """delta-q8 (version 4) is made against model.000/001 (version 3), base_digest included."""
    model = messages.tensors_of(_received("model").body)
    delta = _received("delta-q8")
    assert delta.body["base_version"] == 3 and delta.manifest.version == 4
    new = apply_model_delta(model, delta.body, held_version=3)
    assert drift(new, model) > 0
    with pytest.raises(WrongBase):
        apply_model_delta(model, delta.body, held_version=4)
