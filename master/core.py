"""The master's core: a sans-I/O state machine for enrollment, rounds and aggregation.

Verified messages and clock ticks go in (`on_message`, `on_rejected`, `tick`);
lists of effects come out (see `common/effects.py`). Nothing here touches the
network, the disk or the real clock, so a thousand simulated slaves and a fake clock
cost nothing in a unit test, and durability ("journal before ack", "checkpoint
before publishing the new version") can be read off the effect lists.

Flow (the shared-encoder handshake of the source documents, then FedAvg-style rounds):

1. `start`: publish the training instruction (retained) and the status.
2. A slave answers with `confirm` (its samples and capabilities) or `decline` (why).
   A confirmed slave whose key is allowed is enrolled and sent the current model on
   its own topic: only confirmed slaves get the parameter set.
3. Once enough slaves are enrolled (or `start_wait` passed), rounds begin: the master
   picks participants, publishes the model (retained) and the round (deadline).
4. Updates are journaled, then acknowledged. When the quorum is met, or the deadline
   passes with at least `min_updates`, the strategy aggregates; the new version is
   checkpointed, then published. A round short of updates at its deadline is re-planned.

With an asynchronous strategy (FedBuff, FedAsync, gradient push) step 4 changes: every
online slave takes part, updates are handed to the strategy as they arrive (weighed by
staleness), and a new version is published whenever the strategy yields one.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from fedmq.common import messages as M
from fedmq.common.channel import Received
from fedmq.common.effects import Ack, Checkpoint, Effect, Finish, Journal, Log, Publish, PublishJson, Trust
from fedmq.common.async_strategies import ASYNC_OPTIONS, make_async_strategy
from fedmq.common.errors import ProtocolError, Reason
from fedmq.common.jobconfig import JobConfig
from fedmq.common.modelspec import float_state, validate_state_dict
from fedmq.common.strategies import ClientUpdate, Strategy, make_strategy
from fedmq.common.tensors import decode_state_dict, encode_state_dict

Params = dict[str, torch.Tensor]
COALESCE_SECONDS = 1.0  # slave-driven status changes and async round re-announcements: at most one per this
Evaluator = Callable[[Params], Mapping[str, float]]


@dataclass
class SlaveRecord:
    name: str
    enrolled: bool = False
    samples: int = 0
    online: bool = False
    last_seen: float = 0.0
    declined: str | None = None
    public_key: bytes | None = None  # kept for open enrollment, so a restart re-trusts it
    capabilities: dict[str, Any] = field(default_factory=dict)
    bytes_in: int = 0  # the slave's own count of bytes it received, from its last update


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


class MasterCore:
    def __init__(self, cfg: JobConfig, model: nn.Module, strategy: Strategy, *, evaluate: Evaluator | None = None) -> None:
        self.cfg = cfg
        self.topics = cfg.topics
        self.model = model  # a template for validating update shapes; weights live in `params`
        self.params: Params = {k: v.detach().clone() for k, v in float_state(model).items()}
        self.strategy = strategy
        self.asynchronous = bool(getattr(strategy, "asynchronous", False))
        self.evaluate = evaluate
        self.version = 0
        self.round_number = 1
        self.round: RoundState | None = None
        self.state = "waiting"  # waiting -> training -> finished
        self.started_at: float | None = None
        self.slaves: dict[str, SlaveRecord] = {}
        self.applied: dict[str, int] = {}  # update id -> version it went into (idempotency)
        self._bases: dict[int, Params] = {}  # recent versions, for strategies that mix in a slave's model
        self.rejected: dict[str, int] = {}
        self.not_enrolled: dict[str, str] = {}  # name -> why its messages are ignored
        self.history: list[dict[str, Any]] = []
        self.duplicates = 0
        self._pending_replay: list[Mapping[str, Any]] = []  # journal records awaiting a round
        self._status_at = self._announced_at = float("-inf")  # when last published
        self._status_due = self._announce_due = False  # a change waits for the next tick

    # ------------------------------------------------------------ entry points

    def start(self, now: float) -> list[Effect]:
        """Begin (or, after a restart, resume): (re)publish every retained message."""
        self.started_at = now
        fx: list[Effect] = [self._instruction()]
        if self.state == "finished":
            return fx + [self._model_effect(), *self._status(now, force=True), Finish("already finished")]
        resumed = self.version > 0 or self.state == "training"
        if resumed:
            fx.append(self._model_effect())
        self.state = "waiting"
        self.round = None
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
        slave = self.slaves.get(msg.sender)
        if slave is not None:
            slave.last_seen = now
        if msg.kind in (M.CONFIRM, M.DECLINE):
            return self._on_confirm(msg, now) + _ack(token)
        if msg.kind == M.PRESENCE and msg.enrolled:  # an allowed key, perhaps not confirmed yet
            slave = slave or self.slaves.setdefault(msg.sender, SlaveRecord(msg.sender, last_seen=now))
            return self._on_presence(slave, msg.body["state"] == "online", now) + _ack(token)
        if slave is None or not slave.enrolled:
            why = "sent an update without being enrolled" if msg.kind == M.UPDATE else "not enrolled"
            self.not_enrolled.setdefault(msg.sender, why)
            return self.on_rejected(Reason.NOT_ENROLLED, msg.sender, now) + _ack(token)
        return self._on_update(slave, msg, now, token)

    def on_rejected(self, reason: str, sender: str | None, now: float, detail: str = "") -> list[Effect]:
        """Count a rejected message (the shell reports those it could not verify)."""
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        if reason in (Reason.UNKNOWN_KID, Reason.NOT_ENROLLED) and sender:
            self.not_enrolled.setdefault(sender, "key not enrolled")
        return [Log("warning", f"rejected message from {sender or '?'}: {reason} {detail}".rstrip())]

    def tick(self, now: float) -> list[Effect]:
        if self.state == "finished":
            return []
        fx: list[Effect] = []
        if self._announce_due and self.round is not None and now - self._announced_at >= COALESCE_SECONDS:
            fx.append(self._announce(now))
        if self.round is None:
            fx += self._maybe_start_round(now)
        else:
            fx += self._silent_participants(now)
            if self.round is not None and now >= self.round.deadline:
                fx += self._deadline(now)
        if self._status_due and now - self._status_at >= COALESCE_SECONDS:
            fx += self._status(now)
        return fx

    def _silent_participants(self, now: float) -> list[Effect]:
        """Participants that said nothing for `silence_timeout` (no will came: e.g. a
        half-open connection) are presumed offline, so the round stops waiting for them."""
        limit, rnd = self.cfg.policy.silence_timeout, self.round
        if not limit or rnd is None:
            return []
        answered = {u.sender for u in rnd.updates.values()}
        fx: list[Effect] = []
        for name in rnd.participants:
            slave = self.slaves[name]
            if slave.online and name not in answered and now - max(slave.last_seen, rnd.started) > limit:
                fx += [Log("warning", f"{name} silent for {limit:.0f} s; presumed offline")]
                fx += self._on_presence(slave, False, now)
                if self.round is not rnd:  # that closed the round
                    break
        return fx

    def _deadline(self, now: float) -> list[Effect]:
        assert self.round is not None
        if not self.asynchronous and len(self.round.updates) >= self.cfg.policy.min_updates:
            return self._aggregate(now)
        if self.asynchronous and not any(s.enrolled and s.online for s in self.slaves.values()):
            # Nobody to re-plan with. Keep this round, and with it the ids of the updates
            # the strategy has buffered: dropped here, a re-sent one would count twice.
            self.round.deadline = now + self.cfg.policy.deadline
            return [Log("warning", f"round {self.round.number}: no slave online at the deadline; waiting")]
        return self._replan(now, Log("warning", f"round {self.round.number}: {len(self.round.updates)} update(s) "
                                                f"at the deadline; re-planning"))

    def _replan(self, now: float, why: Log) -> list[Effect]:
        """Open the round again with whoever is online. Synchronous: same number and
        version, and what arrived still counts. Asynchronous: a fresh round number, so
        every slave online trains again; the buffered updates' ids stay, so a re-sent
        one is still known."""
        kept, self.round = self.round, None
        assert kept is not None
        if self.asynchronous:
            self.round_number += 1
        fx = [why] + self._maybe_start_round(now, force=True)
        if self.round is not None:
            self.round.updates.update(kept.updates)
            self.round.bytes_up += kept.bytes_up
            if not self.asynchronous:
                self.round.answered |= kept.answered
        return fx

    def replay(self, record: Mapping[str, Any]) -> None:
        """Queue an update from the journal after a restart; it is re-admitted (without a
        second ack: it was acked) when the next round starts."""
        if record["update_id"] in self.applied:
            return
        if not self.asynchronous and record["version"] != self.version:
            return
        self._pending_replay.append(record)

    # ------------------------------------------------------------ enrollment

    def _on_confirm(self, msg: Received, now: float) -> list[Effect]:
        name, body = msg.sender, msg.body
        slave = self.slaves.get(name)
        if slave is not None and slave.public_key and slave.public_key != body["public_key"]:
            self.not_enrolled[name] = "another key already speaks for this name"
            return self.on_rejected(Reason.WRONG_SENDER, name, now)
        if not msg.enrolled and self.cfg.enrollment != "open":
            # checked for declines too: an unknown key must not un-enroll a slave by its name
            self.not_enrolled.setdefault(name, "key not in the allowlist")
            return self.on_rejected(Reason.NOT_ENROLLED, name, now)
        if msg.kind == M.DECLINE:
            rec = self.slaves.setdefault(name, SlaveRecord(name))
            rec.declined, rec.enrolled, rec.online = body["reason"], False, False
            return [Log("info", f"{name} declined the instruction: {body['reason']}"), *self._status(now)]
        if body["samples"] < self.cfg.min_samples:
            rec = self.slaves.setdefault(name, SlaveRecord(name))
            rec.declined = f"{body['samples']} samples < min_samples {self.cfg.min_samples}"
            return [Log("info", f"{name} not enrolled: {rec.declined}"), *self._status(now)]
        rec = self.slaves.setdefault(name, SlaveRecord(name))
        rec.enrolled, rec.online, rec.declined, rec.last_seen = True, True, None, now
        rec.samples, rec.capabilities = body["samples"], dict(body["capabilities"])
        fx: list[Effect] = []
        if not msg.enrolled:
            rec.public_key = body["public_key"]
            fx += [Trust(name, rec.public_key), Log("warning", f"open enrollment: trusting new key for {name}")]
        self.not_enrolled.pop(name, None)
        fx.append(Log("info", f"{name} enrolled ({rec.samples} samples)"))
        fx.append(Publish(self.topics.direct(name), M.MODEL, self._model_body(), version=self.version))
        return fx + self._join_or_start(name, now) + self._status(now)

    def _on_presence(self, slave: SlaveRecord, online: bool, now: float) -> list[Effect]:
        was = slave.online
        slave.online = online
        fx: list[Effect] = [] if was == online else [Log("info", f"{slave.name} is {'online' if online else 'offline'}")]
        if online and slave.enrolled:
            fx += self._join_or_start(slave.name, now)
        elif self.round is None:
            fx += self._maybe_start_round(now)
        elif not online and self._round_complete():
            fx += self._aggregate(now)
        return fx + (self._status(now) if was != online else [])

    def _announce_join(self, now: float) -> list[Effect]:
        """Re-announce the asynchronous round with a new participant -- at most once per
        COALESCE_SECONDS, joins in between on a tick: each announcement goes to every
        slave and lists them all, so one per join would cost O(n^2) as a fleet joins."""
        if now - self._announced_at < COALESCE_SECONDS:
            self._announce_due = True
            return []
        return [self._announce(now)]

    def _join_or_start(self, name: str, now: float) -> list[Effect]:
        """A slave became available: start a round, or (asynchronous) let it join this one."""
        if self.round is None:
            return self._maybe_start_round(now)
        if self.asynchronous and name not in self.round.participants:
            bisect.insort(self.round.participants, name)
            self.round.bytes_down_base[name] = self.slaves[name].bytes_in
            return self._announce_join(now)
        return []

    # ------------------------------------------------------------ rounds

    def _maybe_start_round(self, now: float, force: bool = False) -> list[Effect]:
        if self.state == "finished" or self.round is not None:
            return []
        online = sorted(n for n, s in self.slaves.items() if s.enrolled and s.online)
        policy = self.cfg.policy
        waited = self.started_at is not None and now - self.started_at >= policy.start_wait
        if not online or (self.state == "waiting" and not force and len(online) < policy.min_slaves and not waited):
            return []
        rng = random.Random(f"{policy.seed}/{self.round_number}/{now}")
        k = policy.participants or len(online)
        chosen = sorted(rng.sample(online, min(k, len(online))))
        quorum = min(policy.quorum or len(chosen), len(chosen))
        self.state = "training"
        self.round = RoundState(self.round_number, chosen, now + policy.deadline, now, quorum,
                                bytes_down_base={n: self.slaves[n].bytes_in for n in chosen})
        fx: list[Effect] = [
            self._announce(now),
            Log("info", f"round {self.round_number} (version {self.version}): {len(chosen)} participant(s)"
                        + ("" if self.asynchronous else f", quorum {quorum}")),
        ]
        for record in self._take_replay():
            fx += self._admit(record, now)
        if self._round_complete():
            fx += self._aggregate(now)
        return fx

    def _announce(self, now: float) -> Publish:
        rnd = self.round
        assert rnd is not None
        self._announced_at, self._announce_due = now, False
        body = {"participants": rnd.participants, "deadline": rnd.deadline, "update": self.cfg.update}
        return Publish(self.topics.master("round"), M.ROUND, body, version=self.version, round=rnd.number, retain=True)

    def _on_update(self, slave: SlaveRecord, msg: Received, now: float, token: Any) -> list[Effect]:
        body = msg.body
        uid = body["update_id"]
        fx: list[Effect] = []
        if self.round is None and self.asynchronous and self.state != "finished":
            # No round open (every slave was presumed offline, or a restarted master found
            # none online), yet here is a usable update: open one rather than drop it.
            slave.online = True
            fx = self._maybe_start_round(now, force=True)
        rnd = self.round
        if uid in self.applied or (rnd is not None and uid in rnd.updates):
            self.duplicates += 1
            return fx + [Log("info", f"duplicate update {uid} ignored")] + _ack(token)
        slave.online = True  # it is evidently there, whatever presence said last
        if rnd is None or (not self.asynchronous and (
                msg.manifest.round != rnd.number or body["base_version"] != self.version)):
            return fx + [Log("info", f"stale update {uid} from {slave.name} (round {msg.manifest.round}, "
                                     f"version {body['base_version']}; now {self.round_number}/{self.version})")] + _ack(token)
        if not self.asynchronous and slave.name not in rnd.participants:
            return fx + [Log("info", f"{slave.name} is not a participant of round {rnd.number}")] + _ack(token)
        try:
            tensors = M.tensors_of(body)
            validate_state_dict(self.model, tensors)
            update = ClientUpdate(slave.name, body["kind"], tensors, body["samples"], body["base_version"])
        except ProtocolError as exc:
            return fx + self.on_rejected(exc.reason, slave.name, now, exc.detail) + _ack(token)
        if self.asynchronous and (why := self.strategy.admissible(update, self.version)):
            self.rejected["stale"] = self.rejected.get("stale", 0) + 1
            return fx + [Log("info", f"update {uid} from {slave.name} not used: {why}")] + _ack(token)
        record = {"update_id": uid, "sender": slave.name, "round": rnd.number, "version": self.version,
                  "bytes": msg.size, "body": dict(body)}
        fx += [Journal(record, msg.raw)] + _ack(token) + self._accept(update, uid, record, now)
        if self._round_complete():
            fx += self._aggregate(now)
        elif self.asynchronous and self.round is rnd and self._everyone_answered():
            # The strategy still buffers, and every slave online is idle: without a new
            # round they would wait for the deadline (forever, with fewer slaves online
            # than FedBuff's buffer).
            fx += self._replan(now, Log("info", f"round {rnd.number}: every participant answered, "
                                                f"version {self.version} still buffering; next round"))
        return fx

    def _admit(self, record: Mapping[str, Any], now: float) -> list[Effect]:
        body = record["body"]
        tensors = decode_state_dict(body["tensors"])
        update = ClientUpdate(record["sender"], body["kind"], tensors, body["samples"], body["base_version"])
        if self.asynchronous and self.strategy.admissible(update, self.version):
            return []
        return self._accept(update, record["update_id"], record, now)

    def _accept(self, update: ClientUpdate, uid: str, record: Mapping[str, Any], now: float) -> list[Effect]:
        """Count an update in the current round; an asynchronous strategy may yield a version."""
        assert self.round is not None
        self.round.updates[uid] = update
        self.round.answered.add(update.sender)
        self.round.bytes_up += record["bytes"]
        slave = self.slaves.get(update.sender)
        bytes_in = record["body"].get("metrics", {}).get("bytes_in")
        if slave is not None and isinstance(bytes_in, int):
            slave.bytes_in = bytes_in
        if not self.asynchronous:
            return []
        base = None
        if self.strategy.needs_base_params:
            base = self.params if update.base_version == self.version else self._bases.get(update.base_version)
        if self.strategy.needs_base_params and base is None:
            return [Log("info", f"update {uid}: base version {update.base_version} no longer kept; not used")]
        new = self.strategy.add(self.params, update, self.version, base)
        return [] if new is None else self._new_version(new, now)

    def _round_complete(self) -> bool:
        rnd = self.round
        if self.asynchronous or rnd is None or len(rnd.updates) < max(1, self.cfg.policy.min_updates):
            return False
        return len(rnd.updates) >= rnd.quorum or self._everyone_answered()

    def _everyone_answered(self) -> bool:
        rnd = self.round
        assert rnd is not None
        return all(n in rnd.answered or not self.slaves[n].online for n in rnd.participants)

    def _aggregate(self, now: float) -> list[Effect]:
        """Close a synchronous round: the strategy combines its updates into a new version."""
        assert self.round is not None
        return self._new_version(self.strategy.aggregate(self.params, list(self.round.updates.values()), self.version), now)

    def _new_version(self, params: Params, now: float) -> list[Effect]:
        """Adopt new parameters: checkpoint, then publish the version and open the next round."""
        rnd = self.round
        assert rnd is not None
        updates = list(rnd.updates.values())
        if getattr(self.strategy, "needs_base_params", False):
            self._bases[self.version] = self.params
            for old in [v for v in self._bases if v < self.version - self.strategy.max_staleness]:
                del self._bases[old]
        self.params = params
        self.version += 1
        self.applied.update({uid: self.version for uid in rnd.updates})
        keep = self.version - getattr(self.strategy, "max_staleness", 0) - 2
        self.applied = {uid: v for uid, v in self.applied.items() if v >= keep}
        row: dict[str, Any] = {
            "round": rnd.number, "version": self.version, "updates": len(updates),
            "samples": sum(u.num_samples for u in updates), "seconds": round(now - rnd.started, 3),
            "update_ids": sorted(rnd.updates),
            "bytes_up": rnd.bytes_up,
            "bytes_down": sum(max(0, self.slaves[n].bytes_in - base) for n, base in rnd.bytes_down_base.items()),
        }
        if self.asynchronous and updates:
            taus = [u.staleness(self.version - 1) for u in updates]
            row.update(staleness_mean=round(sum(taus) / len(taus), 3), staleness_max=max(taus))
        if self.evaluate is not None:
            scores = self.evaluate(self.params)
            row.update({k: float(scores[k]) for k in ("accuracy", "loss") if k in scores})
        self.history.append(row)
        self.round_number += 1
        self.round = None
        done = self.version >= self.cfg.rounds
        target = self.cfg.target_accuracy
        if target is not None and row.get("accuracy", 0.0) >= target:
            done = True
        if done:
            self.state = "finished"
        fx: list[Effect] = [
            Checkpoint(self.checkpoint_state()),
            self._model_effect(),
            PublishJson(self.topics.master("metrics"), {"job": self.cfg.job, **row}),
            Log("info", "round {round}: version {version}, {updates} update(s){acc}".format(
                acc=f", accuracy {row['accuracy']:.4f}" if "accuracy" in row else "", **row)),
        ]
        if done:
            return fx + self._status(now, force=True) + [
                Finish("all rounds done" if self.version >= self.cfg.rounds else "target reached")]
        return fx + self._maybe_start_round(now, force=True) + self._status(now, force=True)

    # ------------------------------------------------------------ messages out

    def _instruction(self) -> Publish:
        return Publish(self.topics.master("instruction"), M.INSTRUCTION, instruction_body(self.cfg), retain=True)

    def _model_body(self) -> dict[str, Any]:
        return {"tensors": encode_state_dict(self.params)}

    def _model_effect(self) -> Publish:
        return Publish(self.topics.master("model"), M.MODEL, self._model_body(), version=self.version,
                       round=self.round_number, retain=True)

    def status(self, now: float) -> dict[str, Any]:
        rnd = self.round
        return {
            "job": self.cfg.job, "state": self.state, "version": self.version, "round": self.round_number,
            "rounds": self.cfg.rounds,
            "participants": rnd.participants if rnd else [],
            "received": sorted(u.sender for u in rnd.updates.values()) if rnd else [],
            "deadline": rnd.deadline if rnd else None,
            "last_accuracy": self.history[-1].get("accuracy") if self.history else None,
            "slaves": {n: {"enrolled": s.enrolled, "online": s.online, "samples": s.samples,
                           **({"declined": s.declined} if s.declined else {})} for n, s in sorted(self.slaves.items())},
            "not_enrolled": dict(sorted(self.not_enrolled.items())),
            "rejected": dict(sorted(self.rejected.items())),
            "duplicates": self.duplicates,
            "updated": round(now, 3),
        }

    def _status(self, now: float, *, force: bool = False) -> list[Effect]:
        """The retained status. Changes the slaves cause (enrollment, presence) publish it
        at most once per COALESCE_SECONDS, later ones on a tick: the status lists every
        slave, so publishing it per change would cost O(n) per join, O(n^2) for a fleet."""
        if not force and now - self._status_at < COALESCE_SECONDS:
            self._status_due = True
            return []
        self._status_at, self._status_due = now, False
        return [PublishJson(self.topics.master("status"), self.status(now), retain=True)]

    # ------------------------------------------------------------ persistence

    def _take_replay(self) -> list[Mapping[str, Any]]:
        pending, self._pending_replay = self._pending_replay, []
        return pending

    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "job": self.cfg.job, "version": self.version, "round": self.round_number, "state": self.state,
            "params": encode_state_dict(self.params),
            "strategy": _encode_tree(self.strategy.state_dict()),
            "applied": self.applied,
            "slaves": {n: asdict(s) for n, s in self.slaves.items()},
            "history": self.history,
            "rejected": self.rejected,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Load a checkpoint written by `checkpoint_state` (the shell read and decoded it)."""
        params = decode_state_dict(state["params"])
        validate_state_dict(self.model, params)
        self.params = {k: v.clone() for k, v in params.items()}
        self.strategy.load_state_dict(_decode_tree(state["strategy"]))
        self.version, self.round_number, self.state = state["version"], state["round"], state["state"]
        self.applied = dict(state["applied"])
        # Presence is as last known: a resumed MQTT session does not resend retained
        # presence, and a slave that died meanwhile only costs one round deadline.
        self.slaves = {n: SlaveRecord(**s) for n, s in state["slaves"].items()}
        self.history = list(state["history"])
        self.rejected = dict(state["rejected"])


