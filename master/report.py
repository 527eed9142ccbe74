"""What the master tells people: the retained JSON status and the metrics row of each version.

Both are unsigned JSON for `mosquitto_sub` and dashboards (docs/PROTOCOL.md section 10).
The status lists every slave, so changes the slaves cause (enrollment, presence) publish
it at most once per `coalesce` seconds and later ones on a tick: publishing it per change
would cost O(n) per join, O(n^2) for a fleet.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedmq.common.effects import Effect, PublishJson
from fedmq.common.privacy import epsilon_spent

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
        # once finished, the master stops following presence: "online" would go stale
        "slaves": {n: {"enrolled": s.enrolled, "online": None if core.phase.finished else s.online,
                       "samples": s.samples,
                       **({"declined": _text(s.declined)} if s.declined else {}),
                       **({"parts": s.parts} if s.parts else {})}  # a model with parts: those it trains
                   for n, s in sorted(core.slaves.items()) if s.enrolled or s.declined or s.online},
        "not_enrolled": {n: _text(why) for n, why in ignored[:MAX_LISTED]},
        "not_enrolled_more": max(0, len(ignored) - MAX_LISTED),
        "rejected": dict(sorted(core.rejected.items())),
        "clipped": dict(sorted(core.intake.clipped.items())),
        "discarded": core.discarded,
        "duplicates": core.duplicates,
        "traffic": core.traffic.total,
        **({"privacy": {**core.cfg.privacy.to_wire(), "epsilon": core.history[-1].get("epsilon", 0.0)
                        if core.history else 0.0}} if core.cfg.privacy is not None else {}),
        "downlink": {"keyframes": core.publisher.keyframes_sent, "deltas": core.publisher.deltas_sent,
                     "drift": round(core.publisher.drift(), 6)},
        "updated": round(now, 3),
    }


def version_row(core: MasterCore, rnd: RoundState, version: int, now: float) -> dict[str, Any]:
    """The metrics of the version `rnd` made: its updates, time, bytes, the schedule's
    extras, the ε spent under DP, and the evaluation if the master has a test set."""
    updates = list(rnd.updates.values())
    row: dict[str, Any] = {
        "round": rnd.number, "version": version, "updates": len(updates),
        "samples": sum(int(u.aggregation_weight) for u in updates), "seconds": round(now - rnd.started, 3),
        "update_ids": sorted(rnd.updates),
        "bytes_up": rnd.bytes_up,
        "bytes_down": sum(max(0, core.slaves[n].bytes_in - base) for n, base in rnd.bytes_down_base.items()),
        **core.schedule.row(updates, version),
        "aggregation_seconds": round(core._aggregation_seconds, 6),
        "traffic": core.traffic.take_round(),
    }
    if (dp := core.cfg.privacy) is not None:  # the slave that sent the most updates spent the most
        row["epsilon"] = epsilon_spent(dp.noise_multiplier, 1.0, max(core.contributions.values(), default=0), dp.delta)
    if core.evaluate is not None:
        scores = core.evaluate(core.store.params)
        row.update({k: float(scores[k]) for k in ("accuracy", "loss") if k in scores})
        if "part_accuracy" in scores:  # a model with parts: each part scored
            row["part_accuracy"] = dict(scores["part_accuracy"])
    return row


class Traffic:
    """Bytes on the wire by direction and message kind (envelope and chunks included):
    received as verified, and published as the shell reports them (one copy: the broker
    fans it out to every subscriber). Cumulative for the status, per version for the metrics."""

    def __init__(self) -> None:
        self.total: dict[str, dict[str, int]] = {"up": {}, "down": {}}
        self._round: dict[str, dict[str, int]] = {"up": {}, "down": {}}

    def _add(self, direction: str, kind: str, nbytes: int) -> None:
        for book in (self.total, self._round):
            book[direction][kind] = book[direction].get(kind, 0) + nbytes

    def received(self, kind: str, nbytes: int) -> None:
        self._add("up", kind, nbytes)

    def sent(self, kind: str, nbytes: int) -> None:
        self._add("down", kind, nbytes)

    def take_round(self) -> dict[str, dict[str, int]]:
        """What went by since the last version (and start counting the next one)."""
        taken, self._round = self._round, {"up": {}, "down": {}}
        return taken


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
