"""What the master tells people: the retained JSON status and the metrics row of each version.

Both are unsigned JSON for `mosquitto_sub` and dashboards (docs/PROTOCOL.md section 10).
The status lists every slave, so changes the slaves cause (enrollment, presence) publish
it at most once per `coalesce` seconds and later ones on a tick: publishing it per change
would cost O(n) per join, O(n^2) for a fleet.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from fedmq.common.effects import Effect, PublishJson

from .schedule import RoundState

if TYPE_CHECKING:
    from .core import MasterCore


MAX_LISTED = 50  # names listed under not_enrolled (the rest are counted): anyone can make up names
MAX_TEXT = 200  # characters of any text a remote party chose (a decline reason)


def _text(value: str) -> str:
    return value if len(value) <= MAX_TEXT else value[:MAX_TEXT - 1] + "…"


def status_document(core: MasterCore, now: float) -> dict[str, Any]:
    """The status, bounded whatever remote parties send: it must always fit one MQTT packet."""
    rnd = core.round
    ignored = sorted(core.not_enrolled.items())
    return {
        "job": core.cfg.job, "state": core.state, "version": core.version, "round": core.round_number,
        "rounds": core.cfg.rounds,
        "participants": rnd.participants if rnd else [],
        "received": sorted(u.sender for u in rnd.updates.values()) if rnd else [],
        "deadline": rnd.deadline if rnd else None,
        "last_accuracy": core.history[-1].get("accuracy") if core.history else None,
        "slaves": {n: {"enrolled": s.enrolled, "online": s.online, "samples": s.samples,
                       **({"declined": _text(s.declined)} if s.declined else {}),
                       **({"parts": s.parts} if s.parts else {})}
                   for n, s in sorted(core.slaves.items()) if s.enrolled or s.declined or s.online},
        "not_enrolled": {n: _text(why) for n, why in ignored[:MAX_LISTED]},
        "not_enrolled_more": max(0, len(ignored) - MAX_LISTED),
        "rejected": dict(sorted(core.rejected.items())),
        "clipped": dict(sorted(core.intake.clipped.items())),
        "discarded": core.discarded,
        "duplicates": core.duplicates,
        "updated": round(now, 3),
    }


def metrics_row(rnd: RoundState, version: int, bytes_in: Mapping[str, int], now: float) -> dict[str, Any]:
    """The metrics of the version `rnd` made (before the evaluation and the schedule's extras)."""
    updates = list(rnd.updates.values())
    return {
        "round": rnd.number, "version": version, "updates": len(updates),
        "samples": sum(int(u.aggregation_weight) for u in updates), "seconds": round(now - rnd.started, 3),
        "update_ids": sorted(rnd.updates),
        "bytes_up": rnd.bytes_up,
        "bytes_down": sum(max(0, bytes_in[n] - base) for n, base in rnd.bytes_down_base.items()),
    }


class StatusBoard:
    """Publishes the retained status, coalescing changes the slaves cause."""

    def __init__(self, topic: str, coalesce: float) -> None:
        self.topic, self.coalesce = topic, coalesce
        self._at = float("-inf")
        self.due = False  # a change waits for the next tick

    def publish(self, core: MasterCore, now: float, *, force: bool = False) -> list[Effect]:
        if not force and now - self._at < self.coalesce:
            self.due = True
            return []
        self._at, self.due = now, False
        return [PublishJson(self.topic, status_document(core, now), retain=True)]

    def publish_if_due(self, core: MasterCore, now: float, *, heartbeat: float) -> list[Effect]:
        """A change that waited, or the heartbeat: at least every `heartbeat` seconds the
        status goes out again (its `updated` shows the master is alive, and counters such
        as rejections change without anything else changing)."""
        if now - self._at >= heartbeat or (self.due and now - self._at >= self.coalesce):
            return self.publish(core, now, force=True)
        return []
