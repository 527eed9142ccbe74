"""`fedmq slave run`: the slave core wired to MQTT, a worker thread and a state file.

Local training runs on one worker thread so the loop keeps answering the broker
(keepalive, incoming rounds) while a device trains for seconds or minutes. The
session is persistent (clean_start off): QoS 1 messages published while the device
was offline are waiting when it reconnects. Presence is a retained, signed message;
the broker publishes the matching "offline" as this client's last will if it
vanishes without saying goodbye.

Chaos for fleet simulations: with `disconnect_rate` p, each local training starts,
with probability p, by dropping the broker connection uncleanly (the broker sends
the will, the master sees the slave go offline) and reconnecting after a random
0.5-3 s pause; the training goes on meanwhile and its update is sent on reconnect.
"""

from __future__ import annotations

import logging
import platform
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import cbor2
import torch
from torch.utils.data import Dataset

from fedmq.common import messages as M
from fedmq.common.channel import Inbox, Sealer, initial_seq
from fedmq.common.effects import SLAVE_EFFECTS, Effect, Interpreter, Log, Publish, SaveState, Subscribe, Train
from fedmq.common.errors import ProtocolError
from fedmq.common.jobconfig import SlaveConfig
from fedmq.common.keys import KeyRing, load_identity, load_public_key, raw_public_bytes
from fedmq.common.shell import HEARTBEAT_FILE, Shell, read_cbor_file, write_atomic
from fedmq.common.topics import slave_client_id
from fedmq.common.workload import data_misfit, load_local_data, task_counts

from .core import SlaveCore, run_training

STATE = "state.cbor"


class TrainingStopped(Exception):
    """Local training was interrupted because the daemon is stopping (not a failure)."""


class _Interruptible(Dataset):
    """The local data, read through a flag: once the daemon stops, the next sample read
    raises, so a SIGTERM ends local training within one batch instead of at its end."""

    def __init__(self, data: Dataset, stop: threading.Event) -> None:
        self.data, self.stop = data, stop
        self.tasks = getattr(data, "tasks", None)  # a task column ([multitask] jobs) reads through too

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        if self.stop.is_set():
            raise TrainingStopped
        return self.data[index]


