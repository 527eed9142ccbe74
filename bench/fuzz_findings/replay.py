"""Replays the reduced findings of bench/fuzz.py against live daemons: is each one still there?

    python bench/fuzz_findings/replay.py            # every finding, one live job
    python bench/fuzz_findings/replay.py F2 F7      # some of them

Each finding (README.md beside this file) is the smallest message, or pair of messages,
that showed the problem, signed with the fleet's enrolled evil key (`slave-02`) for the
round open at that moment. One `LiveJob` (bench/_fuzz_live.py: Mosquitto, a master and
two slaves as real processes) serves them all, one after the other; after each the
replayer waits for two more versions and checks what bench/fuzz.py checks: no daemon
exited or logged a traceback, every version is FedAvg of honest updates (or of a
tolerated one, its weight capped), and, per finding, the master's memory peak and log
growth. Prints one line per finding ("fixed" or "REPRODUCED: why") and a JSON summary;
exits 1 if any finding reproduced.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the _fuzz_* helpers

import torch  # noqa: E402
from _fuzz_cases import EVIL_SAMPLES, EvilLedger, EvilUpdate, LiveState  # noqa: E402
from _fuzz_live import EVIL, HONEST, LiveJob, wait_for  # noqa: E402
from _procs import stop_children_on_exit  # noqa: E402

from fedmq.common.keys import raw_public_bytes  # noqa: E402
from fedmq.common.tensors import encode_sparse, encode_state_dict  # noqa: E402

Message = tuple[str, list[bytes]]  # topic, payloads (several: a chunked message)


@dataclass
class Finding:
    title: str
    build: Callable[[LiveJob, LiveState, EvilLedger], list[Message]]
    max_peak_mb: float | None = None  # the master's RSS may not rise more than this
    max_log_kb: float | None = None  # no daemon's log may grow more than this


def _update(job: LiveJob, live: LiveState, uid: str, tensors: dict[str, Any], samples: int = EVIL_SAMPLES) -> Message:
    topic = job.topics.slave("update", EVIL)
    body = {"update_id": uid, "kind": "delta", "base_version": live.version, "samples": samples,
            "metrics": {"train_loss": 0.5}, "tensors": tensors}
    return topic, job.roles.evil.seal(topic, "update", body, version=live.version, round=live.round)


def f1_foreign_update_id(job: LiveJob, live: LiveState, ledger: EvilLedger) -> list[Message]:
    """An honest slave's update id for the open round, from the evil key, before that slave sends."""
    uid = f"{HONEST[0]}/{live.round}/{live.version}"
    ledger.note(uid, EvilUpdate("F1", EVIL, EVIL_SAMPLES, 7001, admissible=False))
    return [_update(job, live, uid, encode_state_dict(job.roles.evil_tensors(7001)))]


def f2_decline_reason_3mb(job: LiveJob, live: LiveState, ledger: EvilLedger) -> list[Message]:
    """A decline whose reason is 3 MB (in 64 KiB chunks: the key is allowlisted)."""
    topic = job.topics.slave("confirm", EVIL)
    body = {"public_key": raw_public_bytes(job.roles.evil.identity.public_key), "reason": "r" * 3_000_000}
    return [(topic, job.roles.evil.seal(topic, "decline", body, chunk_size=65536))]


def f3_uncapped_weight(job: LiveJob, live: LiveState, ledger: EvilLedger) -> list[Message]:
    """Its own id, valid tensors, and a sample count far above the 40 it declared."""
    uid = f"{EVIL}/{live.round}/{live.version}"
    ledger.note(uid, EvilUpdate("F3", EVIL, 2**63 - 1, 7003, admissible=True))
    return [_update(job, live, uid, encode_state_dict(job.roles.evil_tensors(7003)), samples=2**63 - 1)]


def f4_two_updates_one_round(job: LiveJob, live: LiveState, ledger: EvilLedger) -> list[Message]:
    """Two valid updates from one slave for one round, under two ids."""
    out = []
    for uid, seed in ((f"{EVIL}/{live.round}/{live.version}", 7004), (f"{EVIL}/{live.round}/{live.version}#2", 7005)):
        ledger.note(uid, EvilUpdate("F4", EVIL, EVIL_SAMPLES, seed, admissible=uid.endswith(f"/{live.version}")))
        out.append(_update(job, live, uid, encode_state_dict(job.roles.evil_tensors(seed))))
    return out


def f5_finite_overflow(job: LiveJob, live: LiveState, ledger: EvilLedger) -> list[Message]:
    """Finite values whose weighted sum overflows float32: every element 3e38."""
    uid = f"{EVIL}/{live.round}/{live.version}"
    ledger.note(uid, EvilUpdate("F5", EVIL, EVIL_SAMPLES, 0, admissible=False))
    return [_update(job, live, uid, encode_state_dict({n: torch.full(s, 3.0e38) for n, s in job.roles.spec.items()}))]


def f6_coo_bomb(job: LiveJob, live: LiveState, ledger: EvilLedger) -> list[Message]:
    """One tensor claimed as a coo of shape [8192, 8192] (64 Mi float32 = 256 MiB) with one entry."""
    uid = f"{EVIL}/{live.round}/{live.version}"
    ledger.note(uid, EvilUpdate("F6", EVIL, EVIL_SAMPLES, 0, admissible=False))
    tensors = encode_state_dict(job.roles.evil_tensors(7006))
    victim = next(iter(tensors))
    tensors[victim] = encode_sparse((8192, 8192), torch.tensor([0], dtype=torch.int64), torch.tensor([1.0]))
    return [_update(job, live, uid, tensors)]


