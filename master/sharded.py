"""The root of a sharded job: rounds completed by the partial sums of aggregator workers.

With `[shard] workers` the slaves' updates go to N workers (MQTT shared subscription,
master/worker.py), not to the master. The root keeps everything else of a master --
enrollment, presence, rounds, versions, checkpoints -- by wrapping a `MasterCore`
whose schedule is a `ShardedRounds`. What the root learns of updates:

1. A worker that accepted updates (verified, screened, journaled, acknowledged)
   reports them in a `tally`: id, sender, kind, samples, bytes. The root journals and
   counts each one in the open round, as a single master counts an update; an update
   two workers hold (a slave sent it again and the broker gave it to the other) is
   counted once, for the first worker that reported it.
2. When the round would close in a single master (quorum, everyone answered, or the
   deadline with `min_updates`), the root publishes a retained `collect`: for each
   worker, exactly which updates (and weights) it must sum.
3. Each worker answers with a `partial`: Σ wᵢΔᵢ, Σ wᵢ and the ids it covers, which
   must be exactly those asked for. Once every worker asked has answered, the
   schedule combines the sums into the new version (master/partial.py), and the
   master checkpoints and publishes it as usual.

A worker that does not answer within `collect_timeout` loses its updates for this
round: they are dropped and the round is re-planned, so their slaves send them
again (to a worker that is alive). Only sums can be split like this: rules that need
every update at once (median, trimmed mean, Krum) and the asynchronous strategies are
refused at start (`check_shardable`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import cbor2

from fedmq.common import messages as M
from fedmq.common.channel import Received
from fedmq.common.effects import Ack, Effect, Journal, Log, Publish
from fedmq.common.errors import ConfigError, ProtocolError, Reason
from fedmq.common.jobconfig import JobConfig
from fedmq.common.shardconfig import ShardSettings
from fedmq.common.strategies import ClientUpdate, FedOpt, Strategy
from fedmq.common.topics import PARTIAL
from fedmq.common.update_safety import capped_weight

from .composed import ComposedMaster
from .core import MasterCore
from .job import is_asynchronous
from .modelstore import ModelStore, Params
from .partial import PartialSum, Tallied, combine, parse_tally, parse_weights, same_weights, weights_to_wire
from .schedule import RoundState, SyncRounds


def check_shardable(cfg: JobConfig, strategy: Strategy) -> None:
    """Raise ConfigError unless the job's aggregate is a weighted sum the workers can split."""
    name = cfg.strategy.get("name", "fedavg")
    if is_asynchronous(cfg.strategy):
        raise ConfigError(f"[shard]: strategy {name!r} is asynchronous (it applies each update as it arrives): "
                          "it cannot be sharded; use fedavg, fedavgm, fedadagrad, fedadam or fedyogi")
    rule = getattr(getattr(strategy, "rule", None), "name", None)
    if not isinstance(strategy, FedOpt) or rule != "mean":
        raise ConfigError(f"[shard]: strategy {name!r} with rule {rule!r} is not a sum (median, trimmed mean and "
                          "Krum need every update in one place): it cannot be sharded; use rule = \"mean\"")
    if cfg.update == "student":
        raise ConfigError("[shard]: student updates cannot be sharded (a student's step w - x needs the global "
                          "model at every worker); use update = \"delta\" or \"gradient\"")
    if cfg.distill is not None or cfg.multitask is not None:
        raise ConfigError("[shard]: a model with parts ([distill], [multitask]) is aggregated part by part: it "
                          "cannot be sharded")
    if cfg.enrollment != "allowlist":
        raise ConfigError("[shard]: enrollment mode 'open' cannot be sharded: the workers verify updates with "
                          "the allowlist's keys, and open enrollment learns keys at the master only")


@dataclass
class Collection:
    """A `collect` request: which worker sums which updates, and what came back."""

    number: int
    round: RoundState
    assign: dict[str, dict[str, float]]  # worker -> update id -> weight
    deadline: float
    received: dict[str, PartialSum] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.received.keys() == self.assign.keys()

    def missing(self) -> list[str]:
        return sorted(self.assign.keys() - self.received.keys())


