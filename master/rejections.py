"""Counts of rejected messages by reason, for the status: what the master refused and why.

Both the shell (messages that failed verification) and the core's parts (policy:
not enrolled, stale, bad tensors) count here, so an operator sees one table.
"""

from __future__ import annotations

from typing import Mapping

from fedmq.common.effects import Effect, Log
from fedmq.common.errors import clip


class Rejections:
    def __init__(self) -> None:
        self.by_reason: dict[str, int] = {}

    def tally(self, reason: str) -> None:
        """Count without a log line (for refusals the caller logs in its own words)."""
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1

    def count(self, reason: str, sender: str | None, detail: str = "") -> list[Effect]:
        """Count and log one rejected message."""
        self.tally(reason)
        return [Log("warning", f"rejected message from {sender or '?'}: {reason} {clip(detail)}".rstrip())]

    def restore(self, counts: Mapping[str, int]) -> None:
        self.by_reason = dict(counts)
