"""Fuzzing live daemons: hostile MQTT traffic against a running master and slaves (docs/BENCHMARKS.md).

    python bench/fuzz.py --messages 100000             # the recorded run
    python bench/fuzz.py --messages 2000 --seed 1      # a smoke run (tests/bench_smoke/test_fuzz_smoke.py)

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

The last line of stdout is JSON. On a crash or a violation the last `--ring` cases are
saved under the work directory (findings.json); reduced reproductions of what was found
live in bench/fuzz_findings/. Every process started here is stopped on exit, SIGTERM
and SIGINT.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

HONEST = ["slave-00", "slave-01"]
EVIL, ROGUE, OUTSIDER = "slave-02", "slave-03", "slave-04"
LR = 0.1


class Stop(Exception):
    """SIGTERM: leave through the `finally` blocks that stop every process."""


def _on_sigterm(*_: Any) -> None:
    raise Stop()


# ---------------------------------------------------------------- publishing


class Publisher:
    """A paho client that publishes the hostile cases, paced and with bounded in-flight QoS 1."""

    def __init__(self, settings: dict[str, Any], sent: set[bytes]) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.sent = sent
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"fedmq-fuzzer-{os.getpid()}",
                                  protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(50)
        self.client.connect(settings["host"], settings["port"], keepalive=30)
        self.client.loop_start()
        self.pending: collections.deque = collections.deque()
        self.count = 0

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.sent.add(hashlib.sha256(payload).digest())  # before it can arrive at the witness
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        self.count += 1
        if qos:
            self.pending.append(info)
        while len(self.pending) > 200:
            self.pending[0].wait_for_publish(10)
            self.pending.popleft()

    def flush(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.pending and time.monotonic() < deadline:
            self.pending[0].wait_for_publish(max(0.1, deadline - time.monotonic()))
            self.pending.popleft()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# ---------------------------------------------------------------- daemon health


class Health:
    """Crashes (exits, tracebacks in the logs) and resident memory of the daemons."""

    def __init__(self, fleet: Any, names: list[str]) -> None:
        import psutil

        self.fleet, self.names = fleet, names
        self.procs = {n: psutil.Process(fleet.procs[n].pid) for n in names}
        self.offsets = dict.fromkeys(names, 0)
        self.crashes: list[dict[str, str]] = []
        self.errors: dict[str, int] = dict.fromkeys(names, 0)
        self.baseline: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self._reported_exit: set[str] = set()

    def rss(self) -> dict[str, int]:
        out = {}
        for n, p in self.procs.items():
            try:
                out[n] = p.memory_info().rss
            except Exception:  # noqa: BLE001 - exited: reported as a crash
                pass
        return out

    def start_memory(self) -> None:
        self.baseline = self.rss()
        self.peak = dict(self.baseline)

    def poll(self) -> bool:
        """Look at the processes and the new log lines; True if something crashed since the last call."""
        before = len(self.crashes)
        for n in self.names:
            code = self.fleet.procs[n].poll()
            if code is not None and n not in self._reported_exit:
                self._reported_exit.add(n)
                self.crashes.append({"daemon": n, "kind": "exit", "detail": f"exit code {code}; log tail:\n"
                                     + "\n".join(_short(x) for x in self.fleet.log(n).splitlines()[-30:])})
            self._scan_log(n)
        for n, v in self.rss().items():
            self.peak[n] = max(self.peak.get(n, 0), v)
        return len(self.crashes) > before

    def _scan_log(self, name: str) -> None:
        path = self.fleet.root / "logs" / f"{name}.log"
        try:
            with open(path, "rb") as f:
                f.seek(self.offsets[name])
                text = f.read().decode(errors="replace")
        except OSError:
            return
        cut = text.rfind("\n") + 1  # complete lines only
        text = text[:cut]
        self.offsets[name] += len(text.encode(errors="replace"))
        lines = text.splitlines()
        for i, line in enumerate(lines):
            if " ERROR " in line or " CRITICAL " in line:
                self.errors[name] += 1
            if line.startswith("Traceback (most recent call last)"):
                self.crashes.append({"daemon": name, "kind": "traceback",
                                     "detail": "\n".join(_short(x) for x in lines[max(0, i - 2): i + 40])})


def _short(line: str, limit: int = 400) -> str:
    """A log line as evidence: hostile input can make a daemon log megabytes in one line."""
    return line if len(line) <= limit else f"{line[:limit]}... ({len(line)} characters)"


# ---------------------------------------------------------------- the run


def job_overrides() -> dict[str, Any]:
    return {
        "job": {"rounds": 1_000_000},  # never finishes while fuzzed
        # quorum 2: the honest pair closes a round; the evil key is a participant that
        # never answers validly
        "rounds": {"min_slaves": 2, "quorum": 2, "deadline": 10.0, "start_wait": 60.0},
    }


def slave_overrides() -> dict[str, dict[str, Any]]:
    # ~0.03 s of local training stretched to ~0.5 s: a few versions a second would
    # grow the master's per-version history faster than anything the fuzzer does
    return {n: {"slave": {"slowdown": 15.0}} for n in HONEST}


def wait_for(cond, timeout: float, health: Health | None = None, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if health is not None and health.poll():
            raise RuntimeError(f"a daemon crashed while waiting for {what}: {health.crashes[-1]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def broker_drops(log: Path) -> int:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return 0
    return len(re.findall(r"dropped|Dropping|exceeded", text))


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from _fuzz_cases import CaseFactory, EvilLedger, Roles, enrollment_messages, EVIL_SAMPLES
    from _fuzz_observer import Observer, slave_adoptions

    from fedmq.broker import start_broker
    from fedmq.common.keys import KeyRing, load_identity, load_public_key
    from fedmq.common.topics import Topics
    from fedmq.demo import JOB, LocalFleet

    rng = random.Random(args.seed)
    exclude = tuple(g for g in args.exclude.split(",") if g) if args.exclude else ("\0",)
    broker = start_broker("mosquitto", data_dir=work / "broker", persistence=False)
    fleet = observer = publisher = None
    t0 = time.monotonic()
    try:
        fleet = LocalFleet(work / "fleet", broker.settings, slaves=5, rounds=1_000_000, job=job_overrides(),
                           slave_overrides=slave_overrides(), not_allowed=(OUTSIDER,))
        private, keys = fleet.root / "private", fleet.root / "keys"
        ids = {n: load_identity(private / f"{n}.key", name=n) for n in (EVIL, ROGUE, OUTSIDER)}
        ring = KeyRing()
        for name in ["master", *HONEST]:
            ring.add(name, load_public_key(keys / f"{name}.pub"))
        kids = {name: load_identity(private / f"{name}.key", name=name).kid for name in ["master", *HONEST, EVIL]}
        topics = Topics(JOB)
        sent: set[bytes] = set()
        observer = Observer(broker.settings, topics, ring, HONEST, LR, sent=sent)
        if not observer.transport.wait_connected(30):
            raise RuntimeError("the witness could not connect to the broker")
        for name in HONEST + ["master"]:
            fleet.start(name)
        daemons = ["master", *HONEST]
        health = Health(fleet, daemons)

        # 1. capture
        wait_for(lambda: observer.version() >= args.capture_versions, args.start_timeout, health,
                 f"{args.capture_versions} versions (capture)")
        wait_for(lambda: 0 in observer.models, 30, health, "the witness to hold version 0")
        spec = {n: tuple(t.shape) for n, t in observer.models[0].items()}
        roles = Roles(topics, honest=HONEST, evil=ids[EVIL], rogue=ids[ROGUE], outsider=ids[OUTSIDER], kids=kids,
                      spec=spec, now=time.time())
        publisher = Publisher(broker.settings, sent)
        for topic, payload, retain in enrollment_messages(roles):
            publisher.publish(topic, payload, retain=retain)
        wait_for(lambda: EVIL in observer.snapshot().participants, 60, health, f"{EVIL} to take part in a round")
        observer.capturing = False
        captured = {t: list(p) for t, p in observer.captured.items()}
        capture_seconds = time.monotonic() - t0
        version_start = observer.version()

        # 2. fuzz
        ledger = EvilLedger()
        live = observer.snapshot()
        factory = CaseFactory(rng, roles, captured, live)
        games: collections.Counter[str] = collections.Counter()
        ring_buf: collections.deque = collections.deque(maxlen=args.ring)
        violations: list[dict[str, str]] = []
        health.poll()
        health.start_memory()
        fuzz_start = time.monotonic()
        next_at = fuzz_start
        last_check = last_enroll = fuzz_start
        preempts = 0
        interval = 1.0 / args.rate
        while publisher.count < args.messages:
            now = time.monotonic()
            if now - last_check >= 0.5:
                last_check = now
                crashed = health.poll()
                snap = observer.snapshot()
                live.round, live.version, live.participants, live.run = snap.round, snap.version, snap.participants, snap.run
                violations += [v.as_dict() for v in observer.check_versions(ledger, roles, fleet.root / "logs",
                                                                            declared=EVIL_SAMPLES)]
                if EVIL not in live.participants and now - last_enroll > 3.0:
                    last_enroll = now  # the evil key declined or went offline in some game: back in
                    for topic, payload, retain in enrollment_messages(roles):
                        publisher.publish(topic, payload, retain=retain)
                if (crashed or violations) and not args.keep_going:
                    break
                if now - fuzz_start > args.timeout:
                    break
            if observer.new_round.is_set():  # race the honest slaves: their update ids, from the evil key, first
                observer.new_round.clear()
                snap = observer.snapshot()
                live.round, live.version, live.participants = snap.round, snap.version, snap.participants
                if rng.random() < 0.5 and not "preempt-uid".startswith(exclude):
                    preempts += 1
                    case = factory.preempt()
                    _send(publisher, case, games, ring_buf, ledger)
            case = factory.next()
            while case.game.startswith(exclude):
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

        # 3. settle: the job must go on, memory should come back
        settle_end = time.monotonic() + args.settle
        progressed = lambda: observer.version() > version_end_fuzz  # noqa: E731
        while time.monotonic() < settle_end or (not progressed() and time.monotonic() < settle_end + 60):
            health.poll()
            time.sleep(0.25)
        health.poll()
        rss_after = health.rss()
        wait_for(observer.drained, 30, None, "the witness to drain its queue")
        violations += [v.as_dict() for v in observer.check_versions(ledger, roles, fleet.root / "logs",
                                                                    final=True, declared=EVIL_SAMPLES)]
        published = set(observer.published_versions)
        for name in HONEST:
            for v in slave_adoptions(fleet.log(name)):
                if v not in published:
                    violations.append({"kind": "slave-model", "who": name,
                                       "detail": f"adopted model version {v}, which the master never published"})
        growth = {n: round((rss_after[n] - health.baseline[n]) / 2**20, 1) for n in daemons
                  if n in rss_after and n in health.baseline}  # an exited daemon is a crash, not a shrink
        peak = {n: round((health.peak.get(n, 0) - health.baseline.get(n, 0)) / 2**20, 1) for n in daemons}
        status = observer.status
        summary: dict[str, Any] = {
            "messages": publisher.count, "cases": sum(games.values()), "seed": args.seed, "rate": args.rate,
            "excluded_games": list(args.exclude.split(",")) if args.exclude else [],
            "crashes": len(health.crashes),
            "model_changes": sum(1 for v in violations if v["kind"] in ("model", "non-finite", "slave-model")),
            "rss_growth_mb": max(growth.values()) if growth else None,
            "rss_peak_growth_mb": max(peak.values()) if peak else None,
            "rss_growth_mb_by_daemon": growth, "rss_peak_growth_mb_by_daemon": peak,
            "rss_baseline_mb": {n: round(v / 2**20, 1) for n, v in health.baseline.items()},
            "versions_checked": len(observer.checked) - len(observer.unchecked),
            "versions_unchecked": len(observer.unchecked),
            "versions_during_fuzz": version_end_fuzz - version_start,
            "progress_after_fuzz": progressed(),
            "bounded_accepts": len(observer.bounded_accepts),
            "preempts": preempts,
            "error_log_lines": health.errors,
            "broker_drop_lines": broker_drops(work / "broker" / "mosquitto.log"),
            "master_rejected": status.get("rejected", {}), "master_duplicates": status.get("duplicates"),
            "witness_unverified": dict(observer.unverified),
            "fuzz_seconds": round(fuzz_seconds, 1), "capture_seconds": round(capture_seconds, 1),
            "captured_topics": len(captured), "captured_payloads": sum(len(p) for p in captured.values()),
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
    finally:
        if publisher is not None:
            publisher.close()
        if observer is not None:
            observer.close()
        if fleet is not None:
            fleet.stop_all()
        broker.stop()


def _send(publisher: Publisher, case: Any, games: collections.Counter, ring_buf: collections.deque,
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
    ap.add_argument("--workdir", type=Path, default=None, help="keep the fleet, logs and findings here")
    args = ap.parse_args()
    if args.timeout is None:
        args.timeout = 3 * args.messages / args.rate + 300
    from fedmq.broker import find_mosquitto

    if find_mosquitto() is None:
        sys.exit("fuzz: needs the mosquitto binary (apt-get install mosquitto)")
    signal.signal(signal.SIGTERM, _on_sigterm)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fedmq-fuzz-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    try:
        summary = run(args, work)
    except (Stop, KeyboardInterrupt):
        print("fuzz: stopped; every process it started is stopped", file=sys.stderr)
        sys.exit(130)
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
