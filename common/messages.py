"""Message kinds: which topic each travels on, who sends it, and the shape of its body.

Every signed body is a CBOR map. `validate` checks a received body against its
kind's schema (required fields and their types) so the cores can rely on the shape
and never meet a surprise type; tensors inside are decoded separately, under
`tensors.Limits`, by `tensors_of`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from .errors import ProtocolError, Reason

if TYPE_CHECKING:  # torch only where tensors are decoded: reading a config must not load it
    import torch

    from .tensors import Limits, Spec

INSTRUCTION = "instruction"
CONFIRM = "confirm"
DECLINE = "decline"
MODEL = "model"
DELTA = "delta"
ROUND = "round"
UPDATE = "update"
PRESENCE = "presence"
RECONFIRM = "reconfirm"
TALLY = "tally"  # aggregator worker -> root: which updates it holds (sharded jobs, PROTOCOL.md 11.10)
PARTIAL = "partial"  # aggregator worker -> root: the sum of the updates it was asked for
COLLECT = "collect"  # root -> workers: which updates each must sum

UPDATE_KINDS = ("delta", "gradient", "student")


@dataclass(frozen=True)
class Kind:
    name: str
    topics: tuple[str, ...]  # topic names (see topics.py) it may travel on
    fields: Mapping[str, type | tuple[type, ...]]


_NUM = (int, float)

KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind(INSTRUCTION, ("instruction",), {
            "run": str, "task": str, "model": dict, "train": dict, "update": str, "requirements": dict,
            "round_policy": dict,
        }),
        Kind(CONFIRM, ("confirm",), {"public_key": bytes, "samples": int, "capabilities": dict}),
        Kind(DECLINE, ("confirm",), {"public_key": bytes, "reason": str}),
        Kind(MODEL, ("model", "to"), {"run": str, "tensors": dict}),
        Kind(DELTA, ("delta",), {"run": str, "base_version": int, "base_digest": bytes, "tensors": dict}),
        Kind(ROUND, ("round",), {"run": str, "participants": list, "received": list, "deadline": _NUM, "update": str}),
        Kind(UPDATE, ("update",), {
            "update_id": str, "kind": str, "base_version": int, "samples": int, "metrics": dict, "tensors": dict,
        }),
        Kind(PRESENCE, ("presence",), {"state": str, "version": int}),
        Kind(RECONFIRM, ("to",), {"run": str, "reason": str}),
        Kind(TALLY, ("partial",), {"run": str, "updates": list}),
        Kind(PARTIAL, ("partial",), {"run": str, "collect": int, "updates": list, "weight": _NUM, "tensors": dict}),
        Kind(COLLECT, ("collect",), {"run": str, "collect": int, "assign": dict, "deadline": _NUM}),
    )
}

SELF_SIGNED_KINDS = (CONFIRM, DECLINE)  # a slave's first words, before its key is known


def validate(kind: str, topic_name: str, body: Mapping[str, Any]) -> Kind:
    """Raise BAD_KIND / BAD_BODY unless `body` is a well-formed `kind` on that topic."""
    spec = KINDS.get(kind)
    if spec is None or topic_name not in spec.topics:
        raise ProtocolError(Reason.BAD_KIND, f"{kind!r} is not expected on a {topic_name!r} topic")
    for field, typ in spec.fields.items():
        value = body.get(field)
        if not isinstance(value, typ) or isinstance(value, bool) and typ in (int, _NUM):
            raise ProtocolError(Reason.BAD_BODY, f"{kind}.{field} missing or not {typ}")
    if kind == UPDATE and body["kind"] not in UPDATE_KINDS:
        raise ProtocolError(Reason.BAD_BODY, f"update.kind {body['kind']!r} not one of {UPDATE_KINDS}")
    if kind == PRESENCE and body["state"] not in ("online", "offline"):
        raise ProtocolError(Reason.BAD_BODY, "presence.state must be online or offline")
    return spec


def tensors_of(body: Mapping[str, Any], limits: Limits | None = None, *, finite: bool = True,
               expected: Spec | None = None, partial: bool = False) -> dict[str, torch.Tensor]:
    """Decode a body's `tensors` map (under `tensors.DEFAULT_LIMITS` unless `limits`);
    reject NaN/Inf where the receiver needs finite values.

    `expected`/`partial`: see `tensors.decode_state_dict` (names and shapes checked
    before anything is built)."""
    from .tensors import DEFAULT_LIMITS, all_finite, decode_state_dict

    tensors = decode_state_dict(body.get("tensors"), DEFAULT_LIMITS if limits is None else limits,
                                expected=expected, partial=partial)
    if finite:
        for name, t in tensors.items():
            if t.is_floating_point() and not all_finite(t):
                raise ProtocolError(Reason.NON_FINITE, f"tensor {name!r} holds NaN or Inf")
    return tensors


