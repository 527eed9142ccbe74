"""`fedmq monitor`: follow a job on the broker, verifying every signed message.

The on-call view: one JSON line per message (signed ones decoded and verified
against the public keys found anywhere below a directory, status/metrics JSON passed
through), so it can be read as it scrolls or piped into `jq`.
"""

from __future__ import annotations

import json
import logging
import queue
import time
from pathlib import Path
from typing import Any

import click

from fedmq.common import messages
from fedmq.common.brokerconfig import BrokerConfig
from fedmq.common.channel import Inbox
from fedmq.common.errors import ProtocolError
from fedmq.common.keys import KeyRing
from fedmq.common.topics import DEFAULT_PREFIX, Topics, split_chunk_topic
from fedmq.common.transport import Inbound, Transport

from .decode import _plain, describe_tensors
from .errors import user_errors
from .options import broker_options

JSON_TOPICS = ("status", "metrics", "alive")


def summarize(inbox: Inbox, msg: Inbound, now: float) -> dict[str, Any] | None:
    """One line for one delivery; None while a chunked message is incomplete."""
    line: dict[str, Any] = {"topic": msg.topic, "retained": msg.retain, "bytes": len(msg.payload)}
    if not msg.payload:
        return None
    if msg.topic.rpartition("/")[2] in JSON_TOPICS:
        try:
            return {**line, "json": json.loads(msg.payload)}
        except ValueError:
            return {**line, "error": "not JSON"}
    try:
        received = inbox.receive(split_chunk_topic(msg.topic), msg.payload, now, retained=msg.retain)
    except ProtocolError as exc:
        return {**line, "verified": False, "reason": exc.reason, "detail": exc.detail}
    if received is None:
        return None
    m = received.manifest
    line.update(verified=True, kind=m.kind, sender=m.sender, seq=m.seq, version=m.version, round=m.round,
                size=m.size, body={k: _plain(v) for k, v in received.body.items() if k not in ("tensors", "public_key")})
    if "tensors" in received.body:
        try:
            line["tensors"] = len(describe_tensors(received.body))
        except ProtocolError as exc:
            line.update(verified=False, reason=exc.reason)
    return line


def tool_logger(name: str, *, show: bool) -> logging.Logger:
    """The logger a tool gives its transport: the transport's (rate-limited) warnings on
    stderr as "NAME: message" if `show`, else none (the tool reports failures itself)."""
    log = logging.getLogger(name)
    if not log.handlers:
        handler = logging.StreamHandler() if show else logging.NullHandler()
        handler.setFormatter(logging.Formatter(f"{name.replace('.', ' ')}: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.WARNING)
        log.propagate = False
    return log


@click.command()
@click.option("--job", required=True, help="Job id.")
@click.option("--keys", "keys_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory of trusted NAME.pub files, searched recursively (e.g. keys/ holding "
                   "master.pub and slaves/NAME.pub).")
@click.option("--prefix", default=DEFAULT_PREFIX, show_default=True, help="Topic prefix.")
@broker_options
@click.option("--count", type=int, default=0, help="Exit after this many lines (0: run until Ctrl-C).")
@click.option("--seconds", type=float, default=0.0, help="Exit after this many seconds (0: no limit).")
@user_errors
def monitor(job: str, keys_dir: Path, prefix: str, broker: BrokerConfig, count: int, seconds: float) -> None:
    """Watch a job: every message on PREFIX/JOB/#, verified, as JSON lines."""
    topics = Topics(job, prefix)
    inbox = Inbox(KeyRing.from_tree(keys_dir), job, self_signed=messages.SELF_SIGNED_KINDS)
    lines: queue.Queue[Inbound] = queue.Queue()
    transport = Transport(broker, f"fedmq-monitor-{time.time_ns()}", lines.put, clean_start=True,
                          logger=tool_logger("fedmq.monitor", show=True))
    transport.subscribe(topics.everything, qos=1)
    transport.start()
    shown, end = 0, time.monotonic() + seconds if seconds else None
    try:
        while (not count or shown < count) and (end is None or time.monotonic() < end):
            try:
                msg = lines.get(timeout=0.2)
            except queue.Empty:
                continue
            line = summarize(inbox, msg, time.time())
            if line is not None:
                click.echo(json.dumps(line, default=str))
                shown += 1
    except KeyboardInterrupt:
        pass
    finally:
        transport.stop()
