"""The open round, its number and its announcements, run by the schedule's rules.

The schedule (`schedule.py`) decides *what* a round is; this part keeps *which* round
is open, draws and announces it, lets slaves join where the schedule allows, and
hands a stalled round over for re-planning. Announcements list every participant
and go to every slave, so joins are coalesced: at most one per `coalesce` seconds,
the rest on a tick -- one per join would cost O(n^2) as a fleet joins.
"""

from __future__ import annotations

from typing import Callable, Mapping

from fedmq.common import messages as M
from fedmq.common.effects import Effect, Log, Publish
from fedmq.common.jobconfig import RoundPolicy
from fedmq.common.topics import Topics

from .schedule import RoundState, Schedule, plan_round


class Rounds:
    def __init__(self, policy: RoundPolicy, schedule: Schedule, topics: Topics, update_kind: str,
                 *, coalesce: float) -> None:
        self.policy, self.schedule, self.topics, self.update_kind = policy, schedule, topics, update_kind
        self.coalesce = coalesce
        self.current: RoundState | None = None
        self.number = 1
        self._announced_at = float("-inf")
        self._announce_due = False
        # Whether rounds may open at all: a relay opens local rounds only while its
        # upstream waits for an update from it (relay/core.py sets it).
        self.gate: Callable[[], bool] = lambda: True

    def may_open(self, online: list[str], now: float, *, waiting: bool, started_at: float | None, force: bool) -> bool:
        """Whether a round can start now: someone is online, and before round 1 either
        `min_slaves` are online or `start_wait` has passed (unless forced)."""
        if self.current is not None or not online or not self.gate():
            return False
        waited = started_at is not None and now - started_at >= self.policy.start_wait
        return force or not waiting or len(online) >= self.policy.min_slaves or waited

    def open(self, online: list[str], now: float, version: int, bytes_in: Mapping[str, int]) -> list[Effect]:
        """Plan the next round; the caller announces it (after re-admitting journaled updates)."""
        rnd = self.current = plan_round(self.policy, self.number, online, now, bytes_in)
        return [Log("info", f"round {rnd.number} (version {version}): {len(rnd.participants)} participant(s)"
                            f"{self.schedule.describe(rnd)}")]

    def announce(self, now: float, version: int, run: str) -> Publish:
        """The retained `round`: participants, deadline, and whose update the master holds
        already (so only the others re-send after a restart or a re-plan)."""
        rnd = self.current
        if rnd is None:
            raise RuntimeError("announcing without an open round")
        self._announced_at, self._announce_due = now, False
        body = {"run": run, "participants": rnd.participants, "received": sorted(rnd.answered),
                "deadline": rnd.deadline, "update": self.update_kind}
        return Publish(self.topics.master("round"), M.ROUND, body, version=version, round=rnd.number, retain=True)

    def announce_if_due(self, now: float, version: int, run: str) -> list[Effect]:
        if self._announce_due and self.current is not None and now - self._announced_at >= self.coalesce:
            return [self.announce(now, version, run)]
        return []

    def join(self, name: str, now: float, version: int, run: str, bytes_in: int) -> list[Effect]:
        """Add a slave that became available to the open round, if the schedule lets it join."""
        rnd = self.current
        if rnd is None or not self.schedule.joins_open_round or name in rnd.participants:
            return []
        rnd.participants = sorted([*rnd.participants, name])
        rnd.bytes_down_base[name] = bytes_in
        if now - self._announced_at < self.coalesce:
            self._announce_due = True
            return []
        return [self.announce(now, version, run)]

    def stall(self) -> RoundState:
        """Take the open round away for re-planning (a fresh number if the schedule says so)."""
        kept, self.current = self.current, None
        if kept is None:
            raise RuntimeError("re-planning without an open round")
        if self.schedule.replan_takes_new_number:
            self.number += 1
        return kept

    def carry_over(self, kept: RoundState) -> None:
        """What arrived in the stalled round still counts in the re-planned one."""
        rnd = self.current
        if rnd is None:
            return
        rnd.updates.update(kept.updates)
        rnd.bytes_up += kept.bytes_up
        if not self.schedule.replan_takes_new_number:
            rnd.answered |= kept.answered

    def close(self) -> None:
        """The open round made a version: the next one gets the next number."""
        self.current = None
        self.number += 1
