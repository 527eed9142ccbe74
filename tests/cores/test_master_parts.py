"""The master core's parts, each tested alone: one message or call in, decisions and effects out."""

from __future__ import annotations

import subprocess
import sys

import cbor2
import pytest
import torch

from fedmq.common import messages as M
from fedmq.common.channel import Received
from fedmq.common.effects import MASTER_EFFECTS, Interpreter, Log, Publish, Trust, UnhandledEffect
from fedmq.common.envelope import Manifest
from fedmq.common.errors import ProtocolError
from fedmq.common.jobconfig import RoundPolicy
from fedmq.common.modelspec import build_model
from fedmq.common.strategies import ClientUpdate, make_strategy
from fedmq.common.async_strategies import make_async_strategy
from fedmq.common.tensors import encode_state_dict
from fedmq.common.topics import Topics
from fedmq.master.intake import Refusal, UpdateIntake
from fedmq.master.ledger import UpdateLedger
from fedmq.master.modelstore import ModelStore
from fedmq.master.phase import IllegalTransition, JobPhase
from fedmq.master.registry import SlaveRegistry
from fedmq.master.rejections import Rejections
from fedmq.master.rounds import Rounds
from fedmq.master.schedule import AsyncRounds, SyncRounds, plan_round

TOPICS = Topics("digits")
SPEC = {"arch": "mlp", "sizes": [4, 3, 2], "seed": 0}
KEY_A, KEY_B = b"a" * 32, b"b" * 32


def received(kind: str, sender: str, body: dict, *, topic: str | None = None, round: int = 0, version: int = 0,
             enrolled: bool = True) -> Received:
    topic = topic or TOPICS.slave("update" if kind == M.UPDATE else "confirm", sender)
    raw = cbor2.dumps(body)
    manifest = Manifest(kind=kind, job="digits", sender=sender, topic=topic, seq=1, ts=0, version=version,
                        round=round, size=len(raw), sha256=b"\0" * 32)
    return Received(topic, manifest, body, raw, enrolled, wire_bytes=len(raw) + 200)


def confirm(sender: str, samples: int = 10, key: bytes = KEY_A, enrolled: bool = True) -> Received:
    return received(M.CONFIRM, sender, {"public_key": key, "samples": samples, "capabilities": {}}, enrolled=enrolled)


def registry(open_enrollment: bool = False, min_samples: int = 1) -> SlaveRegistry:
    return SlaveRegistry(open_enrollment=open_enrollment, min_samples=min_samples, rejections=Rejections())


# ------------------------------------------------------------------ registry

def test_registry_enrolls_an_allowed_key_and_marks_it_online() -> None:
    reg = registry()
    admission, fx = reg.on_confirm(confirm("s1"), now=5.0)
    assert admission == "enrolled" and reg.online() == ["s1"] and reg.slaves["s1"].samples == 10
    assert fx == [Log("info", "s1 enrolled (10 samples)")]


def test_registry_refuses_an_unknown_key_in_allowlist_mode_and_says_why() -> None:
    reg = registry()
    admission, fx = reg.on_confirm(confirm("s1", enrolled=False), now=5.0)
    assert admission == "rejected" and reg.online() == []
    assert reg.not_enrolled == {"s1": "key not in the allowlist"} and reg.rejections.by_reason == {"not_enrolled": 1}


def test_registry_open_enrollment_trusts_on_first_use_and_refuses_a_second_key() -> None:
    reg = registry(open_enrollment=True)
    admission, fx = reg.on_confirm(confirm("s1", key=KEY_A, enrolled=False), now=5.0)
    assert admission == "enrolled" and Trust("s1", KEY_A) in fx
    admission, _ = reg.on_confirm(confirm("s1", key=KEY_B, enrolled=False), now=6.0)
    assert admission == "rejected" and reg.rejections.by_reason == {"wrong_sender": 1}


def test_registry_records_declines_and_too_few_samples() -> None:
    reg = registry(min_samples=50)
    admission, _ = reg.on_confirm(confirm("s1", samples=10), now=1.0)
    assert admission == "declined" and reg.slaves["s1"].declined == "10 samples < min_samples 50"
    decline = received(M.DECLINE, "s2", {"public_key": KEY_A, "reason": "no data"})
    assert reg.on_confirm(decline, now=1.0)[0] == "declined" and reg.slaves["s2"].declined == "no data"
    assert reg.online() == []