def f8_alg_of_megabytes(job: LiveJob, live: LiveState, ledger: EvilLedger) -> list[Message]:
    """No key needed: a COSE_Sign1 whose protected header's alg is 1.5 MB of text, on a
    topic the master reads and on one the slaves read."""
    import cbor2
    from cbor2 import CBORTag

    junk = cbor2.dumps(CBORTag(18, [cbor2.dumps({1: "x" * 1_500_000, 4: b"k" * 16}), {-65537: b""}, b"", bytes(64)]))
    return [(job.topics.slave("update", "nobody"), [junk]), (job.topics.master("round"), [junk])]


FINDINGS: dict[str, Finding] = {
    "F1": Finding("update id not bound to its signer", f1_foreign_update_id),
    "F2": Finding("master exits: status too large for the broker", f2_decline_reason_3mb),
    "F3": Finding("sample count not capped by the declared one", f3_uncapped_weight),
    "F4": Finding("two updates of one slave in one round", f4_two_updates_one_round),
    "F5": Finding("a huge finite update aggregated: the model is ruined", f5_finite_overflow),
    "F6": Finding("coo bomb allocated before the shape check", f6_coo_bomb, max_peak_mb=50.0),
    "F7": Finding("a remote party's decline reason logged in full", f2_decline_reason_3mb, max_log_kb=64.0),
    "F8": Finding("an unsigned message's alg logged in full", f8_alg_of_megabytes, max_log_kb=64.0),
}


def replay(job: LiveJob, name: str, finding: Finding) -> str | None:
    """Send one finding's messages at the start of a fresh round; why it reproduced, or None."""
    observer, health, publisher = job.observer, job.health, job.publisher
    assert observer is not None and publisher is not None
    if EVIL not in observer.snapshot().participants:
        job.enroll_evil()
        wait_for(lambda: EVIL in observer.snapshot().participants, 60, health, f"{EVIL} to take part in a round")
    observer.new_round.clear()
    wait_for(observer.new_round.is_set, 60, health, "a new round")
    live = observer.snapshot()
    ledger = EvilLedger()
    logs = {n: job.fleet.root / "logs" / f"{n}.log" for n in ("master", *HONEST)}
    log_before = {n: p.stat().st_size for n, p in logs.items()}
    health.poll()
    health.start_memory()
    for topic, payloads in finding.build(job, live, ledger):
        for p in payloads:
            publisher.publish(topic, p)
    publisher.flush()
    target, deadline = observer.version() + 2, time.monotonic() + 90
    why: list[str] = []
    while observer.version() < target and time.monotonic() < deadline:
        health.sample_peak()  # often: an allocation of the claimed size lasts a fraction of a second
        time.sleep(0.02)
    if observer.version() < target:
        why.append(f"the job stalled: no new version for 90 s after the message (at version {observer.version()})")
    wait_for(observer.drained, 30, None, "the witness")
    violations = observer.check_versions(ledger, job.roles, job.fleet.root / "logs", declared=EVIL_SAMPLES)
    health.poll()
    why += [f"{c['daemon']} {c['kind']}: {c['detail'][-600:]}" for c in health.crashes]
    why += [f"{v.kind}: {v.detail}" for v in violations]
    peak = health.growth_mb(health.peak).get("master", 0.0)
    if finding.max_peak_mb is not None and peak > finding.max_peak_mb:
        why.append(f"master RSS peaked {peak} MB above its level before the message")
    for n, p in logs.items():
        grown = (p.stat().st_size - log_before[n]) / 1024
        if finding.max_log_kb is not None and grown > finding.max_log_kb:
            why.append(f"{n} log grew {grown:.0f} kB")
    return "; ".join(why) or None


def main() -> None:
    stop_children_on_exit()  # SIGTERM/SIGINT leave through LiveJob's cleanup; nothing outlives this process
    names = sys.argv[1:] or list(FINDINGS)
    unknown = [n for n in names if n not in FINDINGS]
    if unknown:
        sys.exit(f"replay: unknown finding(s) {unknown}; known: {', '.join(FINDINGS)}")
    results = run_all(names)
    print(json.dumps(results))
    sys.exit(1 if any(r["reproduced"] for r in results.values()) else 0)


def run_all(names: list[str]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fedmq-fuzz-replay-") as tmp:
        job: LiveJob | None = None
        try:
            for i, name in enumerate(names):
                if job is None:  # one job for all, unless a finding broke it
                    job = LiveJob(Path(tmp) / f"job{i}", capture_versions=1).__enter__()
                finding = FINDINGS[name]
                started = time.monotonic()
                why = replay(job, name, finding)
                results[name] = {"title": finding.title, "reproduced": why is not None, "why": why,
                                 "seconds": round(time.monotonic() - started, 1)}
                print(f"{name} {finding.title}: {'REPRODUCED: ' + why if why else 'fixed'}", file=sys.stderr,
                      flush=True)
                if why and ("stalled" in why or job.health.crashes):
                    job.close()
                    job = None
        finally:
            if job is not None:
                job.close()
    return results


if __name__ == "__main__":
    main()
