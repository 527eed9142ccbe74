"""`fedmq monitor` lines: verified kinds from signed payloads, JSON passed through, rejections named."""

from __future__ import annotations

import json
from pathlib import Path

from fedmq.cli.monitor import summarize
from fedmq.common import messages
from fedmq.common.channel import Inbox
from fedmq.common.keys import KeyRing
from fedmq.common.transport import Inbound

VECTORS = Path(__file__).resolve().parents[2] / "docs" / "vectors"


def test_monitor_summarizes_every_vector_and_json() -> None:
    inbox = Inbox(KeyRing.from_dir(VECTORS), "digits", self_signed=messages.SELF_SIGNED_KINDS)
    index = json.loads((VECTORS / "index.json").read_text())
    kinds = set()
    for entry in index:
        payload = (VECTORS / entry["file"]).read_bytes()
        line = summarize(inbox, Inbound(entry["topic"], payload, 1, False, 1), now=0.0)
        if line is not None:  # None: a chunk of a message still incomplete
            assert line["verified"] is True and line["kind"] == entry["kind"], line
            kinds.add(line["kind"])
    assert kinds == set(messages.KINDS)
    status = summarize(inbox, Inbound("fedmq/digits/status", b'{"version": 3}', 1, True, 2), now=0.0)
    assert status["json"] == {"version": 3}


def test_monitor_names_the_rejection() -> None:
    inbox = Inbox(KeyRing.from_dir(VECTORS), "digits")
    payload = (VECTORS / "round.cbor").read_bytes()
    line = summarize(inbox, Inbound("fedmq/digits/model", payload, 1, False, 1), now=0.0)
    assert line["verified"] is False and line["reason"] == "wrong_topic"
