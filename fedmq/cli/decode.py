"""`fedmq decode`: verify one captured message and print what it says, as JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from cbor2 import CBORTag

from fedmq.common import messages
from fedmq.common.channel import Inbox
from fedmq.common.envelope import parse
from fedmq.common.errors import ProtocolError
from fedmq.common.keys import KeyRing
from fedmq.common.tensors import describe

from .errors import user_errors


def _plain(value: Any) -> Any:
    """Body fields as JSON: bytes as hex, nested maps and arrays recursively."""
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, CBORTag):
        return {"tag": value.tag}
    return value


def decode_payloads(payloads: list[bytes], topic: str, keyring: KeyRing) -> dict[str, Any]:
    """Verify (and reassemble, if chunked) one message; a summary fit for JSON."""
    job = parse(payloads[0]).manifest_unverified().job  # decode checks keys, not which job
    # a captured message is checked for authenticity, not freshness: no clock, no seq bound
    inbox = Inbox(keyring, job, self_signed=messages.SELF_SIGNED_KINDS, max_seq_ahead=None)
    received = None
    for payload in payloads:
        received = inbox.receive(topic, payload, now=0.0)
    if received is None:
        raise ProtocolError("bad_chunk", f"message is chunked and only {len(payloads)} chunk(s) were given")
    manifest = {k: _plain(v) for k, v in vars(received.manifest).items()}
    body = {k: _plain(v) for k, v in received.body.items() if k != "tensors"}
    out: dict[str, Any] = {"topic": topic, "kind": received.kind, "verified": True,
                           "enrolled_key": received.enrolled, "manifest": manifest, "body": body}
    if "tensors" in received.body:
        out["tensors"] = describe(messages.tensors_of(received.body, finite=False))
    return out


@click.command()
@click.argument("files", nargs=-1, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--topic", required=True, help="The MQTT topic the message was published on (it is signed).")
@click.option("--keys", "keys_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory of trusted NAME.pub files.")
@user_errors
def decode(files: tuple[Path, ...], topic: str, keys_dir: Path) -> None:
    """Verify a captured message (FILES, or stdin) and print manifest and tensors as JSON.

    A chunked message is given as all its chunk files. Exit status 1 if the message
    is rejected, with the reason.
    """
    payloads = [f.read_bytes() for f in files] if files else [sys.stdin.buffer.read()]
    try:
        summary = decode_payloads(payloads, topic, KeyRing.from_dir(keys_dir))
    except ProtocolError as exc:
        click.echo(json.dumps({"verified": False, "reason": exc.reason, "detail": exc.detail}))
        raise SystemExit(1) from None
    click.echo(json.dumps(summary, indent=2))
