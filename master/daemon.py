"""`fedmq master run`: the master core wired to MQTT, a checkpoint and a journal.

On start it restores the last checkpoint (model, version, round, strategy state,
applied update ids, replay table) and re-admits the journaled updates of the round
in progress, then re-publishes its retained state. Updates are acknowledged to the
broker only after the core has journaled them (the effect order guarantees it), so a
crash loses nothing the broker handed over: unacknowledged messages are redelivered
to the persistent session, journaled ones are replayed from disk.

Journal records are fsync'd in batches (`GroupCommit`): every ack that follows an
unsynced record waits for the fsync that covers it, so a burst of updates costs one
fsync, not one each (docs/BENCHMARKS.md, "Master ingest").
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any, Callable

import cbor2
import torch

from fedmq.common import messages as M
from fedmq.common.channel import Inbox, Sealer, initial_seq
from fedmq.common.effects import (MASTER_EFFECTS, Ack, Checkpoint, Effect, Finish, Interpreter, Journal, Log, Publish,
                                  PublishJson, Trust)
from fedmq.common.errors import ConfigError, ProtocolError, Reason
from fedmq.common.jobconfig import JobConfig
from fedmq.common.keys import KeyRing, load_identity, public_key_from_raw
from fedmq.common.layout import Layout
from fedmq.common.privacy import epsilon_spent
from fedmq.common.shell import HEARTBEAT_FILE, GroupCommit, JournalFile, Shell, read_cbor_file, write_atomic
from fedmq.common.topics import master_client_id, split_chunk_topic
from fedmq.common.workload import load_local_data

from .core import MasterCore
from .job import make_job_strategy
from .jobmodel import job_model
from .prometheus import PrometheusExporter

CHECKPOINT = "checkpoint.cbor"
JOURNAL = "journal.cbor"
KEYS_CHECK_SECONDS = 5.0  # how often the allowlist directory is read again


def _evaluator(cfg: JobConfig):
    """Accuracy on the job's evaluation set, if it has one (the master never sees slave data).

    Tried once on the initial model here, so a set that does not fit the model stops the
    master at start with one line, not with a traceback at the first aggregation."""
    if not cfg.eval_data:
        return None
    dataset = load_local_data(cfg.eval_data)
    layout = Layout.of_job(cfg)  # a model with parts: each student, or each head on its task's rows
    model = layout.build()

    def run(params: dict[str, torch.Tensor]) -> dict[str, Any]:
        model.load_state_dict(params, strict=False)
        return layout.evaluate(model, dataset)

    if why := layout.data_misfit(model, dataset):
        raise ConfigError(f"master.eval {cfg.eval_data}: {why}")
    return run


class MasterDaemon:
    def __init__(self, cfg: JobConfig, log: logging.Logger | None = None, *, threads: int = 1,
                 metrics_port: int | None = None) -> None:
        self.cfg = cfg
        self.log = log or logging.getLogger("fedmq.master")
        torch.set_num_threads(threads)
        identity = load_identity(cfg.master_key, name=cfg.master_name)
        self.state_dir = cfg.state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        ring = KeyRing.from_dir(cfg.slave_keys) if cfg.enrollment == "allowlist" else KeyRing()
        if cfg.enrollment == "open":
            self.log.warning("enrollment mode 'open': any key that confirms is trusted (demos only)")
        if cfg.privacy is not None:
            epsilon_spent(cfg.privacy.noise_multiplier, 1.0, 1, cfg.privacy.delta)  # the accountant is installed
        self.core = self._make_core(cfg)
        inbox = Inbox(ring, cfg.job, self_signed=M.SELF_SIGNED_KINDS)
        checkpoint = read_cbor_file(self.state_dir / CHECKPOINT)
        if checkpoint is not None:
            self.core.restore(checkpoint)
            inbox.load_replay_state(checkpoint.get("replay", []))
            self.log.info("resumed from checkpoint: version %d, round %d", self.core.version, self.core.round_number)
        sealer = Sealer(identity, cfg.job, seq=initial_seq(time.time(), checkpoint.get("seq", 0) if checkpoint else 0),
                        chunk_size=cfg.chunk_size)
        self.journal = JournalFile(self.state_dir / JOURNAL)
        replayed = 0
        for record in self.journal.records():
            self.core.replay(record)
            replayed += 1
        if replayed:
            self.log.info("journal: %d record(s) re-admitted for version %d", replayed, self.core.version)
        self._learned: set[bytes] = set()  # keys trusted by open enrollment (not from the allowlist)
        for slave in self.core.slaves.values():
            if slave.public_key and cfg.enrollment == "open":
                self._learned.add(ring.add(slave.name, public_key_from_raw(slave.public_key)))
        self._keys_checked = 0.0
        self.shell = Shell(cfg.broker, master_client_id(cfg.job), sealer, inbox, self.log, manual_ack=True,
                           heartbeat=self.state_dir / HEARTBEAT_FILE)
        topics = cfg.topics
        self.alive_topic = topics.master("alive")
        self.shell.set_will(self.alive_topic, self._alive(False))
        for topic_filter in self._subscriptions():
            self.shell.transport.subscribe(topic_filter, qos=1)
        # its own retained messages, to put them back if anyone overwrites them (a junk
        # instruction would keep every new slave from enrolling)
        self._own_retained = {topics.master(name) for name in ("instruction", "model", "round")}
        self._own_retained |= {topics.model_part(p) for p in self.core.layout.parts if p}  # a model with parts
        for topic in sorted(self._own_retained):
            self.shell.transport.subscribe(topic, qos=1)
            self.shell.transport.subscribe(topic + "/chunk/+", qos=1)
        self.finished: str | None = None
        self.acks = GroupCommit(self.journal, self.shell.transport.ack)
        # Last, once nothing else can fail: Prometheus /metrics on 127.0.0.1:metrics_port,
        # fed with every status and metrics JSON the daemon publishes
        self.exporter: PrometheusExporter | None = None
        if metrics_port is not None:
            self.exporter = PrometheusExporter(cfg.job)
            self.exporter.start(metrics_port)
            self.log.info("Prometheus metrics on http://127.0.0.1:%d/metrics", metrics_port)
        self._now = 0.0
        self._interpret = self._interpreter()

    # Hooks for the daemons built on this one (the relay's, the sharded root's): the core
    # they drive, what they subscribe to, and the effects they handle besides these.

    def _make_core(self, cfg: JobConfig) -> MasterCore:
        # the whole model, or its parts (a fixed teacher's weights read from its file)
        return MasterCore(cfg, job_model(cfg), make_job_strategy(cfg), evaluate=_evaluator(cfg),
                          timer=time.perf_counter, run=uuid.uuid4().hex[:12])

    def _subscriptions(self) -> list[str]:
        return [self.cfg.topics.slaves(name) for name in ("confirm", "update", "presence")]

    def run(self) -> str | None:
        """Serve until the job finishes (returns why) or a signal stops the daemon (None)."""
        self.apply(self.core.start(time.time()), time.time())
        try:
            self.shell.run(self.handle, self.tick)
        finally:
            self.acks.commit()
            # a clean stop says goodbye itself: the broker does not send the will then
            self.shell.transport.publish(self.alive_topic, self._alive(False), qos=1, retain=True)
            self.shell.close()
            self.journal.close()
            if self.exporter is not None:
                self.exporter.close()
        return self.finished

    def _alive(self, alive: bool) -> bytes:
        """The retained liveness message (and, with alive false, the will): JSON for any MQTT tool."""
        return json.dumps({"job": self.cfg.job, "alive": alive, "since": round(time.time(), 3)}).encode()

    def tick(self, now: float) -> None:
        if self.cfg.enrollment == "allowlist" and now - self._keys_checked >= KEYS_CHECK_SECONDS:
            self._keys_checked = now
            self._reread_allowlist(now)
        self.shell.reassert_due(now)
        self.apply(self.core.tick(now), now)
        self.acks.commit()

    def _reread_allowlist(self, now: float) -> None:
        """Keys added to (or removed from) the allowlist directory take effect without a restart."""
        try:
            fresh = KeyRing.from_dir(self.cfg.slave_keys)
        except (ConfigError, OSError, ValueError) as exc:
            self.log.warning("allowlist %s not re-read: %s", self.cfg.slave_keys, exc)
            return
        added, removed = self.shell.inbox.keyring.update_from(fresh, keep=self._learned)
        if removed:
            self.log.warning("keys removed from the allowlist: %s (their messages are now rejected)", ", ".join(removed))
        if added:
            for name in added:  # a key added again starts afresh: a bad clock's lock-out is lifted
                self.shell.inbox.reset_sender(name)
            self.apply(self.core.on_keys_added(added, now), now)

    def handle(self, kind: str, value: Any, now: float) -> None:
        if kind == "msg":
            self._handle_message(value, now)
        elif kind == "connected":
            self.shell.transport.publish(self.alive_topic, self._alive(True), qos=1, retain=True)
            self.apply(self.core.on_connection(True, now), now)
        elif kind == "disconnected":
            self.apply(self.core.on_connection(False, now), now)
        elif kind == "expired":
            self.apply(self.core.on_rejected(Reason.CHUNK_TIMEOUT, value.sender, now,
                                             f"{value.kind} seq {value.seq}: {value.received}/{value.chunks} chunks"), now)
        if self.acks.due(time.monotonic(), idle=self.shell.events.empty()):
            self.acks.commit()

    def _handle_message(self, value: Any, now: float) -> None:
        if split_chunk_topic(value.topic) in self._own_retained:
            self.acks.ack(value, time.monotonic())
            self.shell.reassert(value, now)
            return
        try:
            received = self.shell.receive(value, now)
        except ProtocolError as exc:
            if exc.reason == Reason.REPLAY and value.dup:
                # The broker resending, after a reconnect, what it had delivered before and
                # not seen acknowledged (the ack was lost with the connection); this daemon
                # accepted it then, and journaled it if it was an update. Not an attack.
                self.log.info("redelivered message on %s already received; dropped", value.topic)
                self.acks.ack(value, time.monotonic())
                return
            self.shell.log_rejection(value, exc)
            parsed = self.cfg.topics.parse(value.topic)
            self.apply(self.core.on_rejected(exc.reason, parsed[1] if parsed else None, now), now)
            self.acks.ack(value, time.monotonic())
            return
        if received is None:
            self.acks.ack(value, time.monotonic())  # one chunk of a message still incomplete
            return
        self.apply(self.core.on_message(received, now, token=value), now)

    def apply(self, effects: list[Effect], now: float) -> None:
        self._now = now
        self._interpret(effects)

    def _checkpoint(self, fx: Checkpoint) -> None:
        self.acks.commit()  # the checkpoint truncates the journal: ack what it held first
        state = {**fx.state, "replay": self.shell.inbox.export_replay_state(), "seq": self.shell.sealer.next_seq}
        write_atomic(self.state_dir / CHECKPOINT, cbor2.dumps(state))
        self.journal.truncate()

    def _finish(self, fx: Finish) -> None:
        self.finished = fx.reason
        self.log.info("job %s finished: %s", self.cfg.job, fx.reason)
        self.shell.stop()

    def _publish(self, fx: Publish) -> None:
        if self.journal.dirty:  # durable before acted on: what the journal holds is on disk before anything goes out
            self.acks.commit()
        self.core.note_published(fx.kind, self.shell.publish(fx, self._now))

    def _publish_json(self, fx: PublishJson) -> None:
        self.shell.publish_json(fx)
        if self.exporter is not None:
            name = self.cfg.topics.parse(fx.topic)
            if name == ("status", None):
                self.exporter.on_status(fx.data)
            elif name == ("metrics", None):
                self.exporter.on_metrics(fx.data)

    def _interpreter(self) -> Interpreter:
        return Interpreter(self._handlers(), covers=MASTER_EFFECTS)

    def _handlers(self) -> dict[type, Callable[[Any], None]]:
        return {
            Publish: self._publish,
            PublishJson: self._publish_json,
            Journal: lambda fx: self.journal.append(fx.record, fx.raw_body),
            Ack: lambda fx: self.acks.ack(fx.token, time.monotonic()),
            Checkpoint: self._checkpoint,
            Trust: lambda fx: self.shell.inbox.keyring.add(fx.name, public_key_from_raw(fx.public_key)),
            Log: self.shell.log_effect,
            Finish: self._finish,
        }
