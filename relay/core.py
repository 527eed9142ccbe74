"""The relay's core: the master of a site's job and one slave of an upstream job, in one state machine.

A relay is a local parameter server (the source documents' hierarchical exchange): it
aggregates its devices' updates in local rounds and exchanges parameters with the
upstream (global) master every N local rounds or M samples. It composes the two
cores as they are:

* **down** -- a `MasterCore` of the site's job: enrollment, presence, local rounds,
  journal, checkpoints, all as in any master. Its rounds open only while the
  upstream waits for this relay's update (`Rounds.gate`).
* **up** -- a `SlaveCore` of the upstream job: it confirms the upstream instruction
  with the summed samples of the devices enrolled below (again when that sum
  changes), follows the upstream model, and asks for "local training" when an
  upstream round names the relay -- the `Train` effect, which this core carries out
  itself instead of training on local data.

One exchange (a *task*): `Train(round r, version v, params)` arrives; the site's
model becomes the upstream model (`MasterCore.adopt`: a new local version, published
to the devices); local rounds run until `exchange_rounds` of them made a version, or
their updates' samples reached `exchange_samples`; then the relay answers the
upstream round with a `delta` update: the local model minus the upstream model it
started from, with `samples` = the sum of the samples of the devices whose updates
made those local versions (each device counted once, with the samples it declared
when it enrolled). The upstream master thus sees one enrolled party whose updates
carry its devices' samples (docs/PROTOCOL.md 11.11).

Durability is the two cores' own -- the site's updates are journaled before they are
acknowledged and each local version is checkpointed before it is published; the
upstream update is persisted (`SaveState`) before it is sent -- plus the task, which
goes into the site's checkpoint: after a crash the local rounds resume from the
checkpoint and the journal, and the exchange happens once. Effects for the upstream
connection are wrapped in `Upstream`; the others are the site master's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from fedmq.common.channel import Received
from fedmq.common.effects import Checkpoint, Effect, Log, PublishJson, Train
from fedmq.common.modelspec import float_state
from fedmq.common.tensors import decode_state_dict, encode_state_dict, spec_of
from fedmq.master.composed import ComposedMaster
from fedmq.master.core import MasterCore
from fedmq.slave.core import SlaveCore
from fedmq.slave.trainer import LocalResult

Params = dict[str, torch.Tensor]
# Devices enrolling one after the other change the samples the relay declares upstream;
# each new confirm costs the upstream master a model sent to the relay, so the first
# waits until the site would start its rounds, and later ones go at most once per this.
DECLARE_SECONDS = 30.0


@dataclass(frozen=True)
class Upstream:
    """An effect for the upstream connection (publish, subscribe, save the upstream state, log)."""

    effect: Effect


@dataclass
class Task:
    """One exchange with the upstream master: the upstream round and model it answers,
    and the local version that model became."""

    round: int
    version: int
    base: Params = field(repr=False)
    base_local: int  # the site's version that is the upstream model
    requested: bool = True  # the upstream core waits for the answer (False right after a restart)
    sent: bool = False

    def state(self) -> dict[str, Any]:
        return {"round": self.round, "version": self.version, "base": encode_state_dict(self.base),
                "base_local": self.base_local, "sent": self.sent}

    @classmethod
    def from_state(cls, s: Mapping[str, Any]) -> Task:
        return cls(s["round"], s["version"], decode_state_dict(s["base"]), s["base_local"], requested=False,
                   sent=bool(s["sent"]))


class RelayCore(ComposedMaster):
    """See the module docstring. The site's daemon drives it as a master core; the
    upstream connection's events come in through `up_start` and `on_up_message`."""

    def __init__(self, down: MasterCore, up: SlaveCore, *, exchange_rounds: int = 1,
                 exchange_samples: int = 0) -> None:
        super().__init__(down)
        self.up = up
        self.exchange_rounds, self.exchange_samples = exchange_rounds, exchange_samples
        self.task: Task | None = None
        self.up_bytes_in = 0  # bytes the upstream connection received (reported in the update's metrics)
        self._declared_at = float("-inf")
        down.rounds.gate = self._rounds_may_open
        up.data_misfit = self.misfit
        self._spec = spec_of(float_state(down.model))

    # ------------------------------------------------------------ the upstream side

    def up_start(self, now: float, saved: Mapping[str, Any] | None) -> list[Effect]:
        self.up.samples = self.devices_samples()
        return self._after(self._from_up(self.up.start(now, saved), now), now)

    def on_up_message(self, msg: Received, now: float) -> list[Effect]:
        fx = self._from_up(self.up.on_message(msg, now), now)
        return self._after(fx + self._abandon_if_overtaken(now), now)

    def misfit(self, model: torch.nn.Module) -> str | None:
        """Why the upstream instruction's model cannot be this site's (the slave core declines it)."""
        if spec_of(float_state(model)) != self._spec:
            return "the upstream model's tensors are not the site job's [model]"
        return None

    def devices_samples(self) -> int:
        """What the relay declares upstream: the samples of every device enrolled below."""
        return sum(s.samples for s in self.master.slaves.values() if s.enrolled)

    def _from_up(self, fx: list[Effect], now: float) -> list[Effect]:
        """The slave core's effects: `Train` is this core's to carry out, the rest go upstream."""
        out: list[Effect] = []
        for f in fx:
            out += self._on_train(f, now) if isinstance(f, Train) else [Upstream(f)]
        return out

    def _on_train(self, fx: Train, now: float) -> list[Effect]:
        task = self.task
        if task is not None and (task.round, task.version) == (fx.round, fx.version):
            task.requested = True  # (after a restart) local rounds resume where the checkpoint left them
            return [Log("info", f"upstream round {fx.round}: local rounds resume ({self._progress()[0]} done)")]
        self.task = Task(fx.round, fx.version, {k: v.clone() for k, v in fx.params.items()}, self.master.version + 1)
        fx_out: list[Effect] = [Log("info", f"upstream round {fx.round}: upstream version {fx.version} becomes local "
                                            f"version {self.master.version + 1}")]
        return fx_out + self.master.adopt(fx.params, now)

    def _abandon_if_overtaken(self, now: float) -> list[Effect]:
        """The upstream model moved on while local rounds ran for an older one (the upstream
        round closed without this relay): a synchronous upstream would drop the answer, so
        the slave core is told the task is over and asks for the newer round."""
        task = self.task
        if task is None or task.sent or not task.requested or self.up.asynchronous or self.up.version <= task.version:
            return []
        task.sent = True
        result = LocalResult("delta", {k: torch.zeros_like(v) for k, v in task.base.items()}, 1, {})
        return [Log("info", f"upstream round {task.round}: upstream version {self.up.version} came first; "
                            f"local rounds for version {task.version} given up")] \
            + self._from_up(self.up.on_trained(task.round, task.version, result, now, self.up_bytes_in), now)

    # ------------------------------------------------------------ the local side

    def _rounds_may_open(self) -> bool:
        """Local rounds run while an exchange is under way and not due yet."""
        return self.task is not None and not self.task.sent and not self._due()

    def _rows(self) -> list[Mapping[str, Any]]:
        """The metrics rows of the local versions made since the task began."""
        assert self.task is not None
        return [r for r in self.master.history if r["version"] > self.task.base_local]

    def _progress(self) -> tuple[int, int]:
        """(local versions made since the task began, samples of their updates)."""
        rows = self._rows()
        return len(rows), sum(int(r["samples"]) for r in rows)

    def _contributors(self) -> dict[str, int]:
        """Device -> the samples it declared, for every device whose update made a local
        version of this task (an update's id is SENDER/ROUND/VERSION: PROTOCOL.md 11.2)."""
        senders = {uid.rsplit("/", 2)[0] for r in self._rows() for uid in r["update_ids"]}
        return {s: self.master.slaves[s].samples for s in sorted(senders) if s in self.master.slaves}

    def _due(self) -> bool:
        rounds, samples = self._progress()
        return rounds >= 1 and (rounds >= self.exchange_rounds
                                or (self.exchange_samples > 0 and samples >= self.exchange_samples))

    def _after(self, fx: list[Effect], now: float) -> list[Effect]:
        """After every call: note whose updates count, exchange when due, re-declare the
        samples upstream when the devices changed, and put the task into checkpoints."""
        task = self.task
        if task is not None and task.requested and not task.sent and self._due():
            fx = fx + self._exchange(now)
        samples = self.devices_samples()
        if samples != self.up.samples and (now - self._declared_at >= DECLARE_SECONDS if self.up.enrolled
                                           else self._site_ready(now)):
            self._declared_at = now
            fx = fx + [Log("info", f"the devices' samples are now {samples}: confirming upstream again")] \
                + self._from_up(self.up.on_samples(samples, now), now)
        return [self._with_task(f) for f in fx]

    def _site_ready(self, now: float) -> bool:
        """Whether the site would start its first round: the relay confirms upstream only
        then, with the samples of the devices it will train with (the upstream master
        caps an update's weight by what its sender declared)."""
        policy, started = self.master.cfg.policy, self.master.started_at
        enrolled = sum(1 for s in self.master.slaves.values() if s.enrolled)
        return enrolled >= policy.min_slaves or (started is not None and now - started >= policy.start_wait)

    def _exchange(self, now: float) -> list[Effect]:
        task = self.task
        assert task is not None
        rounds, processed = self._progress()
        delta = {k: self.master.params[k] - task.base[k] for k in task.base}
        devices = self._contributors()
        samples = sum(devices.values())
        task.sent = True
        result = LocalResult("delta", delta, max(1, samples), {
            "local_rounds": float(rounds), "local_samples": float(processed), "devices": float(len(devices))})
        return [Log("info", f"upstream round {task.round}: sending the delta of {rounds} local round(s) "
                            f"({samples} samples of {len(devices)} device(s))")] \
            + self._from_up(self.up.on_trained(task.round, task.version, result, now, self.up_bytes_in), now)

    def _with_task(self, fx: Effect) -> Effect:
        """The site's checkpoints carry the task; its status says what the relay does
        upstream, and each metrics row which upstream round and version it served."""
        if isinstance(fx, Checkpoint):
            return Checkpoint({**fx.state, "relay": self.task.state() if self.task else None})
        if isinstance(fx, PublishJson) and fx.topic == self.master.topics.master("status"):
            return PublishJson(fx.topic, {**fx.data, "relay": self.status()}, retain=fx.retain, qos=fx.qos)
        if isinstance(fx, PublishJson) and fx.topic == self.master.topics.master("metrics") and self.task:
            upstream = {"round": self.task.round, "version": self.task.version}  # the exchange this version served
            return PublishJson(fx.topic, {**fx.data, "upstream": upstream}, retain=fx.retain, qos=fx.qos)
        return fx

    def status(self) -> dict[str, Any]:
        """The `relay` object of the site's status: the upstream side and the exchange under way."""
        up = self.up
        out: dict[str, Any] = {
            "upstream": {"job": up.cfg.job, "id": up.cfg.slave_id, "enrolled": up.enrolled, "declined": up.declined,
                         "version": up.version, "samples_declared": up.samples},
            "exchange_rounds": self.exchange_rounds, "exchange_samples": self.exchange_samples, "task": None}
        if self.task is not None:
            rounds, samples = self._progress()
            out["task"] = {"round": self.task.round, "version": self.task.version, "local_rounds": rounds,
                           "local_samples": samples, "devices": sorted(self._contributors()),
                           "sent": self.task.sent}
        return out

    # ------------------------------------------------------------ persistence

    def restore(self, state: Mapping[str, Any]) -> None:
        self.master.restore(state)
        self.task = Task.from_state(state["relay"]) if state.get("relay") else None

    def checkpoint_state(self) -> dict[str, Any]:
        return {**self.master.checkpoint_state(), "relay": self.task.state() if self.task else None}

    def tick(self, now: float) -> list[Effect]:
        return self._after(self.master.tick(now) + self._from_up(self.up.tick(now), now), now)
