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


def describe_tensors(body: Any) -> list[dict[str, Any]]:
    """Name, dtype and shape of each tensor of a verified body (imports torch: only when asked)."""
    from fedmq.common.tensors import describe

    return describe(messages.tensors_of(body, finite=False))


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
        out["tensors"] = describe_tensors(received.body)
    return out


@click.command()
@click.argument("files", nargs=-1, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--topic", required=True, help="The MQTT topic the message was published on (it is signed).")
@click.option("--keys", "keys_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory of trusted NAME.pub files, searched recursively.")
@user_errors
def decode(files: tuple[Path, ...], topic: str, keys_dir: Path) -> None:
    """Verify a captured message (FILES, or stdin) and print manifest and tensors as JSON.

    A chunked message is given as all its chunk files. Exit status 1 if the message
    is rejected, with the reason. Capture with `mosquitto_sub -N` (no newline added):
    a message that verifies only without a trailing newline is decoded, with a warning.
    """
    payloads = [f.read_bytes() for f in files] if files else [sys.stdin.buffer.read()]
    keyring = KeyRing.from_tree(keys_dir)
    try:
        summary = decode_payloads(payloads, topic, keyring)
    except ProtocolError as exc:
        summary = _without_newlines(payloads, topic, keyring)
        if summary is None:
            hint = ("; the input ends with a newline, which is not part of a message: "
                    "capture with mosquitto_sub -N" if any(p.endswith(b"\n") for p in payloads) else "")
            click.echo(json.dumps({"verified": False, "reason": exc.reason, "detail": exc.detail + hint}))
            raise SystemExit(1) from None
        click.echo("fedmq decode: warning: the input ends with a newline that is not part of the message "
                   "(mosquitto_sub adds one unless given -N); decoded without it", err=True)
    click.echo(json.dumps(summary, indent=2))


def _without_newlines(payloads: list[bytes], topic: str, keyring: KeyRing) -> dict[str, Any] | None:
    """The summary of the payloads with one trailing newline each removed, if that verifies."""
    if not any(p.endswith(b"\n") for p in payloads):
        return None
    try:
        return decode_payloads([p.removesuffix(b"\n") for p in payloads], topic, keyring)
    except ProtocolError:
        return None
