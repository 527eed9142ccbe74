"""`fedmq relay -c relay.toml`: the relay core wired to two MQTT connections, a checkpoint and a journal.

The site side is the master daemon as it is (checkpoint, journal with group commit,
allowlist, liveness, status, Prometheus), driving a `RelayCore`. The upstream side
is a `SlaveLink` -- the slave daemon's connection: presence and its will, retained
bootstrap, the state file -- on its own connection (another broker, or the same one
under another job). Both connections feed one event queue, so one loop thread runs
the one core: upstream events arrive tagged `up-`. Effects the core wraps in
`Upstream` go to the upstream connection; the rest are the site master's.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Callable

from fedmq.common.effects import SLAVE_EFFECTS, Interpreter, Log, Publish, SaveState, Subscribe, Train
from fedmq.common.errors import ProtocolError
from fedmq.common.jobconfig import JobConfig
from fedmq.common.keys import load_identity, raw_public_bytes
from fedmq.common.modelspec import build_model
from fedmq.master.core import MasterCore
from fedmq.master.daemon import MasterDaemon, _evaluator
from fedmq.master.job import make_job_strategy
from fedmq.slave.core import SlaveCore
from fedmq.slave.link import SlaveLink

from .config import RelayConfig
from .core import RelayCore, Upstream

UP = "up-"


class _Tagged:
    """Puts the upstream connection's events into the site connection's queue, tagged."""

    def __init__(self, target: Any) -> None:
        self.target = target

    def put(self, item: tuple[str, Any]) -> None:
        kind, value = item
        self.target.put((UP + kind, value))


class RelayDaemon(MasterDaemon):
    core: RelayCore

    def __init__(self, rcfg: RelayConfig, log: logging.Logger | None = None, *, threads: int = 1,
                 metrics_port: int | None = None) -> None:
        self.rcfg = rcfg
        super().__init__(rcfg.down, log or logging.getLogger("fedmq.relay"), threads=threads,
                         metrics_port=metrics_port)
        self.up_log = logging.getLogger(f"fedmq.relay.upstream.{rcfg.up.job}")
        self.link = SlaveLink(rcfg.up, self.up_log, events=_Tagged(self.shell.events), heartbeat=False)
        self.link.version = lambda: self.core.up.version
        self._up_interpret = Interpreter({
            Publish: lambda fx: self.link.publish(fx, self._now),
            Subscribe: self.link.subscribe,
            SaveState: lambda fx: self.link.save(fx.state),
            Log: lambda fx: self.up_log.log(logging.getLevelName(fx.level.upper()), fx.message),
        }, covers=SLAVE_EFFECTS - {Train})  # the core carries out Train itself

    def _make_core(self, cfg: JobConfig) -> RelayCore:  # type: ignore[override]
        up = self.rcfg.up
        public_key = raw_public_bytes(load_identity(up.key, name=up.slave_id).public_key)
        down = MasterCore(cfg, build_model(cfg.model), make_job_strategy(cfg), evaluate=_evaluator(cfg),
                          timer=time.perf_counter, run=uuid.uuid4().hex[:12])
        capabilities = {"update": list(up.update_kinds), "relay": {"job": cfg.job}}
        return RelayCore(down, SlaveCore(up, public_key, 0, capabilities), exchange_rounds=self.rcfg.exchange_rounds,
                         exchange_samples=self.rcfg.exchange_samples)

    def run(self) -> str | None:
        now = time.time()
        self.apply(self.core.up_start(now, self.link.saved), now)  # upstream subscriptions, before it connects
        self.link.shell.transport.start()
        try:
            return super().run()
        finally:
            self.link.close(self.core.up.state())

    def handle(self, kind: str, value: Any, now: float) -> None:
        if not kind.startswith(UP):
            super().handle(kind, value, now)
            return
        kind = kind[len(UP):]
        if kind == "connected":
            self.link.connected()
        elif kind == "msg":
            try:
                received = self.link.receive(value, now)
            except ProtocolError as exc:
                self.link.shell.log_rejection(value, exc)
                return
            if received is not None:
                self.core.up_bytes_in = self.link.shell.bytes_in
                self.apply(self.core.on_up_message(received, now), now)

    def tick(self, now: float) -> None:
        for gone in self.link.shell.inbox.expire(now):
            self.up_log.warning("dropped an incomplete %s from %s on %s after the timeout", gone.kind, gone.sender,
                                gone.topic)
        super().tick(now)

    def _handlers(self) -> dict[type, Callable[[Any], None]]:
        return {**super()._handlers(), Upstream: lambda fx: self._up_interpret([fx.effect])}
