"""How a model with parts goes out: each part on its own retained topic, and to one slave just the parts it holds.

A model with parts (common/layout.py: a fixed teacher and its students, a shared encoder
and its task heads) goes out at every version as one retained `model` message per part,
on `model/PART` (docs/PROTOCOL.md section 9.3), so that a slave subscribes to, and
receives, only the parts it holds: a weak device that runs the small student never
downloads the large one, a slave of one task never another task's head. After it
enrolls, a slave gets exactly its parts in one `model` on its own topic. Every part
goes out at every version, changed or not, so the parts a slave holds always complete a
version (slave/assembly.py). Downlink deltas do not apply (the job file refuses them).
"""

from __future__ import annotations

from typing import Any, Mapping

from fedmq.common import messages as M
from fedmq.common.compression_settings import Downlink
from fedmq.common.effects import Effect, Publish
from fedmq.common.layout import Layout
from fedmq.common.tensors import encode_state_dict
from fedmq.common.topics import Topics

from .downlink import ModelPublisher
from .modelstore import ModelStore


class PartsPublisher(ModelPublisher):
    def __init__(self, settings: Downlink, store: ModelStore, topics: Topics, layout: Layout) -> None:
        super().__init__(settings, store, topics)
        self.layout = layout

    def model_body(self, run: str, trains: Mapping[str, int] | None = None) -> dict[str, Any]:
        """The parts a slave that trains `trains` holds (all parts if None)."""
        _, params = self.held()
        keep = None if trains is None else self.layout.holds(trains)
        return {"run": run, "tensors": encode_state_dict(self.layout.select(params, keep))}

    def publish(self, run: str, round_number: int) -> list[Effect]:
        self.devices.publish(self.store.version, self.store.params)  # (deltas are off: always the whole model)
        self.keyframes_sent += 1
        return list(self.retained_all(run, round_number))

    def retained_all(self, run: str, round_number: int) -> list[Publish]:
        version, params = self.held()
        return [Publish(self.topics.model_part(part), M.MODEL,
                        {"run": run, "tensors": encode_state_dict(self.layout.select(params, [part]))},
                        version=version, round=round_number, retain=True)
                for part in self.layout.parts]


def make_publisher(settings: Downlink, store: ModelStore, topics: Topics) -> ModelPublisher:
    """The publisher of the store's model: whole, or part by part."""
    layout = store.layout
    if layout is not None and layout.grouped:
        return PartsPublisher(settings, store, topics, layout)
    return ModelPublisher(settings, store, topics)
