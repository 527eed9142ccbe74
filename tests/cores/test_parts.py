"""Model parts end to end through the cores (real signing, in-memory bus): distilled
students of a fixed teacher on the reference workload, and a shared encoder with two
task heads fed from per-task queues."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedmq.common import messages as M
from fedmq.common.brokerconfig import BrokerConfig
from fedmq.common.channel import Inbox, Sealer
from fedmq.common.jobconfig import SlaveConfig, TrainSettings
from fedmq.common.keys import Identity, KeyRing, raw_public_bytes
from fedmq.common.layout import Layout
from fedmq.common.partsconfig import DistillConfig, MultitaskConfig
from fedmq.common.workload import data_misfit, reference_split, task_counts, task_dataset
from fedmq.demo import DEMO_STUDENTS, train_reference_teacher
from fedmq.master.core import MasterCore
from fedmq.master.job import make_job_strategy
from fedmq.master.jobmodel import job_model
from fedmq.slave.core import SlaveCore
from fedmq.slave.trainer import LocalResult

from .conftest import Bus, Node, job_config


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small MLPs: more threads only spin on a shared machine
    yield
    torch.set_num_threads(threads)


def parts_bus(cfg, datasets: list[Any], test: Any, students: dict[int, str] | None = None,
              train_time: float | None = None) -> Bus:
    """A master (the job's composite model, teacher loaded) and one slave per dataset;
    local training takes `train_time` simulated seconds (None: no time at all)."""
    layout = Layout.of_job(cfg)
    bus = Bus()
    if train_time is not None:
        bus.train_time = {f"slave-{i}": train_time for i in range(len(datasets))}
    master_id = Identity.generate("master")
    idents = [Identity.generate(f"slave-{i}") for i in range(len(datasets))]
    ring = KeyRing()
    for ident in idents:
        ring.add(ident.name, ident.public_key)
    scored = layout.build()

    def evaluate(params):
        scored.load_state_dict(params, strict=False)
        return layout.evaluate(scored, test)

    master = MasterCore(cfg, job_model(cfg), make_job_strategy(cfg), evaluate=evaluate)
    bus.add(Node("master", Sealer(master_id, cfg.job, seq=1), Inbox(ring, cfg.job, self_signed=M.SELF_SIGNED_KINDS),
                 master, subs=[cfg.topics.slaves(k) for k in ("confirm", "update", "presence")]))
    master_ring = KeyRing()
    master_ring.add("master", master_id.public_key)
    for i, (ident, ds) in enumerate(zip(idents, datasets)):
        scfg = SlaveConfig(slave_id=ident.name, job=cfg.job, key=Path("k"), master_key=Path("m"), data="-",
                           state_dir=Path("."), broker=BrokerConfig(), student=(students or {}).get(i, ""))
        core = SlaveCore(scfg, raw_public_bytes(ident.public_key), len(ds), task_samples=task_counts(ds),
                         data_misfit=lambda model, task=None, ds=ds: data_misfit(model, ds, task))
        bus.add(Node(ident.name, Sealer(ident, cfg.job, seq=1), Inbox(master_ring, cfg.job), core, dataset=ds))
    bus.master = master
    bus.run("master", master.start(bus.now))
    for node in list(bus.nodes.values()):
        if node.name != "master":
            bus.run(node.name, node.core.start(bus.now))
    bus.pump()  # enrollment (and, with training taking no time, the whole job)
    return bus


@pytest.mark.slow  # 60 rounds of 8 slaves' local training (the teacher's and the students')
def test_distilled_students_reach_their_targets_on_the_reference_workload(tmp_path):
    """The teacher: the reference MLP after 30 rounds of FedAvg (in-process), fixed. Slaves
    0-3 distil a student of its architecture, slaves 4-7 (the weak devices) one of half its
    hidden width, each from its own non-IID shard; 30 rounds, FedAvg per student."""
    teacher_accuracy = train_reference_teacher(tmp_path / "teacher.cbor")
    cfg = job_config(tmp_path, rounds=30, update="student", model={"arch": "mlp", "sizes": [64, 128, 10], "seed": 0},
                     train=TrainSettings(), policy={"min_slaves": 8},
                     distill=DistillConfig(tmp_path / "teacher.cbor", DEMO_STUDENTS))
    split = reference_split()
    bus = parts_bus(cfg, [split.slave_dataset(i) for i in range(8)], split.test_dataset(),
                    students={i: "same" if i < 4 else "half" for i in range(8)})
    history = bus.master.history
    assert bus.finished and len(history) == 30
    last = history[-1]["part_accuracy"]
    # measured: teacher 0.933; students 0.931 (same) and 0.892 (half) at round 30
    assert last["teacher"] == pytest.approx(teacher_accuracy, abs=1e-6)
    assert last["students.same"] >= 0.88 and last["students.half"] >= 0.85, last
    assert history[-1]["accuracy"] == pytest.approx(min(last["students.same"], last["students.half"]), abs=1e-6)
    slaves = bus.json["fedmq/digits/status"]["slaves"]
    assert {n: list(s["parts"]) for n, s in slaves.items()} == {
        f"slave-{i}": ["students.same" if i < 4 else "students.half"] for i in range(8)}
    # each student is published on its own retained topic; a weak slave holds only the teacher and its student
    assert {t for t in bus.retained if "/model" in t} == {
        "fedmq/digits/model/teacher", "fedmq/digits/model/students.same", "fedmq/digits/model/students.half"}
    weak = bus.nodes["slave-5"].core
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in weak.model.state_dict() if k.startswith("students")} \
        == {"students.half"}


# ------------------------------------------------------------------ shared encoder, task heads


def tagged(x: np.ndarray, y: np.ndarray, tasks: list[str]) -> Any:
    """Rows dealt to `tasks` in turn; a parity row's label is its digit mod 2."""
    names = np.array([tasks[i % len(tasks)] for i in range(len(y))])
    return task_dataset(x, np.where(names == "parity", y % 2, y), names)


@pytest.fixture
def multitask(tmp_path):
    """slave-0 has digit samples only, slave-1 parity only, slave-2 both, slave-3 none of the job's tasks."""
    split = reference_split(num_slaves=3, alpha=100.0)  # near-IID shards: the point here is the tasks
    shard = [(split.train_x[r], split.train_y[r]) for r in split.slave_indices]
    x, y = split.test_x, split.test_y
    test = task_dataset(np.concatenate([x, x]), np.concatenate([y, y % 2]), ["digit"] * len(y) + ["parity"] * len(y))
    cfg = job_config(tmp_path, rounds=12, model={"arch": "mlp", "sizes": [64, 128], "relu_last": True, "seed": 0},
                     train=TrainSettings(), policy={"min_slaves": 3, "deadline": 30.0},
                     multitask=MultitaskConfig(("digit", "parity"), {"digit": {"arch": "mlp", "sizes": [128, 10]},
                                                                      "parity": {"arch": "mlp", "sizes": [128, 2]}}))
    data = [tagged(*shard[0], ["digit"]), tagged(*shard[1], ["parity"]), tagged(*shard[2], ["digit", "parity"]),
            tagged(*shard[2], ["speech"])]
    return lambda: (parts_bus(cfg, data, test, train_time=1.0), data)


def heads(params: dict[str, torch.Tensor], task: str) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in params.items() if k.startswith(f"heads.{task}.")}


