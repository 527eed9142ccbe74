"""The live job the fuzzer attacks: broker, daemons, witness, publisher and keys, set up and torn down together.

`LiveJob` is a context manager: on entry a Mosquitto of its own on a free loopback
port (anonymous, like the tests' broker: the fuzzer must be able to publish on the
victims' topics), a master and two honest slaves as real `fedmq ... run` processes
(`fedmq.demo.LocalFleet`: the reference workload, FedAvg, rounds without end), the
witness (`Observer`) and a publisher; it waits until `capture_versions` versions went
by (the witness records them: the seed corpus), then enrolls the evil key and waits
until it takes part in a round. On exit everything it started is stopped, whatever
happened. bench/fuzz.py and bench/fuzz_findings/replay.py both use it.
"""

from __future__ import annotations

import collections
import hashlib
import os
import re
import time
from pathlib import Path
from typing import Any, Callable

from _fuzz_cases import Roles, enrollment_messages
from _fuzz_observer import Observer

HONEST = ["slave-00", "slave-01"]
EVIL, ROGUE, OUTSIDER = "slave-02", "slave-03", "slave-04"
DAEMONS = ["master", *HONEST]
LR = 0.1


def job_overrides() -> dict[str, Any]:
    return {
        "job": {"rounds": 1_000_000},  # never finishes while fuzzed
        # quorum 2: the honest pair closes a round; the evil key is a participant whose
        # updates should all be refused
        "rounds": {"min_slaves": 2, "quorum": 2, "deadline": 10.0, "start_wait": 60.0},
    }


def slave_overrides() -> dict[str, dict[str, Any]]:
    # ~0.03 s of local training stretched to ~0.5 s: several versions a second would
    # grow the master's per-version history faster than anything the fuzzer does
    return {n: {"slave": {"slowdown": 15.0}} for n in HONEST}


def _short(line: str, limit: int = 400) -> str:
    """A log line as evidence: hostile input can make a daemon log megabytes in one line."""
    return line if len(line) <= limit else f"{line[:limit]}... ({len(line)} characters)"


class Publisher:
    """A paho client that publishes hostile payloads, with a bounded number of QoS 1 in flight.

    Every payload's digest goes into `sent` first, so the witness can tell the fuzzer's
    own traffic from the daemons'."""

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
        self.sent.add(hashlib.sha256(payload).digest())
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


class Health:
    """Crashes (exits, tracebacks in the logs) and resident memory of the daemons."""

    def __init__(self, fleet: Any, names: list[str]) -> None:
        import psutil

        self.fleet, self.names = fleet, names
        self.procs = {n: psutil.Process(fleet.procs[n].pid) for n in names}
        self.offsets = dict.fromkeys(names, 0)
        self.crashes: list[dict[str, str]] = []
        self.errors: dict[str, int] = dict.fromkeys(names, 0)
        self.longest_line: dict[str, int] = dict.fromkeys(names, 0)  # hostile input must not make log lines long
        self.baseline: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self._exited: set[str] = set()

    def rss(self) -> dict[str, int]:
        out = {}
        for n, p in self.procs.items():
            if n in self._exited:
                continue
            try:
                out[n] = p.memory_info().rss
            except Exception:  # noqa: BLE001 - it exited: poll reports the crash
                pass
        return out

    def start_memory(self) -> None:
        self.baseline = self.rss()
        self.peak = dict(self.baseline)

    def growth_mb(self, now: dict[str, int]) -> dict[str, float]:
        """Growth from the baseline; an exited daemon is a crash, not a shrink: left out."""
        return {n: round((now[n] - self.baseline[n]) / 2**20, 1) for n in self.names
                if n in now and n in self.baseline}

    def poll(self) -> bool:
        """Look at the processes and the new log lines; True if something crashed since the last call."""
        before = len(self.crashes)
        for n in self.names:
            code = self.fleet.procs[n].poll()
            if code is not None and n not in self._exited:
                self._exited.add(n)
                self.crashes.append({"daemon": n, "kind": "exit", "detail": f"exit code {code}; log tail:\n"
                                     + "\n".join(_short(x) for x in self.fleet.log(n).splitlines()[-30:])})
            self._scan_log(n)
        self.sample_peak()
        return len(self.crashes) > before

    def sample_peak(self) -> None:
        for n, v in self.rss().items():
            self.peak[n] = max(self.peak.get(n, 0), v)

    def _scan_log(self, name: str) -> None:
        path = self.fleet.root / "logs" / f"{name}.log"
        try:
            with open(path, "rb") as f:
                f.seek(self.offsets[name])
                data = f.read()
        except OSError:
            return
        data = data[: data.rfind(b"\n") + 1]  # complete lines only
        self.offsets[name] += len(data)
        lines = data.decode(errors="replace").splitlines()
        for i, line in enumerate(lines):
            self.longest_line[name] = max(self.longest_line[name], len(line))
            if " ERROR " in line or " CRITICAL " in line:
                self.errors[name] += 1
            if line.startswith("Traceback (most recent call last)"):
                self.crashes.append({"daemon": name, "kind": "traceback",
                                     "detail": "\n".join(_short(x) for x in lines[max(0, i - 2): i + 40])})


