"""Transport floor of bench/ingest.py: a subscriber that only receives and acks.

    python bench/_ingest_floor.py CONFIG.json

The master's own Transport (paho-mqtt, persistent session, manual QoS 1 acks), the
same subscription the master makes for updates, and nothing behind it: every
message is acked in paho's callback and counted. No verification, decoding,
journal or aggregation. What this process spends per update is what the master
spends before any of its own work, whatever the rest of fedmq does; it bounds how
far the master's receive path can be improved without replacing the MQTT client.

Prints its ready line (`{"ready": true}`) once subscribed, then, after `messages`
messages (or `timeout`), one JSON line: CPU seconds and wall seconds from the first
to the last message, and the count.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

from fedmq.common.topics import Topics
from fedmq.common.brokerconfig import BrokerConfig
from fedmq.common.transport import Inbound, Transport


def main() -> int:
    cfg = json.loads(Path(sys.argv[1]).read_text())
    expected: int = cfg["messages"]
    done = threading.Event()
    seen = {"n": 0, "t0": 0.0, "c0": 0.0, "t1": 0.0, "c1": 0.0}

    def on_message(msg: Inbound) -> None:
        if seen["n"] == 0:
            seen["t0"], seen["c0"] = time.perf_counter(), time.process_time()
        transport.ack(msg)
        seen["n"] += 1
        if seen["n"] == expected:
            seen["t1"], seen["c1"] = time.perf_counter(), time.process_time()
            done.set()

    broker = BrokerConfig(host=cfg["broker"]["host"], port=cfg["broker"]["port"])
    transport = Transport(broker, f"ingest-floor-{os.getpid()}", on_message, clean_start=True, manual_ack=True)
    transport.subscribe(Topics(cfg["job"]).slaves("update"), qos=1)  # as MasterDaemon
    transport.start()
    try:
        if not transport.wait_connected(10):
            print(json.dumps({"error": "could not connect"}), flush=True)
            return 1
        time.sleep(0.2)  # the SUBSCRIBE is queued ahead of this line; a margin for SUBACK
        print(json.dumps({"ready": True}), flush=True)
        ok = done.wait(cfg["timeout"])
        print(json.dumps({"messages": seen["n"], "seconds": seen["t1"] - seen["t0"],
                          "cpu_seconds": seen["c1"] - seen["c0"], "complete": ok}), flush=True)
        return 0 if ok else 1
    finally:
        transport.stop()


if __name__ == "__main__":
    sys.exit(main())
