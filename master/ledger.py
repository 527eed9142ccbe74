"""Which updates the master has applied, so none is applied twice, and which wait for replay.

An update is identified by its `update_id`. Once it went into a version it stays known
for a while (the staleness horizon plus two versions), so a slave that re-sends it --
after a restart of either side, or a re-planned round -- is told apart from new work.
Journaled updates of the round in progress are queued here after a master restart and
re-admitted when the next round opens.
"""

from __future__ import annotations

from typing import Any, Mapping


class UpdateLedger:
    def __init__(self) -> None:
        self.applied: dict[str, int] = {}  # update id -> version it went into
        self.duplicates = 0
        self._replay: list[Mapping[str, Any]] = []

    def is_applied(self, uid: str) -> bool:
        return uid in self.applied

    def mark_applied(self, uids: list[str], version: int, horizon: int) -> None:
        """Record that `uids` made `version`; forget ids older than the horizon allows."""
        self.applied.update({uid: version for uid in uids})
        keep = version - horizon - 2
        self.applied = {uid: v for uid, v in self.applied.items() if v >= keep}

    def queue_replay(self, record: Mapping[str, Any]) -> None:
        self._replay.append(record)

    def take_replay(self) -> list[Mapping[str, Any]]:
        pending, self._replay = self._replay, []
        return pending
