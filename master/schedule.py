"""When rounds open, who takes part, when they aggregate, and what a late update means.

Two schedules behind one interface, so the master core never asks "am I asynchronous?":

* `SyncRounds` (FedAvg family): a round names its participants and a quorum; only
  their updates for this round and version count; the round closes at the quorum,
  when every participant answered or went offline, or at the deadline with at least
  `min_updates` (else it is re-planned under the same number, and what arrived counts).
* `AsyncRounds` (FedBuff, FedAsync, gradient push): every online slave takes part and
  slaves joining are added to the open round; each update goes to the strategy as it
  arrives, weighed by staleness, and the strategy says when a version is due. A round
  that stalls is re-announced under a new number so that every slave trains again.

The differences are data (class attributes) and a few small methods; the round's
bookkeeping (`RoundState`) and the participant draw (`plan_round`) are shared.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping

from fedmq.common.effects import Effect, Log
from fedmq.common.jobconfig import RoundPolicy
from fedmq.common.strategies import ClientUpdate

from .modelstore import ModelStore, Params

DeadlineAction = Literal["aggregate", "replan", "wait"]


@dataclass
class RoundState:
    number: int
    participants: list[str]
    deadline: float
    started: float
    quorum: int
    updates: dict[str, ClientUpdate] = field(default_factory=dict)  # by update_id
    answered: set[str] = field(default_factory=set)  # participants with an update in this round
    bytes_up: int = 0
    bytes_down_base: dict[str, int] = field(default_factory=dict)

    def count(self, uid: str, update: ClientUpdate, wire_bytes: int) -> None:
        self.updates[uid] = update
        self.answered.add(update.sender)
        self.bytes_up += wire_bytes

    def everyone_answered(self, is_online: Callable[[str], bool]) -> bool:
        return all(n in self.answered or not is_online(n) for n in self.participants)


def plan_round(policy: RoundPolicy, number: int, online: list[str], now: float,
               bytes_in: Mapping[str, int]) -> RoundState:
    """Draw the participants of round `number` from the online slaves (seeded, so a
    simulation replays) and set its quorum and deadline."""
    rng = random.Random(f"{policy.seed}/{number}/{now}")
    k = policy.participants or len(online)
    chosen = sorted(rng.sample(online, min(k, len(online))))
    quorum = min(policy.quorum or len(chosen), len(chosen))
    return RoundState(number, chosen, now + policy.deadline, now, quorum,
                      bytes_down_base={n: bytes_in[n] for n in chosen})


class SyncRounds:
    """Synchronous rounds: fixed participants, a quorum, one version per round."""

    joins_open_round = False  # a slave enrolling mid-round waits for the next one
    opens_round_on_update = False
    replan_takes_new_number = False  # a re-planned round keeps its number; what arrived counts
    next_round_when_all_answered = False  # `ready` covers it

    def __init__(self, strategy: Any, policy: RoundPolicy) -> None:
        self.strategy = strategy
        self.min_updates = policy.min_updates
        self.horizon = 0  # versions an update id must stay known after it was applied

    def describe(self, rnd: RoundState) -> str:
        return f", quorum {rnd.quorum}"

    def precheck(self, rnd: RoundState | None, round_no: int, base_version: int, sender: str, version: int) -> str | None:
        """Why an update cannot count in this round (before decoding it), or None."""
        if rnd is None or round_no != rnd.number or base_version != version:
            return "stale"
        if sender not in rnd.participants:
            return f"{sender} is not a participant of round {rnd.number}"
        return None

    def admissible(self, update: ClientUpdate, version: int) -> str | None:
        return None  # precheck said it all

    def take(self, uid: str, update: ClientUpdate, store: ModelStore) -> tuple[Params | None, list[Effect]]:
        return None, []  # kept in the round until it closes

    def ready(self, rnd: RoundState, is_online: Callable[[str], bool]) -> bool:
        if len(rnd.updates) < max(1, self.min_updates):
            return False
        return len(rnd.updates) >= rnd.quorum or rnd.everyone_answered(is_online)

    def at_deadline(self, rnd: RoundState, anyone_online: bool) -> DeadlineAction:
        return "aggregate" if len(rnd.updates) >= self.min_updates else "replan"

    def close(self, rnd: RoundState, store: ModelStore) -> Params:
        return self.strategy.aggregate(store.params, list(rnd.updates.values()), store.version)

    def replayable(self, record: Mapping[str, Any], version: int) -> bool:
        return record["version"] == version

    def row(self, updates: list[ClientUpdate], version: int) -> dict[str, Any]:
        return {}


class AsyncRounds:
    """Asynchronous versions: everyone online trains; the strategy yields versions."""

    joins_open_round = True
    opens_round_on_update = True  # no round open (all presumed offline), yet a usable update: open one
    replan_takes_new_number = True  # so every slave online trains again
    next_round_when_all_answered = True  # the strategy still buffers and every slave is idle

    def __init__(self, strategy: Any, policy: RoundPolicy) -> None:
        self.strategy = strategy
        self.horizon = strategy.max_staleness

    def describe(self, rnd: RoundState) -> str:
        return ""

    def precheck(self, rnd: RoundState | None, round_no: int, base_version: int, sender: str, version: int) -> str | None:
        return "stale" if rnd is None else None

    def admissible(self, update: ClientUpdate, version: int) -> str | None:
        return self.strategy.admissible(update, version)

    def take(self, uid: str, update: ClientUpdate, store: ModelStore) -> tuple[Params | None, list[Effect]]:
        base = None
        if self.strategy.needs_base_params:
            base = store.base(update.base_version)
            if base is None:
                return None, [Log("info", f"update {uid}: base version {update.base_version} no longer kept; not used")]
        return self.strategy.add(store.params, update, store.version, base), []

    def ready(self, rnd: RoundState, is_online: Callable[[str], bool]) -> bool:
        return False  # versions come from `take`

    def at_deadline(self, rnd: RoundState, anyone_online: bool) -> DeadlineAction:
        # Nobody to re-plan with: keep this round, and with it the ids of the updates
        # the strategy has buffered (dropped here, a re-sent one would count twice).
        return "replan" if anyone_online else "wait"

    def close(self, rnd: RoundState, store: ModelStore) -> Params:
        raise RuntimeError("an asynchronous round is never closed by the schedule; the strategy yields versions")

    def replayable(self, record: Mapping[str, Any], version: int) -> bool:
        return True  # the strategy judges staleness when it is re-admitted

    def row(self, updates: list[ClientUpdate], version: int) -> dict[str, Any]:
        if not updates:
            return {}
        taus = [u.staleness(version - 1) for u in updates]
        return {"staleness_mean": round(sum(taus) / len(taus), 3), "staleness_max": max(taus)}


Schedule = SyncRounds | AsyncRounds


def make_schedule(strategy: Any, policy: RoundPolicy) -> Schedule:
    """The schedule that fits the strategy (asynchronous strategies say so)."""
    return AsyncRounds(strategy, policy) if getattr(strategy, "asynchronous", False) else SyncRounds(strategy, policy)


def keep_bases_for(strategy: Any) -> int:
    """How many older versions the model store must keep for this strategy."""
    return strategy.max_staleness if getattr(strategy, "needs_base_params", False) else 0
