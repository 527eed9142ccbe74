"""The slave's core: a sans-I/O state machine from instruction to updates.

It answers the master's instruction (confirm or decline), adopts the parameter sets
it is sent, and when a round names it, asks its shell to train (`Train`, run off the
core's thread because it takes seconds) and then publishes the update. Resume state
(`SaveState`) is written *before* an update is published, so a slave killed after
training re-sends the same update (same `update_id`, which the master de-duplicates)
instead of training twice or losing it.

Every claim can be re-established from either side (docs/PROTOCOL.md section 11.5):
the slave keeps the instruction it answered, so a restarted slave needs nothing
retained to make sense of a model; it confirms again when the master asks
(`reconfirm`) or, unanswered, on its own at growing intervals; a new run of the job
is a new instruction; and it never goes back to a model older than one it held.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import cbor2
import torch
from torch import nn
from torch.utils.data import Dataset

from fedmq.common import messages as M
from fedmq.common.channel import Received
from fedmq.common.effects import Effect, Log, Publish, SaveState, Subscribe, Train
from fedmq.common.errors import ProtocolError
from fedmq.common.jobconfig import SlaveConfig
from fedmq.common.layout import Layout
from fedmq.common.modelspec import build_model, float_state, load_float_state
from fedmq.common.compression import ErrorFeedback, WrongBase, apply_model_delta, encode_update
from fedmq.common.compression_settings import CompressionSettings
from fedmq.common.privacy import privatize
from fedmq.common.privacy_settings import DPSettings
from fedmq.common.tensors import Limits, encode_state_dict, spec_of

from .assembly import ModelAssembly
from .plan import SlavePlan, plan_for, train_parts
from .trainer import LocalResult, train_local

Params = dict[str, torch.Tensor]
KEEP_DONE_ROUNDS = 64
CONFIRM_RETRY = (30.0, 300.0)  # an unanswered confirm is sent again after 30 s, doubling up to 5 min


@dataclass(frozen=True)
class JobSettings:
    compression: CompressionSettings
    privacy: DPSettings | None


@dataclass
class RoundInfo:
    number: int
    version: int
    participants: list[str]
    received: list[str]  # participants whose update the master holds already
    deadline: float


@dataclass
class SlaveCore:
    cfg: SlaveConfig
    public_key: bytes  # raw Ed25519, sent with confirm/decline so an open-enrollment master can learn it
    samples: int
    capabilities: dict[str, Any] = field(default_factory=dict)
    # Why the local data cannot train a model built from the instruction (None: it can).
    data_misfit: Callable[..., str | None] | None = None  # (model[, task=T]): task for multi-task jobs
    task_samples: Mapping[str, int] = field(default_factory=dict)  # local samples per task (the data's task column)
    instruction: dict[str, Any] | None = None
    instruction_digest: bytes = b""
    enrolled: bool = False
    declined: str | None = None  # why this slave declined the current instruction
    model: nn.Module | None = None
    version: int = -1  # of the model held in memory
    floor: int = -1  # the newest version ever held in this run: nothing older is adopted
    round: RoundInfo | None = None
    training: bool = False
    done_rounds: list[int] = field(default_factory=list)
    pending: dict[str, Any] | None = None  # last update body, kept until a newer version arrives
    _confirmed_at: float | None = None  # an unanswered confirm went out then
    _retry: float = CONFIRM_RETRY[0]
    settings: JobSettings | None = None  # what the instruction says about compression and privacy
    feedback: ErrorFeedback | None = None  # what uplink compression left out, sent later (error feedback)
    _plan: SlavePlan | None = None  # what it trains in the instruction's job (slave/plan.py)
    _assembly: ModelAssembly | None = None  # collects the parts of a model version

    def __post_init__(self) -> None:
        self.topics = self.cfg.topics

    @property
    def run(self) -> str | None:
        return self.instruction.get("run") if self.instruction else None

    @property
    def plan(self) -> SlavePlan:
        """Which model parts this slave trains and holds (the whole model in a plain job)."""
        if self._plan is None:
            assert self.instruction is not None
            plan = self._make_plan(self.instruction)
            self._plan = plan if isinstance(plan, SlavePlan) else SlavePlan(Layout.from_instruction(self.instruction))
        return self._plan

    @property
    def assembly(self) -> ModelAssembly:
        if self._assembly is None:
            self._assembly = ModelAssembly(self.plan.layout, self.plan.holds)
        return self._assembly

    def _make_plan(self, body: Mapping[str, Any]) -> SlavePlan | str:
        return plan_for(body, student=self.cfg.student, samples=self.samples, task_samples=self.task_samples,
                        misfit=self.data_misfit)

    @property
    def asynchronous(self) -> bool:
        """Asynchronous jobs want updates even from an older version (the master weighs staleness)."""
        return bool(self.instruction and self.instruction["round_policy"].get("asynchronous"))

    # ------------------------------------------------------------ entry points

    def start(self, now: float, saved: Mapping[str, Any] | None = None) -> list[Effect]:
        """Subscribe; after a restart, pick up where the state file says we were."""
        fx: list[Effect] = [Subscribe(self.topics.master("instruction")), Subscribe(self.topics.direct(self.cfg.slave_id))]
        if saved:
            self.instruction = dict(saved["instruction"]) if saved.get("instruction") else None
            self.instruction_digest = bytes(saved.get("instruction_digest", b"")) if self.instruction else b""
            self.enrolled = bool(saved.get("enrolled")) and self.instruction is not None
            self.declined = saved.get("declined")
            self.floor = int(saved.get("version", -1))
            self.done_rounds = list(saved.get("done_rounds", []))
            self.pending = saved.get("pending")
            if self.instruction is not None and self._adopt_settings(self.instruction) is None and self.feedback:
                self.feedback.load_state_dict(saved.get("feedback") or {"residual": {}})
        if self.instruction is not None and not self.enrolled:
            # It confirmed (or declined) before the restart and heard nothing back; the data
            # may have changed meanwhile: decide again.
            fx += self._answer(now)
        if self.enrolled:
            fx += self._follow(fetch_model=True)
        if self.pending is not None:
            p = self.pending
            fx.append(Log("info", f"re-sending update {p['body']['update_id']} after restart"))
            fx.append(self._update(p["body"], p["body"]["base_version"], p["round"]))
        return fx

    def on_message(self, msg: Received, now: float) -> list[Effect]:
        parsed = self.topics.parse(msg.topic)
        if parsed is None:
            return [Log("warning", f"message on unexpected topic {msg.topic}")]
        M.validate(msg.kind, parsed[0], msg.body)
        if msg.kind == M.INSTRUCTION:
            return self._on_instruction(msg, now)
        if msg.kind == M.RECONFIRM and self.instruction is None:
            # Asked to confirm, yet no instruction: what was retained was junk or lost.
            return [Log("info", "asked to confirm, but no instruction here: fetching the retained one again"),
                    Subscribe(self.topics.master("instruction"))]
        if msg.kind != M.INSTRUCTION and msg.body.get("run") != self.run:
            return [Log("info", f"{msg.kind} of run {msg.body.get('run')!r} ignored (the instruction's run is {self.run!r})")]
        if msg.kind == M.MODEL:
            return self._on_model(msg, now, direct=parsed[0] == "to")
        if msg.kind == M.ROUND:
            b = msg.body
            self.round = RoundInfo(msg.manifest.round, msg.manifest.version, list(b["participants"]),
                                   list(b["received"]), float(b["deadline"]))
            return self._resend_pending() + self._maybe_train(now)
        if msg.kind == M.RECONFIRM:
            return self._on_reconfirm(now)
        if msg.kind == M.DELTA:
            return self._on_delta(msg, now)
        return [Log("warning", f"ignoring {msg.kind} message")]

    def tick(self, now: float) -> list[Effect]:
        """Confirm again if the last confirm was not answered (the master never had it,
        or lost it): without this a slave could wait for ever in a state it cannot leave."""
        if self.enrolled or self._confirmed_at is None or now - self._confirmed_at < self._retry:
            return []
        self._retry = min(self._retry * 2, CONFIRM_RETRY[1])
        return [Log("info", "no answer to the confirm; confirming again")] + self._confirm(now)

    def on_trained(self, rnd: int, version: int, result: LocalResult, now: float, bytes_in: int = 0) -> list[Effect]:
        """Local training finished (in the shell's worker): persist, then publish the update."""
        self.training = False
        if version != self.version and not self.asynchronous:
            return [Log("info", f"round {rnd}: model moved on to version {self.version} while training; dropped")
                    ] + self._maybe_train(now)  # the newer round may be waiting for us
        body = {
            "update_id": f"{self.cfg.slave_id}/{rnd}/{version}", "kind": result.kind, "base_version": version,
            "samples": result.num_samples,
            "metrics": {**{k: float(v) for k, v in result.metrics.items()}, "bytes_in": bytes_in},
            "tensors": self._wire_tensors(result),
            **({"parts": result.parts} if result.parts else {}),  # a model with parts: those it trained
        }
        self.pending = {"round": rnd, "body": body}
        self.done_rounds = (self.done_rounds + [rnd])[-KEEP_DONE_ROUNDS:]
        return [
            SaveState(self.state()),
            self._update(body, version, rnd),
            Log("info", f"round {rnd}: sent {result.kind} update ({result.num_samples} samples, "
                        f"loss {result.metrics.get('train_loss', float('nan')):.4f})"),
        ] + self._maybe_train(now)  # a newer round may have come meanwhile

    def on_training_failed(self, rnd: int, error: str) -> list[Effect]:
        """Local training raised: withdraw (a decline the master shows in its status), so no
        round waits for this slave; a restart decides afresh."""
        self.training = False
        return [Log("error", f"round {rnd}: local training failed: {error}")] + self._decline(
            f"local training failed: {error}")

    def on_samples(self, samples: int, now: float) -> list[Effect]:
        """The local sample count changed (a relay's devices enrolled): answer the
        instruction held again, so the master learns the new count and a decline for
        too few samples becomes a confirm."""
        if samples == self.samples:
            return []
        self.samples = samples
        return self._answer(now) if self.instruction is not None else []

    def state(self) -> dict[str, Any]:
        return {"instruction": self.instruction, "instruction_digest": self.instruction_digest,
                "enrolled": self.enrolled, "declined": self.declined, "version": max(self.floor, self.version),
                "done_rounds": self.done_rounds, "pending": self.pending,
                "feedback": self.feedback.state_dict() if self.feedback else None}

    def _wire_tensors(self, result: LocalResult) -> dict[str, Any]:
        """The update's tensors as they travel: noised (DP), then compressed (with error
        feedback) -- a delta or gradient; a student's whole weights go uncompressed, with
        DP noised as the step w − x from the global student x it was trained from."""
        if result.kind == "student" and self.settings is not None and self.settings.privacy is not None:
            held = float_state(self.model)  # (synchronous: still the version it trained from)
            step = privatize({k: w - held[k] for k, w in result.tensors.items()}, self.settings.privacy)
            return encode_state_dict({k: held[k] + s for k, s in step.items()})
        if result.kind not in ("delta", "gradient") or self.settings is None:
            return encode_state_dict(result.tensors)
        tensors = result.tensors
        if self.settings.privacy is not None:
            tensors = privatize(tensors, self.settings.privacy)
        return encode_update(tensors, self.settings.compression.uplink, self.feedback)

    # ------------------------------------------------------------ enrollment

    def _on_instruction(self, msg: Received, now: float) -> list[Effect]:
        body = msg.body
        digest = hashlib.sha256(cbor2.dumps(body, canonical=True)).digest()
        if digest == self.instruction_digest:
            return []  # the same instruction again (retained redelivery, master restart)
        if body["run"] != self.run:  # a new run of the job starts from nothing
            self.model, self.version, self.floor, self.round = None, -1, -1, None
            self.done_rounds, self.pending, self.feedback = [], None, None
        self.instruction_digest, self.instruction = digest, dict(body)
        self.enrolled = False
        self._plan = self._assembly = None  # the parts it trains follow from the instruction
        return self._answer(now)

    def _answer(self, now: float) -> list[Effect]:
        """Confirm the instruction held, or decline it with the reason."""
        assert self.instruction is not None
        why = self._cannot_serve(self.instruction)
        if why:
            return [Log("warning", f"declining instruction: {why}")] + self._decline(why)
        self.declined = None
        return [Log("info", f"confirming instruction for task {self.instruction['task']!r} ({self.samples} samples)"),
                *self._confirm(now), SaveState(self.state())]

    def _cannot_serve(self, body: Mapping[str, Any]) -> str | None:
        if self.cfg.tasks and body["task"] not in self.cfg.tasks:
            return f"no training samples for task {body['task']!r} (serves {', '.join(self.cfg.tasks)})"
        if body["update"] not in self.cfg.update_kinds:
            return f"update kind {body['update']!r} not supported here"
        need = body["requirements"].get("min_samples", 1)
        if self.samples < need:
            return f"{self.samples} local samples, the job needs {need}"
        if why := self._adopt_settings(body):
            return why
        plan = self._make_plan(body)  # builds the model (or its parts) and checks the data against it
        if isinstance(plan, str):
            return plan
        if self.model is not None and set(float_state(self.model)) != set(float_state(plan.build())):
            self.model, self.version = None, -1  # the parts it holds changed: take the next model afresh
        self._plan, self._assembly = plan, None
        return None

    def _adopt_settings(self, body: Mapping[str, Any]) -> str | None:
        """Read the instruction's compression and privacy settings (None), or say why not."""
        try:
            compression = CompressionSettings.from_wire(body.get("compression", {}))
            privacy = DPSettings.from_wire(body["privacy"]) if "privacy" in body else None
        except ProtocolError as exc:
            return f"cannot follow the instruction's settings: {exc.detail}"
        self.settings = JobSettings(compression, privacy)
        uplink = compression.uplink
        if not uplink.error_feedback:
            self.feedback = None
        elif self.feedback is None or self.feedback.encoding != uplink:
            self.feedback = ErrorFeedback(uplink)
        return None

    def _confirm(self, now: float) -> list[Effect]:
        self._confirmed_at = now
        return [Publish(self.topics.slave("confirm", self.cfg.slave_id), M.CONFIRM,
                        {"public_key": self.public_key, "samples": self.samples, "capabilities": self.capabilities,
                         **self.plan.confirm_fields()})]  # a model with parts: the parts it trains

    def _decline(self, why: str) -> list[Effect]:
        self.declined, self.enrolled, self._confirmed_at = why, False, None
        return [Publish(self.topics.slave("confirm", self.cfg.slave_id), M.DECLINE,
                        {"public_key": self.public_key, "reason": why}),
                SaveState(self.state())]

    def _on_reconfirm(self, now: float) -> list[Effect]:
        """The master does not count this slave as enrolled (it lost its state, or the key
        was added to its allowlist after this slave confirmed): confirm again."""
        if self.declined is not None or self.instruction is None:
            return []
        self.enrolled, self._retry = False, CONFIRM_RETRY[0]
        return [Log("info", "the master asks for a new confirm")] + self._answer(now)

    # ------------------------------------------------------------ models and rounds

    def _on_model(self, msg: Received, now: float, *, direct: bool) -> list[Effect]:
        version = msg.manifest.version
        if version < self.floor:
            return [Log("warning", f"model version {version} refused: this slave held version {self.floor} already")]
        # A model on this slave's own topic is the master's answer to its confirm.
        first = direct and not self.enrolled
        newer = version > self.version
        if not newer and not first:
            return []
        if newer:
            model = self.model if self.model is not None else self.plan.build()
            spec = spec_of(float_state(model))
            try:  # (a model with parts comes part by part: the assembly says when a version is whole)
                tensors = M.tensors_of(msg.body, Limits.for_model(spec), expected=spec,
                                       partial=self.plan.holds is not None)
                tensors = self.assembly.offer(version, tensors)
                if tensors is None:
                    return []  # the other parts of this version are still to come
                load_float_state(model, tensors)
            except ProtocolError as exc:
                return [Log("warning", f"rejected model version {version}: {exc}")]
            self.model, self.version, self.floor = model, version, max(self.floor, version)
            if self.pending is not None and self.pending["body"]["base_version"] < version:
                self.pending = None
        fx: list[Effect] = []
        if first:
            self.enrolled, self._confirmed_at, self._retry = True, None, CONFIRM_RETRY[0]
            fx += self._follow(fetch_model=False)  # it came with this message: not the retained copy too
        fx += [SaveState(self.state()), Log("info", f"model version {version}")]
        return fx + self._maybe_train(now)

    def _on_delta(self, msg: Received, now: float) -> list[Effect]:
        """A compressed change from the version this slave holds to the next (PROTOCOL.md
        9.5). Against another base (it missed one) it is ignored: the master sends a full
        model to a slave that comes back, and a keyframe every few versions."""
        version = msg.manifest.version
        if not self.enrolled or self.model is None or version <= self.version:
            return []
        try:
            params = apply_model_delta(float_state(self.model), msg.body, held_version=self.version)
        except WrongBase as exc:
            return [Log("info", f"delta to version {version} not applied: {exc}; waiting for a full model")]
        except ProtocolError as exc:
            return [Log("warning", f"rejected delta to version {version}: {exc}")]
        load_float_state(self.model, params)
        self.version, self.floor = version, max(self.floor, version)
        if self.pending is not None and self.pending["body"]["base_version"] < version:
            self.pending = None
        return [SaveState(self.state()), Log("info", f"model version {version} (delta)")] + self._maybe_train(now)

    def _resend_pending(self) -> list[Effect]:
        """A round announced again (master restarted, or re-planned it) that does not list
        this slave's update as received lost it: send it again (a new message, same
        update_id). Sent once per need: not when the master says it holds it."""
        rnd, p = self.round, self.pending
        if rnd is None or p is None or p["round"] != rnd.number or p["body"]["base_version"] != rnd.version:
            return []
        if self.cfg.slave_id not in rnd.participants or self.cfg.slave_id in rnd.received:
            return []
        return [self._update(p["body"], rnd.version, rnd.number)]

    def _update(self, body: dict[str, Any], version: int, rnd: int) -> Publish:
        """The update message; in one MQTT message when the instruction asks for whole updates
        (a sharded job: the broker hands each message to one of its aggregator workers)."""
        whole = bool(self.instruction and self.instruction["round_policy"].get("whole_updates"))
        return Publish(self.topics.slave("update", self.cfg.slave_id), M.UPDATE, body, version=version, round=rnd,
                       whole=whole)

    def _follow(self, *, fetch_model: bool) -> list[Effect]:
        """Follow the job once enrolled: models (or the parts of one it holds), rounds, deltas.
        A slave that was just sent its model does not fetch the retained one too (the same bytes again)."""
        return [*(Subscribe(t, retained=fetch_model) for t in self.plan.model_topics(self.topics)),
                Subscribe(self.topics.master("round")),
                Subscribe(self.topics.master("delta"))]

    def _maybe_train(self, now: float) -> list[Effect]:
        """Train when the current round names us on the version we hold. A synchronous
        round's deadline ends it (a late update would be dropped); an asynchronous master
        takes updates whenever they come, so a slave that finished older work after the
        deadline still trains -- waiting for a re-plan would idle it, forever if the
        master is down."""
        rnd = self.round
        if (
            rnd is None or not self.enrolled or self.training or self.model is None
            or self.cfg.slave_id not in rnd.participants or rnd.number in self.done_rounds
            or rnd.version != self.version or (now >= rnd.deadline and not self.asynchronous)
        ):
            return []
        self.training = True
        return [Train(rnd.number, self.version, {k: v.clone() for k, v in float_state(self.model).items()})]


def run_training(instruction: Mapping[str, Any], params: Params, dataset: Dataset, *, seed: int) -> LocalResult:
    """Do what a `Train` effect asks, with the instruction's settings (called by the shell's worker)."""
    if Layout.from_instruction(instruction).grouped:  # students of a teacher, or an encoder and task heads
        return train_parts(instruction, params, dataset, seed=seed)
    model = build_model(instruction["model"])
    load_float_state(model, params)
    t = instruction["train"]
    kind = instruction["update"]
    constraints = CompressionSettings.from_wire(instruction.get("compression", {})).constraints
    return train_local(model, dataset, kind=kind, epochs=t["epochs"], batch_size=t["batch_size"], lr=t["lr"],
                       momentum=t["momentum"], weight_decay=t["weight_decay"], prox_mu=t["prox_mu"],
                       grad_batches=t["grad_batches"] or None, seed=seed,
                       **(constraints.train_kwargs() if kind == "delta" else {}))
