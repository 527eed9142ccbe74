"""`fedmq worker -c job.toml --id W`: an aggregator worker of a sharded job, wired to MQTT and its journal.

The worker subscribes to the job's updates through the shared subscription
`$share/GROUP/PREFIX/JOB/update/+` (MQTT 5: the broker hands each update to one
member of the group) and to the root's retained `round` and `collect`. It verifies
updates with the slaves' allowlisted keys, journals what its core accepts and
acknowledges it only once the journal is on disk (group commit, as the master
does), and sends its `tally` only then too: a crash loses nothing it acknowledged
or reported. The state file (`worker.cbor`) holds the run, version and round the
journal belongs to, the replay table and the next sequence number; it is replaced,
and the journal emptied, when a new version makes what the worker held obsolete.

A worker that stops cleanly keeps its MQTT session: the broker goes on handing it
its share of the updates, which wait for it. Restart it (systemd does), or see
docs/OPERATIONS.md for retiring one for good.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import cbor2
import torch

from fedmq.common.channel import Inbox, Sealer, initial_seq
from fedmq.common.effects import Ack, Checkpoint, Effect, Interpreter, Journal, Log, Publish
from fedmq.common.errors import ConfigError, ProtocolError, Reason
from fedmq.common.jobconfig import JobConfig
from fedmq.common.keys import KeyRing, load_identity, load_public_key
from fedmq.common.modelspec import build_model
from fedmq.common.shell import HEARTBEAT_FILE, GroupCommit, JournalFile, Shell, read_cbor_file, write_atomic
from fedmq.common.topics import worker_client_id

from .daemon import JOURNAL, KEYS_CHECK_SECONDS
from .job import make_job_strategy
from .sharded import check_shardable
from .worker import WORKER_EFFECTS, WorkerCore

STATE = "worker.cbor"


class WorkerDaemon:
    def __init__(self, cfg: JobConfig, worker: str, *, key: Path | None = None, state_dir: Path | None = None,
                 log: logging.Logger | None = None, threads: int = 1) -> None:
        shard = cfg.shard
        if shard is None:
            raise ConfigError("fedmq worker: the job file has no [shard] table (which workers share its updates)")
        if worker not in shard.workers:
            raise ConfigError(f"fedmq worker: {worker!r} is not one of [shard] workers ({', '.join(shard.workers)})")
        if cfg.broker.protocol != "5":
            raise ConfigError("fedmq worker: shared subscriptions need MQTT 5 (broker.protocol = \"5\")")
        strategy = make_job_strategy(cfg)
        check_shardable(cfg, strategy)
        assert cfg.slave_keys is not None  # allowlist mode: check_shardable
        self.cfg, self.worker = cfg, worker
        self.log = log or logging.getLogger(f"fedmq.worker.{worker}")
        torch.set_num_threads(threads)
        identity = load_identity(key or shard.worker_key(worker), name=worker)
        self.master_key = load_public_key(shard.master_pub)
        self.state_dir = state_dir or cfg.state_dir / f"worker-{worker}"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.journal = JournalFile(self.state_dir / JOURNAL)
        self.core = WorkerCore(cfg, worker, build_model(cfg.model), strategy, reread=self.journal.records)
        inbox = Inbox(self._keyring(), cfg.job)
        state = read_cbor_file(self.state_dir / STATE) or {}
        if state:
            self.core.restore(state)
            inbox.load_replay_state(state.get("replay", []))
        replayed = 0
        for record in self.journal.records():
            self.core.replay(record)
            replayed += 1
        if replayed:
            self.log.info("journal: %d update(s) of version %d held again", replayed, self.core.version)
        sealer = Sealer(identity, cfg.job, seq=initial_seq(time.time(), state.get("seq", 0)), chunk_size=cfg.chunk_size)
        self.shell = Shell(cfg.broker, worker_client_id(worker, cfg.job), sealer, inbox, self.log, manual_ack=True,
                           heartbeat=self.state_dir / HEARTBEAT_FILE)
        topics = cfg.topics
        self.shell.transport.subscribe(topics.shared_updates(shard.group), qos=1)
        for name in ("round", "collect"):  # retained: a new process needs them whatever its session holds
            self.shell.transport.subscribe(topics.master(name), qos=1, bootstrap=True)
            self.shell.transport.subscribe(topics.master(name) + "/chunk/+", qos=1, bootstrap=True)
        self.acks = GroupCommit(self.journal, self.shell.transport.ack)
        self._keys_checked = time.time()
        self._now = 0.0
        self._interpret = Interpreter({
            Publish: self._publish,
            Journal: lambda fx: self.journal.append(fx.record, fx.raw_body),
            Ack: lambda fx: self.acks.ack(fx.token, time.monotonic()),
            Checkpoint: self._checkpoint,
            Log: self.shell.log_effect,
        }, covers=WORKER_EFFECTS)

    def _keyring(self) -> KeyRing:
        """The slaves' allowlisted keys, and the master's, which signs rounds and collect requests."""
        assert self.cfg.slave_keys is not None
        ring = KeyRing.from_dir(self.cfg.slave_keys)
        ring.add(self.cfg.master_name, self.master_key)
        return ring

    def run(self) -> None:
        now = time.time()
        self.apply(self.core.start(now), now)
        self.log.info("worker %s of job %s: updates through %s", self.worker, self.cfg.job,
                      self.cfg.topics.shared_updates(self.cfg.shard.group))  # type: ignore[union-attr]
        try:
            self.shell.run(self.handle, self.tick)
        finally:
            self.acks.commit()
            self.shell.close()
            self.journal.close()

    def handle(self, kind: str, value: Any, now: float) -> None:
        if kind == "msg":
            self._handle_message(value, now)
        idle = self.shell.events.empty()
        if self.acks.due(time.monotonic(), idle=idle):
            self.acks.commit()
        if idle:  # a burst is over: what it brought is journaled, tell the root
            self.apply(self.core.flush(now), now)

    def _handle_message(self, value: Any, now: float) -> None:
        try:
            received = self.shell.receive(value, now)
        except ProtocolError as exc:
            if exc.reason == Reason.REPLAY and value.dup:  # the broker resending what was received (the ack got lost)
                self.log.info("redelivered message on %s already received; dropped", value.topic)
            else:
                self.shell.log_rejection(value, exc)
            self.acks.ack(value, time.monotonic())
            return
        if received is None:  # one chunk of a message still incomplete
            self.acks.ack(value, time.monotonic())
            return
        self.apply(self.core.on_message(received, now, token=value), now)

    def tick(self, now: float) -> None:
        if now - self._keys_checked >= KEYS_CHECK_SECONDS:
            self._keys_checked = now
            try:  # keys added to (or removed from) the allowlist take effect without a restart
                self.shell.inbox.keyring.update_from(self._keyring())
            except (ConfigError, OSError, ValueError) as exc:
                self.log.warning("allowlist %s not re-read: %s", self.cfg.slave_keys, exc)
        self.apply(self.core.tick(now), now)
        self.acks.commit()
        self.apply(self.core.flush(now), now)

    def apply(self, effects: list[Effect], now: float) -> None:
        self._now = now
        self._interpret(effects)

    def _publish(self, fx: Publish) -> None:
        if self.journal.dirty:  # durable before acted on: a tally names only journaled updates
            self.acks.commit()
        self.shell.publish(fx, self._now)

    def _checkpoint(self, fx: Checkpoint) -> None:
        self.acks.commit()
        state = {**fx.state, "replay": self.shell.inbox.export_replay_state(), "seq": self.shell.sealer.next_seq}
        write_atomic(self.state_dir / STATE, cbor2.dumps(state))
        self.journal.truncate()
