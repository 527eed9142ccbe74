"""The master's registry of slaves: who is enrolled, whose key is trusted, who is online.

Enrollment is the shared-encoder handshake of the source documents: a slave confirms
(or declines) the instruction, and an allowed key that confirms with enough samples is
enrolled. The registry decides admission and keeps presence; it never decides rounds
(the schedule does) and never touches the model (the model store does). Every
rejection it sees is counted through the `Rejections` it is given, so the status shows
them beside those the shell reports.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Literal, Mapping

from fedmq.common import messages as M
from fedmq.common.channel import Received
from fedmq.common.effects import Effect, Log, Trust
from fedmq.common.errors import Reason, clip

from .rejections import Rejections

if TYPE_CHECKING:
    from fedmq.common.layout import Layout


@dataclass
class SlaveRecord:
    name: str
    enrolled: bool = False
    samples: int = 0
    online: bool = False
    last_seen: float = 0.0
    declined: str | None = None
    public_key: bytes | None = None  # kept for open enrollment, so a restart re-trusts it
    bytes_in: int = 0  # the slave's own count of bytes it received, from its last update
    parts: dict[str, int] | None = None  # a model with parts: those it confirmed it trains -> samples


_RECORD_FIELDS = frozenset(f.name for f in fields(SlaveRecord))
MAX_IGNORED = 10_000  # names of unknown senders remembered for the status
MAX_REASON = 1_000  # characters of a decline reason kept
Admission = Literal["enrolled", "declined", "rejected"]


class SlaveRegistry:
    """Enrollment, trust, presence and silence of every slave the master has heard of."""

    def __init__(self, *, open_enrollment: bool, min_samples: int, rejections: Rejections,
                 layout: Layout | None = None) -> None:
        self.open_enrollment = open_enrollment
        self.layout = layout  # a model with parts: which parts a confirm may claim
        self.min_samples = min_samples
        self.rejections = rejections
        self.slaves: dict[str, SlaveRecord] = {}
        self.not_enrolled: dict[str, str] = {}  # name -> why its messages are ignored
        self.going_offline: dict[str, float] = {}  # name -> when an "offline" came that has not taken effect yet
        self._asked: dict[str, float] = {}  # name -> when it was last asked to confirm again

    def get(self, name: str) -> SlaveRecord | None:
        return self.slaves.get(name)

    def record(self, name: str, now: float | None = None) -> SlaveRecord:
        """The record of `name`, created (unenrolled, offline) if it is new."""
        if name not in self.slaves:
            self.slaves[name] = SlaveRecord(name, last_seen=now or 0.0)
        return self.slaves[name]

    def enrolled(self, name: str) -> bool:
        rec = self.slaves.get(name)
        return rec is not None and rec.enrolled

    def online(self) -> list[str]:
        """Enrolled slaves that are online, sorted (round planning draws from these)."""
        return sorted(n for n, s in self.slaves.items() if s.enrolled and s.online)

    def is_online(self, name: str) -> bool:
        return self.slaves[name].online

    def any_online(self) -> bool:
        return any(s.enrolled and s.online for s in self.slaves.values())

    def ignore(self, name: str, why: str) -> None:
        """Note why messages of `name` are ignored (shown in the status), keeping the first
        reason; at most MAX_IGNORED names are remembered (anyone can make names up)."""
        if name in self.not_enrolled or len(self.not_enrolled) < MAX_IGNORED:
            self.not_enrolled.setdefault(name, why)

    # ------------------------------------------------------------ enrollment

    def on_confirm(self, msg: Received, now: float) -> tuple[Admission, list[Effect]]:
        """A confirm or decline: what became of the sender, and the effects."""
        name, body = msg.sender, msg.body
        known = self.slaves.get(name)
        if known is not None and known.public_key and known.public_key != body["public_key"]:
            self.not_enrolled[name] = "another key already speaks for this name"
            return "rejected", self.rejections.count(Reason.WRONG_SENDER, name)
        if not msg.enrolled and not self.open_enrollment:
            # checked for declines too: an unknown key must not un-enroll a slave by its name
            self.ignore(name, "key not in the allowlist")
            return "rejected", self.rejections.count(Reason.NOT_ENROLLED, name)
        rec = self.record(name)
        if msg.kind == M.DECLINE:
            rec.declined, rec.enrolled, rec.online = body["reason"][:MAX_REASON], False, False
            return "declined", [Log("info", f"{name} declined the instruction: {clip(rec.declined)}")]
        if body["samples"] < self.min_samples:
            rec.declined = f"{body['samples']} samples < min_samples {self.min_samples}"
            return "declined", [Log("info", f"{name} not enrolled: {rec.declined}")]
        parts, why = self.layout.confirmed_parts(body.get("parts")) if self.layout else (None, None)
        if why:
            rec.declined, rec.enrolled, rec.online = why[:MAX_REASON], False, False
            return "declined", [Log("info", f"{name} not enrolled: {rec.declined}")]
        rec.enrolled, rec.online, rec.declined, rec.last_seen = True, True, None, now
        rec.samples = body["samples"]
        rec.parts = None if parts is None else {p: min(n, rec.samples) for p, n in parts.items()}
        fx: list[Effect] = []
        if not msg.enrolled:
            rec.public_key = body["public_key"]
            fx += [Trust(name, rec.public_key), Log("warning", f"open enrollment: trusting new key for {name}")]
        self.not_enrolled.pop(name, None)
        trains = f"; trains {', '.join(rec.parts)}" if rec.parts else ""
        return "enrolled", fx + [Log("info", f"{name} enrolled ({rec.samples} samples{trains})")]

    def enrollment_record(self, name: str) -> dict[str, Any]:
        """What the journal keeps of an enrollment, so a crash before the next checkpoint
        does not forget it (`reenroll` takes it back)."""
        rec = self.slaves[name]
        return {"type": "enroll", "sender": name, "samples": rec.samples, "public_key": rec.public_key,
                "parts": rec.parts}

    def reenroll(self, record: Mapping[str, Any]) -> None:
        rec = self.record(record["sender"])
        rec.enrolled, rec.online, rec.declined = True, True, None
        rec.samples, rec.public_key = record["samples"], record.get("public_key")
        rec.parts = record.get("parts")
        self.not_enrolled.pop(rec.name, None)

    def should_ask(self, name: str, now: float, every: float) -> bool:
        """Whether to ask `name` to confirm again now (at most once per `every` seconds)."""
        if now - self._asked.get(name, float("-inf")) < every:
            return False
        self._asked[name] = now
        return True

    # ------------------------------------------------------------ presence

    def set_online(self, name: str, online: bool) -> list[Effect]:
        """Record presence; a log line if it changed (the caller re-plans)."""
        rec = self.slaves[name]
        self.going_offline.pop(name, None)
        was, rec.online = rec.online, online
        return [] if was == online else [Log("info", f"{name} is {'online' if online else 'offline'}")]

    def offline_due(self, now: float, grace: float) -> list[str]:
        """Slaves whose "offline" is `grace` seconds old with nothing heard since: it takes effect now."""
        due = [n for n, since in self.going_offline.items() if now - since >= grace]
        for name in due:
            del self.going_offline[name]
        return due

    def silent(self, participants: list[str], answered: set[str], since: float, now: float, limit: float) -> list[str]:
        """Participants that said nothing for `limit` seconds (no will came: e.g. a
        half-open connection); the caller presumes them offline."""
        return [n for n in participants
                if self.slaves[n].online and n not in answered and now - max(self.slaves[n].last_seen, since) > limit]

    # ------------------------------------------------------------ persistence

    def checkpoint(self) -> dict[str, Any]:
        return {n: asdict(s) for n, s in self.slaves.items()}

    def restore(self, slaves: Mapping[str, Mapping[str, Any]]) -> None:
        """Presence is as last known: a resumed MQTT session does not resend retained
        presence, and a slave that died meanwhile only costs one round deadline."""
        self.slaves = {n: SlaveRecord(**{k: v for k, v in s.items() if k in _RECORD_FIELDS})
                       for n, s in slaves.items()}