class ShardedRounds(SyncRounds):
    """Synchronous rounds whose aggregate is the sum of the workers' partial sums.

    A round is *tallied* when a single master would close it (quorum etc., counting
    the updates the workers reported); it is *ready* once the partial sums of the
    collection made for it are all in."""

    def __init__(self, strategy: Any, policy: Any) -> None:
        super().__init__(strategy, policy)
        self.collection: Collection | None = None

    def tallied(self, rnd: RoundState, is_online: Callable[[str], bool]) -> bool:
        return super().ready(rnd, is_online)

    def collecting(self, rnd: RoundState | None) -> bool:
        return rnd is not None and self.collection is not None and self.collection.round is rnd

    def ready(self, rnd: RoundState, is_online: Callable[[str], bool]) -> bool:
        return self.collecting(rnd) and self.collection is not None and self.collection.complete

    def at_deadline(self, rnd: RoundState, anyone_online: bool) -> str:  # type: ignore[override]
        # The root collects what was tallied at the deadline before the master's tick
        # gets here; whatever reaches this point cannot close: re-plan.
        return "aggregate" if self.ready(rnd, lambda _n: True) else "replan"

    def close(self, rnd: RoundState, store: ModelStore) -> Params:
        """Add the partial sums (the root's merge: one addition per worker, whatever the
        number of updates) and apply the step."""
        c = self.collection
        assert c is not None and c.complete
        self.collection = None
        total = PartialSum.zeros_like(store.params)
        for part in c.received.values():
            total.merge(part)
        return combine(store.params, total, self.strategy)


