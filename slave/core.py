"""The slave's core: a sans-I/O state machine from instruction to updates.

It answers the master's instruction (confirm or decline), adopts the parameter sets
it is sent, and when a round names it, asks its shell to train (`Train`, run off the
core's thread because it takes seconds) and then publishes the update. Resume state
(`SaveState`) is written *before* an update is published, so a slave killed after
training re-sends the same update (same `update_id`, which the master de-duplicates)
instead of training twice or losing it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Mapping

import cbor2
import torch
from torch import nn
from torch.utils.data import Dataset

from fedmq.common import messages as M
from fedmq.common.channel import Received
from fedmq.common.effects import Effect, Log, Publish, SaveState, Subscribe, Train
from fedmq.common.errors import ConfigError, ProtocolError
from fedmq.common.jobconfig import SlaveConfig
from fedmq.common.modelspec import build_model, float_state, load_float_state
from fedmq.common.tensors import encode_state_dict

from .trainer import LocalResult, distill_local, train_local

Params = dict[str, torch.Tensor]
KEEP_DONE_ROUNDS = 64


@dataclass
class RoundInfo:
    number: int
    version: int
    participants: list[str]
    deadline: float


@dataclass
class SlaveCore:
    cfg: SlaveConfig
    public_key: bytes  # raw Ed25519, sent with confirm/decline so an open-enrollment master can learn it
    samples: int
    capabilities: dict[str, Any] = field(default_factory=dict)
    instruction: dict[str, Any] | None = None
    instruction_digest: bytes = b""
    enrolled: bool = False
    model: nn.Module | None = None
    version: int = -1
    round: RoundInfo | None = None
    training: bool = False
    done_rounds: list[int] = field(default_factory=list)
    pending: dict[str, Any] | None = None  # last update body, kept until a newer version arrives

    def __post_init__(self) -> None:
        self.topics = self.cfg.topics

    # ------------------------------------------------------------ entry points

    def start(self, now: float, saved: Mapping[str, Any] | None = None) -> list[Effect]:
        """Subscribe; after a restart, pick up where the state file says we were."""
        fx: list[Effect] = [Subscribe(self.topics.master("instruction")), Subscribe(self.topics.direct(self.cfg.slave_id))]
        if saved:
            self.instruction_digest = bytes(saved.get("instruction_digest", b""))
            self.enrolled = bool(saved.get("enrolled"))
            self.done_rounds = list(saved.get("done_rounds", []))
            self.pending = saved.get("pending")
        if self.enrolled:
            fx += self._follow()
        if self.pending is not None:
            p = self.pending
            fx.append(Log("info", f"re-sending update {p['body']['update_id']} after restart"))
            fx.append(Publish(self.topics.slave("update", self.cfg.slave_id), M.UPDATE, p["body"],
                              version=p["body"]["base_version"], round=p["round"]))
        return fx

    def on_message(self, msg: Received, now: float) -> list[Effect]:
        parsed = self.topics.parse(msg.topic)
        if parsed is None:
            return [Log("warning", f"message on unexpected topic {msg.topic}")]
        M.validate(msg.kind, parsed[0], msg.body)
        if msg.kind == M.INSTRUCTION:
            return self._on_instruction(msg)
        if msg.kind == M.MODEL:
            return self._on_model(msg, now)
        if msg.kind == M.ROUND:
            b = msg.body
            self.round = RoundInfo(msg.manifest.round, msg.manifest.version, list(b["participants"]), float(b["deadline"]))
            return self._resend_pending() + self._maybe_train(now)
        return [Log("warning", f"ignoring {msg.kind} message")]

    def on_trained(self, rnd: int, version: int, result: LocalResult, now: float, bytes_in: int = 0) -> list[Effect]:
        """Local training finished (in the shell's worker): persist, then publish the update."""
        self.training = False
        if version != self.version and not self.asynchronous:
            return [Log("info", f"round {rnd}: model moved on to version {self.version} while training; dropped")]
        body = {
            "update_id": f"{self.cfg.slave_id}/{rnd}/{version}", "kind": result.kind, "base_version": version,
            "samples": result.num_samples,
            "metrics": {**{k: float(v) for k, v in result.metrics.items()}, "bytes_in": bytes_in},
            "tensors": encode_state_dict(result.tensors),
        }
        self.pending = {"round": rnd, "body": body}
        self.done_rounds = (self.done_rounds + [rnd])[-KEEP_DONE_ROUNDS:]
        return [
            SaveState(self.state()),
            Publish(self.topics.slave("update", self.cfg.slave_id), M.UPDATE, body, version=version, round=rnd),
            Log("info", f"round {rnd}: sent {result.kind} update ({result.num_samples} samples, "
                        f"loss {result.metrics.get('train_loss', float('nan')):.4f})"),
        ] + self._maybe_train(now)  # asynchronous: a newer round may have come meanwhile

    @property
    def asynchronous(self) -> bool:
        """Asynchronous jobs want updates even from an older version (the master weighs staleness)."""
        return bool(self.instruction and self.instruction["round_policy"].get("asynchronous"))

    def on_training_failed(self, rnd: int, error: str) -> list[Effect]:
        self.training = False
        return [Log("error", f"round {rnd}: local training failed: {error}")]

    def state(self) -> dict[str, Any]:
        return {"instruction_digest": self.instruction_digest, "enrolled": self.enrolled, "version": self.version,
                "done_rounds": self.done_rounds, "pending": self.pending}

    # ------------------------------------------------------------ handlers

    def _on_instruction(self, msg: Received) -> list[Effect]:
        body = msg.body
        digest = hashlib.sha256(cbor2.dumps(body, canonical=True)).digest()
        if digest == self.instruction_digest and (self.enrolled or self.instruction is not None):
            if self.instruction is None:
                self.instruction = dict(body)
            return []  # the same instruction again (retained redelivery, master restart)
        why = self._cannot_serve(body)
        self.instruction_digest, self.instruction = digest, dict(body)
        self.enrolled = False
        if why:
            return [Log("warning", f"declining instruction: {why}"),
                    Publish(self.topics.slave("confirm", self.cfg.slave_id), M.DECLINE,
                            {"public_key": self.public_key, "reason": why}),
                    SaveState(self.state())]
        try:
            self.model = build_model(body["model"])
        except ConfigError as exc:
            return [Publish(self.topics.slave("confirm", self.cfg.slave_id), M.DECLINE,
                            {"public_key": self.public_key, "reason": f"cannot build model: {exc}"})]
        return [Log("info", f"confirming instruction for task {body['task']!r} ({self.samples} samples)"),
                Publish(self.topics.slave("confirm", self.cfg.slave_id), M.CONFIRM,
                        {"public_key": self.public_key, "samples": self.samples, "capabilities": self.capabilities})]

    def _cannot_serve(self, body: Mapping[str, Any]) -> str | None:
        if self.cfg.tasks and body["task"] not in self.cfg.tasks:
            return f"no training samples for task {body['task']!r} (serves {', '.join(self.cfg.tasks)})"
        if body["update"] not in self.cfg.update_kinds:
            return f"update kind {body['update']!r} not supported here"
        need = body["requirements"].get("min_samples", 1)
        if self.samples < need:
            return f"{self.samples} local samples, the job needs {need}"
        return None

    def _on_model(self, msg: Received, now: float) -> list[Effect]:
        version = msg.manifest.version
        if self.instruction is None:
            return [Log("info", "model received before the instruction; ignored")]
        if version <= self.version:
            return []
        if self.model is None:
            self.model = build_model(self.instruction["model"])
        try:
            tensors = M.tensors_of(msg.body)
            load_float_state(self.model, tensors)
        except ProtocolError as exc:
            return [Log("warning", f"rejected model version {version}: {exc}")]
        first = not self.enrolled
        self.enrolled, self.version = True, version
        if self.pending is not None and self.pending["body"]["base_version"] < version:
            self.pending = None
        fx: list[Effect] = self._follow() if first else []
        fx += [SaveState(self.state()), Log("info", f"model version {version}")]
        return fx + self._maybe_train(now)

    def _resend_pending(self) -> list[Effect]:
        """A round announced again (master restarted, or re-planned it) may have lost our
        update: send it again. Its update_id lets the master drop it if it had it."""
        rnd, p = self.round, self.pending
        if rnd is None or p is None or p["round"] != rnd.number or p["body"]["base_version"] != rnd.version:
            return []
        if self.cfg.slave_id not in rnd.participants:
            return []
        return [Publish(self.topics.slave("update", self.cfg.slave_id), M.UPDATE, p["body"],
                        version=rnd.version, round=rnd.number)]

    def _follow(self) -> list[Effect]:
        return [Subscribe(self.topics.master("model")), Subscribe(self.topics.master("round"))]

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
    model = build_model(instruction["model"])
    load_float_state(model, params)
    t = instruction["train"]
    kind = instruction["update"]
    if kind == "student":
        student = build_model(instruction["model"])  # the instruction declares no other architecture yet
        return distill_local(model, student, dataset, epochs=t["epochs"], batch_size=t["batch_size"], lr=t["lr"],
                             momentum=t["momentum"], weight_decay=t["weight_decay"],
                             temperature=t["temperature"], alpha=t["alpha"], seed=seed)
    return train_local(model, dataset, kind=kind, epochs=t["epochs"], batch_size=t["batch_size"], lr=t["lr"],
                       momentum=t["momentum"], weight_decay=t["weight_decay"], prox_mu=t["prox_mu"],
                       grad_batches=t["grad_batches"] or None, seed=seed)
