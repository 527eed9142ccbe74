"""Publisher process of bench/ingest.py: several slave identities, one MQTT connection.

    python bench/_ingest_pub.py CONFIG.json

Before it connects it seals (Sealer: CBOR, SHA-256, Ed25519, 64 KiB chunks) every
update it will send -- one per identity per round, for rounds 1..R with base
version R-1, as the master will announce them -- so sealing costs nothing while the
master is measured. Then it waits for the master's retained instruction, sends one
signed `confirm` per identity, and whenever a round is announced (signed, verified
with the master's key) publishes that round's updates, QoS 1. Prints one JSON line
(timings, CPU seconds) on exit. Everything is bounded by `timeout`.
"""

from __future__ import annotations

import json
import os
import queue
import resource
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _ingest_common import encoded_update, seal_update  # noqa: E402

from fedmq.common import messages as M  # noqa: E402
from fedmq.common.channel import Inbox, Sealer, initial_seq  # noqa: E402
from fedmq.common.errors import ProtocolError  # noqa: E402
from fedmq.common.keys import KeyRing, load_identity, load_public_key, raw_public_bytes  # noqa: E402
from fedmq.common.topics import Topics, split_chunk_topic  # noqa: E402
from fedmq.common.brokerconfig import BrokerConfig  # noqa: E402
from fedmq.common.transport import Inbound, Transport# noqa: E402


def main() -> int:
    cfg = json.loads(Path(sys.argv[1]).read_text())
    deadline = time.monotonic() + cfg["timeout"]
    topics = Topics(cfg["job"])
    rounds = cfg["rounds"]
    idents = [load_identity(p, name=n) for n, p in cfg["identities"]]
    tensors = encoded_update(cfg["size"], cfg["mode"], seed=cfg["seed"])
    now = time.time()
    sealers = {i.name: Sealer(i, cfg["job"], seq=initial_seq(now), chunk_size=cfg["chunk_size"]) for i in idents}
    t0 = time.perf_counter()
    sealed: dict[int, list[tuple[str, bytes]]] = {}
    for rnd in range(1, rounds + 1):
        out = sealed.setdefault(rnd, [])
        for ident in idents:
            topic = topics.slave("update", ident.name)
            out += [(topic, p) for p in seal_update(sealers[ident.name], topic, rnd, tensors, now)]
    seal_seconds = time.perf_counter() - t0
    confirms = [(topics.slave("confirm", i.name),
                 sealers[i.name].seal(topics.slave("confirm", i.name), M.CONFIRM,
                                      {"public_key": raw_public_bytes(i.public_key), "samples": 10,
                                       "capabilities": {"update": ["delta"]}}, now=time.time())[0])
                for i in idents]

    ring = KeyRing()
    ring.add("master", load_public_key(cfg["master_pub"]))
    inbox = Inbox(ring, cfg["job"])
    announced: queue.Queue[int] = queue.Queue()
    instruction = threading.Event()

    def on_message(msg: Inbound) -> None:
        if not msg.payload:
            return
        try:
            got = inbox.receive(split_chunk_topic(msg.topic), msg.payload, time.time(), retained=msg.retain)
        except ProtocolError:
            return
        if got is None:
            return
        if got.kind == M.INSTRUCTION:
            instruction.set()
        elif got.kind == M.ROUND:
            announced.put(got.manifest.round)

    broker = BrokerConfig(host=cfg["broker"]["host"], port=cfg["broker"]["port"])
    transport = Transport(broker, f"ingest-pub-{os.getpid()}", on_message, clean_start=True)
    for name in ("instruction", "round"):
        transport.subscribe(topics.master(name), qos=1)
        transport.subscribe(topics.master(name) + "/chunk/+", qos=1)
    transport.start()
    stats: dict[str, object] = {"pid": os.getpid(), "identities": len(idents), "seal_seconds": round(seal_seconds, 3),
                                "payloads": sum(len(v) for v in sealed.values()),
                                "bytes": sum(len(p) for v in sealed.values() for _, p in v)}
    try:
        if not instruction.wait(max(0.0, deadline - time.monotonic())):
            stats["error"] = "no instruction"
            return 1
        time.sleep(0.3)  # the master subscribes before it publishes; this is only a margin
        for topic, payload in confirms:
            transport.publish(topic, payload, qos=1)
        published: dict[int, float] = {}
        while len(published) < rounds and time.monotonic() < deadline:
            try:
                rnd = announced.get(timeout=min(1.0, max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                continue
            if rnd in published or rnd not in sealed:
                continue
            t = time.perf_counter()
            for topic, payload in sealed.pop(rnd):
                transport.publish(topic, payload, qos=1)
            published[rnd] = time.perf_counter() - t
        stats["rounds_published"] = len(published)
        stats["flushed"] = transport.flush(max(1.0, deadline - time.monotonic()))
        return 0 if len(published) == rounds else 1
    finally:
        transport.stop()
        ru = resource.getrusage(resource.RUSAGE_SELF)
        stats["cpu_seconds"] = round(ru.ru_utime + ru.ru_stime, 3)
        print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    sys.exit(main())