class RootCore(ComposedMaster):
    """The master of a sharded job (module docstring): a MasterCore plus the workers' messages."""

    def __init__(self, master: MasterCore, shard: ShardSettings) -> None:
        super().__init__(master)
        if not isinstance(master.schedule, ShardedRounds):
            raise TypeError("the root's MasterCore needs a ShardedRounds schedule")
        self.schedule: ShardedRounds = master.schedule
        self.shard = shard
        self.workers = frozenset(shard.workers)
        self.owner: dict[str, str] = {}  # update id -> the worker that holds it (open round)
        self._replayed: list[Mapping[str, Any]] = []  # journaled tallies, counted again when the round opens
        self._collects = 0

    # ------------------------------------------------------------ entry points

    def on_message(self, msg: Received, now: float, token: Any = None) -> list[Effect]:
        parsed = self.master.topics.parse(msg.topic)
        if parsed is not None and parsed[0] == PARTIAL:
            return self._after(self._from_worker(msg, parsed[1], now) + _ack(token), now)
        if msg.sender in self.workers:  # a worker's key never speaks for a slave
            return self.master.on_rejected(Reason.WRONG_SENDER, msg.sender, now,
                                           "a worker's key signs only on its partial topic") + _ack(token)
        return super().on_message(msg, now, token)

    def tick(self, now: float) -> list[Effect]:
        rnd, c = self.master.round, self.schedule.collection
        fx: list[Effect] = []
        if rnd is not None and c is not None and self.schedule.collecting(rnd) and now >= c.deadline:
            fx += self._give_up(rnd, c, now)
        elif (rnd is not None and not self.schedule.collecting(rnd) and now >= rnd.deadline
              and len(rnd.updates) >= max(1, self.schedule.min_updates)):
            fx += self._collect(rnd, now)  # the deadline: what was tallied makes the version, as in a single master
        return self._after(fx + self.master.tick(now), now)

    def replay(self, record: Mapping[str, Any]) -> None:
        """A journaled record after a restart: tallies are this part's (counted again in
        `start`), enrollments the master's."""
        if "worker" in record:
            self._replayed.append(record)
        else:
            self.master.replay(record)

    def start(self, now: float) -> list[Effect]:
        fx = self.master.start(now)
        if self._recount():  # the round announced lists them as received: announce it again, after
            fx = [f for f in fx if not (isinstance(f, Publish) and f.kind == M.ROUND)]
            fx.append(self.master.rounds.announce(now, self.master.version, self.master.run))
        return self._after(fx, now)

    def _recount(self) -> int:
        """Count the journaled tallies of the round in progress in the round the master
        opened after a restart (they were acknowledged and journaled before)."""
        rnd, version = self.master.round, self.master.version
        if rnd is None or not self._replayed:
            return 0
        replayed, self._replayed = self._replayed, []
        counted = 0
        for rec in replayed:
            if rec["version"] == version and rec["round"] == rnd.number and rec["update_id"] not in rnd.updates \
                    and self.master.registry.enrolled(rec["sender"]):
                body = rec["body"]
                self._hold(rnd, rec["worker"], rec["update_id"], rec["sender"], body["kind"], body["samples"],
                           rec["bytes"], version)
                counted += 1
        return counted

    def _after(self, fx: list[Effect], now: float) -> list[Effect]:
        rnd = self.master.round
        if rnd is None or self.master.phase.finished or self.schedule.collecting(rnd):
            return fx
        self._recount()  # (no round opened at start: the first one that does)
        if self.owner.keys() - rnd.updates.keys():  # a new round: forget who held the last one's updates
            self.owner = {u: w for u, w in self.owner.items() if u in rnd.updates}
        if self.schedule.tallied(rnd, self.master.registry.is_online):
            fx = fx + self._collect(rnd, now)
        return fx

    # ------------------------------------------------------------ workers' messages

    def _from_worker(self, msg: Received, worker: str, now: float) -> list[Effect]:
        if worker != msg.sender or worker not in self.workers:
            reason = Reason.WRONG_SENDER if worker != msg.sender else Reason.NOT_ENROLLED
            return self.master.on_rejected(reason, msg.sender, now, f"on the partial topic of {worker}")
        try:
            M.validate(msg.kind, PARTIAL, msg.body)
            if msg.body["run"] != self.master.run:
                return [Log("info", f"{msg.kind} of {worker} for run {msg.body['run']!r} ignored")]
            if msg.kind == M.TALLY:
                return self._on_tally(worker, msg, now)
            return self._on_partial(worker, msg, now)
        except ProtocolError as exc:
            return self.master.on_rejected(exc.reason, worker, now, exc.detail)

    def _on_tally(self, worker: str, msg: Received, now: float) -> list[Effect]:
        entries = parse_tally(msg.body["updates"])
        rnd, version = self.master.round, self.master.version
        m = msg.manifest
        if rnd is None or m.round != rnd.number or m.version != version:
            return [Log("info", f"tally of {worker} for round {m.round} (version {m.version}) ignored: "
                                f"now {self.master.round_number}/{version}")]
        if self.schedule.collecting(rnd):
            late = [e.update_id for e in entries if e.update_id not in rnd.updates]
            return [Log("info", f"round {rnd.number}: {len(late)} update(s) tallied by {worker} after the "
                                f"collection began; not used")] if late else []
        fx: list[Effect] = []
        for entry in entries:
            fx += self._count(worker, entry, rnd, version, now)
        return fx

    def _count(self, worker: str, e: Tallied, rnd: RoundState, version: int, now: float) -> list[Effect]:
        """Count one tallied update in the open round, as MasterCore counts an update."""
        holder = self.owner.get(e.update_id)
        if e.update_id in rnd.updates or self.master.ledger.is_applied(e.update_id):
            if holder is not None and holder != worker:
                self.master.ledger.duplicates += 1
                return [Log("info", f"update {e.update_id} held by {holder} and by {worker}: counted once")]
            return []
        why = self.schedule.precheck(rnd, rnd.number, version, e.sender, version)
        if why is None and not self.master.registry.enrolled(e.sender):
            why = f"{e.sender} is not enrolled"
        if why is not None:
            return [Log("info", f"update {e.update_id} tallied by {worker} not counted: {why}")]
        body = {"kind": e.kind, "base_version": version, "samples": e.samples}
        record = {"update_id": e.update_id, "sender": e.sender, "round": rnd.number, "version": version,
                  "bytes": e.bytes, "worker": worker}
        self._hold(rnd, worker, e.update_id, e.sender, e.kind, e.samples, e.bytes, version)
        slave = self.master.registry.slaves[e.sender]
        slave.online, slave.last_seen = True, now
        return [Journal(record, cbor2.dumps(body))]

    def _hold(self, rnd: RoundState, worker: str, uid: str, sender: str, kind: str, samples: int, nbytes: int,
              version: int) -> None:
        """Count one update a worker holds; its weight is capped as the master caps an
        update's (by what its slave declared at enrollment, and the job's max_weight)."""
        weight = capped_weight(samples, self.master.registry.slaves[sender].samples, self.master.intake.max_weight)
        rnd.count(uid, ClientUpdate(sender, kind, {}, samples, version, weight=weight), nbytes)
        self.owner[uid] = worker

    def _on_partial(self, worker: str, msg: Received, now: float) -> list[Effect]:
        rnd, c, m = self.master.round, self.schedule.collection, msg.manifest
        if c is None or not self.schedule.collecting(rnd) or m.round != c.round.number or m.version != self.master.version:
            return [Log("info", f"partial sum of {worker} for round {m.round} (version {m.version}) ignored: "
                                f"no collection open for it")]
        want = c.assign.get(worker)
        if want is None or worker in c.received:
            return [Log("info", f"partial sum of {worker} not asked for (or in already); ignored")]
        got = parse_weights(msg.body["updates"], "partial")
        if not same_weights(got, want):
            return [Log("warning", f"partial sum of {worker} covers {len(got)} update(s), not the {len(want)} asked "
                                   f"for; ignored (it is asked again if it does not answer)")]
        if not math.isclose(float(msg.body["weight"]), sum(want.values()), rel_tol=1e-6):
            raise ProtocolError(Reason.BAD_BODY, f"weight {msg.body['weight']} is not the sum of its updates' weights")
        tensors = M.tensors_of(msg.body)
        self.master.store.validate(tensors)
        c.received[worker] = PartialSum(dict(tensors), float(msg.body["weight"]), got)
        fx: list[Effect] = [Log("info", f"round {c.round.number}: partial sum of {worker} ({len(got)} update(s)), "
                                        f"{len(c.received)}/{len(c.assign)} worker(s)")]
        return fx + self.master.close_if_ready(now)

    # ------------------------------------------------------------ collections

    def _collect(self, rnd: RoundState, now: float) -> list[Effect]:
        """Ask each worker for the sum of the updates of `rnd` it holds."""
        assign: dict[str, dict[str, float]] = {}
        for uid, update in rnd.updates.items():
            assign.setdefault(self.owner[uid], {})[uid] = update.aggregation_weight
        self._collects += 1
        c = self.schedule.collection = Collection(self._collects, rnd, assign, now + self.shard.collect_timeout)
        rnd.deadline = max(rnd.deadline, c.deadline)  # the master's deadline waits for the collection
        body = {"run": self.master.run, "collect": c.number, "deadline": c.deadline,
                "assign": {w: weights_to_wire(a) for w, a in sorted(assign.items())}}
        return [Log("info", f"round {rnd.number}: collecting the sums of {len(rnd.updates)} update(s) from "
                            f"{len(assign)} worker(s)"),
                Publish(self.master.topics.master("collect"), M.COLLECT, body, version=self.master.version,
                        round=rnd.number, retain=True)]

    def _give_up(self, rnd: RoundState, c: Collection, now: float) -> list[Effect]:
        """Workers that did not answer in time: drop the updates they hold and re-plan the
        round, so that their slaves send them again (to a worker that is alive)."""
        missing = c.missing()
        dropped = [uid for w in missing for uid in c.assign[w]]
        for uid in dropped:
            rnd.answered.discard(rnd.updates.pop(uid).sender)
            self.owner.pop(uid, None)
        self.schedule.collection = None
        rnd.deadline = now  # the master's tick re-plans it (same number): the others' sums are asked again
        return [Log("warning", f"round {rnd.number}: no partial sum from {', '.join(missing)} within "
                               f"{self.shard.collect_timeout:g} s; the {len(dropped)} update(s) they hold are sent "
                               f"again by their slaves")]


def _ack(token: Any) -> list[Effect]:
    return [] if token is None else [Ack(token)]
