"""The fuzzer's hostile MQTT messages: what to publish next, on which topic, signed by which key.

`CaseFactory.next` draws a game and returns a `Case`: the topic, the payloads to
publish on it in order (several for a chunked message), and what it is (`game`), so a
finding names the game that caused it. Three families:

* **unsigned**: random bytes and CBOR, and mutations of captured valid messages
  (bench/_fuzz_mutations.py), replays, retained junk.
* **signed by an enrolled key** (`evil`, whose private key the fleet made): hostile
  manifests and bodies (hostile tensors: bench/_fuzz_tensors.py) that pass the
  signature check and reach the schema, the tensor decoder, the round logic and the
  aggregation screen of the master.
* **signed by other keys**: an allowlisted key that never enrolls (`rogue`, the one
  that may be locked out by a sequence number far ahead), a key the allowlist does
  not hold (`outsider`), and forgeries of the master's messages (the slaves only
  trust the master's key, so those stop at the signature).

What the evil key may legitimately get accepted is tracked in `EvilLedger`, so the
invariant checker (bench/_fuzz_observer.py) can tell a hostile update that moved the
model from one whose influence stayed within the documented bounds.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable

import cbor2
import torch
from cbor2 import CBORTag

from fedmq.common.envelope import COSE_SIGN1_TAG, HDR_BODY, HDR_CHUNK, Manifest, protected_header, sig_structure
from fedmq.common.keys import Identity, raw_public_bytes
from fedmq.common.tensors import encode_state_dict, encode_tensor
from fedmq.common.topics import Topics, chunk_topic

from _fuzz_mutations import cbor_bombs, cose, cose_variants, mutate_bytes, random_cbor, safe_dumps, split_cose
from _fuzz_tensors import hostile_tensors

EVIL_SAMPLES = 40  # what the evil key declares when it enrolls (the cap of its weight)
MAX_PAYLOAD = 1_900_000  # under Mosquitto's max_packet_size (2 MiB) with the topic and headers


@dataclass
class Case:
    game: str
    topic: str
    payloads: list[bytes]
    retain: bool = False
    qos: int = 1
    notes: list[tuple[str, EvilUpdate]] = field(default_factory=list)  # evil updates it carries, by update_id

    def publishes(self) -> list[tuple[str, bytes]]:
        return [(self.topic, p) for p in self.payloads]


@dataclass
class LiveState:
    """What the fuzzer knows of the job right now (from the observer's verified view)."""

    round: int = 0
    version: int = 0
    participants: tuple[str, ...] = ()
    run: str = ""


@dataclass
class EvilUpdate:
    """An update the evil key sent that the master may accept (bounded influence), or
    must refuse; `seed` regenerates its tensors (`Roles.evil_tensors`; 0: tensors of
    another kind, not reproducible)."""

    game: str
    sender: str
    claimed: int
    seed: int
    admissible: bool  # true: accepted with capped weight is the documented behaviour


@dataclass
class EvilLedger:
    """Every update the evil key published, by update_id: several may share one id (only
    the first the master accepts can count; later ones are duplicates)."""

    updates: dict[str, list[EvilUpdate]] = field(default_factory=dict)

    def note(self, uid: str, upd: EvilUpdate) -> None:
        self.updates.setdefault(uid, []).append(upd)


# ---------------------------------------------------------------- signing hostile messages


class Signer:
    """Signs anything for one identity: valid manifests (`seal`) or hand-made ones (`raw`).

    Its own sequence counter only grows, like a real sender's, so a hostile body still
    passes the replay check; `seq` overrides it for the sequence-number games."""

    def __init__(self, identity: Identity, job: str, seq: int) -> None:
        self.identity = identity
        self.job = job
        self.next_seq = seq

    def take_seq(self) -> int:
        self.next_seq += 1
        return self.next_seq - 1

    def seal(self, signed_topic: str, kind: str, body: Any, *, version: int = 0, round: int = 0,
             raw: bytes | None = None, chunk_size: int = 1 << 30, now_ms: int = 0, **overrides: Any) -> list[bytes]:
        """Sign `body` (or `raw` CBOR bytes) as `kind` for `signed_topic` (the external_aad);
        manifest fields in `overrides` replace the computed ones (sender, job, seq, size,
        sha256, chunks, and the manifest's own `topic`)."""
        data = raw if raw is not None else cbor2.dumps(body)
        parts = [data[i:i + chunk_size] for i in range(0, len(data), chunk_size)] or [b""]
        fields = dict(kind=kind, job=self.job, sender=self.identity.name, topic=signed_topic, seq=None, ts=now_ms,
                      version=version, round=round, size=len(data), sha256=hashlib.sha256(data).digest(),
                      chunks=len(parts))
        fields.update(overrides)
        if fields["seq"] is None:
            fields["seq"] = self.take_seq()
        manifest = Manifest(**fields)
        return self.sign_payload(signed_topic, manifest.encode(), parts, chunked=fields["chunks"] > 1 or len(parts) > 1)

    def sign_payload(self, topic: str, payload: bytes, parts: list[bytes], *, chunked: bool,
                     chunk_headers: list[Any] | None = None, kid: bytes | None = None) -> list[bytes]:
        protected = protected_header(kid or self.identity.kid)
        signature = self.identity.private_key.sign(sig_structure(protected, topic, payload))
        out = []
        for i, part in enumerate(parts):
            unprotected: dict[int, Any] = {HDR_BODY: part}
            if chunk_headers is not None:
                unprotected[HDR_CHUNK] = chunk_headers[i]
            elif chunked:
                unprotected[HDR_CHUNK] = [i, len(parts)]
            out.append(cose(protected, unprotected, payload, signature))
        return out


def new_signer(identity: Identity, job: str, now: float) -> Signer:
    return Signer(identity, job, int(now * 1_000_000))


# ---------------------------------------------------------------- the case factory


class Roles:
    """The keys and names the fuzzer plays with, and the model's tensor names and shapes."""

    def __init__(self, topics: Topics, *, honest: list[str], evil: Identity, rogue: Identity, outsider: Identity,
                 kids: dict[str, bytes], spec: dict[str, tuple[int, ...]], now: float) -> None:
        self.topics = topics
        self.honest = honest
        self.evil, self.rogue, self.outsider = (new_signer(i, topics.job, now) for i in (evil, rogue, outsider))
        self.kids = kids  # every known key id by name (master, slaves), to put in headers
        self.spec = spec

    def evil_tensors(self, seed: int) -> dict[str, torch.Tensor]:
        """The tensors of an evil update that could pass every check: finite, the model's
        shapes, norm ~2 (under the default bound of 10). Each seed is a direction of its
        own, so the witness can tell which of several such updates made a version."""
        g = torch.Generator().manual_seed(seed)
        return {n: torch.randn(s, generator=g) * 0.02 for n, s in self.spec.items()}


class CaseFactory:
    """Draws the next hostile message; `captured` holds valid payloads per topic."""

    def __init__(self, rng: random.Random, roles: Roles, captured: dict[str, list[bytes]], live: LiveState) -> None:
        self.rng = rng
        self.roles = roles
        self.captured = {t: list(p) for t, p in captured.items() if p}
        self.all_captured = [p for ps in self.captured.values() for p in ps]
        self.live = live
        self._notes: list[tuple[str, EvilUpdate]] = []
        self._seeds = 1000  # evil tensors' seeds, one per update
        t = roles.topics
        self.master_targets = [t.slave(n, s) for n in ("confirm", "update", "presence")
                               for s in [*roles.honest, roles.evil.identity.name, roles.rogue.identity.name,
                                         roles.outsider.identity.name, "nobody"]]
        self.slave_targets = [t.master("instruction"), t.master("model"), t.master("round"), t.master("delta")] + \
            [t.direct(s) for s in [*roles.honest, roles.evil.identity.name]] + \
            [chunk_topic(t.master(n), i) for n in ("instruction", "model", "round") for i in (0, 1, 7)]
        self.games: list[tuple[float, Callable[[], Case]]] = [
            (6, self.random_bytes), (4, self.random_cbor_item), (4, self.bomb), (12, self.mutated_capture),
            (10, self.cose_game), (4, self.replay), (3, self.wrong_topic_replay), (2, self.retained_junk),
            (20, self.evil_update), (4, self.evil_manifest), (4, self.evil_chunks), (3, self.evil_confirm),
            (2, self.evil_presence), (3, self.evil_kind_games), (2, self.rogue_games), (3, self.outsider_games),
            (5, self.forged_master),
        ]
        self._weights = [w for w, _ in self.games]

    def next(self) -> Case:
        self._notes = []
        _, make = self.rng.choices(self.games, weights=self._weights)[0]
        case = make()
        case.notes = self._notes
        if max((len(p) for p in case.payloads), default=0) > MAX_PAYLOAD:  # the broker would drop the fuzzer
            case.payloads = [p[:MAX_PAYLOAD] for p in case.payloads]
            case.game += "(cut)"
        return case

    # -- unsigned ------------------------------------------------------------------

    def any_target(self) -> str:
        return self.rng.choice(self.master_targets if self.rng.random() < 0.5 else self.slave_targets)

    def random_bytes(self) -> Case:
        n = int(self.rng.choice([0, 1, 2, 5, 17, 64, 300, 4096, 70_000]))
        return Case("random-bytes", self.any_target(), [self.rng.randbytes(n)], qos=self.rng.choice([0, 1]))

    def random_cbor_item(self) -> Case:
        value = random_cbor(self.rng)
        if self.rng.random() < 0.5:
            value = CBORTag(COSE_SIGN1_TAG, [safe_dumps(random_cbor(self.rng)), {HDR_BODY: safe_dumps(value)},
                                             safe_dumps(random_cbor(self.rng)), self.rng.randbytes(64)])
        return Case("random-cbor", self.any_target(), [safe_dumps(value)])

    def bomb(self) -> Case:
        data = cbor_bombs(self.rng)
        if self.rng.random() < 0.5:  # inside an otherwise plausible envelope, as the body or the manifest
            cap = self._capture_for(self.any_target())
            parts = split_cose(cap[1]) if cap else None
            if parts:
                prot, unprot, payload, sig = parts
                if self.rng.random() < 0.5:
                    unprot[HDR_BODY] = data
                    return Case("bomb-in-body", cap[0], [cose(prot, unprot, payload, sig)])
                return Case("bomb-in-manifest", cap[0], [cose(prot, unprot, data, sig)])
        return Case("bomb", self.any_target(), [data])

    def _capture_for(self, topic: str) -> tuple[str, bytes] | None:
        """A captured payload of this topic's kind (any, if none), and the topic it was on."""
        base = topic.split("/chunk/")[0]
        if self.captured.get(base):
            return base, self.rng.choice(self.captured[base])
        if not self.captured:
            return None
        t = self.rng.choice(list(self.captured))
        return t, self.rng.choice(self.captured[t])

    def mutated_capture(self) -> Case:
        cap = self._capture_for(self.any_target())
        if cap is None:
            return self.random_bytes()
        game, data = mutate_bytes(self.rng, cap[1], self.all_captured)
        return Case(game, cap[0], [data], qos=self.rng.choice([0, 1, 1]))

    def cose_game(self) -> Case:
        cap = self._capture_for(self.any_target())
        if cap is None:
            return self.random_bytes()
        game, data = cose_variants(self.rng, cap[1], list(self.roles.kids.values()), self.all_captured)
        return Case(game, cap[0], [data])

    def replay(self) -> Case:
        cap = self._capture_for(self.any_target())
        if cap is None:
            return self.random_bytes()
        return Case("replay", cap[0], [cap[1]], retain=self.rng.random() < 0.2, qos=self.rng.choice([0, 1]))

    def wrong_topic_replay(self) -> Case:
        cap = self._capture_for(self.any_target())
        if cap is None:
            return self.random_bytes()
        return Case("replay-other-topic", self.any_target(), [cap[1]])

    def retained_junk(self) -> Case:
        """Retained junk where slaves bootstrap from: the instruction, model and round topics."""
        t = self.roles.topics
        topic = self.rng.choice([t.master("instruction"), t.master("model"), t.master("round"),
                                 chunk_topic(t.master("model"), 0)])
        cap = self._capture_for(topic)
        data = self.rng.choice([b"", b"\x00", cbor_bombs(self.rng),
                                mutate_bytes(self.rng, cap[1], self.all_captured)[1] if cap else b"\xa0"])
        return Case("retained-junk", topic, [data], retain=True)

    # -- signed by the enrolled evil key ---------------------------------------------

    def _evil_uid(self, r: int | None = None, v: int | None = None) -> str:
        """The id the master expects of the evil key: SENDER/ROUND/VERSION (of the open round)."""
        return f"{self.roles.evil.identity.name}/{self.live.round if r is None else r}/" \
               f"{self.live.version if v is None else v}"

    def _seed(self) -> int:
        self._seeds += 1
        return self._seeds

    def _note(self, uid: Any, game: str, *, seed: int = 0, claimed: int = EVIL_SAMPLES,
              admissible: bool = False) -> None:
        """Remember what the evil key sends under `uid` (written to the ledger once it is published)."""
        if isinstance(uid, str):
            self._notes.append((uid, EvilUpdate(game, self.roles.evil.identity.name, claimed, seed, admissible)))

    def _update_body(self, uid: Any, tensors: dict[str, Any], *, samples: Any = EVIL_SAMPLES, kind: Any = "delta",
                     base: Any = None, metrics: Any = None) -> dict[str, Any]:
        return {"update_id": uid, "kind": kind, "base_version": self.live.version if base is None else base,
                "samples": samples, "metrics": {"train_loss": 0.5, "bytes_in": 1000} if metrics is None else metrics,
                "tensors": tensors}

    def evil_update(self) -> Case:
        """A validly signed update for the open round whose body breaks one rule (or, for
        `samples-huge` and `metrics-junk`, stretches what the protocol tolerates)."""
        rng, live, evil = self.rng, self.live, self.roles.evil
        name = evil.identity.name
        topic = self.roles.topics.slave("update", name)
        r, v = live.round, live.version
        uid = self._evil_uid()
        seed = self._seed()
        valid = encode_state_dict(self.roles.evil_tensors(seed))
        op = rng.randrange(14)
        manifest = {"version": v, "round": r}
        if op < 5:
            game, tensors = hostile_tensors(rng, self.roles.spec)
            body = self._update_body(uid, tensors)
            self._note(uid, game)
        elif op == 5:  # the documented bound: weight capped to what the slave declared
            claimed = rng.choice([EVIL_SAMPLES + 1, 10**6, 2**40, 2**63 - 1, 2**64 - 1])
            game, body = "samples-huge", self._update_body(uid, valid, samples=claimed)
            self._note(uid, game, seed=seed, claimed=claimed, admissible=True)
        elif op == 6:
            samples = rng.choice([0, -1, 1.5, True, "40", None, [40], CBORTag(2, b"\x01" * 20), math.nan])
            game, body = "samples-bad", self._update_body(uid, valid, samples=samples)
            self._note(uid, game, seed=seed)
        elif op == 7:  # metrics are informational: junk there may be accepted, with the capped weight
            metrics = rng.choice([{"bytes_in": rng.choice([2**64 - 1, -1, -(2**63), 2**62])},
                                  {"bytes_in": math.nan}, {"bytes_in": "x"}, {"x" * 1000: 1.0},
                                  {str(i): float(i) for i in range(rng.choice([100, 20000]))},
                                  _deep_map(rng.choice([5, 14])), [], "m"])
            game = "metrics-junk"
            body = self._update_body(uid, valid, metrics=metrics)
            self._note(uid, game, seed=seed, admissible=isinstance(metrics, dict))
        elif op == 8:  # another slave's update id: an update belongs to its signer
            uid = f"{rng.choice(self.roles.honest)}/{r}/{v}"
            game, body = "uid-of-other-slave", self._update_body(uid, valid)
            self._note(uid, game, seed=seed)
        elif op == 9:  # not exactly SENDER/ROUND/VERSION
            bad_uid = rng.choice([7, b"id", None, "", "x" * rng.choice([1000, 500_000]), "\u202e\x00", ["a"],
                                  uid + "#2", uid + " ", uid + "\x00", uid.upper(), f"{name}/{r + 1}/{v}",
                                  f"{name}/{r}/{v + 1}", f"{name}/{r}/{v}/0", f"{name}//{r}/{v}", f"./{uid}"])
            game, body = "uid-bad", self._update_body(bad_uid, valid)
            self._note(bad_uid, game, seed=seed)
        elif op == 10:
            kind = rng.choice(["foo", "", "DELTA", 1, None, "model", "gradient ", ["delta"]])
            game, body = "update-kind", self._update_body(uid, valid, kind=kind)
            self._note(uid, game, seed=seed)
        elif op == 11:  # base version other than the open round's, its id consistent with it
            base = rng.choice([v - 1, v + 1, v + 10**6, 2**64 - 1, -1, float(v), True])
            game, body = "base-version", self._update_body(f"{name}/{r}/{base}", valid, base=base)
            self._note(body["update_id"], game, seed=seed)
            if isinstance(base, int) and not isinstance(base, bool) and base >= 0 and rng.random() < 0.7:
                manifest["version"] = base
        elif op == 12:  # a round that is not open, its id consistent with it
            rr = max(0, rng.choice([r - 1, r + 1, r + 1000, 0]))
            game, body = "round-not-open", self._update_body(self._evil_uid(rr, v), valid)
            self._note(body["update_id"], game, seed=seed)
            manifest["round"] = rr
        else:  # the body's fields swapped around, or missing
            body = self._update_body(uid, valid)
            k1, k2 = rng.sample(sorted(body), 2)
            if rng.random() < 0.5:
                body[k1], body[k2] = body[k2], body[k1]
            else:
                del body[k1]
            game = f"update-fields:{k1}/{k2}"
            self._note(body.get("update_id"), game, seed=seed)
        return Case(game, topic, evil.seal(topic, "update", body, **manifest))

    def preempt(self) -> Case:
        """Right after a round opens: an honest slave's update id for it, from the evil key,
        before that slave can send its own (an update belongs to its signer)."""
        self._notes = []
        live, evil = self.live, self.roles.evil
        name = evil.identity.name
        topic = self.roles.topics.slave("update", name)
        uid = f"{self.rng.choice(self.roles.honest)}/{live.round}/{live.version}"
        seed = self._seed()
        body = self._update_body(uid, encode_state_dict(self.roles.evil_tensors(seed)))
        self._note(uid, "preempt-uid", seed=seed)
        case = Case("preempt-uid", topic, evil.seal(topic, "update", body, version=live.version, round=live.round))
        case.notes = self._notes
        return case

    def evil_manifest(self) -> Case:
        """Valid signature and body, hostile manifest: other job, sender, topic, seq, sizes.
        A manifest topic other than the one signed for and the timestamp are informational
        (the signature binds the real topic): those updates may count, like an honest one."""
        rng, live, evil = self.rng, self.live, self.roles.evil
        name = evil.identity.name
        topic = self.roles.topics.slave("update", name)
        uid = self._evil_uid()
        seed = self._seed()
        body = self._update_body(uid, encode_state_dict(self.roles.evil_tensors(seed)))
        raw = cbor2.dumps(body)
        op = rng.randrange(9)
        kw: dict[str, Any] = {"version": live.version, "round": live.round}
        if op == 0:
            game, kw["job"] = "manifest-job", rng.choice(["other", "digits2", "x" * 64])
        elif op == 1:
            game, kw["sender"] = "manifest-sender", rng.choice(self.roles.honest + ["master"])
        elif op == 2:
            game, kw["topic"] = "manifest-topic", self.roles.topics.slave("update", rng.choice(self.roles.honest))
        elif op == 3:  # a sequence number from the past: a replay
            game, kw["seq"] = "seq-behind", rng.choice([0, 1, evil.next_seq - 10**6])
        elif op == 4:  # further ahead than a day: refused without locking the key out
            game, kw["seq"] = "seq-ahead-2d", evil.next_seq + 2 * 86_400 * 10**6
        elif op == 5:
            game, kw["size"] = "manifest-size", rng.choice([len(raw) + 1, len(raw) - 1, 0, 2**62])
        elif op == 6:
            game, kw["sha256"] = "manifest-digest", hashlib.sha256(raw + b"x").digest()
        elif op == 7:
            game, kw["version"], kw["round"] = "manifest-version-round", rng.choice([10**9, 2**63]), rng.choice([10**9, 2**63])
        else:
            game, kw["ts"] = "manifest-ts", rng.choice([0, 2**63])
        self._note(uid, game, seed=seed, admissible=game in ("manifest-topic", "manifest-ts"))
        return Case(game, topic, evil.seal(topic, "update", None, raw=raw, **kw))

    def evil_chunks(self) -> Case:
        """Chunk games with a valid signature: missing, duplicated, reordered, forged and endless chunks."""
        rng, live, evil = self.rng, self.live, self.roles.evil
        name = evil.identity.name
        topic = self.roles.topics.slave("update", name)
        uid = self._evil_uid()
        game, tensors = hostile_tensors(rng, self.roles.spec)
        self._note(uid, "chunks:" + game)
        raw = cbor2.dumps(self._update_body(uid, tensors))
        size = rng.choice([1024, 4096, 16384])
        parts = [raw[i:i + size] for i in range(0, len(raw), size)]
        op = rng.randrange(7)
        seq = evil.take_seq()
        kw = dict(kind="update", job=evil.job, sender=name, topic=topic, seq=seq, ts=0, version=live.version,
                  round=live.round, size=len(raw), sha256=hashlib.sha256(raw).digest(), chunks=len(parts))
        if op == 0:  # one chunk never comes: held until the reassembly timeout
            keep = list(range(len(parts)))
            keep.pop(rng.randrange(len(keep)))
            payloads = evil.sign_payload(topic, Manifest(**kw).encode(), parts, chunked=True)
            return Case("chunks-missing:" + game, topic, [payloads[i] for i in keep])
        if op == 1:
            payloads = evil.sign_payload(topic, Manifest(**kw).encode(), parts, chunked=True)
            out = payloads + [rng.choice(payloads) for _ in range(3)]
            rng.shuffle(out)
            return Case("chunks-dup-shuffled:" + game, topic, out)
        if op == 2:  # forged slices under the same signed header (digest fails)
            payloads = evil.sign_payload(topic, Manifest(**kw).encode(), parts, chunked=True)
            forged = evil.sign_payload(topic, Manifest(**kw).encode(), [rng.randbytes(len(p)) for p in parts], chunked=True)
            return Case("chunks-forged-slices", topic, [x for pair in zip(forged, payloads) for x in pair])
        if op == 3:  # endless: a huge claimed count and size, tiny chunks
            kw.update(chunks=16384, size=16384 * 64)
            payload = Manifest(**kw).encode()
            n = rng.choice([20, 200])
            return Case("chunks-endless", topic, evil.sign_payload(
                topic, payload, [rng.randbytes(64) for _ in range(n)], chunked=True,
                chunk_headers=[[i, 16384] for i in range(n)]))
        if op == 4:  # chunk headers that disagree with the signed count
            payload = Manifest(**kw).encode()
            headers = [[i, len(parts) + rng.choice([1, -1, 1000])] for i in range(len(parts))]
            return Case("chunks-count-mismatch", topic, evil.sign_payload(topic, payload, parts, chunked=True,
                                                                         chunk_headers=headers))
        if op == 5:  # large claimed size, within the per-sender budget: pins memory until the timeout
            kw.update(size=rng.choice([8, 60]) * 1024 * 1024, chunks=rng.choice([128, 1024]))
            payload = Manifest(**kw).encode()
            n = 8
            return Case("chunks-big-claim", topic, evil.sign_payload(
                topic, payload, [rng.randbytes(65536) for _ in range(n)], chunked=True,
                chunk_headers=[[i, kw["chunks"]] for i in range(n)]))
        kw["chunks"] = 1  # signed as one chunk, sent as several
        payload = Manifest(**kw).encode()
        return Case("chunks-unsigned-split", topic, evil.sign_payload(topic, payload, parts, chunked=True))

    def evil_confirm(self) -> Case:
        """Confirm/decline bodies; never one that would enroll the evil key with other samples."""
        rng, evil = self.rng, self.roles.evil
        name = evil.identity.name
        topic = self.roles.topics.slave("confirm", name)
        pub = _raw_public(evil.identity)
        op = rng.randrange(6)
        if op == 0:
            body = {"public_key": pub, "samples": rng.choice([0, -1, 1.5, "40", None, True, CBORTag(2, b"\x01" * 9)]),
                    "capabilities": {}}
            game = "confirm-samples"
        elif op == 1:
            body = {"public_key": rng.choice([b"", b"\x00" * 32, pub[:31], "key", _raw_public(self.roles.rogue.identity)]),
                    "samples": EVIL_SAMPLES, "capabilities": {}}
            game = "confirm-public-key"
        elif op == 2:
            body = {"public_key": pub, "samples": EVIL_SAMPLES,
                    "capabilities": rng.choice([_deep_map(14), {"x" * 100_000: 1}, {"update": ["delta"] * 50_000}, []])}
            game = "confirm-capabilities"
        elif op == 3:  # a decline with an oversized reason: the master's status must stay publishable
            body = {"public_key": pub, "reason": "r" * rng.choice([10, 100_000, 1_500_000, 3_000_000])}
            return Case("decline-long-reason", topic, evil.seal(topic, "decline", body, chunk_size=65536))
        elif op == 4:
            body = {"public_key": pub, "reason": rng.choice([None, 5, b"x", ["a"]])}
            return Case("decline-bad", topic, evil.seal(topic, "decline", body))
        else:
            body = random_cbor(rng)
            game = "confirm-random"
        return Case(game, topic, evil.seal(topic, "confirm", body))

    def evil_presence(self) -> Case:
        rng, evil = self.rng, self.roles.evil
        topic = self.roles.topics.slave("presence", evil.identity.name)
        body = rng.choice([{"state": "dancing", "version": 0}, {"state": "online", "version": 2**64 - 1},
                           {"state": "online", "version": 1.5}, {"state": None}, {"state": "online", "version": -10**30},
                           {"state": "offline", "version": 0}])
        return Case("presence", topic, evil.seal(topic, "presence", body), retain=rng.random() < 0.5)

    def evil_kind_games(self) -> Case:
        """Kinds on topics they do not belong to, other slaves' topics, and master topics."""
        rng, evil, t = self.rng, self.roles.evil, self.roles.topics
        name = evil.identity.name
        op = rng.randrange(5)
        if op == 0:
            topic = t.slave("update", name)
            kind = rng.choice(["model", "instruction", "round", "presence", "confirm", "reconfirm", "", "x" * 300])
            return Case(f"kind-on-update:{kind[:12]}", topic, evil.seal(topic, kind, {"run": "x", "tensors": {}}))
        if op == 1:  # signed for and sent to another slave's topic
            topic = t.slave(rng.choice(["update", "confirm", "presence"]), rng.choice(self.roles.honest))
            uid = f"{rng.choice(self.roles.honest)}/{self.live.round}/{self.live.version}"
            seed = self._seed()
            body = self._update_body(uid, encode_state_dict(self.roles.evil_tensors(seed)))
            self._note(uid, "other-slave-topic", seed=seed)
            return Case("other-slave-topic", topic, evil.seal(topic, "update", body, version=self.live.version,
                                                              round=self.live.round))
        if op == 2:  # signed for its own topic, published on another slave's
            own = t.slave("update", name)
            return Case("signed-for-other-topic", t.slave("update", rng.choice(self.roles.honest)),
                        evil.seal(own, "update", self._update_body(self._evil_uid(), {})))
        if op == 3:  # a message of another job (signed for its topic, or for this one), sent here
            signed_for = rng.choice([Topics("other").slave("update", name), t.slave("update", name)])
            return Case("other-job", t.slave("update", name),
                        evil.seal(signed_for, "update", self._update_body(self._evil_uid(), {}), job="other"))
        # an update of another run of the job: updates carry no run, so it is only a stray key
        # (and tensors that do not fit the model)
        body = {**self._update_body(self._evil_uid(), {"x": encode_tensor(torch.zeros(1))}),
                "run": rng.choice([self.live.run, "other-run", ""])}
        topic = t.slave("update", name)
        return Case("update-with-run", topic, evil.seal(topic, "update", body, version=self.live.version,
                                                        round=self.live.round))

    # -- other keys ---------------------------------------------------------------

    def rogue_games(self) -> Case:
        """An allowlisted key that never enrolls: updates, presence, and seq far ahead (< 1 day),
        which locks this key out of that topic for the rest of the run."""
        rng, rogue, t = self.rng, self.roles.rogue, self.roles.topics
        name = rogue.identity.name
        topic = t.slave(rng.choice(["update", "presence"]), name)
        kind = "update" if topic.split("/")[-2] == "update" else "presence"
        body = self._update_body(f"{name}/{self.live.round}/{self.live.version}",
                                 encode_state_dict(self.roles.evil_tensors(1))) if kind == "update" \
            else {"state": "online", "version": 0}
        seq = rogue.next_seq + rng.choice([0, 3600 * 10**6, 80_000 * 10**6]) if rng.random() < 0.3 else None
        return Case(f"rogue-{kind}" + ("-seq-ahead" if seq else ""), topic,
                    rogue.seal(topic, kind, body, version=self.live.version, round=self.live.round,
                               **({"seq": seq} if seq else {})))

    def outsider_games(self) -> Case:
        """A key the allowlist does not hold: self-signed confirms (some with the wrong key inside)."""
        rng, out, t = self.rng, self.roles.outsider, self.roles.topics
        name = out.identity.name
        victim = rng.choice([name, *self.roles.honest, self.roles.evil.identity.name])
        topic = t.slave(rng.choice(["confirm", "confirm", "update", "presence"]), victim)
        pub = rng.choice([_raw_public(out.identity), _raw_public(self.roles.evil.identity), b"\x00" * 32])
        body = {"public_key": pub, "samples": rng.choice([1, 10**9]), "capabilities": {}}
        overrides = {"sender": victim} if victim != name else {}
        chunk = 64 if rng.random() < 0.2 else 1 << 30  # a self-signed message in chunks
        return Case("outsider-confirm", topic, out.seal(topic, rng.choice(["confirm", "decline", "update"]), body,
                                                        chunk_size=chunk, **overrides))

    def forged_master(self) -> Case:
        """The master's messages forged by the evil key (its kid, or the master's kid with
        the evil key's signature), with hostile bodies, on the slaves' topics."""
        rng, evil, t = self.rng, self.roles.evil, self.roles.topics
        topic = rng.choice([t.master("instruction"), t.master("model"), t.master("round"), t.master("delta"),
                            t.direct(rng.choice(self.roles.honest))])
        name = topic.split("/")[-1] if "/to/" not in topic else "model"
        spec_model = {"arch": "mlp", "sizes": rng.choice([[64, 10**9, 10], [64, 128, 10], [64] * 10_000, "x"]), "seed": 0}
        bodies = {
            "instruction": {"run": "forged", "task": "digits", "model": spec_model, "train": {"epochs": 10**9},
                            "update": "delta", "requirements": {}, "round_policy": {"asynchronous": True}},
            "model": {"run": self.live.run, "tensors": hostile_tensors(rng, self.roles.spec)[1]},
            "delta": {"run": self.live.run, "base_version": self.live.version, "base_digest": b"\x00" * 32,
                      "tensors": hostile_tensors(rng, self.roles.spec)[1]},
            "round": {"run": self.live.run, "participants": self.roles.honest * rng.choice([1, 50_000]), "received": [],
                      "deadline": rng.choice([math.inf, math.nan, 1e300]), "update": "delta"},
        }
        kind = rng.choice(["instruction", "model", "round", "reconfirm"]) if "/to/" in topic else name
        body = bodies.get(kind, {"run": self.live.run, "reason": "x"})
        kid = self.roles.kids.get("master") if rng.random() < 0.5 else None
        raw = cbor2.dumps(body)
        m = Manifest(kind=kind, job=t.job, sender="master", topic=topic.split("/chunk/")[0], seq=int(2**62),
                     ts=0, version=self.live.version + rng.choice([1, 1000]), round=self.live.round + 1,
                     size=len(raw), sha256=hashlib.sha256(raw).digest(), chunks=1)
        payloads = evil.sign_payload(m.topic, m.encode(), [raw], chunked=False, kid=kid)
        return Case("forged-master:" + kind, topic, payloads, retain=rng.random() < 0.3)


def _raw_public(identity: Identity) -> bytes:
    return raw_public_bytes(identity.public_key)


def _deep_map(depth: int) -> dict[str, Any]:
    out: dict[str, Any] = {"leaf": 1.0}
    for _ in range(depth):
        out = {"n": out}
    return out


def enrollment_messages(roles: Roles) -> list[tuple[str, bytes, bool]]:
    """(topic, payload, retain) that enroll the evil key: confirm, then presence online."""
    evil, t = roles.evil, roles.topics
    name = evil.identity.name
    confirm = t.slave("confirm", name)
    presence = t.slave("presence", name)
    body = {"public_key": _raw_public(evil.identity), "samples": EVIL_SAMPLES,
            "capabilities": {"update": ["delta"], "torch": torch.__version__, "machine": "fuzz"}}
    out = [(confirm, p, False) for p in evil.seal(confirm, "confirm", body)]
    out += [(presence, p, True) for p in evil.seal(presence, "presence", {"state": "online", "version": -1})]
    return out
