"""Proposed master-side fixes, applied at run time for measurement only.

    python bench/_ingest_fixes.py --fixes threads,finite,combine,groupcommit -c job.toml

runs exactly what `fedmq master run -c job.toml` runs (load_job, setup_logging,
MasterDaemon(cfg).run()), after patching in the changes bench/ingest.py proposes, so
their effect can be measured end to end without touching master/ or common/. None of
this is used by fedmq itself; docs/BENCHMARKS.md ("Master ingest") describes each change
for the files it belongs in.

* threads     -- torch.set_num_threads(1) in the master (the slave daemon already does
                 this). With the default of one OpenMP thread per core, every torch op
                 on a 1 M tensor spins a second thread that, on a 2-core machine shared
                 with Mosquitto, is often descheduled: torch.isfinite on 1 M floats took
                 34-130 ms with 2 threads vs 2-5 ms with 1 under load.
* finite      -- modelspec.validate_state_dict checks finiteness with torch.isfinite
                 although messages.tensors_of has just checked the same tensors with
                 numpy (~10x faster, see messages.all_finite); use all_finite.
* combine     -- strategies.combine, rule "mean": accumulate w_i * delta_i in place
                 instead of torch.stack-ing K updates (a K x model copy) and then
                 multiplying (another) and summing.
* groupcommit -- MasterDaemon: append journal records without fsync, hold back the
                 Ack effects that follow them, and fsync once (then ack) when the event
                 queue is empty, 64 acks are waiting, 50 ms passed, or before a
                 checkpoint. "Journal before ack" still holds: no ack leaves before the
                 fsync that covers its record.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

FIXES = ("threads", "finite", "combine", "groupcommit")


def validate_state_dict_numpy(model: torch.nn.Module, tensors: Any) -> None:
    """modelspec.validate_state_dict with the finiteness check done by messages.all_finite."""
    from fedmq.common.errors import ProtocolError, Reason
    from fedmq.common.messages import all_finite
    from fedmq.common.modelspec import float_state

    expected = float_state(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ProtocolError(Reason.BAD_TENSOR, f"tensor names differ from the model: missing {missing}, "
                                               f"unexpected {unexpected}")
    for name, ref in expected.items():
        value = tensors[name]
        if not isinstance(value, torch.Tensor):
            raise ProtocolError(Reason.BAD_TENSOR, f"{name}: not a tensor")
        if value.dtype != ref.dtype or value.shape != ref.shape:
            raise ProtocolError(Reason.BAD_TENSOR, f"{name}: {value.dtype} {tuple(value.shape)}, expected "
                                                   f"{ref.dtype} {tuple(ref.shape)}")
        if not all_finite(value):
            raise ProtocolError(Reason.NON_FINITE, f"{name}: contains NaN or Inf")


def streaming_combine(original: Callable) -> Callable:
    def combine(deltas: Sequence[dict[str, torch.Tensor]], weights: Sequence[float], rule: str = "mean",
                trim: float = 0.1) -> dict[str, torch.Tensor]:
        if rule != "mean":
            return original(deltas, weights, rule, trim)
        total = float(sum(weights))
        out: dict[str, torch.Tensor] = {}
        for name in deltas[0]:
            acc = torch.zeros_like(deltas[0][name])
            for d, w in zip(deltas, weights):
                acc.add_(d[name], alpha=w / total)
            out[name] = acc
        return out
    return combine


def apply_patches(fixes: Sequence[str]) -> Callable[[], None]:
    """Patch the in-process modules; returns a function that undoes it."""
    import fedmq.common.strategies as strategies
    import fedmq.master.core as core

    undo: list[Callable[[], None]] = []
    if "threads" in fixes:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        undo.append(lambda: torch.set_num_threads(before))
    if "finite" in fixes:
        orig_v = core.validate_state_dict
        core.validate_state_dict = validate_state_dict_numpy
        undo.append(lambda: setattr(core, "validate_state_dict", orig_v))
    if "combine" in fixes:
        orig_c = strategies.combine
        strategies.combine = streaming_combine(orig_c)
        undo.append(lambda: setattr(strategies, "combine", orig_c))

    def restore() -> None:
        for u in reversed(undo):
            u()
    return restore


def group_commit_daemon():
    from fedmq.common.effects import Ack, Checkpoint, Journal
    from fedmq.master.daemon import MasterDaemon

    class GroupCommitDaemon(MasterDaemon):
        MAX_ACKS = 64
        MAX_WAIT = 0.05

        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            self._held: list[Any] = []
            self._dirty = False
            self._since = 0.0

        def apply(self, effects: list, now: float) -> None:
            for fx in effects:
                if isinstance(fx, Journal):
                    self.journal._f.write(__import__("cbor2").dumps(fx.record))
                    if not self._dirty:
                        self._since = time.monotonic()
                    self._dirty = True
                elif isinstance(fx, Ack) and self._dirty:
                    self._held.append(fx.token)
                elif isinstance(fx, Checkpoint):
                    self._commit()
                    super().apply([fx], now)
                else:
                    super().apply([fx], now)

        def handle(self, kind: str, value: Any, now: float) -> None:
            super().handle(kind, value, now)
            if self._dirty and (self.shell.events.empty() or len(self._held) >= self.MAX_ACKS
                                or time.monotonic() - self._since > self.MAX_WAIT):
                self._commit()

        def _commit(self) -> None:
            if self._dirty:
                self.journal._f.flush()
                os.fsync(self.journal._f.fileno())
                self._dirty = False
            for token in self._held:
                self.shell.transport.ack(token)
            self._held.clear()

    return GroupCommitDaemon


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixes", default="", help=f"comma-separated subset of {','.join(FIXES)}")
    ap.add_argument("-c", "--config", required=True)
    args = ap.parse_args()
    fixes = [f for f in args.fixes.split(",") if f]
    unknown = set(fixes) - set(FIXES)
    if unknown:
        ap.error(f"unknown fixes {sorted(unknown)}")
    from fedmq.common.jobconfig import load_job
    from fedmq.common.shell import setup_logging
    from fedmq.master.daemon import MasterDaemon

    apply_patches(fixes)
    cls = group_commit_daemon() if "groupcommit" in fixes else MasterDaemon
    setup_logging(False)
    cls(load_job(args.config)).run()


if __name__ == "__main__":
    main()
