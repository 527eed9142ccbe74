"""`fedmq slave run`: the slave core wired to MQTT (slave/link.py), a worker thread and a state file.

Local training runs on one worker thread so the loop keeps answering the broker
(keepalive, incoming rounds) while a device trains for seconds or minutes. The
connection -- persistent session, presence and its will, the state file -- is the
`SlaveLink`, which the relay's upstream side shares.

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

import torch
from torch.utils.data import Dataset

from fedmq.common.effects import SLAVE_EFFECTS, Effect, Interpreter, Log, Publish, SaveState, Subscribe, Train
from fedmq.common.errors import ProtocolError
from fedmq.common.jobconfig import SlaveConfig
from fedmq.common.workload import data_misfit, load_local_data, task_counts

from .core import SlaveCore, run_training
from .link import SlaveLink


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
        self.dataset = load_local_data(cfg.data)
        self.link = SlaveLink(cfg, self.log)
        self.shell = self.link.shell
        capabilities = {"update": list(cfg.update_kinds), "torch": torch.__version__, "machine": platform.machine()}
        self.core = SlaveCore(cfg, self.link.public_key, len(self.dataset), capabilities,
                              data_misfit=lambda model, task=None: data_misfit(model, self.dataset, task),
                              task_samples=task_counts(self.dataset))
        self.link.version = lambda: self.core.version
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="train")
        self._chaos = random.Random()  # used on the worker thread only
        self._stopping = threading.Event()  # set when the daemon stops: training ends within a batch
        self._now = 0.0
        self._interpret = self._interpreter()

    def run(self) -> None:
        self.apply(self.core.start(time.time(), self.link.saved), time.time())
        try:
            self.shell.run(self.handle, lambda now: self.apply(self.core.tick(now), now))
        finally:
            self._stopping.set()
            self.worker.shutdown(wait=False, cancel_futures=True)
            self.link.close(self.core.state())

    def handle(self, kind: str, value: Any, now: float) -> None:
        if kind == "connected":
            self.link.connected()
        elif kind == "msg":
            try:
                received = self.link.receive(value, now)
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

    def _interpreter(self) -> Interpreter:
        return Interpreter({
            Publish: lambda fx: self.link.publish(fx, self._now),
            Subscribe: self.link.subscribe,
            SaveState: lambda fx: self.link.save(fx.state),
            Train: lambda fx: self.worker.submit(self._train, fx),
            Log: self.shell.log_effect,
        }, covers=SLAVE_EFFECTS)

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
