"""The master core's interface, presented by a part that drives an inner `MasterCore`.

The master daemon (master/daemon.py) drives whatever its `_make_core` returns through
these entry points. The sharded root (master/sharded.py) and the relay
(relay/core.py) each wrap a MasterCore to add a capability -- partial sums from
workers, an upstream job -- without a branch inside the MasterCore: they take the
messages that are theirs, hand everything else on, and add to the effects that come
back (`_after`).
"""

from __future__ import annotations

from typing import Any, Mapping

from fedmq.common.channel import Received
from fedmq.common.effects import Effect

from .core import MasterCore


class ComposedMaster:
    def __init__(self, master: MasterCore) -> None:
        self.master = master

    # The read-only views the daemon, tests and benches use.
    version = property(lambda self: self.master.version)
    params = property(lambda self: self.master.params)
    round = property(lambda self: self.master.round)
    round_number = property(lambda self: self.master.round_number)
    slaves = property(lambda self: self.master.slaves)
    state = property(lambda self: self.master.state)
    history = property(lambda self: self.master.history)
    layout = property(lambda self: self.master.layout)

    def start(self, now: float) -> list[Effect]:
        return self._after(self.master.start(now), now)

    def on_message(self, msg: Received, now: float, token: Any = None) -> list[Effect]:
        return self._after(self.master.on_message(msg, now, token), now)

    def on_rejected(self, reason: str, sender: str | None, now: float, detail: str = "") -> list[Effect]:
        return self._after(self.master.on_rejected(reason, sender, now, detail), now)

    def on_connection(self, up: bool, now: float) -> list[Effect]:
        return self._after(self.master.on_connection(up, now), now)

    def on_keys_added(self, names: list[str], now: float) -> list[Effect]:
        return self._after(self.master.on_keys_added(names, now), now)

    def tick(self, now: float) -> list[Effect]:
        return self._after(self.master.tick(now), now)

    def note_published(self, kind: str, nbytes: int) -> None:
        self.master.note_published(kind, nbytes)

    def replay(self, record: Mapping[str, Any]) -> None:
        self.master.replay(record)

    def restore(self, state: Mapping[str, Any]) -> None:
        self.master.restore(state)

    def checkpoint_state(self) -> dict[str, Any]:
        return self.master.checkpoint_state()

    def _after(self, fx: list[Effect], now: float) -> list[Effect]:
        """What the composing part adds once the inner core has acted."""
        return fx
