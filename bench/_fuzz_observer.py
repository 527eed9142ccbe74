"""The fuzzer's witness: what the master and the honest slaves really published, and the invariants.

It subscribes to the whole job (`PREFIX/JOB/#`), drops the fuzzer's own payloads by
digest, and verifies everything else with the real keys (the master's and the honest
slaves'), exactly as a slave or the master would. From that verified view it keeps:

* the captured valid payloads per topic (the seed corpus, recorded before fuzzing);
* the current round, version and participants (so hostile updates target the open round);
* every model version the master published, and every update the honest slaves sent;
* the master's metrics rows (`update_ids` per version).

`check_versions` then holds the master to "the model changes only through honest
rounds": every published model is finite, every update id in a version is one an honest
slave sent (or a hostile one whose acceptance the protocol allows, with its weight
capped at what the evil key declared), and the published model equals FedAvg of
exactly those updates over the previous version, recomputed here.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedmq.common import messages as M
from fedmq.common.brokerconfig import BrokerConfig
from fedmq.common.channel import Inbox
from fedmq.common.errors import ProtocolError
from fedmq.common.keys import KeyRing
from fedmq.common.strategies import ClientUpdate, make_strategy
from fedmq.common.tensors import all_finite, as_float32_state
from fedmq.common.topics import Topics, split_chunk_topic
from fedmq.common.transport import Inbound, Transport

from _fuzz_cases import EvilLedger, EvilUpdate, LiveState, Roles

CAPTURE_PER_TOPIC = 12
ATOL = 1e-5


@dataclass
class Violation:
    kind: str  # "crash" | "traceback" | "model" | "slave-model" | "non-finite"
    who: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "who": self.who, "detail": self.detail}


@dataclass
class Genuine:
    sender: str
    round: int
    update: ClientUpdate


@dataclass
class Observer:
    broker: dict[str, Any]
    topics: Topics
    keyring: KeyRing  # the master's and the honest slaves' public keys
    honest: list[str]
    gradient_lr: float
    sent: set[bytes] = field(default_factory=set)  # sha256 of every payload the fuzzer published
    capturing: bool = True
    captured: dict[str, list[bytes]] = field(default_factory=dict)
    live: LiveState = field(default_factory=LiveState)
    models: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    published_versions: set[int] = field(default_factory=set)
    genuine: dict[str, Genuine] = field(default_factory=dict)
    rows: dict[int, dict[str, Any]] = field(default_factory=dict)
    status: dict[str, Any] = field(default_factory=dict)
    new_round: threading.Event = field(default_factory=threading.Event)
    unverified: dict[str, int] = field(default_factory=dict)  # monitored-topic payloads not ours that failed
    seen: int = 0

    def __post_init__(self) -> None:
        self.inbox = Inbox(self.keyring, self.topics.job)
        self.lock = threading.Lock()
        self.q: queue.Queue[Inbound | None] = queue.Queue()
        self.worker = threading.Thread(target=self._work, name="fuzz-observer", daemon=True)
        self.worker.start()
        self.transport = Transport(BrokerConfig(**self.broker), f"fedmq-fuzz-observer-{id(self)}", self.q.put,
                                   clean_start=True)
        self.transport.subscribe(self.topics.everything, qos=1)
        self.transport.start()
        self.checked: set[int] = set()
        self.unchecked: list[int] = []
        self.bounded_accepts: list[str] = []

    def close(self) -> None:
        self.transport.stop()
        self.q.put(None)
        self.worker.join(timeout=10)

    def drained(self) -> bool:
        """Every message received so far is handled (not merely taken off the queue)."""
        return self.q.unfinished_tasks == 0

    # ------------------------------------------------------------ receiving

    def _work(self) -> None:
        while True:
            msg = self.q.get()
            if msg is None:
                return
            try:
                self._on(msg)
            except Exception as exc:  # noqa: BLE001 - a bug here must not silence the witness
                key = f"witness error {type(exc).__name__}"
                with self.lock:
                    self.unverified[key] = self.unverified.get(key, 0) + 1
            finally:
                self.q.task_done()

    def _on(self, msg: Inbound) -> None:
        self.seen += 1
        if hashlib.sha256(msg.payload).digest() in self.sent:
            return
        base = split_chunk_topic(msg.topic)
        parsed = self.topics.parse(base)
        if parsed is None or not msg.payload:
            return
        name, who = parsed
        if name in ("status", "metrics", "alive"):
            self._on_json(name, msg.payload)
            return
        if self.capturing and len(self.captured.setdefault(msg.topic, [])) < CAPTURE_PER_TOPIC:
            self.captured[msg.topic].append(msg.payload)
        if who is not None and name != "to" and who not in self.honest:
            return  # the fuzzer's own keys: nothing to witness
        try:
            received = self.inbox.receive(base, msg.payload, time.time(), retained=msg.retain)
        except ProtocolError as exc:
            with self.lock:
                self.unverified[exc.reason] = self.unverified.get(exc.reason, 0) + 1
            return
        if received is None:
            return
        with self.lock:
            self._on_verified(name, received)

    def _on_json(self, name: str, payload: bytes) -> None:
        try:
            data = json.loads(payload)
        except ValueError:
            return
        with self.lock:
            if name == "metrics" and isinstance(data.get("version"), int):
                self.rows[data["version"]] = data
            elif name == "status":
                self.status = data

    def _on_verified(self, name: str, msg: Any) -> None:
        kind, body, man = msg.kind, msg.body, msg.manifest
        if msg.sender == "master":
            if kind == M.MODEL:
                tensors = M.tensors_of(body, finite=False)
                self.models[man.version] = {k: v.clone() for k, v in tensors.items()}
                self.published_versions.add(man.version)
            elif kind == M.ROUND:
                self.live.round, self.live.version = man.round, man.version
                self.live.participants = tuple(body.get("participants", ()))
                self.live.run = body.get("run", "")
                self.new_round.set()
            elif kind == M.INSTRUCTION:
                self.live.run = body.get("run", "")
            return
        if kind == M.UPDATE:  # as the master decodes it (NaN kept: a NaN model makes NaN updates)
            tensors = as_float32_state(M.tensors_of(body, finite=False))
            upd = ClientUpdate(msg.sender, body["kind"], tensors, body["samples"], body["base_version"])
            self.genuine[body["update_id"]] = Genuine(msg.sender, man.round, upd)

    def snapshot(self) -> LiveState:
        with self.lock:
            return LiveState(self.live.round, self.live.version, self.live.participants, self.live.run)

    def version(self) -> int:
        with self.lock:
            return max(self.rows, default=0)

    # ------------------------------------------------------------ invariants

    def check_versions(self, ledger: EvilLedger, roles: Roles, logs: Path, *, final: bool = False,
                       declared: int) -> list[Violation]:
        """Check every version whose metrics row and models (this and the previous) arrived.

        What cannot be checked yet stays for a later call; with `final`, the rest is
        reported as unchecked (never counted as a violation)."""
        out: list[Violation] = []
        with self.lock:
            ready = sorted(v for v in self.rows if v not in self.checked)
            for v in ready:
                if v in self.models and v - 1 in self.models:
                    out += self._check(v, ledger, roles, logs, declared)
                    self.checked.add(v)
                elif final:
                    self.unchecked.append(v)
                    self.checked.add(v)
            self._prune()
        return out

    def _prune(self) -> None:
        """Keep memory flat over long runs: old models and honest updates are not needed again."""
        if not self.checked:
            return
        done = max(self.checked)
        for v in [v for v in self.models if v < done - 2 and v not in (0,)]:
            del self.models[v]
        oldest_round = min((r.get("round", 0) for v, r in self.rows.items() if v >= done - 2), default=0)
        for uid in [u for u, g in self.genuine.items() if g.round < oldest_round - 2]:
            del self.genuine[uid]

    def _check(self, v: int, ledger: EvilLedger, roles: Roles, logs: Path, declared: int) -> list[Violation]:
        row, new, prev = self.rows[v], self.models[v], self.models[v - 1]
        ids = row.get("update_ids", [])
        bad = [n for n, t in new.items() if t.is_floating_point() and not all_finite(t)]
        if bad:
            return [Violation("non-finite", "master", f"version {v} published with NaN/Inf in {bad} "
                                                      f"(update_ids {ids})")]
        honest: list[ClientUpdate] = []
        hostile: dict[str, list[EvilUpdate]] = {}  # update id -> what the evil key sent under it
        forged: list[str] = []
        for uid in ids:
            sent = ledger.updates.get(uid, [])
            g = self.genuine.get(uid)
            if g is not None:
                honest.append(g.update)
                if sent:
                    forged.append(f"{uid} (also sent by {sent[0].sender}: {sorted({e.game for e in sent})})")
            elif sent:
                hostile[uid] = sent
            elif _sent_by_honest_slave(uid, logs):
                self.unchecked.append(v)  # genuine, but the witness missed the message: nothing to compare with
                return []
            else:
                return [Violation("model", "master", f"version {v}: update id {uid!r} was sent by no honest slave "
                                                     f"and not by the fuzzer (update_ids {ids})")]
        senders = [g.update.sender for g in (self.genuine[u] for u in ids if u in self.genuine)] + \
            [sent[0].sender for sent in hostile.values()]
        doubles = sorted({s for s in senders if senders.count(s) > 1})
        if doubles:
            return [Violation("model", "master", f"version {v}: more than one update from {doubles} in one round "
                                                 f"(update_ids {ids})")]
        strategy = make_strategy({"name": "fedavg"}, gradient_lr=self.gradient_lr)

        def diff_with(combo: tuple[EvilUpdate, ...], capped: bool = True) -> float:
            extra = [ClientUpdate(e.sender, "delta", roles.evil_tensors(e.seed),
                                  max(1, min(e.claimed, declared) if capped else e.claimed), v - 1) for e in combo]
            return _max_diff(strategy.aggregate(prev, honest + extra, v - 1), new)

        # Each hostile id stands for one of the updates sent under it: find the one that
        # makes the published model (each has tensors of its own seed), if it is one of
        # those whose tensors are known; weights capped at what the evil key declared.
        known = [[e for e in sent if e.seed > 0] for sent in hostile.values()]
        best = math.inf
        for combo in itertools.islice(itertools.product(*known), 400):
            diff = diff_with(combo)
            best = min(best, diff)
            if diff > ATOL:
                continue
            refused = [e.game for e in combo if not e.admissible]
            if refused:
                return [Violation("model", "master", f"version {v}: hostile update(s) {list(hostile)} ({refused}) "
                                                     f"aggregated; they must be refused")]
            self.bounded_accepts += [f"v{v}:{e.game}" for e in combo]
            return []
        forged_note = f"; forged ids: {forged}" if forged else ""
        if hostile:
            suspects = sorted({e.game for sent in hostile.values() for e in sent if e.seed == 0})
            uncapped = any(diff_with(combo, capped=False) <= ATOL
                           for combo in itertools.islice(itertools.product(*known), 400))
            why = ("their claimed, uncapped sample counts" if uncapped else
                   f"an update with hostile tensors, one of {suspects}")
            return [Violation("model", "master", f"version {v}: hostile update(s) {list(hostile)} aggregated: "
                                                 f"the model matches {why}" + forged_note)]
        return [Violation("model", "master", f"version {v}: published model differs from FedAvg of its update_ids "
                                             f"{ids} over version {v - 1} by {best if best < math.inf else _max_diff(strategy.aggregate(prev, honest, v - 1), new):.3g}"
                                             + forged_note)]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if set(a) != set(b):
        return float("inf")
    return max((float((a[k].float() - b[k].float()).abs().max()) if a[k].numel() else 0.0) for k in a)


_SENT = re.compile(r"round (\d+): sent \w+ update")


def _sent_by_honest_slave(uid: str, logs: Path) -> bool:
    """Fallback when the witness missed an update: the slave's own log says it sent it."""
    parts = uid.split("/")
    if len(parts) != 3 or not parts[1].isdigit():
        return False
    path = logs / f"{parts[0]}.log"
    if not path.exists():
        return False
    return any(m.group(1) == parts[1] for m in _SENT.finditer(path.read_text(errors="replace")))


_ADOPTED = re.compile(r" INFO model version (\d+)$", re.M)


def slave_adoptions(log_text: str) -> list[int]:
    """The model versions a slave adopted, from its log."""
    return [int(m.group(1)) for m in _ADOPTED.finditer(log_text)]
