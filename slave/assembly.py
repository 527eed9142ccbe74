"""Collects the parts of one model version from `model` messages until the slave holds every part it needs.

A model with parts arrives part by part: each part's retained `model/PART` message at
every version (docs/PROTOCOL.md section 9.3), or all of a slave's parts at once on its
`to/SLAVE` topic. A version is complete -- and the slave adopts it -- once every part
the slave holds has arrived *at that version*; parts of a version that is not yet
complete wait here (a slave that subscribes while the master is publishing a new
version can get one part's new version before another's). A whole model is complete
in one message.
"""

from __future__ import annotations

from typing import Any, Mapping

from fedmq.common.errors import ProtocolError, Reason
from fedmq.common.layout import Layout

KEEP_VERSIONS = 2  # incomplete versions kept at most (the newest)


class ModelAssembly:
    def __init__(self, layout: Layout, holds: list[str] | None) -> None:
        self.layout, self.holds = layout, holds  # holds None: one whole model
        self._pending: dict[int, dict[str, dict[str, Any]]] = {}  # version -> part -> tensors

    def offer(self, version: int, tensors: Mapping[str, Any]) -> dict[str, Any] | None:
        """All tensors of `version` once it is complete, else None. ProtocolError
        (`bad_tensor`) for tensors of a part this slave does not hold."""
        if self.holds is None:
            return dict(tensors)
        by_part = self.layout.split(tensors)
        foreign = sorted(set(by_part) - set(self.holds))
        if foreign:
            raise ProtocolError(Reason.BAD_TENSOR, f"part {foreign[0]!r} is not one this slave holds")
        got = self._pending.setdefault(version, {})
        got.update(by_part)
        if all(p in got for p in self.holds):
            self._pending = {v: parts for v, parts in self._pending.items() if v > version}
            return {k: t for p in self.holds for k, t in got[p].items()}
        for old in sorted(self._pending)[:-KEEP_VERSIONS]:
            del self._pending[old]
        return None
