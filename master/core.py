"""The master's core: a sans-I/O state machine composing the registry, schedule, model store and ledger.

Verified messages and clock ticks go in (`on_message`, `on_rejected`, `tick`); lists of
effects come out (see `common/effects.py`). Nothing here touches the network, the
disk or the real clock, so a thousand simulated slaves and a fake clock cost nothing
in a unit test, and durability ("journal before ack", "checkpoint before publishing
the new version") can be read off the effect lists.

One update's path, through named parts:

1. `on_message` routes a slave's `update` to `_on_update`; the `SlaveRegistry` says
   whether its sender is enrolled.
2. The `UpdateLedger` says whether it was applied already (a duplicate); the
   schedule (`SyncRounds` or `AsyncRounds`) whether it can count now (round, version,
   participant, staleness); the `ModelStore` whether its tensors fit the model.
3. It is journaled, acknowledged and counted in the open `RoundState`; the schedule
   either keeps it for the round (synchronous) or hands it to the strategy at once
   (asynchronous), which may yield new parameters.
4. When the schedule says the round is ready (quorum, everyone answered, deadline), the
   strategy aggregates; `_new_version` makes the store adopt the parameters,
   checkpoints, publishes the model and metrics, and opens the next round.

Enrollment (the shared-encoder handshake of the source documents): the master
publishes the instruction (retained); a slave confirms or declines; an allowed key that
confirms is enrolled and sent the current model on its own topic. The retained model
is readable by any broker account the ACL lets read it: enrollment decides who may
contribute, the broker's ACL who may read.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from torch import nn

from fedmq.common import messages as M
from fedmq.common.channel import Received
from fedmq.common.effects import Ack, Checkpoint, Effect, Finish, Journal, Log, Publish, PublishJson
from fedmq.common.errors import ProtocolError, Reason
from fedmq.common.jobconfig import JobConfig
from fedmq.common.layout import Layout
from fedmq.common.strategies import ClientUpdate, Strategy
from fedmq.common.update_safety import all_finite_params

from . import checkpoint
from .job import instruction_body
from .intake import Refusal, UpdateIntake
from .enrollment import Enrollment, Outcome
from .ledger import UpdateLedger
from .modelstore import ModelStore, Params
from .partspublisher import make_publisher
from .phase import JobPhase
from .registry import SlaveRegistry
from .rejections import Rejections
from .report import StatusBoard, Traffic, version_row
from .rounds import Rounds
from .schedule import RoundState, Schedule, keep_bases_for, make_schedule

COALESCE_SECONDS = 1.0  # slave-driven status changes and async round re-announcements: at most one per this
STATUS_SECONDS = 10.0  # the retained status is republished at least this often: its `updated` is the heartbeat
Evaluator = Callable[[Params], Mapping[str, float]]


class MasterCore:
    def __init__(self, cfg: JobConfig, model: nn.Module, strategy: Strategy, *, evaluate: Evaluator | None = None,
                 timer: Callable[[], float] = lambda: 0.0, run: str = "0", schedule: Schedule | None = None) -> None:
        self.cfg = cfg
        self.timer = timer  # measures how long the strategy takes (the shell passes a real one)
        self._aggregation_seconds = 0.0
        self.run = run  # this run of the job; a checkpoint brings back the run it belongs to
        self._fresh = True  # no checkpoint restored: the run must be made durable before it is announced
        self.topics = cfg.topics
        self.model = model
        self.strategy = strategy
        self.evaluate = evaluate
        # `schedule`: another implementation of the part (the sharded root's, master/sharded.py)
        self.schedule = schedule if schedule is not None else make_schedule(strategy, cfg.policy)
        self.rounds = Rounds(cfg.policy, self.schedule, self.topics, cfg.update, coalesce=COALESCE_SECONDS)
        self.layout = Layout.of_job(cfg)  # its parts: the whole model, teacher and students, encoder and heads
        self.store = ModelStore(model, keep_bases=keep_bases_for(strategy), layout=self.layout)
        self.rejections = Rejections()
        self.registry = SlaveRegistry(open_enrollment=cfg.enrollment == "open", min_samples=cfg.min_samples,
                                      rejections=self.rejections, layout=self.layout)
        self.ledger = UpdateLedger()
        self.intake = UpdateIntake(self.store, self.ledger, self.schedule,
                                   max_update_norm=getattr(strategy, "max_update_norm", None),
                                   max_weight=getattr(strategy, "max_weight", None))
        self.discarded: list[dict[str, Any]] = []  # versions refused as non-finite (the last few)
        self.phase = JobPhase()
        self.board = StatusBoard(self.topics.master("status"), COALESCE_SECONDS)
        self.publisher = make_publisher(cfg.compression.downlink, self.store, self.topics)  # whole, or part by part
        self.traffic = Traffic()
        self.enrollment = Enrollment(self.registry, self.topics, self.publisher, cfg.policy)
        self.contributions: dict[str, int] = {}  # slave -> updates of it the strategy used (for the DP accounting)
        self.started_at: float | None = None
        self.history: list[dict[str, Any]] = []

    # Read-only views for the shell, tests and benches.
    version = property(lambda self: self.store.version)
    params = property(lambda self: self.store.params)
    state = property(lambda self: self.phase.state)
    round = property(lambda self: self.rounds.current)
    round_number = property(lambda self: self.rounds.number)
    slaves = property(lambda self: self.registry.slaves)
    not_enrolled = property(lambda self: self.registry.not_enrolled)
    rejected = property(lambda self: self.rejections.by_reason)
    applied = property(lambda self: self.ledger.applied)
    duplicates = property(lambda self: self.ledger.duplicates)

    # ------------------------------------------------------------ entry points

    def start(self, now: float) -> list[Effect]:
        """Begin (or, after a restart, resume): (re)publish every retained message."""
        self.started_at = now
        fx: list[Effect] = []
        if self._fresh:  # the run id goes out in the instruction: durable first
            self._fresh = False
            fx.append(Checkpoint(self.checkpoint_state()))
        # The model goes out at version 0 too: a slave restarted before version 1 finds it retained.
        fx += [self._instruction(), *self._model_effects()]
        if self.phase.finished:
            return fx + [*self._status(now, force=True), Finish("already finished")]
        resumed = self.version > 0 or self.phase.state == "training"
        self.phase.go("waiting")
        self.rounds.current = None
        fx += self._maybe_start_round(now, force=resumed)
        return fx + self._status(now, force=True)

    def on_message(self, msg: Received, now: float, token: Any = None) -> list[Effect]:
        """A verified message from a slave. `token` is acked once the message is safe."""
        parsed = self.topics.parse(msg.topic)
        if parsed is None or parsed[1] != msg.sender:
            return self.on_rejected(Reason.WRONG_SENDER, msg.sender, now) + _ack(token)
        try:
            M.validate(msg.kind, parsed[0], msg.body)
        except ProtocolError as exc:
            return self.on_rejected(exc.reason, msg.sender, now, str(exc)) + _ack(token)
        self.traffic.received(msg.kind, msg.wire_bytes)
        slave = self.registry.get(msg.sender)
        if slave is not None:
            slave.last_seen = now
            self.registry.going_offline.pop(msg.sender, None)  # heard from since its "offline"
        if msg.kind in (M.CONFIRM, M.DECLINE):
            return self._act(self.enrollment.confirm(msg, now, self.run), now) + _ack(token)
        if msg.kind == M.PRESENCE and msg.enrolled:  # an allowed key, perhaps not confirmed yet
            self.registry.record(msg.sender, now)
            online = msg.body["state"] == "online"
            return self._act(self.enrollment.presence(msg.sender, online, now, self.run), now) + _ack(token)
        if not self.registry.enrolled(msg.sender):
            self.registry.ignore(msg.sender, "sent an update without being enrolled" if msg.kind == M.UPDATE
                                 else "not enrolled")
            fx = self.on_rejected(Reason.NOT_ENROLLED, msg.sender, now)
            return fx + (self.enrollment.ask_to_confirm(msg.sender, now, self.run) if msg.enrolled else []) + _ack(token)
        return self._on_update(msg, now, token)

    def on_connection(self, up: bool, now: float) -> list[Effect]:
        """The shell's own broker connection came up or went down (see `Enrollment.connection`)."""
        return self.enrollment.connection(up)

    def on_keys_added(self, names: list[str], now: float) -> list[Effect]:
        """New keys in the allowlist: ask those slaves to confirm (they may have tried while unknown)."""
        return self.enrollment.keys_added(names, now, self.run)

    def on_rejected(self, reason: str, sender: str | None, now: float, detail: str = "") -> list[Effect]:
        """Count a rejected message (the shell reports those it could not verify)."""
        if reason in (Reason.UNKNOWN_KID, Reason.NOT_ENROLLED) and sender:
            self.registry.ignore(sender, "key not enrolled")
        return self.rejections.count(reason, sender, detail)

    def tick(self, now: float) -> list[Effect]:
        if self.phase.finished:
            return []
        fx: list[Effect] = self.rounds.announce_if_due(now, self.version, self.run)
        fx += self.enrollment.due(now, self.run)
        for name in self.registry.offline_due(now, self.cfg.policy.offline_grace):
            fx += self._act(self.enrollment.presence(name, False, now, self.run, grace=False), now)
        if self.round is None:
            fx += self._maybe_start_round(now)
        else:
            fx += self._silent_participants(now)
            if self.round is not None and now >= self.round.deadline:
                fx += self._deadline(now)
        return fx + self.board.publish_if_due(self, now, heartbeat=STATUS_SECONDS)

    def replay(self, record: Mapping[str, Any]) -> None:
        """Queue an update from the journal after a restart; it is re-admitted (without a
        second ack: it was acked) when the next round starts."""
        if record.get("type") == "enroll":
            self.registry.reenroll(record)
        elif not self.ledger.is_applied(record["update_id"]) and self.schedule.replayable(record, self.version):
            self.ledger.queue_replay(record)

    # ------------------------------------------------------------ entry points for composing cores
    # (the relay's RelayCore and the sharded root's RootCore drive a MasterCore from outside)

    def adopt(self, params: Params, now: float) -> list[Effect]:
        """Make `params` the next version without a round: a relay passes its upstream
        model down. A round in progress is dropped (its updates were for the old
        version), as are journaled updates waiting for replay; the version is
        checkpointed, then published, and a round opens when the rounds may."""
        fx: list[Effect] = []
        if self.round is not None:
            fx.append(Log("info", f"round {self.round.number}: dropped, the model was replaced"))
            self.rounds.close()
        self.ledger.take_replay()
        self.store.adopt(params)
        published = self.publisher.publish(self.run, self.round_number)  # decided before the checkpoint holds it
        fx += [Checkpoint(self.checkpoint_state()), *published]
        return fx + self._maybe_start_round(now, force=True) + self._status(now, force=True)

    def close_if_ready(self, now: float) -> list[Effect]:
        """Aggregate if the schedule now says the open round is ready: for a part that
        completes rounds outside the update path (the sharded root's partial sums)."""
        return self._aggregate(now) if self._ready() else []

    # ------------------------------------------------------------ enrollment and presence

    def _act(self, out: Outcome, now: float) -> list[Effect]:
        """Carry out what enrollment decided: its effects, then each change of availability."""
        fx = list(out.effects)
        for name, available in out.changes:
            fx += self._availability(name, available, now)
        return fx + (self._status(now) if out.status else [])

    def _availability(self, name: str, online: bool, now: float) -> list[Effect]:
        """A slave became available (join or start a round) or not (the round may close now)."""
        if online and self.registry.enrolled(name):
            return self._join_or_start(name, now)
        if self.round is None:
            return self._maybe_start_round(now)
        if not online and self._ready():
            return self._aggregate(now)
        return []

    def _silent_participants(self, now: float) -> list[Effect]:
        """Participants that said nothing for `silence_timeout` are presumed offline, so the
        round stops waiting for them."""
        limit, rnd = self.cfg.policy.silence_timeout, self.round
        if not limit or rnd is None:
            return []
        fx: list[Effect] = []
        for name in self.registry.silent(rnd.participants, rnd.answered, rnd.started, now, limit):
            fx += [Log("warning", f"{name} silent for {limit:.0f} s; presumed offline")]
            fx += self._act(self.enrollment.presence(name, False, now, self.run, grace=False), now)
            if self.round is not rnd:  # that closed the round
                break
        return fx

    def _join_or_start(self, name: str, now: float) -> list[Effect]:
        """A slave became available: start a round, or let it join the open one."""
        if self.round is None:
            return self._maybe_start_round(now)
        return self.rounds.join(name, now, self.version, self.run, self.registry.slaves[name].bytes_in)

    # ------------------------------------------------------------ rounds

    def _maybe_start_round(self, now: float, force: bool = False) -> list[Effect]:
        online = self.registry.online()
        if self.phase.finished or not self.rounds.may_open(online, now, waiting=self.phase.state == "waiting",
                                                           started_at=self.started_at, force=force):
            return []
        self.phase.go("training")
        fx = self.rounds.open(online, now, self.version, {n: self.registry.slaves[n].bytes_in for n in online})
        rnd = self.round
        for record in self.ledger.take_replay():  # before the announcement, which lists what the master holds
            fx += self._admit(record, now)
        if self.round is rnd:  # (an asynchronous re-admission may have made a version and a new round)
            fx.append(self._announce(now))
        if self._ready():
            fx += self._aggregate(now)
        return fx

    def _deadline(self, now: float) -> list[Effect]:
        rnd = self.round
        assert rnd is not None
        action = self.schedule.at_deadline(rnd, self.registry.any_online())
        if action == "aggregate":
            return self._aggregate(now)
        if action == "wait":
            rnd.deadline = now + self.cfg.policy.deadline
            return [Log("warning", f"round {rnd.number}: no slave online at the deadline; waiting")]
        return self._replan(now, Log("warning", f"round {rnd.number}: {len(rnd.updates)} update(s) at the deadline; "
                                                f"re-planning"))

    def _replan(self, now: float, why: Log) -> list[Effect]:
        """Open the round again with whoever is online (see `Rounds.stall` and `carry_over`)."""
        kept = self.rounds.stall()
        fx = [why] + self._maybe_start_round(now, force=True)
        self.rounds.carry_over(kept)
        return fx

    def _ready(self) -> bool:
        return self.round is not None and self.schedule.ready(self.round, self.registry.is_online)

    def _aggregate(self, now: float) -> list[Effect]:
        """Close the round: the strategy combines its updates into a new version."""
        assert self.round is not None
        started = self.timer()
        before = self.strategy.state_dict()  # taken back if the aggregate is not finite
        params = self.schedule.close(self.round, self.store)
        self._aggregation_seconds = self.timer() - started
        return self._new_version(params, now, strategy_before=before)

    # ------------------------------------------------------------ updates

    def _on_update(self, msg: Received, now: float, token: Any) -> list[Effect]:
        name, uid = msg.sender, msg.body["update_id"]
        fx: list[Effect] = []
        if self.round is None and self.schedule.opens_round_on_update and not self.phase.finished:
            self.registry.slaves[name].online = True
            fx = self._maybe_start_round(now, force=True)
        rnd = self.round
        rec = self.registry.slaves[name]
        verdict = self.intake.screen(msg, rnd, self.round_number, declared_samples=rec.samples,
                                     declared_parts=rec.parts)
        if not (isinstance(verdict, Refusal) and verdict.duplicate):
            self.registry.slaves[name].online = True  # it is evidently there, whatever presence said last
        if isinstance(verdict, Refusal):
            if verdict.duplicate:
                self.ledger.duplicates += 1
            if verdict.reason:
                self.rejections.tally(verdict.reason)
            return fx + [Log(verdict.level, verdict.log)] + _ack(token)
        assert rnd is not None
        update = verdict
        record = {"update_id": uid, "sender": name, "round": rnd.number, "version": self.version,
                  "bytes": msg.wire_bytes, "body": dict(msg.body)}
        fx += [Journal(record, msg.raw)] + _ack(token) + self._accept(update, uid, record, now)
        if self._ready():
            fx += self._aggregate(now)
        elif (self.schedule.next_round_when_all_answered and self.round is rnd
              and rnd.everyone_answered(self.registry.is_online)):
            # Every slave online is idle while the strategy still buffers: without a new
            # round they would wait for the deadline (forever, with fewer slaves online
            # than FedBuff's buffer).
            fx += self._replan(now, Log("info", f"round {rnd.number}: every participant answered, "
                                                f"version {self.version} still buffering; next round"))
        return fx

    def _admit(self, record: Mapping[str, Any], now: float) -> list[Effect]:
        """Re-admit a journaled update after a restart (it was acked before)."""
        rec = self.registry.get(record["sender"])
        try:
            update = self.intake.to_update(record["sender"], record["body"], rec.samples if rec else None,
                                           rec.parts if rec else None)
        except ProtocolError as exc:  # e.g. a job file whose max_update_norm was lowered since
            return [Log("warning", f"journaled update {record['update_id']} not re-admitted: {exc}")]
        if self.schedule.admissible(update, self.version):
            return []
        return self._accept(update, record["update_id"], record, now)

    def _accept(self, update: ClientUpdate, uid: str, record: Mapping[str, Any], now: float) -> list[Effect]:
        """Count an update in the open round; the schedule may turn it into a version at once."""
        assert self.round is not None
        self.round.count(uid, update, record["bytes"])
        self.contributions[update.sender] = self.contributions.get(update.sender, 0) + 1
        slave = self.registry.get(update.sender)
        bytes_in = record["body"].get("metrics", {}).get("bytes_in")
        if slave is not None and isinstance(bytes_in, int):
            slave.bytes_in = bytes_in
        started = self.timer()
        new, fx = self.schedule.take(uid, update, self.store)
        self._aggregation_seconds += self.timer() - started  # an asynchronous version: the sum of its steps
        return fx if new is None else fx + self._new_version(new, now)

    def _new_version(self, params: Params, now: float, *, strategy_before: Mapping[str, Any] | None = None
                     ) -> list[Effect]:
        """Adopt new parameters: checkpoint, then publish the version and open the next round."""
        rnd: RoundState | None = self.round
        assert rnd is not None
        if bad := all_finite_params(params):
            return self._discard(rnd, bad, now, strategy_before)
        version = self.store.adopt(params)
        self.ledger.mark_applied(list(rnd.updates), version, self.schedule.horizon)
        row = version_row(self, rnd, version, now)
        self._aggregation_seconds = 0.0
        self.history.append(row)
        self.rounds.close()
        target = self.cfg.target_accuracy
        done = version >= self.cfg.rounds or (target is not None and row.get("accuracy", 0.0) >= target)
        if done:
            self.phase.go("finished")
        published = self.publisher.publish(self.run, self.round_number)  # decided before the checkpoint holds it
        fx: list[Effect] = [
            Checkpoint(self.checkpoint_state()),
            *published,
            PublishJson(self.topics.master("metrics"), {"job": self.cfg.job, **row}, retain=True),
            Log("info", "round {round}: version {version}, {updates} update(s){acc}".format(
                acc=f", accuracy {row['accuracy']:.4f}" if "accuracy" in row else "", **row)),
        ]
        if done:
            return fx + self._status(now, force=True) + [
                Finish("all rounds done" if version >= self.cfg.rounds else "target reached")]
        return fx + self._maybe_start_round(now, force=True) + self._status(now, force=True)

    def _discard(self, rnd: RoundState, tensors: list[str], now: float,
                 strategy_before: Mapping[str, Any] | None) -> list[Effect]:
        """Finite updates made a non-finite model (their sum overflowed): the version is
        never checkpointed nor published. Its updates are named and refused, the strategy
        goes back to where it was, and a new round (a new number: the slaves train again)
        starts from the current version."""
        ids = sorted(rnd.updates)
        if strategy_before is not None:
            self.strategy.load_state_dict(strategy_before)
        for _ in ids:
            self.rejections.tally(Reason.NON_FINITE_AGGREGATE)
        self.ledger.mark_applied(ids, self.version, self.schedule.horizon)  # never counted again
        self.discarded = (self.discarded + [{"round": rnd.number, "update_ids": ids, "tensors": tensors[:8]}])[-5:]
        self.rounds.close()
        return ([Log("error", f"round {rnd.number}: the aggregate of {len(ids)} update(s) is not finite "
                              f"({', '.join(tensors[:4])}); version discarded, updates refused: {', '.join(ids[:10])}")]
                + self._maybe_start_round(now, force=True) + self._status(now, force=True))

    # ------------------------------------------------------------ messages out

    def _instruction(self) -> Publish:
        return Publish(self.topics.master("instruction"), M.INSTRUCTION, instruction_body(self.cfg, self.run),
                       retain=True)

    def _model_effects(self) -> list[Publish]:
        return self.publisher.retained_all(self.run, self.round_number)

    def note_published(self, kind: str, nbytes: int) -> None:
        """The shell reports what a `Publish` cost on the wire (envelope and chunks included)."""
        self.traffic.sent(kind, nbytes)

    def _announce(self, now: float) -> Publish:
        return self.rounds.announce(now, self.version, self.run)

    def _status(self, now: float, *, force: bool = False) -> list[Effect]:
        return self.board.publish(self, now, force=force)

    # ------------------------------------------------------------ persistence

    def checkpoint_state(self) -> dict[str, Any]:
        return checkpoint.snapshot(self)

    def restore(self, state: Mapping[str, Any]) -> None:
        """Load a checkpoint written by `checkpoint_state` (the shell read and decoded it)."""
        checkpoint.restore(self, state)
        self._fresh = False


def _ack(token: Any) -> list[Effect]:
    return [] if token is None else [Ack(token)]
