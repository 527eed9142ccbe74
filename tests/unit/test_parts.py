"""Model parts without a broker: the layout's names and rules, per-part aggregation, the
slave's plan and model assembly, the multi-task trainer, the data's task column."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmq.common.errors import ConfigError, ProtocolError
from fedmq.common.layout import Layout
from fedmq.common.modelspec import float_state
from fedmq.common.strategies import ClientUpdate, PartStrategies, make_strategy
from fedmq.common.workload import data_misfit, load_local_data, task_counts, task_dataset, task_subset
from fedmq.slave.assembly import ModelAssembly
from fedmq.slave.plan import plan_for, train_parts
from fedmq.slave.trainer import train_multitask

TEACHER = {"arch": "mlp", "sizes": [8, 16, 3], "seed": 0}
STUDENTS = {"same": {"arch": "mlp", "sizes": [8, 16, 3], "seed": 1}, "half": {"arch": "mlp", "sizes": [8, 8, 3]}}
ENCODER = {"arch": "mlp", "sizes": [8, 16], "relu_last": True, "seed": 0}
HEADS = {"digit": {"arch": "mlp", "sizes": [16, 3]}, "parity": {"arch": "mlp", "sizes": [16, 2]}}
TRAIN = {"epochs": 1, "batch_size": 8, "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0, "temperature": 2.0,
         "alpha": 0.5}


def instruction(layout: Layout, update: str = "delta") -> dict:
    spec = next(iter(layout.parts.values())).spec
    return {"model": spec, "update": update, "train": TRAIN, **layout.instruction_fields()}


def tasks_data(n: int = 48, tasks=("digit", "parity"), seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    names = np.array([tasks[i % len(tasks)] for i in range(n)])
    y = np.where(names == "parity", rng.integers(0, 2, n), rng.integers(0, 3, n))
    return task_dataset(x, y, names)


# ------------------------------------------------------------------ the layout


def test_part_names_tensor_names_and_what_a_slave_holds():
    distill = Layout.distill(TEACHER, STUDENTS)
    model = distill.build()  # a student called "half" is not Module.half
    names = set(float_state(model))
    assert {"teacher.0.weight", "students.same.2.bias", "students.half.0.weight"} <= names
    assert {distill.part_of(n) for n in names} == {"teacher", "students.same", "students.half"}
    assert distill.trainable == ["students.same", "students.half"] and distill.students == ["same", "half"]
    assert distill.holds(["students.half"]) == ["teacher", "students.half"]
    assert set(float_state(distill.build(["teacher", "students.half"]))) == {
        n for n in names if not n.startswith("students.same.")}
    multi = Layout.multitask(ENCODER, HEADS)
    assert multi.holds(["encoder", "heads.parity"]) == ["encoder", "heads.parity"]
    assert multi.part_of("heads.digit.0.weight") == "heads.digit" and multi.part_of("other.0.weight") is None
    with pytest.raises(ProtocolError, match="belongs to no part"):
        multi.split({"heads.speech.0.weight": 0})
    assert Layout.plain(TEACHER).part_of("0.weight") == ""


def test_the_instruction_carries_the_layout_and_a_slave_rebuilds_it():
    for layout in (Layout.distill(TEACHER, STUDENTS), Layout.multitask(ENCODER, HEADS, min_queue=4)):
        again = Layout.from_instruction(instruction(layout))
        assert again.kind == layout.kind and list(again.parts) == list(layout.parts)
        assert again.min_queue == layout.min_queue
    assert not Layout.from_instruction({"model": TEACHER}).grouped
    with pytest.raises(ConfigError, match="multitask.heads"):
        Layout.from_instruction({"model": ENCODER, "multitask": {"heads": {"a.b": {}}}})


def test_fit_checks_name_the_key():
    Layout.distill(TEACHER, STUDENTS).check_fit()
    Layout.multitask(ENCODER, HEADS).check_fit()
    with pytest.raises(ConfigError, match=r"^distill.students.bad: outputs \[N, 5\], the teacher \(\[model\]\) "
                                          r"outputs \[N, 3\]$"):
        Layout.distill(TEACHER, {"bad": {"arch": "mlp", "sizes": [8, 4, 5]}}).check_fit()
    with pytest.raises(ConfigError, match=r"^distill.students.wide: takes inputs of shape \[N, 9\]"):
        Layout.distill(TEACHER, {"wide": {"arch": "mlp", "sizes": [9, 4, 3]}}).check_fit()
    with pytest.raises(ConfigError, match=r"^multitask.heads.parity: does not take the encoder's output"):
        Layout.multitask(ENCODER, {"parity": {"arch": "mlp", "sizes": [32, 2]}}).check_fit()


def test_what_a_slave_may_confirm_and_send():
    distill, multi = Layout.distill(TEACHER, STUDENTS), Layout.multitask(ENCODER, HEADS)
    assert distill.confirmed_parts({"students.half": 40}) == ({"students.half": 40}, None)
    assert "names no parts" in distill.confirmed_parts(None)[1]
    assert "not a trainable part" in distill.confirmed_parts({"teacher": 40})[1]  # the teacher is fixed
    assert "one student" in distill.confirmed_parts({"students.half": 4, "students.same": 4})[1]
    assert "encoder and at least one" in multi.confirmed_parts({"heads.digit": 4})[1]
    assert Layout.plain(TEACHER).confirmed_parts({"anything": 1}) == (None, None)
    confirmed = {"encoder": 30, "heads.digit": 30}
    assert multi.update_parts({"encoder": 50, "heads.digit": 10}, confirmed) == {"encoder": 30, "heads.digit": 10}
    with pytest.raises(ProtocolError) as exc:
        multi.update_parts({"encoder": 5, "heads.parity": 5}, confirmed)
    assert exc.value.reason == "unconfirmed_part"
    with pytest.raises(ProtocolError) as exc:
        multi.update_parts({"encoder": True}, confirmed)
    assert exc.value.reason == "bad_body"


# ------------------------------------------------------------------ aggregation per part


def test_each_part_is_aggregated_from_its_own_updates_and_untouched_parts_stay_bit_for_bit():
    layout = Layout.multitask(ENCODER, HEADS)
    params = {k: v.clone() for k, v in float_state(layout.build()).items()}
    strategy = PartStrategies(layout.trainable, layout.part_of, lambda: make_strategy({"name": "fedavgm"}))

    def update(sender: str, heads: list[str], value: float, samples: dict) -> ClientUpdate:
        parts = ["encoder", *heads]
        return ClientUpdate(sender, "delta", {k: torch.full_like(v, value) for k, v in params.items()
                                              if layout.part_of(k) in parts}, 10, 0, parts=samples)

    a = update("a", ["heads.digit"], 1.0, {"encoder": 30, "heads.digit": 30})
    b = update("b", ["heads.digit"], 4.0, {"encoder": 10, "heads.digit": 10})
    new = strategy.aggregate(params, [a, b], 0)
    for k, v in params.items():
        part = layout.part_of(k)
        if part == "heads.parity":
            assert torch.equal(new[k], v), k  # no update of that task: not a bit changed
        else:
            assert torch.allclose(new[k], v + (30 * 1.0 + 10 * 4.0) / 40), k  # weighted by each part's samples
    state = strategy.state_dict()
    assert set(state) == {"encoder", "heads.digit", "heads.parity"} and not state["heads.parity"]
    again = strategy.aggregate(new, [update("c", ["heads.parity"], 1.0, {"encoder": 5, "heads.parity": 5})], 1)
    digit = [k for k in params if k.startswith("heads.digit.")]
    assert all(torch.equal(again[k], new[k]) for k in digit)  # momentum of digit does not move it without updates


# ------------------------------------------------------------------ the slave's plan and assembly


def misfit_of(dataset):
    return lambda model, task=None: data_misfit(model, dataset, task)


def test_a_slave_plans_its_student_and_declines_what_it_cannot_run():
    layout = Layout.distill(TEACHER, STUDENTS)
    body = instruction(layout, "student")
    plan = plan_for(body, student="half", samples=40, task_samples={}, misfit=None)
    assert plan.trains == {"students.half": 40} and plan.holds == ["teacher", "students.half"]
    assert plan.confirm_fields() == {"parts": {"students.half": 40}}
    assert plan_for(body, student="", samples=40, task_samples={}, misfit=None).trains == {"students.same": 40}
    assert "no student 'tiny'" in plan_for(body, student="tiny", samples=4, task_samples={}, misfit=None)
    plain = {"model": TEACHER, "update": "student", "train": TRAIN}
    assert "distill students" in plan_for(plain, student="", samples=4, task_samples={}, misfit=None)


def test_a_slave_queues_samples_per_task_and_declines_without_any_task():
    layout = Layout.multitask(ENCODER, HEADS)
    body = instruction(layout)
    data = tasks_data(30)  # 15 digit, 15 parity
    plan = plan_for(body, student="", samples=30, task_samples=task_counts(data), misfit=misfit_of(data))
    assert plan.trains == {"encoder": 30, "heads.digit": 15, "heads.parity": 15}
    short = tasks_data(12)  # 6 per task: fewer than a batch (8)
    assert "no task queue holds the 8 samples" in plan_for(body, student="", samples=12,
                                                           task_samples=task_counts(short), misfit=None)
    other = tasks_data(12, tasks=("speech",))
    why = plan_for(body, student="", samples=12, task_samples=task_counts(other), misfit=None)
    assert why.startswith("no samples for any task of this job (digit, parity)")
    assert "no task column" in plan_for(body, student="", samples=12, task_samples={}, misfit=None)
    bad = tasks_data(30, tasks=("parity",))
    bad.tensors[1][:] = 5  # labels no 2-class head has
    assert "task parity: labels 5..5" in plan_for(body, student="", samples=30, task_samples=task_counts(bad),
                                                  misfit=misfit_of(bad))


def test_a_version_is_adopted_once_every_held_part_arrived_at_that_version():
    layout = Layout.distill(TEACHER, STUDENTS)
    holds = ["teacher", "students.half"]
    parts = layout.split(float_state(layout.build(holds)))
    assembly = ModelAssembly(layout, holds)
    assert assembly.offer(3, parts["teacher"]) is None
    assert assembly.offer(4, parts["students.half"]) is None  # of another version
    complete = assembly.offer(3, parts["students.half"])
    assert set(complete) == set(parts["teacher"]) | set(parts["students.half"])
    assert assembly.offer(4, parts["teacher"]) is not None  # 4 was kept
    with pytest.raises(ProtocolError, match="not one this slave holds"):
        assembly.offer(5, layout.split(float_state(layout.build()))["students.same"])
    whole = ModelAssembly(Layout.plain(TEACHER), None)
    assert whole.offer(1, {"0.weight": 1}) == {"0.weight": 1}


# ------------------------------------------------------------------ training


def test_multitask_training_touches_only_the_encoder_and_the_heads_of_queued_tasks():
    layout = Layout.multitask(ENCODER, HEADS)
    model = layout.build()
    data = tasks_data(40, tasks=("digit",))
    queues = {"digit": task_subset(data, "digit")}
    result = train_multitask(layout.module(model, "encoder"), {"digit": layout.module(model, "heads.digit")},
                             queues, epochs=2, batch_size=8, lr=0.1, momentum=0.9, weight_decay=0.01, seed=0)
    assert result.kind == "delta" and result.parts == {"encoder": 40, "heads.digit": 40}
    assert {layout.part_of(k) for k in result.tensors} == {"encoder", "heads.digit"}
    assert all(result.tensors[k].abs().sum() > 0 for k in result.tensors)
    # through the slave's entry point: it trains what it was sent, named as the master names it
    body = instruction(layout)
    held = {k: v for k, v in float_state(model).items() if layout.part_of(k) in ("encoder", "heads.digit")}
    again = train_parts(body, held, data, seed=0)
    assert set(again.tensors) == set(held) and again.parts == {"encoder": 40, "heads.digit": 40}
    # as the daemon passes it: read through its interruptible wrapper, which keeps the task column
    import threading

    from fedmq.slave.daemon import _Interruptible

    wrapped = train_parts(body, held, _Interruptible(data, threading.Event()), seed=0)
    assert all(torch.equal(wrapped.tensors[k], again.tensors[k]) for k in held)


def test_a_student_continues_from_the_received_global_student():
    layout = Layout.distill(TEACHER, STUDENTS)
    body = instruction(layout, "student")
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(32, 8)).astype(np.float32), rng.integers(0, 3, 32)
    from fedmq.common.workload import _as_dataset  # (x, y) without a task column

    params = {k: v for k, v in float_state(layout.build(["teacher", "students.half"])).items()}
    params = {k: v + 1.0 if k.startswith("students.") else v for k, v in params.items()}  # a trained global student
    result = train_parts(body, params, _as_dataset(x, y), seed=0)
    assert result.kind == "student" and result.parts == {"students.half": 32}
    assert set(result.tensors) == {k for k in params if k.startswith("students.half.")}
    drift = max(float((result.tensors[k] - params[k]).abs().max()) for k in result.tensors)
    assert 0 < drift < 1.0  # trained from the received weights, not from the spec's seed


# ------------------------------------------------------------------ the task column


def test_npz_and_csv_sources_carry_a_task_column(tmp_path):
    path = tmp_path / "tasks.npz"
    np.savez(path, x=np.zeros((4, 3), np.float32), y=np.array([0, 1, 1, 0]),
             task=np.array(["digit", "parity", "parity", "digit"]))
    data = load_local_data(str(path))
    assert task_counts(data) == {"digit": 2, "parity": 2}
    assert len(task_subset(data, "parity")) == 2 and data[0][0].shape == (3,)
    csv = tmp_path / "tasks.csv"
    csv.write_text("a,b,task,label\n0.5,1,digit,2\n0.25,0,parity,1\n1,1,parity,0\n")
    data = load_local_data(str(csv))
    assert task_counts(data) == {"digit": 1, "parity": 2}
    assert data[:][1].tolist() == [2, 1, 0] and data[:][0].shape == (3, 2)
    np.savez(tmp_path / "plain.npz", x=np.zeros((2, 3), np.float32), y=np.array([0, 1]))
    assert task_counts(load_local_data(str(tmp_path / "plain.npz"))) == {}
    np.savez(tmp_path / "bad.npz", x=np.zeros((2, 3), np.float32), y=np.array([0, 1]), task=np.zeros((2, 2)))
    with pytest.raises(ConfigError, match="task must be a 1-D array"):
        load_local_data(str(tmp_path / "bad.npz"))


# ------------------------------------------------------------------ the test vectors


def test_the_vectors_of_parts_follow_the_layout_their_instruction_describes():
    from pathlib import Path

    from fedmq.cli.decode import decode_payloads
    from fedmq.common.keys import KeyRing, load_public_key

    vectors = Path(__file__).resolve().parents[2] / "docs" / "vectors"
    ring = KeyRing()
    for name in ("master", "slave-01"):
        ring.add(name, load_public_key(vectors / f"{name}.pub"))

    def body(topic: str, *files: str) -> dict:
        return decode_payloads([(vectors / f).read_bytes() for f in files], topic, ring)

    multitask = body("fedmq/digits/instruction", "instruction-multitask.cbor")["body"]
    layout = Layout.from_instruction(multitask)
    assert layout.tasks == ["digit", "parity"]
    distill = Layout.from_instruction(body("fedmq/digits/instruction", "instruction-distill.cbor")["body"])
    assert distill.students == ["same", "half"] and distill.trainable == ["students.same", "students.half"]
    confirm = body("fedmq/digits/confirm/slave-01", "confirm-parts.cbor")["body"]
    confirmed, why = layout.confirmed_parts(confirm["parts"])
    assert why is None
    update = body("fedmq/digits/update/slave-01", "update-parts.000.cbor", "update-parts.001.cbor")
    parts = layout.update_parts(update["body"]["parts"], confirmed)
    assert parts == {"encoder": 120, "heads.digit": 120}
    assert {layout.part_of(t["name"]) for t in update["tensors"]} == set(parts)
    model = body("fedmq/digits/model/heads.parity", "model-part.cbor")
    assert {layout.part_of(t["name"]) for t in model["tensors"]} == {"heads.parity"}
