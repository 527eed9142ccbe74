"""What devices are sent of each version: a full model (keyframe) or a small delta.

With downlink deltas off (the default), every version goes out as the retained full
`model`, as always. With them on (`[compression.downlink] delta = true`), the master
keeps an exact copy of what devices hold (`DeviceModel`: the last keyframe plus every
delta since) and publishes each new version as a `delta` against that copy, and a full
keyframe as the retained `model` every `keyframe_every` versions or when the devices
would drift farther than `max_drift` from the master's weights. A device that cannot
follow (it enrolled late, restarted, missed a delta) is given the devices' model of the
current version on its own topic: anything else would make the next delta's base wrong.
"""

from __future__ import annotations

from typing import Any, Mapping

from fedmq.common import messages as M
from fedmq.common.compression import Delta, DeviceModel, drift
from fedmq.common.compression_settings import Downlink
from fedmq.common.effects import Effect, Publish
from fedmq.common.tensors import encode_state_dict
from fedmq.common.topics import Topics

from .modelstore import ModelStore, Params


class ModelPublisher:
    def __init__(self, settings: Downlink, store: ModelStore, topics: Topics) -> None:
        self.settings, self.store, self.topics = settings, store, topics
        self.devices = DeviceModel(settings)
        self.deltas_sent = self.keyframes_sent = 0

    def held(self) -> tuple[int, Params]:
        """The version and weights a device holds when it follows every message."""
        if self.devices.params is None:
            self.devices.publish(self.store.version, self.store.params)  # the first keyframe
        assert self.devices.version is not None and self.devices.params is not None
        return self.devices.version, self.devices.params

    def model_body(self, run: str, trains: Mapping[str, int] | None = None) -> dict[str, Any]:
        """A full `model` body of what devices hold now (retained, or for one device).
        `trains`: the parts a slave trains, in a model with parts (master/partspublisher.py)."""
        _, params = self.held()
        return {"run": run, "tensors": encode_state_dict(params)}

    def publish(self, run: str, round_number: int) -> list[Effect]:
        """The store adopted a new version: a keyframe (the retained `model`) or a `delta`."""
        sent = self.devices.publish(self.store.version, self.store.params)
        if isinstance(sent, Delta):
            self.deltas_sent += 1
            return [Publish(self.topics.master("delta"), M.DELTA, {"run": run, **sent.body}, version=sent.version,
                            round=round_number)]
        self.keyframes_sent += 1
        return [self.retained(run, round_number)]

    def retained_all(self, run: str, round_number: int) -> list[Publish]:
        """Every retained `model` message (one here; one per part in a model with parts)."""
        return [self.retained(run, round_number)]

    def retained(self, run: str, round_number: int) -> Publish:
        version, _ = self.held()
        return Publish(self.topics.master("model"), M.MODEL, self.model_body(run), version=version, round=round_number,
                       retain=True)

    def drift(self) -> float:
        """How far what devices hold is from the master's weights (0 without deltas)."""
        if self.devices.params is None or self.devices.version != self.store.version:
            return 0.0
        return drift(self.devices.params, self.store.params)

    def checkpoint(self) -> dict[str, Any]:
        return self.devices.state_dict()

    def restore(self, state: Mapping[str, Any] | None) -> None:
        if state:
            self.devices.load_state_dict(state)