def test_registry_names_silent_participants_only() -> None:
    reg = registry()
    for name in ("s1", "s2", "s3"):
        reg.on_confirm(confirm(name), now=0.0)
    reg.slaves["s2"].last_seen = 50.0
    assert reg.silent(["s1", "s2", "s3"], answered={"s3"}, since=0.0, now=70.0, limit=60.0) == ["s1"]


# ------------------------------------------------------------------ schedules

def _update(sender: str, base: int = 0, delta: float = 1.0) -> ClientUpdate:
    return ClientUpdate(sender, "delta", {"w": torch.full((2,), delta)}, 10, base)


def test_plan_round_draws_the_same_participants_for_the_same_seed() -> None:
    policy = RoundPolicy(participants=2, quorum=5, deadline=30.0, seed=7)
    online = ["a", "b", "c", "d"]
    first = plan_round(policy, 3, online, 100.0, dict.fromkeys(online, 0))
    again = plan_round(policy, 3, online, 100.0, dict.fromkeys(online, 0))
    assert first.participants == again.participants and len(first.participants) == 2
    assert first.quorum == 2 and first.deadline == 130.0  # quorum capped by the participants


def test_sync_schedule_refuses_stale_and_foreign_updates_and_closes_at_quorum() -> None:
    sched = SyncRounds(make_strategy({"name": "fedavg"}), RoundPolicy(min_updates=1))
    rnd = plan_round(RoundPolicy(quorum=2), 4, ["a", "b", "c"], 0.0, {"a": 0, "b": 0, "c": 0})
    assert sched.precheck(rnd, 3, 0, "a", 0) == "stale"  # an older round
    assert sched.precheck(rnd, 4, 1, "a", 0) == "stale"  # another base version
    assert sched.precheck(rnd, 4, 0, "x", 0) == "x is not a participant of round 4"
    assert sched.precheck(rnd, 4, 0, "a", 0) is None
    rnd.count("a/4/0", _update("a"), 100)
    assert not sched.ready(rnd, lambda n: True)
    assert sched.ready(rnd, lambda n: n == "a"), "everyone else went offline: the round may close"
    rnd.count("b/4/0", _update("b"), 100)
    assert sched.ready(rnd, lambda n: True) and sched.at_deadline(rnd, True) == "aggregate"


def test_async_schedule_leaves_versions_to_the_strategy_and_waits_when_nobody_is_online() -> None:
    strategy = make_async_strategy({"name": "fedbuff", "buffer_size": 2, "max_staleness": 3})
    sched = AsyncRounds(strategy, RoundPolicy())
    store = ModelStore(torch.nn.Linear(2, 1, bias=False))
    store.params = {"weight": torch.zeros(1, 2)}
    rnd = plan_round(RoundPolicy(), 1, ["a"], 0.0, {"a": 0})
    assert sched.precheck(None, 1, 0, "a", 0) == "stale" and sched.precheck(rnd, 9, 5, "a", 0) is None
    assert "staleness" in sched.admissible(ClientUpdate("a", "delta", {"weight": torch.ones(1, 2)}, 1, 0), 4)
    first, _ = sched.take("a/1/0", ClientUpdate("a", "delta", {"weight": torch.ones(1, 2)}, 1, 0), store)
    second, _ = sched.take("b/1/0", ClientUpdate("b", "delta", {"weight": torch.ones(1, 2)}, 1, 0), store)
    assert first is None and torch.equal(second["weight"], torch.ones(1, 2))
    assert not sched.ready(rnd, lambda n: True)
    assert sched.at_deadline(rnd, anyone_online=False) == "wait" and sched.at_deadline(rnd, True) == "replan"


# ------------------------------------------------------------------ rounds

