"""Compression on the reference workload (in-process FedAvg, DESIGN.md): accuracy cost.

Runs bench/compression.py's federation (every update and delta really encoded,
CBOR-serialised and decoded) and checks the measured trade-offs that
docs/BENCHMARKS.md reports: int8 costs nothing; top-1 % + int8 needs error feedback
and, with it, trails dense FedAvg by about 2 points at round 30 and catches up by
round 45; the `topk` preset (sparse downlink deltas too) stays close.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

BENCH = Path(__file__).resolve().parents[2] / "bench" / "compression.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("fedmq_bench_compression", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra threads only spin on a shared machine
    yield module
    torch.set_num_threads(threads)
    del sys.modules[spec.name]


@pytest.fixture(scope="module")
def dense(bench):
    return bench.run(bench.Case("dense", plain=True), 30)


def case(bench, name):
    return next(c for c in bench.CASES if c.name == name)


def test_dense_matches_the_reference_baseline(dense):
    # the same federation as tests/unit/test_reference_fedavg.py
    assert dense["accuracy"][29] >= 0.90 and dense["rounds_to_target"] <= 15


def test_int8_with_error_feedback_costs_nothing(bench, dense):
    r = bench.run(case(bench, "int8+EF"), 30)
    assert r["final"] >= dense["final"] - 0.01
    assert r["bytes_up"] < 0.3 * dense["bytes_up"]


def test_top1_percent_int8_needs_error_feedback_and_catches_up_with_it(bench, dense):
    with_ef = bench.run(case(bench, "top1%+int8+EF"), 45)
    without = bench.run(case(bench, "top1%+int8 no-EF"), 30)
    assert with_ef["bytes_up"] < dense["bytes_up"] / 40
    at30 = with_ef["accuracy"][29]
    # measured: 0.911 vs dense 0.933 (the 1-point goal of issue 13 is not met at round 30)
    assert at30 >= dense["final"] - 0.03
    assert at30 >= without["final"] + 0.04  # error feedback is what makes top-1 % work
    # ...and by round 45 it reaches dense FedAvg's round-30 accuracy (within a point)
    assert max(with_ef["accuracy"][35:45]) >= dense["final"] - 0.01


def test_topk_preset_with_sparse_downlink_deltas(bench, dense):
    r = bench.run(case(bench, "preset topk"), 30)
    assert r["final"] >= dense["final"] - 0.02  # measured 0.925 vs 0.933
    assert r["bytes_up"] < dense["bytes_up"] / 40 and r["bytes_down"] < dense["bytes_down"] / 4
    assert 1 <= r["keyframes"] <= 3  # version 0, then every 10 versions at most
