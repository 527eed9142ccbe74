"""An aggregator worker of a sharded job: screens, journals and sums its share of the updates.

The broker hands each of the job's updates to one of the workers (the shared
subscription `$share/GROUP/PREFIX/JOB/update/+`; each update is one MQTT message,
which the instruction asks the slaves for). A worker checks an update exactly as a
master does (`intake.screen_update`: duplicate, stale, participant, tensors that fit
the model), journals it, acknowledges it and adds its weighted step to a running
sum. After the journal is on disk it reports what it holds to the root (`tally`);
when the root's `collect` names the updates it must sum, it answers with their
`partial` sum: the running one when the root asked for exactly what it holds, else
the sum rebuilt from its journal (an update another worker got first, one that
came after the collection began).

What it knows of the round comes from the root's retained `round` (number,
version, participants): an update for a round it has not heard of yet waits,
unacknowledged, until it has (at most `EARLY_MAX` of them, for `EARLY_SECONDS`).
A new version makes everything held obsolete: a `Checkpoint` (which empties the
journal) records the new run, version and round. After a crash the journal is
replayed and everything held is tallied again; the root counts each update once.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Mapping

from torch import nn

from fedmq.common import messages as M
from fedmq.common.channel import Received
from fedmq.common.effects import Ack, Checkpoint, Effect, Journal, Log, Publish
from fedmq.common.errors import ProtocolError, Reason
from fedmq.common.jobconfig import JobConfig
from fedmq.common.strategies import ClientUpdate, FedOpt

from .intake import Refusal, UpdateIntake
from .ledger import UpdateLedger
from .modelstore import ModelStore
from .partial import PartialSum, Tallied, parse_weights, partial_body, same_weights, weighted_step
from .schedule import RoundState, SyncRounds

EARLY_MAX = 16  # updates held back (unacknowledged) because their round was not announced yet
EARLY_SECONDS = 30.0
WORKER_EFFECTS = frozenset({Publish, Journal, Ack, Checkpoint, Log})
"""What the worker core returns."""


@dataclass
class _Early:
    msg: Received
    token: Any
    since: float


class WorkerCore:
    """One worker's state: the round it knows, the updates it holds for that version, their sum.

    `reread` yields the journal's records (what `Journal` effects wrote, bodies
    decoded): a partial sum for another set of updates than the running one is
    rebuilt from them."""

    def __init__(self, cfg: JobConfig, worker: str, model: nn.Module, strategy: FedOpt,
                 reread: Callable[[], Iterable[Mapping[str, Any]]]) -> None:
        self.cfg, self.worker, self.strategy, self.reread = cfg, worker, strategy, reread
        self.topics = cfg.topics
        self.store = ModelStore(model)  # names and shapes to check; version = the round's
        self.store.version = -1
        self.schedule = SyncRounds(strategy, cfg.policy)
        self.ledger = UpdateLedger()  # stays empty: what a worker holds is in `round.updates`
        # the master's checks, bounds and caps; not the cap by what a slave declared at
        # enrollment, which only the root knows: its collect says the weights to use
        self.intake = UpdateIntake(self.store, self.ledger, self.schedule, max_update_norm=strategy.max_update_norm,
                                   max_weight=strategy.max_weight)
        self.run: str | None = None
        self.round: RoundState | None = None
        self.sum = PartialSum.zeros_like(self.store.params)
        self.untallied: list[Tallied] = []
        self._bytes: dict[str, int] = {}  # update id -> its wire bytes (the root's metrics count them)
        self.early: list[_Early] = []
        self.answered = 0  # partial sums sent (for the status line and tests)

    version = property(lambda self: self.store.version)

    @property
    def held(self) -> dict[str, ClientUpdate]:
        """The updates held for the current version (tensors dropped), by id."""
        return self.round.updates if self.round is not None else {}

    # ------------------------------------------------------------ persistence

    def restore(self, state: Mapping[str, Any]) -> None:
        """The state file: the run, version and round the journal's records belong to."""
        self.run = state.get("run")
        self.store.version = int(state.get("version", -1))
        if state.get("round") is not None:
            self.round = RoundState(int(state["round"]), list(state.get("participants", [])), 0.0, 0.0, 0)

    def checkpoint_state(self) -> dict[str, Any]:
        rnd = self.round
        return {"worker": self.worker, "run": self.run, "version": self.version,
                "round": rnd.number if rnd else None, "participants": rnd.participants if rnd else []}

    def replay(self, record: Mapping[str, Any]) -> None:
        """An update journaled before a restart: held and summed again (acknowledged before)."""
        if self.round is None or record.get("run") != self.run or record.get("version") != self.version:
            return
        try:
            update = self.intake.to_update(record["sender"], record["body"], None)
        except ProtocolError:
            return  # cannot happen for what this worker journaled; never fatal
        self._hold(record["update_id"], update, record["bytes"])

    def start(self, now: float) -> list[Effect]:
        """After the journal's replay: tell the root again about everything held."""
        self.untallied = [self._tallied(uid, u) for uid, u in self.held.items()]
        return [Log("info", f"worker {self.worker}: holding {len(self.held)} update(s) of version {self.version}")] \
            if self.held else []

    # ------------------------------------------------------------ entry points

    def on_message(self, msg: Received, now: float, token: Any = None) -> list[Effect]:
        parsed = self.topics.parse(msg.topic)
        try:
            if parsed is None:
                raise ProtocolError(Reason.BAD_KIND, f"unexpected topic {msg.topic}")
            name, who = parsed
            M.validate(msg.kind, name, msg.body)
            if msg.kind == M.UPDATE:
                if who != msg.sender or msg.sender == self.cfg.master_name:
                    raise ProtocolError(Reason.WRONG_SENDER, f"{msg.sender} on the update topic of {who}")
                return self._on_update(msg, token, now)
            if msg.sender != self.cfg.master_name:
                raise ProtocolError(Reason.WRONG_SENDER, f"{msg.kind} signed by {msg.sender}")
            if msg.kind == M.ROUND:
                return self._on_round(msg, now) + _ack(token)
            if msg.kind == M.COLLECT:
                return self._on_collect(msg) + _ack(token)
            return _ack(token)
        except ProtocolError as exc:
            return [Log("warning", f"rejected message from {msg.sender}: {exc.reason} {exc.detail}".rstrip())] \
                + _ack(token)

    def flush(self, now: float) -> list[Effect]:
        """The tally of what was accepted since the last one (the shell calls this once the
        journal that holds it is on disk: when its queue is idle, and on ticks)."""
        if not self.untallied or self.run is None or self.round is None:
            return []
        entries, self.untallied = self.untallied, []
        return [Publish(self.topics.worker(self.worker), M.TALLY,
                        {"run": self.run, "updates": [e.to_wire() for e in entries]},
                        version=self.version, round=self.round.number),
                Log("info", f"round {self.round.number}: tallied {len(entries)} update(s), "
                            f"{len(self.held)} held for version {self.version}")]

    def tick(self, now: float) -> list[Effect]:
        """Updates that waited too long for their round: refused as stale (their slave
        sends them again if the root re-plans without them)."""
        expired = [e for e in self.early if now - e.since >= EARLY_SECONDS]
        self.early = [e for e in self.early if now - e.since < EARLY_SECONDS]
        fx: list[Effect] = []
        for e in expired:
            fx += [Log("info", f"update {e.msg.body['update_id']} from {e.msg.sender}: its round "
                               f"{e.msg.manifest.round} was not announced within {EARLY_SECONDS:g} s")] + _ack(e.token)
        return fx

    # ------------------------------------------------------------ rounds and updates

    def _on_round(self, msg: Received, now: float) -> list[Effect]:
        run, version, number = msg.body["run"], msg.manifest.version, msg.manifest.round
        if run == self.run and version < self.version:
            return []  # an older retained round, after a restart
        fx: list[Effect] = []
        if run != self.run or version != self.version:
            dropped = len(self.held)
            self.run, self.store.version = run, version
            self.sum = PartialSum.zeros_like(self.store.params)
            self.untallied, self._bytes = [], {}
            self.round = RoundState(number, list(msg.body["participants"]), float(msg.body["deadline"]), now, 0)
            fx.append(Checkpoint(self.checkpoint_state()))  # the journal starts afresh
            if dropped:
                fx.append(Log("info", f"version {version}: {dropped} update(s) of the last version forgotten"))
        else:  # the same version: a re-planned or re-announced round; what is held still counts
            assert self.round is not None
            self.round.number, self.round.participants = number, list(msg.body["participants"])
            self.round.deadline = float(msg.body["deadline"])
        early, self.early = self.early, []
        for e in early:
            fx += self._on_update(e.msg, e.token, e.since)
        return fx

    def _on_update(self, msg: Received, token: Any, now: float) -> list[Effect]:
        rnd, m = self.round, msg.manifest
        if rnd is None or msg.body.get("base_version", -1) > self.version or \
                (msg.body.get("base_version") == self.version and m.round > rnd.number):
            if len(self.early) < EARLY_MAX:  # its round is not known here yet
                self.early.append(_Early(msg, token, now))
                return []
        verdict = self.intake.screen(msg, rnd, rnd.number if rnd else 0, declared_samples=None)
        uid = msg.body["update_id"]
        if isinstance(verdict, ClientUpdate) and verdict.kind == "student":
            verdict = Refusal(f"student update {uid} from {msg.sender} refused: a sharded job takes deltas and "
                              f"gradients only (a student's step needs the global model)", "warning", Reason.BAD_KIND)
        if isinstance(verdict, Refusal):
            if verdict.duplicate and uid in self.held:
                self.untallied.append(self._tallied(uid, self.held[uid]))  # the root may have lost it: tell again
            return [Log(verdict.level, f"worker {self.worker}: {verdict.log}")] + _ack(token)
        assert rnd is not None and self.run is not None
        record = {"update_id": uid, "sender": msg.sender, "round": rnd.number, "version": self.version,
                  "run": self.run, "bytes": msg.wire_bytes}
        self._hold(uid, verdict, msg.wire_bytes)
        self.untallied.append(self._tallied(uid, self.held[uid]))
        return [Journal(record, msg.raw)] + _ack(token)

    def _hold(self, uid: str, update: ClientUpdate, nbytes: int) -> None:
        assert self.round is not None
        self.sum.add(uid, weighted_step(update, self.store.params, self.strategy), update.aggregation_weight)
        self.round.count(uid, replace(update, tensors={}), nbytes)
        self._bytes[uid] = nbytes

    def _tallied(self, uid: str, u: ClientUpdate) -> Tallied:
        return Tallied(uid, u.sender, u.kind, u.num_samples, self._bytes.get(uid, 0))

    # ------------------------------------------------------------ collections

    def _on_collect(self, msg: Received) -> list[Effect]:
        body, m = msg.body, msg.manifest
        if body["run"] != self.run or m.version != self.version or self.worker not in body["assign"]:
            return []  # not for what this worker holds (an old retained one, or nothing asked of it)
        want = parse_weights(body["assign"][self.worker], "collect")
        missing = sorted(want.keys() - self.held.keys())
        if missing:
            return [Log("error", f"collect {body['collect']} asks worker {self.worker} for {len(missing)} update(s) "
                                 f"it does not hold ({', '.join(missing[:3])}...): not answered; the root "
                                 f"re-plans the round without them")]
        total = self.sum if same_weights(want, self.sum.weights) else self._rebuild(want)
        self.answered += 1
        return [Log("info", f"round {m.round}: partial sum of {len(want)} update(s) for collect {body['collect']}"),
                Publish(self.topics.worker(self.worker), M.PARTIAL, partial_body(self.run, body["collect"], total),
                        version=self.version, round=m.round)]

    def _rebuild(self, want: Mapping[str, float]) -> PartialSum:
        """The sum of exactly the updates `want` names, with its weights, from the journal."""
        total = PartialSum.zeros_like(self.store.params)
        for record in self.reread():
            uid = record.get("update_id")
            if uid in want and uid not in total.weights and record.get("version") == self.version:
                update = self.intake.to_update(record["sender"], record["body"], None)
                total.add(uid, weighted_step(update, self.store.params, self.strategy), want[uid])
        if total.weights.keys() != want.keys():
            raise RuntimeError(f"journal lacks {sorted(want.keys() - total.weights.keys())[:3]} it holds")
        return total


def _ack(token: Any) -> list[Effect]:
    return [] if token is None else [Ack(token)]
