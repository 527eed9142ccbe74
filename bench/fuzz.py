"""Fuzzing live daemons: hostile MQTT traffic against a running master and slaves (docs/BENCHMARKS.md).

    python bench/fuzz.py --messages 100000 --rate 250 --seed 11 --settle 130 --keep-going   # the recorded run
    python bench/fuzz.py --messages 2000 --seed 1      # a smoke run (tests/bench_smoke/test_fuzz_smoke.py)
    python bench/fuzz.py --only chunks --messages 5000 # one family of games (--exclude: all but some)

A Mosquitto of its own on a free loopback port (anonymous, like the tests' broker:
the point is what the daemons do with hostile input, not the ACL, so the fuzzer may
publish on every topic), one `fedmq master run` and two `fedmq slave run` processes
(`fedmq.demo.LocalFleet`, the reference workload, FedAvg, endless rounds). Keys for
three more slaves are made in the fleet directory: `slave-02` is allowlisted and
enrolled by the fuzzer itself (the *evil* key: validly signed hostile bodies reach the
master's deepest checks), `slave-03` is allowlisted but never enrolls (*rogue*: sequence
numbers far ahead), `slave-04` is not in the allowlist (*outsider*).

1. **Capture**: the job runs until `--capture-versions` versions are out; a witness
   subscribed to `PREFIX/JOB/#` records every payload per topic (the seed corpus).
2. **Fuzz**: `--messages` publishes at `--rate` per second (QoS 0/1, some retained) on
   every topic the master and the slaves subscribe to: random bytes and CBOR, CBOR
   bombs, mutations of the captured messages, COSE header games, replays, and hostile
   bodies signed by the evil, rogue and outsider keys (bench/_fuzz_cases.py). Honest
   training goes on meanwhile.
3. **Settle** `--settle` seconds, then check:

   * ``crashes``: a daemon process that exited, or a traceback in its log;
   * ``model_changes``: a master version that is not FedAvg of honest updates over the
     previous version (recomputed by the witness from the verified honest updates and
     models; a hostile update the protocol lets through -- informational fields, a
     claimed sample count above the declared one -- must weigh at most what the evil
     key declared), a non-finite model, or a slave that adopted a model version the
     master never published;
   * ``rss_growth_mb``: the largest growth of a daemon's resident memory from the start
     of fuzzing to the end of the settle period (``rss_peak_growth_mb``: during it).

The first crash or violation ends the fuzzing unless `--keep-going`. The last line of
stdout is JSON (also: cases per game family, the master's rejections by reason, log
sizes and longest log lines, an RSS series). On a crash or a violation the last `--ring`
cases are saved under the work directory (findings.json); reduced reproductions of what
was found live in bench/fuzz_findings/. Every process started here is stopped on exit, SIGTERM
and SIGINT (bench/_procs.py).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the _fuzz_* helpers beside this file


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from _fuzz_cases import EVIL_SAMPLES, CaseFactory, EvilLedger
    from _fuzz_live import EVIL, HONEST, LiveJob, broker_drops, wait_for
    from _fuzz_observer import slave_adoptions

    rng = random.Random(args.seed)
    exclude = tuple(g for g in args.exclude.split(",") if g) or ("\0",)
    only = tuple(g for g in args.only.split(",") if g) or ("",)
    with LiveJob(work, capture_versions=args.capture_versions, start_timeout=args.start_timeout) as job:
        observer, publisher, health, roles = job.observer, job.publisher, job.health, job.roles
        assert observer is not None and publisher is not None
        logs = job.fleet.root / "logs"
        version_start = observer.version()
        ledger = EvilLedger()
        live = observer.snapshot()
        factory = CaseFactory(rng, roles, job.captured, live)
        games: collections.Counter[str] = collections.Counter()
        ring_buf: collections.deque = collections.deque(maxlen=args.ring)
        violations: list[dict[str, str]] = []

        def refresh() -> None:
            snap = observer.snapshot()
            live.round, live.version, live.participants, live.run = snap.round, snap.version, snap.participants, snap.run

        health.poll()
        health.start_memory()
        fuzz_start = time.monotonic()
        series: list[list[float]] = []  # [seconds since fuzzing began, RSS MB of each daemon]

        def sample() -> None:
            if not series or time.monotonic() - fuzz_start - series[-1][0] >= 10.0:
                rss = health.rss()
                series.append([round(time.monotonic() - fuzz_start, 1)]
                              + [round(rss.get(n, 0) / 2**20, 1) for n in health.names])

        next_at = last_check = last_enroll = fuzz_start
        preempts = 0
        interval = 1.0 / args.rate
        while publisher.count < args.messages:
            now = time.monotonic()
            if now - last_check >= 0.5:
                last_check = now
                crashed = health.poll()
                sample()
                refresh()
                violations += [v.as_dict() for v in observer.check_versions(ledger, roles, logs,
                                                                            declared=EVIL_SAMPLES)]
                if EVIL not in live.participants and now - last_enroll > 3.0:
                    last_enroll = now  # the evil key declined or went offline in some game: back in
                    job.enroll_evil()
                if (crashed or violations) and not args.keep_going or now - fuzz_start > args.timeout:
                    break
            if observer.new_round.is_set():  # race the honest slaves: their update ids, from the evil key, first
                observer.new_round.clear()
                refresh()
                if rng.random() < 0.5 and not "preempt-uid".startswith(exclude) and "preempt-uid".startswith(only):
                    preempts += 1
                    _send(publisher, factory.preempt(), games, ring_buf, ledger)
            case = factory.next()
            while case.game.startswith(exclude) or not case.game.startswith(only):
                case = factory.next()
            _send(publisher, case, games, ring_buf, ledger)
            next_at += interval * len(case.payloads)
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            elif delay < -2.0:
                next_at = time.monotonic()  # cannot keep the rate: do not burst to catch up
        publisher.flush()
        fuzz_seconds = time.monotonic() - fuzz_start
        version_end_fuzz = observer.version()

        # settle: the job must go on, partial messages expire, memory should come back
        settle_end = time.monotonic() + args.settle
        progressed = lambda: observer.version() > version_end_fuzz  # noqa: E731
        while time.monotonic() < settle_end or (not progressed() and time.monotonic() < settle_end + 60):
            health.poll()
            sample()
            time.sleep(0.25)
        health.poll()
        rss_after = health.rss()
        wait_for(observer.drained, 30, None, "the witness to drain its queue")
        violations += [v.as_dict() for v in observer.check_versions(ledger, roles, logs, final=True,
                                                                    declared=EVIL_SAMPLES)]
        published = set(observer.published_versions)
        for name in HONEST:
            for v in slave_adoptions(job.fleet.log(name)):
                if v not in published:
                    violations.append({"kind": "slave-model", "who": name,
                                       "detail": f"adopted model version {v}, which the master never published"})
        growth = health.growth_mb(rss_after)
        peak = health.growth_mb(health.peak)
        status = observer.status
        summary: dict[str, Any] = {
            "messages": publisher.count, "cases": sum(games.values()), "seed": args.seed, "rate": args.rate,
            "excluded_games": [g for g in args.exclude.split(",") if g],
            "only_games": [g for g in args.only.split(",") if g],
            "crashes": len(health.crashes),
            "model_changes": sum(1 for v in violations if v["kind"] in ("model", "non-finite", "slave-model")),
            "rss_growth_mb": max(growth.values(), default=None),
            "rss_peak_growth_mb": max(peak.values(), default=None),
            "rss_growth_mb_by_daemon": growth, "rss_peak_growth_mb_by_daemon": peak,
            "rss_baseline_mb": {n: round(v / 2**20, 1) for n, v in health.baseline.items()},
            "rss_series_mb": {"daemons": health.names, "samples": series},
            "versions_checked": len(observer.checked) - len(observer.unchecked),
            "versions_unchecked": len(observer.unchecked),
            "versions_during_fuzz": version_end_fuzz - version_start,
            "progress_after_fuzz": progressed(),
            "bounded_accepts": len(observer.bounded_accepts),
            "preempts": preempts,
            "error_log_lines": health.errors,
            "log_mb": {n: round((logs / f"{n}.log").stat().st_size / 2**20, 1) for n in health.names},
            "longest_log_line": health.longest_line,
            "broker_drop_lines": broker_drops(job.broker.log_path),
            "master_rejected": status.get("rejected", {}), "master_duplicates": status.get("duplicates"),
            "witness_unverified": dict(observer.unverified),
            "fuzz_seconds": round(fuzz_seconds, 1), "capture_seconds": round(job.capture_seconds, 1),
            "captured_topics": len(job.captured), "captured_payloads": sum(len(p) for p in job.captured.values()),
            "games": dict(sorted(_family_counts(games).items())),
            "crash_details": health.crashes, "violations": violations,
            "load_avg_1m_end": round(os.getloadavg()[0], 2),
        }
        if health.crashes or violations:
            findings = work / "findings.json"
            findings.write_text(json.dumps({"crashes": health.crashes, "violations": violations,
                                            "last_cases": list(ring_buf)}, indent=1) + "\n")
            summary["findings"] = str(findings)
        return summary


def _send(publisher: Any, case: Any, games: collections.Counter, ring_buf: collections.deque,
          ledger: Any) -> None:
    for uid, upd in case.notes:  # before it can arrive: the witness may check the version it makes
        ledger.note(uid, upd)
    for topic, payload in case.publishes():
        publisher.publish(topic, payload, qos=case.qos, retain=case.retain)
    games[case.game] += 1
    ring_buf.append({"game": case.game, "topic": case.topic, "retain": case.retain, "qos": case.qos,
                     "t": round(time.time(), 3),
                     "payloads_hex": [p.hex() if len(p) <= 4096 else p[:4096].hex() + "..." for p in case.payloads],
                     "sizes": [len(p) for p in case.payloads]})


def _family_counts(games: collections.Counter) -> dict[str, int]:
    """Cases per game family (the part of the game name before ':')."""
    out: collections.Counter[str] = collections.Counter()
    for g, n in games.items():
        out[g.split(":")[0]] += n
    return dict(out)


def main() -> None:
    from _procs import stop_children_on_exit

    stop_children_on_exit()  # SIGTERM/SIGINT leave through LiveJob's cleanup; nothing outlives this process
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=2000, help="MQTT publishes to send (chunks count one each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rate", type=float, default=200.0, help="publishes per second")
    ap.add_argument("--settle", type=float, default=15.0, help="seconds after fuzzing before memory is measured")
    ap.add_argument("--capture-versions", type=int, default=2, help="versions of honest traffic captured first")
    ap.add_argument("--start-timeout", type=float, default=300.0)
    ap.add_argument("--timeout", type=float, default=None, help="cap on the fuzzing phase, seconds")
    ap.add_argument("--ring", type=int, default=300, help="cases kept for findings.json")
    ap.add_argument("--keep-going", action="store_true", help="do not stop at the first crash or violation")
    ap.add_argument("--exclude", default="", help="comma-separated game name prefixes not to play "
                    "(e.g. games whose finding is known and not fixed yet)")
    ap.add_argument("--only", default="", help="comma-separated game name prefixes: play only these")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the fleet, logs and findings here")
    args = ap.parse_args()
    if args.timeout is None:
        args.timeout = 3 * args.messages / args.rate + 300
    from fedmq.broker import find_mosquitto

    if find_mosquitto() is None:
        sys.exit("fuzz: needs the mosquitto binary (apt-get install mosquitto)")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fedmq-fuzz-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    summary = run(args, work)
    summary["wall_seconds"] = round(time.time() - started, 1)
    summary["workdir"] = str(work) if (args.workdir or summary.get("findings")) else None
    if not args.workdir and not summary.get("findings"):
        shutil.rmtree(work, ignore_errors=True)
    print(f"{summary['messages']} messages in {summary['fuzz_seconds']} s: {summary['crashes']} crash(es), "
          f"{summary['model_changes']} model change(s), RSS growth {summary['rss_growth_mb']} MB "
          f"(peak {summary['rss_peak_growth_mb']} MB)", file=sys.stderr)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