def test_task_heads_learn_and_a_head_changes_only_with_updates_of_its_task(multitask):
    bus, data = multitask()
    master = bus.master
    while master.version < 8:
        bus.advance(bus.now + 1.0)
    status = bus.json["fedmq/digits/status"]
    assert status["slaves"]["slave-3"]["declined"].startswith("no samples for any task of this job (digit, parity)")
    assert status["slaves"]["slave-0"]["parts"] == {"encoder": len(data[0]), "heads.digit": len(data[0])}
    both = task_counts(data[2])
    assert status["slaves"]["slave-2"]["parts"] == {"encoder": len(data[2]), "heads.digit": both["digit"],
                                                    "heads.parity": both["parity"]}
    acc = master.history[-1]["part_accuracy"]
    assert acc["heads.digit"] >= 0.85 and acc["heads.parity"] >= 0.85, acc
    # Now only the digit-only slave answers: its updates move the encoder and the digit
    # head, never the parity head (not one bit), although the encoder it reads changes.
    bus.silent.update({"slave-1", "slave-2"})
    version = master.version + 1  # (the round in progress may still count their training under way)
    while master.version < version:
        bus.advance(bus.now + 1.0)
    before = master.params
    bus.advance(bus.now + 200.0)
    later = master.history[version:]
    assert len(later) >= 2 and all(row["update_ids"] == [f"slave-0/{row['round']}/{row['version'] - 1}"]
                                   for row in later), later
    after = master.params
    assert all(torch.equal(after[k], v) for k, v in heads(before, "parity").items())
    assert not all(torch.equal(after[k], v) for k, v in heads(before, "digit").items())
    assert not torch.equal(after["encoder.0.weight"], before["encoder.0.weight"])
    # the slaves hold (and were sent) only the parts they train
    assert {k.split(".")[0] for k in bus.nodes["slave-1"].core.model.state_dict()} == {"encoder", "heads"}
    assert not any(k.startswith("heads.digit.") for k in bus.nodes["slave-1"].core.model.state_dict())


