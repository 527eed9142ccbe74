"""The checks an update passes before it may count: known already, on time, well-formed, usable.

`screen_update` turns a verified `update` message into a `ClientUpdate`, or says why not
(a `Refusal`): a duplicate of one already counted or applied; stale or from a
non-participant (the schedule's `precheck`); tensors that do not decode or do not fit
the model; or, for the asynchronous strategies, too stale to use. It changes nothing;
the core acts on the verdict.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedmq.common import messages as M
from fedmq.common.channel import Received
from fedmq.common.errors import ProtocolError
from fedmq.common.strategies import ClientUpdate

from .ledger import UpdateLedger
from .modelstore import ModelStore
from .schedule import RoundState, Schedule


@dataclass(frozen=True)
class Refusal:
    log: str
    level: str = "info"
    reason: str | None = None  # counted in the status's `rejected` under this reason
    duplicate: bool = False  # counted as a duplicate instead


def screen_update(msg: Received, rnd: RoundState | None, round_number: int, *, ledger: UpdateLedger,
                  schedule: Schedule, store: ModelStore) -> ClientUpdate | Refusal:
    body, name = msg.body, msg.sender
    uid = body["update_id"]
    if ledger.is_applied(uid) or (rnd is not None and uid in rnd.updates):
        return Refusal(f"duplicate update {uid} ignored", duplicate=True)
    late = schedule.precheck(rnd, msg.manifest.round, body["base_version"], name, store.version)
    if late is not None or rnd is None:
        if late in (None, "stale"):
            late = (f"stale update {uid} from {name} (round {msg.manifest.round}, version {body['base_version']}; "
                    f"now {round_number}/{store.version})")
        return Refusal(late)
    try:
        tensors = M.tensors_of(body)
        store.validate(tensors)
        update = ClientUpdate(name, body["kind"], tensors, body["samples"], body["base_version"])
    except ProtocolError as exc:
        return Refusal(f"rejected message from {name}: {exc.reason} {exc.detail}".rstrip(), "warning", exc.reason)
    if why := schedule.admissible(update, store.version):
        return Refusal(f"update {uid} from {name} not used: {why}", reason="stale")
    return update