def test_rounds_coalesce_join_announcements_and_carry_what_arrived_over_a_replan() -> None:
    sched = SyncRounds(make_strategy({"name": "fedavg"}), RoundPolicy())
    rounds = Rounds(RoundPolicy(deadline=10.0), sched, TOPICS, "delta", coalesce=1.0)
    rounds.open(["a", "b"], 0.0, 0, {"a": 0, "b": 0})
    rounds.current.count("a/1/0", _update("a"), 10)
    announced = rounds.announce(0.0, 0, "run-1")
    assert announced.body == {"run": "run-1", "participants": ["a", "b"], "received": ["a"], "deadline": 10.0,
                              "update": "delta"} and announced.round == 1
    assert rounds.join("c", 0.5, 0, "run-1", 0) == [], "a synchronous round takes no joiners"
    kept = rounds.stall()
    assert rounds.number == 1, "a synchronous re-plan keeps the round number"
    rounds.open(["b", "c"], 11.0, 0, {"b": 0, "c": 0})
    rounds.carry_over(kept)
    assert set(rounds.current.updates) == {"a/1/0"} and rounds.current.answered == {"a"}

    async_rounds = Rounds(RoundPolicy(), AsyncRounds(make_async_strategy({"name": "fedbuff"}), RoundPolicy()),
                          TOPICS, "delta", coalesce=1.0)
    async_rounds.open(["a"], 0.0, 0, {"a": 0})
    async_rounds.announce(0.0, 0, "run-1")
    assert async_rounds.join("b", 0.5, 0, "run-1", 0) == [], "within the coalescing window: announced on a tick"
    assert async_rounds.current.participants == ["a", "b"]
    (late,) = async_rounds.announce_if_due(1.5, 0, "run-1")
    assert late.body["participants"] == ["a", "b"]
    async_rounds.stall()
    assert async_rounds.number == 2, "an asynchronous re-plan takes a new number"


# ------------------------------------------------------------------ model store, ledger, phase

def test_model_store_adopts_versions_keeps_bases_and_refuses_wrong_shapes() -> None:
    store = ModelStore(build_model(SPEC), keep_bases=1)
    v0 = store.params
    for step in (1, 2, 3):
        store.adopt({k: v + step for k, v in v0.items()})
    assert store.version == 3 and store.base(2) is not None and store.base(0) is None
    with pytest.raises(ProtocolError):
        store.validate({"0.weight": torch.zeros(5, 5)})
    saved = store.checkpoint()
    fresh = ModelStore(build_model(SPEC))
    fresh.restore(saved["version"], saved["params"])
    assert fresh.version == 3 and all(torch.equal(fresh.params[k], store.params[k]) for k in v0)


def test_ledger_forgets_applied_ids_past_the_horizon() -> None:
    ledger = UpdateLedger()
    ledger.mark_applied(["a/1/0"], 1, horizon=0)
    ledger.mark_applied(["a/2/1"], 2, horizon=0)
    ledger.mark_applied(["a/3/2"], 3, horizon=0)
    assert ledger.is_applied("a/2/1") and ledger.is_applied("a/1/0")
    ledger.mark_applied(["a/4/3"], 4, horizon=0)
    assert not ledger.is_applied("a/1/0") and ledger.is_applied("a/4/3")


def test_job_phase_refuses_illegal_transitions() -> None:
    phase = JobPhase()
    phase.go("training")
    phase.go("finished")
    with pytest.raises(IllegalTransition):
        phase.go("training")
    with pytest.raises(IllegalTransition):
        JobPhase("paused")


# ------------------------------------------------------------------ intake

def _intake(**kw):
    store = ModelStore(build_model(SPEC))
    sched = SyncRounds(make_strategy({"name": "fedavg"}), RoundPolicy())
    ledger = UpdateLedger()
    rnd = plan_round(RoundPolicy(), 1, ["s1", "s2"], 0.0, {"s1": 0, "s2": 0})
    return UpdateIntake(store, ledger, sched, **kw), rnd, {k: torch.zeros_like(v) for k, v in store.params.items()}


def _update_msg(tensors: dict, *, sender: str = "s1", round: int = 1, uid: str | None = None,
                samples: int = 5, version: int = 0) -> Received:
    body = {"update_id": uid or f"{sender}/{round}/0", "kind": "delta", "base_version": 0, "samples": samples,
            "metrics": {}, "tensors": encode_state_dict(tensors)}
    return received(M.UPDATE, sender, body, round=round, version=version)


def test_intake_screens_duplicates_stale_and_bad_tensors_before_anything_counts() -> None:
    intake, rnd, good = _intake()
    screen = lambda msg: intake.screen(msg, rnd, 1, declared_samples=5)  # noqa: E731
    assert isinstance(screen(_update_msg(good)), ClientUpdate)
    stale = screen(_update_msg(good, round=0))
    assert isinstance(stale, Refusal) and stale.log.startswith("stale update s1/0/0") and stale.reason is None
    bad = screen(_update_msg({"0.weight": torch.zeros(2, 2)}))
    assert isinstance(bad, Refusal) and bad.reason == "bad_tensor"
    intake.ledger.mark_applied(["s1/1/0"], 1, horizon=0)
    dup = screen(_update_msg(good))
    assert isinstance(dup, Refusal) and dup.duplicate