def wait_for(cond: Callable[[], bool], timeout: float, health: Health | None = None, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if health is not None and health.poll():
            raise RuntimeError(f"a daemon crashed while waiting for {what}: {health.crashes[-1]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def broker_drops(log: Path) -> int:
    """Lines in which Mosquitto says it dropped messages (a client's queue was full)."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return 0
    return len(re.findall(r"dropped|Dropping|exceeded", text))


class LiveJob:
    def __init__(self, work: Path, *, capture_versions: int = 2, start_timeout: float = 300.0) -> None:
        self.work = work
        self.capture_versions = capture_versions
        self.start_timeout = start_timeout
        self.broker: Any = None
        self.fleet: Any = None
        self.observer: Observer | None = None
        self.publisher: Publisher | None = None

    def __enter__(self) -> LiveJob:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _start(self) -> None:
        from fedmq.broker import start_broker
        from fedmq.common.keys import KeyRing, load_identity, load_public_key
        from fedmq.common.topics import Topics
        from fedmq.demo import JOB, LocalFleet

        t0 = time.monotonic()
        self.broker = start_broker("mosquitto", data_dir=self.work / "broker", persistence=False)
        self.fleet = fleet = LocalFleet(self.work / "fleet", self.broker.settings, slaves=5, rounds=1_000_000,
                                        job=job_overrides(), slave_overrides=slave_overrides(),
                                        not_allowed=(OUTSIDER,))
        private, keys = fleet.root / "private", fleet.root / "keys"
        ids = {n: load_identity(private / f"{n}.key", name=n) for n in ("master", *HONEST, EVIL, ROGUE, OUTSIDER)}
        ring = KeyRing()
        for name in ["master", *HONEST]:
            ring.add(name, load_public_key(keys / f"{name}.pub"))
        self.topics = Topics(JOB)
        self.sent: set[bytes] = set()
        self.observer = observer = Observer(self.broker.settings, self.topics, ring, HONEST, LR, sent=self.sent)
        if not observer.transport.wait_connected(30):
            raise RuntimeError("the witness could not connect to the broker")
        for name in DAEMONS:
            fleet.start(name)
        self.health = health = Health(fleet, DAEMONS)
        wait_for(lambda: observer.version() >= self.capture_versions, self.start_timeout, health,
                 f"{self.capture_versions} versions (capture)")
        wait_for(lambda: 0 in observer.models, 30, health, "the witness to hold version 0")
        spec = {n: tuple(t.shape) for n, t in observer.models[0].items()}
        kids = {name: ids[name].kid for name in ["master", *HONEST, EVIL]}
        self.roles = Roles(self.topics, honest=HONEST, evil=ids[EVIL], rogue=ids[ROGUE], outsider=ids[OUTSIDER],
                           kids=kids, spec=spec, now=time.time())
        self.publisher = Publisher(self.broker.settings, self.sent)
        self.enroll_evil()
        wait_for(lambda: EVIL in observer.snapshot().participants, 60, health, f"{EVIL} to take part in a round")
        observer.capturing = False
        self.captured = {t: list(p) for t, p in observer.captured.items()}
        self.capture_seconds = time.monotonic() - t0

    def enroll_evil(self) -> None:
        assert self.publisher is not None
        for topic, payload, retain in enrollment_messages(self.roles):
            self.publisher.publish(topic, payload, retain=retain)

    def close(self) -> None:
        for step in (lambda: self.publisher and self.publisher.close(),
                     lambda: self.observer and self.observer.close(),
                     lambda: self.fleet and self.fleet.stop_all(),
                     lambda: self.broker and self.broker.stop()):
            try:
                step()
            except Exception:  # noqa: BLE001 - stop the rest whatever one step does
                pass
        self.publisher = self.observer = self.fleet = self.broker = None