def instruction_body(cfg: JobConfig) -> dict[str, Any]:
    """The training instruction: everything a slave needs to build and train the model."""
    return {
        "task": cfg.task, "model": dict(cfg.model), "train": asdict(cfg.train), "update": cfg.update,
        "requirements": {"min_samples": cfg.min_samples},
        "round_policy": {"deadline": cfg.policy.deadline, "participants": cfg.policy.participants,
                         "asynchronous": is_asynchronous(cfg.strategy)},
    }


def is_asynchronous(strategy_cfg: Mapping[str, Any]) -> bool:
    return strategy_cfg.get("name") in ASYNC_OPTIONS


def make_job_strategy(cfg: JobConfig) -> Strategy:
    """The job's aggregation rule: synchronous (FedOpt family) or asynchronous."""
    if is_asynchronous(cfg.strategy):
        return make_async_strategy(cfg.strategy, gradient_lr=cfg.train.lr)
    return make_strategy(cfg.strategy, gradient_lr=cfg.train.lr)


def _ack(token: Any) -> list[Effect]:
    return [] if token is None else [Ack(token)]


def _encode_tree(value: Any) -> Any:
    """Strategy state (nested maps of tensors and numbers) in CBOR-friendly form."""
    if isinstance(value, torch.Tensor):
        return {"__tensor__": encode_state_dict({"t": value})["t"]}
    if isinstance(value, Mapping):
        return {k: _encode_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode_tree(v) for v in value]
    return value


def _decode_tree(value: Any) -> Any:
    if isinstance(value, Mapping):
        if set(value) == {"__tensor__"}:
            return decode_state_dict({"t": value["__tensor__"]})["t"].clone()
        return {k: _decode_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_decode_tree(v) for v in value]
    return value