def test_an_update_belongs_to_its_signer_round_and_version() -> None:
    """Issue 11, finding 1: one enrolled slave sent updates with other slaves' ids."""
    intake, rnd, good = _intake()
    for uid, version in (("s2/1/0", 0), ("s1/2/0", 0), ("s1/1/7", 0), ("s1/1/0", 3)):
        verdict = intake.screen(_update_msg(good, uid=uid, version=version), rnd, 1, declared_samples=5)
        assert isinstance(verdict, Refusal) and verdict.reason == "foreign_update", (uid, version)


def test_weight_is_capped_by_the_enrollment_and_the_norm_is_bounded() -> None:
    """Issue 11, finding 2: a claimed 10^15 samples, a x1e6 step, a 3e38 step."""
    intake, rnd, good = _intake()
    huge = intake.screen(_update_msg(good, samples=10**15), rnd, 1, declared_samples=40)
    assert isinstance(huge, ClientUpdate) and huge.aggregation_weight == 40
    big = {k: torch.full_like(v, 1.0) for k, v in good.items()}  # norm ~ 8.8: within the default 10
    assert isinstance(intake.screen(_update_msg(big), rnd, 1, declared_samples=5), ClientUpdate)
    assert intake.clipped == {}
    larger = {k: torch.full_like(v, 3.0) for k, v in good.items()}  # clipped to 10
    clipped = intake.screen(_update_msg(larger, sender="s2"), rnd, 1, declared_samples=5)
    assert isinstance(clipped, ClientUpdate) and intake.clipped == {"s2": 1}
    rnd2 = plan_round(RoundPolicy(), 2, ["s1"], 0.0, {"s1": 0})
    for scale in (1e6, 3e38):
        attack = {k: torch.full_like(v, scale) for k, v in good.items()}
        verdict = intake.screen(_update_msg(attack, round=2), rnd2, 2, declared_samples=5)
        assert isinstance(verdict, Refusal) and verdict.reason == "too_large", scale


def test_a_decompression_bomb_is_refused_before_anything_is_allocated() -> None:
    """Issue 11, finding 6: coo tensors of shape [8192, 8192] in a tiny update."""
    from fedmq.common.tensors import encode_sparse

    intake, rnd, good = _intake()
    bomb = {k: encode_sparse((8192, 8192), torch.tensor([0], dtype=torch.int32), torch.tensor([1.0], dtype=torch.float64))
            for k in good}
    body = {"update_id": "s1/1/0", "kind": "delta", "base_version": 0, "samples": 5, "metrics": {}, "tensors": bomb}
    verdict = intake.screen(received(M.UPDATE, "s1", body, round=1), rnd, 1, declared_samples=5)
    assert isinstance(verdict, Refusal) and verdict.reason in ("bad_tensor", "too_large")


# ------------------------------------------------------------------ the shell's one dispatch

def test_interpreter_fails_loudly_on_an_effect_without_a_handler() -> None:
    with pytest.raises(UnhandledEffect, match="no handler for"):
        Interpreter({Log: print}, covers=MASTER_EFFECTS)
    seen: list = []
    run = Interpreter({Log: seen.append}, ignore={Trust})
    run([Log("info", "x"), Trust("s", KEY_A)])
    assert seen == [Log("info", "x")]
    with pytest.raises(UnhandledEffect, match="Publish has no handler"):
        run([Publish("t", "model", {})])


def test_the_cores_and_the_configuration_load_without_any_transport() -> None:
    """The cores are sans-I/O: importing them (and the config) pulls in no MQTT client,
    no shell and no socket or threading beyond what torch itself imports."""
    probe = ("import sys, torch; base = set(sys.modules); "
             "import fedmq.master.core, fedmq.slave.core, fedmq.common.jobconfig; "
             "print(' '.join(sorted(set(sys.modules) - base)))")
    added = set(subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout.split())
    forbidden = {m for m in added if m.startswith("paho") or m in (
        "socket", "threading", "ssl", "fedmq.common.transport", "fedmq.common.shell", "queue")}
    assert not forbidden, f"the cores import transport modules: {sorted(forbidden)}"
    assert "fedmq.master.core" in added
