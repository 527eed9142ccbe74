"""The checks an update passes before it may count: its own, on time, well-formed, bounded.

`UpdateIntake.screen` turns a verified `update` message into a `ClientUpdate`, or says
why not (a `Refusal`), in this order:

1. **its own**: the `update_id` must be `SENDER/ROUND/VERSION` of the signed sender,
   the manifest's round and the update's base version (equal to the manifest's
   version), so one slave cannot speak for another or send two updates for one round;
2. **new**: not a duplicate of one already counted or applied;
3. **on time**: the schedule's `precheck` (round and version, participant);
4. **well-formed**: tensors decoded under limits sized for this model, their names and
   shapes checked against it before anything is allocated, cast to float32, finite;
5. **bounded**: its L2 norm clipped to the job's `max_update_norm` (refused above 100x),
   its weight capped by what the slave declared at enrollment and the job's
   `max_weight`;
6. **usable**: for the asynchronous strategies, not too stale.

It changes nothing but its own count of clipped updates; the core acts on the verdict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from fedmq.common import messages as M
from fedmq.common.channel import Received
from fedmq.common.errors import ProtocolError, Reason, clip
from fedmq.common.modelspec import float_state
from fedmq.common.strategies import ClientUpdate
from fedmq.common.tensors import Limits, as_float32_state, spec_of
from fedmq.common.update_safety import bound_client_update, capped_weight

from .ledger import UpdateLedger
from .modelstore import ModelStore
from .schedule import RoundState, Schedule


@dataclass(frozen=True)
class Refusal:
    log: str
    level: str = "info"
    reason: str | None = None  # counted in the status's `rejected` under this reason
    duplicate: bool = False  # counted as a duplicate instead


def expected_update_id(sender: str, round_number: int, version: int) -> str:
    return f"{sender}/{round_number}/{version}"


class UpdateIntake:
    def __init__(self, store: ModelStore, ledger: UpdateLedger, schedule: Schedule, *,
                 max_update_norm: float | None = None, max_weight: int | None = None) -> None:
        self.store, self.ledger, self.schedule = store, ledger, schedule
        self.spec = spec_of(float_state(store.template))
        self.limits = Limits.for_model(self.spec)  # nothing larger than the model is ever allocated
        self.max_update_norm, self.max_weight = max_update_norm, max_weight
        self.clipped: dict[str, int] = {}  # slave -> updates whose norm was clipped

    def screen(self, msg: Received, rnd: RoundState | None, round_number: int, *,
               declared_samples: int | None, declared_parts: Mapping[str, int] | None = None) -> ClientUpdate | Refusal:
        body, name = msg.body, msg.sender
        uid = body["update_id"]
        own = expected_update_id(name, msg.manifest.round, body["base_version"])
        if uid != own or msg.manifest.version != body["base_version"]:
            return Refusal(f"update {uid[:80]!r} from {name} refused: its id must be {own!r} (sender/round/version "
                           f"as signed, manifest version {msg.manifest.version})", "warning", Reason.FOREIGN_UPDATE)
        if self.ledger.is_applied(uid) or (rnd is not None and uid in rnd.updates):
            return Refusal(f"duplicate update {uid} ignored", duplicate=True)
        late = self.schedule.precheck(rnd, msg.manifest.round, body["base_version"], name, self.store.version)
        if late is not None or rnd is None:
            if late in (None, "stale"):
                late = (f"stale update {uid} from {name} (round {msg.manifest.round}, version {body['base_version']}; "
                        f"now {round_number}/{self.store.version})")
            return Refusal(late)
        try:
            update = self.to_update(name, body, declared_samples, declared_parts)
        except ProtocolError as exc:
            return Refusal(f"rejected update {uid} from {name}: {exc.reason} {clip(exc.detail)}".rstrip(), "warning",
                           exc.reason)
        if why := self.schedule.admissible(update, self.store.version):
            return Refusal(f"update {uid} from {name} not used: {why}", reason=Reason.STALE)
        return update

    def to_update(self, sender: str, body: dict, declared_samples: int | None,
                  declared_parts: Mapping[str, int] | None = None) -> ClientUpdate:
        """Steps 4 and 5 for a body (also one re-admitted from the journal): decoded, checked
        against the model (against the parts it says it trains, which must be parts its
        sender confirmed, in a model with parts), its norm bounded and its weight capped.
        Raises ProtocolError."""
        parts = self.store.update_parts(body.get("parts"), declared_parts)
        spec = self.spec if parts is None else self.store.spec(parts)
        tensors = as_float32_state(M.tensors_of(body, self.limits, expected=spec))
        self.store.validate(tensors, parts)
        update = ClientUpdate(sender, body["kind"], tensors, body["samples"], body["base_version"],
                              weight=capped_weight(body["samples"], declared_samples, self.max_weight), parts=parts)
        base = self.store.base(update.base_version) if update.kind == "student" else None
        update, clipped, _ = bound_client_update(update, base or self.store.params, self.max_update_norm)
        if clipped:
            self.clipped[sender] = self.clipped.get(sender, 0) + 1
        return update
