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


def status_document(core: MasterCore, now: float) -> dict[str, Any]:
    rnd = core.round
    return {
        "job": core.cfg.job, "state": core.state, "version": core.version, "round": core.round_number,
        "rounds": core.cfg.rounds,
        "participants": rnd.participants if rnd else [],
        "received": sorted(u.sender for u in rnd.updates.values()) if rnd else [],
        "deadline": rnd.deadline if rnd else None,
        "last_accuracy": core.history[-1].get("accuracy") if core.history else None,
        "slaves": {n: {"enrolled": s.enrolled, "online": s.online, "samples": s.samples,
                       **({"declined": s.declined} if s.declined else {})} for n, s in sorted(core.slaves.items())},
        "not_enrolled": dict(sorted(core.not_enrolled.items())),
        "rejected": dict(sorted(core.rejected.items())),
        "duplicates": core.duplicates,
        "updated": round(now, 3),
    }


def metrics_row(rnd: RoundState, version: int, bytes_in: Mapping[str, int], now: float) -> dict[str, Any]:
    """The metrics of the version `rnd` made (before the evaluation and the schedule's extras)."""
    updates = list(rnd.updates.values())
    return {
        "round": rnd.number, "version": version, "updates": len(updates),
        "samples": sum(u.num_samples for u in updates), "seconds": round(now - rnd.started, 3),
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

    def publish_if_due(self, core: MasterCore, now: float) -> list[Effect]:
        return self.publish(core, now) if self.due and now - self._at >= self.coalesce else []
