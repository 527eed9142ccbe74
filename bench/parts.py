"""Models with parts, in-process: students distilled from a fixed teacher, and task heads on a shared encoder.

Run by hand:  python bench/parts.py  [--rounds 30] [--alpha 0.5] [--temperature 2.0] [--json]

The same code as a distributed run minus the transport: slaves train with
`slave.plan.train_parts` from the instruction `master.job.instruction_body` writes, the
master aggregates with `PartStrategies` and scores with `Layout.evaluate`
(tests/cores/test_parts.py runs the same through the cores with signed messages).

* Distillation, the reference workload of DESIGN.md: the teacher is the reference MLP
  64-128-10 after 30 rounds of FedAvg over the 8 non-IID shards (what a plain fedmq job
  of that workload produces), then fixed. Slaves 0-3 distil a student of the teacher's
  architecture ("same"), slaves 4-7 one of half its hidden width ("half", 64-64-10);
  2 local epochs, batch 32, lr 0.1, loss alpha·CE + (1 − alpha)·T²·KL; FedAvg per
  student. Beside it, the same students trained by the same slaves without a teacher
  (alpha = 1: plain FedAvg of each student on its own four shards).
* Shared encoder: digits over 3 near-IID shards (Dirichlet α = 100), an encoder
  64-128 (ReLU) and two heads, "digit" (10 classes) and "parity" (2); slave 0 has
  digit samples only, slave 1 parity only, slave 2 both (alternating rows). Each head
  is scored on the test rows of its task.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmq.common.brokerconfig import BrokerConfig
from fedmq.common.jobconfig import JobConfig, RoundPolicy, TrainSettings
from fedmq.common.layout import Layout
from fedmq.common.modelspec import float_state
from fedmq.common.partsconfig import DistillConfig, MultitaskConfig
from fedmq.common.workload import reference_split, task_counts, task_dataset
from fedmq.demo import DEMO_STUDENTS, train_reference_teacher
from fedmq.common.strategies import ClientUpdate
from fedmq.master.job import instruction_body, make_job_strategy
from fedmq.master.jobmodel import job_model
from fedmq.slave.plan import plan_for, train_parts

MLP = {"arch": "mlp", "sizes": [64, 128, 10], "seed": 0}


def job(tmp: Path, **over: Any) -> JobConfig:
    base = dict(job="bench", rounds=30, task="digits", update="delta", model=MLP, train=TrainSettings(),
                strategy={"name": "fedavg"}, policy=RoundPolicy(), enrollment="open", slave_keys=None,
                master_key=tmp / "m.key", state_dir=tmp, broker=BrokerConfig())
    return JobConfig(**{**base, **over})


def run(cfg: JobConfig, datasets: list[Any], test: Any, students: dict[int, str], rounds: int,
        every: int) -> list[dict[str, Any]]:
    """Rounds of local training and per-part aggregation; the scores every `every` rounds."""
    layout = Layout.of_job(cfg)
    body = instruction_body(cfg, "bench")
    plans = [plan_for(body, student=students.get(i, ""), samples=len(ds), task_samples=task_counts(ds), misfit=None)
             for i, ds in enumerate(datasets)]
    model = job_model(cfg)
    params = {k: v.clone() for k, v in float_state(model).items()}
    strategy = make_job_strategy(cfg)
    rows = []
    for version in range(rounds):
        updates = []
        for i, (plan, ds) in enumerate(zip(plans, datasets)):
            if isinstance(plan, str):
                continue
            held = layout.select(params, plan.holds)
            result = train_parts(body, held, ds, seed=1000 * version + i)
            updates.append(ClientUpdate(f"slave-{i}", result.kind, result.tensors, result.num_samples, version,
                                        parts=result.parts))
        params = strategy.aggregate(params, updates, version)
        if (version + 1) % every == 0:
            model.load_state_dict(params, strict=False)
            rows.append({"round": version + 1, **layout.evaluate(model, test)["part_accuracy"]})
    return rows


def distillation(tmp: Path, rounds: int, alpha: float, temperature: float) -> dict[str, Any]:
    teacher = train_reference_teacher(tmp / "teacher.cbor")
    split = reference_split()
    shards = [split.slave_dataset(i) for i in range(8)]
    students = {i: "same" if i < 4 else "half" for i in range(8)}
    out: dict[str, Any] = {"teacher_accuracy": teacher}
    for name, a in (("distilled", alpha), ("without_teacher", 1.0)):
        cfg = job(tmp, update="student", train=TrainSettings(alpha=a, temperature=temperature),
                  distill=DistillConfig(tmp / "teacher.cbor", DEMO_STUDENTS))
        out[name] = run(cfg, shards, split.test_dataset(), students, rounds, every=5)
    return out


def multitask(tmp: Path, rounds: int) -> list[dict[str, Any]]:
    split = reference_split(num_slaves=3, alpha=100.0)

    def tagged(x: np.ndarray, y: np.ndarray, tasks: list[str]) -> Any:
        names = np.array([tasks[i % len(tasks)] for i in range(len(y))])
        return task_dataset(x, np.where(names == "parity", y % 2, y), names)

    shards = [tagged(split.train_x[r], split.train_y[r], t)
              for r, t in zip(split.slave_indices, [["digit"], ["parity"], ["digit", "parity"]])]
    x, y = split.test_x, split.test_y
    test = task_dataset(np.concatenate([x, x]), np.concatenate([y, y % 2]), ["digit"] * len(y) + ["parity"] * len(y))
    cfg = job(tmp, model={"arch": "mlp", "sizes": [64, 128], "relu_last": True, "seed": 0},
              multitask=MultitaskConfig(("digit", "parity"), {"digit": {"arch": "mlp", "sizes": [128, 10]},
                                                               "parity": {"arch": "mlp", "sizes": [128, 2]}}))
    return run(cfg, shards, test, {}, rounds, every=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)  # small MLPs: more threads only spin on a shared machine
    with tempfile.TemporaryDirectory() as tmp:
        result = {"distillation": distillation(Path(tmp), args.rounds, args.alpha, args.temperature),
                  "multitask": multitask(Path(tmp), 12)}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    d = result["distillation"]
    print(f"teacher (fixed): {d['teacher_accuracy']:.3f}")
    print("round  same  half   | without teacher: same  half")
    for a, b in zip(d["distilled"], d["without_teacher"]):
        print(f"{a['round']:>5} {a['students.same']:.3f} {a['students.half']:.3f}   "
              f"|                  {b['students.same']:.3f} {b['students.half']:.3f}")
    print("round  digit parity")
    for r in result["multitask"]:
        print(f"{r['round']:>5} {r['heads.digit']:.3f} {r['heads.parity']:.3f}")


if __name__ == "__main__":
    main()