class SlaveDaemon:
    def __init__(self, cfg: SlaveConfig, log: logging.Logger | None = None, *, threads: int = 1) -> None:
        self.cfg = cfg
        self.log = log or logging.getLogger(f"fedmq.slave.{cfg.slave_id}")
        torch.set_num_threads(threads)
        # torch's first optimizer imports torch._dynamo (about 1 s of CPU, far more on a
        # busy host). Paid here, it is not taken for local training time, which
        # `slowdown` multiplies: a slowed slave's first update came minutes late.
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
        identity = load_identity(cfg.key, name=cfg.slave_id)
        ring = KeyRing()
        ring.add(cfg.master_name, load_public_key(cfg.master_key))
        self.dataset = load_local_data(cfg.data)
        self.state_path = cfg.state_dir / STATE
        self.saved = read_cbor_file(self.state_path) or {}
        sealer = Sealer(identity, cfg.job, seq=initial_seq(time.time(), self.saved.get("seq", 0)))
        capabilities = {"update": list(cfg.update_kinds), "torch": torch.__version__, "machine": platform.machine()}
        self.core = SlaveCore(cfg, raw_public_bytes(identity.public_key), len(self.dataset), capabilities,
                              data_misfit=lambda model, task=None: data_misfit(model, self.dataset, task),
                              task_samples=task_counts(self.dataset))
        self.shell = Shell(cfg.broker, slave_client_id(cfg.slave_id, cfg.job), sealer, Inbox(ring, cfg.job), self.log,
                           heartbeat=cfg.state_dir / HEARTBEAT_FILE)
        self.presence_topic = cfg.topics.slave("presence", cfg.slave_id)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="train")
        self._online: bytes = b""
        self._arm_presence()
        self._chaos = random.Random()  # used on the worker thread only
        self._stopping = threading.Event()  # set when the daemon stops: training ends within a batch
        self._now = 0.0
        self._interpret = self._interpreter()

    def _arm_presence(self) -> None:
        """Seal the next connection's "online" and then its "offline" will, and register the will.

        A will is signed before it is needed, so its sequence number is fixed then.
        Per connection the presence topic carries online(k) < will(k) < online(k+1):
        the pair for the next connection is armed as soon as this one is up, so
        whether the broker sends the will or not, every presence message the
        master sees is newer than the last, and none is rejected as a replay.
        """
        now = time.time()
        self._online = self._presence("online", now)
        self.shell.set_will(self.presence_topic, self._presence("offline", now))

    def _presence(self, state: str, now: float) -> bytes:
        (payload,) = self.shell.sealer.seal(self.presence_topic, M.PRESENCE, {"state": state, "version": self.core.version},
                                            now=now)
        return payload

    def run(self) -> None:
        self.apply(self.core.start(time.time(), self.saved), time.time())
        try:
            self.shell.run(self.handle, lambda now: self.apply(self.core.tick(now), now))
        finally:
            self._stopping.set()
            self.worker.shutdown(wait=False, cancel_futures=True)
            # a clean stop says goodbye itself: the broker does not send the will then
            self.shell.transport.publish(self.presence_topic, self._presence("offline", time.time()), qos=1, retain=True)
            self.save()
            self.shell.close(flush_seconds=5.0)

    def handle(self, kind: str, value: Any, now: float) -> None:
        if kind == "connected":
            self.shell.transport.publish(self.presence_topic, self._online, qos=1, retain=True)
            self._arm_presence()
        elif kind == "msg":
            try:
                received = self.shell.receive(value, now)
                if received is not None:
                    self.apply(self.core.on_message(received, now), now)
            except ProtocolError as exc:
                self.shell.log_rejection(value, exc)
        elif kind == "trained":
            rnd, version, result = value
            self.apply(self.core.on_trained(rnd, version, result, now, bytes_in=self.shell.bytes_in), now)
        elif kind == "failed":
            rnd, error = value
            self.apply(self.core.on_training_failed(rnd, error), now)

    def apply(self, effects: list[Effect], now: float) -> None:
        self._now = now
        self._interpret(effects)

    def _subscribe(self, fx: Subscribe) -> None:
        # Retained, possibly chunked. `bootstrap`: a restarted slave resumes its session,
        # which already has these subscriptions, so the broker would not resend the
        # retained instruction, model and round -- which this process, unlike the
        # session, has never seen (PROTOCOL.md section 2: Retain Handling 0).
        chunked = self.cfg.topics.retained_chunked(fx.topic)  # instruction, round, model (or model/PART)
        for topic in (fx.topic, fx.topic + "/chunk/+") if chunked else (fx.topic,):
            self.shell.transport.subscribe(topic, fx.qos, bootstrap=chunked and fx.retained,
                                           skip_retained=not fx.retained)

    def _interpreter(self) -> Interpreter:
        return Interpreter({
            Publish: lambda fx: self.shell.publish(fx, self._now),
            Subscribe: self._subscribe,
            SaveState: lambda fx: self.save(fx.state),
            Train: lambda fx: self.worker.submit(self._train, fx),
            Log: self.shell.log_effect,
        }, covers=SLAVE_EFFECTS)

    def save(self, state: dict[str, Any] | None = None) -> None:
        state = {**(state or self.core.state()), "seq": self.shell.sealer.next_seq}
        write_atomic(self.state_path, cbor2.dumps(state))

    def _train(self, fx: Train) -> None:
        """Worker thread: train, stretch the time for simulated slow devices, report back."""
        rate = self.cfg.disconnect_rate
        if rate and self._chaos.random() < rate:
            self.shell.transport.drop(pause=self._chaos.uniform(0.5, 3.0))
        try:
            start = time.monotonic()
            result = run_training(self.core.instruction, fx.params, _Interruptible(self.dataset, self._stopping),
                                  seed=self.cfg.seed * 1_000_003 + fx.round)
            extra = (self.cfg.slowdown - 1.0) * (time.monotonic() - start)
            if extra > 0 and self._stopping.wait(extra):
                raise TrainingStopped
            self.shell.events.put(("trained", (fx.round, fx.version, result)))
        except TrainingStopped:
            self.log.info("round %d: local training stopped (the daemon is stopping)", fx.round)
        except Exception as exc:  # noqa: BLE001 - reported to the core, never kills the daemon
            self.log.exception("local training failed")
            self.shell.events.put(("failed", (fx.round, f"{type(exc).__name__}: {exc}")))