def test_an_update_touching_a_head_its_sender_did_not_confirm_is_rejected(multitask):
    bus, _ = multitask()
    master = bus.master
    forged: list[str] = []

    def trainer(node, fx):
        """slave-0 (digit only) also sends a change of the parity head."""
        from fedmq.slave.core import run_training

        result = run_training(node.core.instruction, fx.params, node.dataset, seed=fx.round)
        if node.name != "slave-0":
            return result
        parity = {k: torch.ones_like(v) for k, v in master.params.items() if k.startswith("heads.parity.")}
        forged.append(node.name)
        return LocalResult(result.kind, {**result.tensors, **parity}, result.num_samples, result.metrics,
                           {**result.parts, "heads.parity": 10})

    bus.trainer = trainer
    before = heads(master.params, "parity")
    bus.advance(bus.now + 100.0)  # slave-0's updates never count: each round closes at its deadline (30 s)
    assert forged and master.rejected.get("unconfirmed_part") == len(forged)
    assert bus.json["fedmq/digits/status"]["rejected"]["unconfirmed_part"] == len(forged)
    rejected = [fx.message for fx in bus.effects["master"] if getattr(fx, "level", "") == "warning"
                and "unconfirmed_part" in getattr(fx, "message", "")]
    assert rejected and "'heads.parity' is not a part this slave confirmed" in rejected[0]
    # versions went on from the others; the parity head moved only by their updates, never to all-ones
    assert master.version >= 1
    assert not any(torch.equal(master.params[k], torch.ones_like(v)) for k, v in before.items())


def test_with_privacy_a_student_is_sent_as_the_global_student_plus_a_clipped_noised_step(fleet, tmp_path):
    """[privacy] bounds what one slave's data can move a student by, as for a delta: the
    step w − x from the global student x is clipped to C and noised, and x + step is sent."""
    from fedmq.common.effects import Publish
    from fedmq.common.modelspec import build_model, float_state
    from fedmq.common.privacy_settings import DPSettings
    from fedmq.common.strategies import global_norm
    from fedmq.master.jobmodel import write_weights

    spec = {"arch": "mlp", "sizes": [64, 32, 10], "seed": 0}
    write_weights(tmp_path / "teacher.cbor", build_model(spec))
    students = {"small": {"arch": "mlp", "sizes": [64, 8, 10], "seed": 3}}
    bus = fleet(2, rounds=1, update="student", model=spec, policy={"min_slaves": 2},
                distill=DistillConfig(tmp_path / "teacher.cbor", students),
                privacy=DPSettings(clip_norm=0.01, noise_multiplier=0.01))
    assert bus.finished
    start = {f"students.small.{k}": v for k, v in float_state(build_model(students["small"])).items()}
    update = next(fx for fx in bus.effects["slave-0"] if isinstance(fx, Publish) and fx.kind == M.UPDATE
                  and fx.body["base_version"] == 0)
    sent = M.tensors_of(update.body)
    assert update.body["kind"] == "student" and set(sent) == set(start)
    step = global_norm({k: sent[k] - start[k] for k in sent})
    assert 0.005 < step < 0.011  # clipped to C = 0.01 (plus noise of std 1e-4 per entry), not the trained step


def test_a_restarted_master_takes_back_the_parts_their_strategies_and_who_trains_what(multitask):
    import cbor2

    bus, _ = multitask()
    master = bus.master
    while master.version < 3:
        bus.advance(bus.now + 1.0)
    state = cbor2.loads(cbor2.dumps(master.checkpoint_state()))  # as the daemon writes and reads it
    again = MasterCore(master.cfg, job_model(master.cfg), make_job_strategy(master.cfg))
    again.restore(state)
    assert again.version == master.version
    assert all(torch.equal(again.params[k], v) for k, v in master.params.items())
    assert {n: s.parts for n, s in again.slaves.items()} == {n: s.parts for n, s in master.slaves.items()}
    assert again.slaves["slave-2"].parts.keys() == {"encoder", "heads.digit", "heads.parity"}
    assert set(again.strategy.state_dict()) == {"encoder", "heads.digit", "heads.parity"}
