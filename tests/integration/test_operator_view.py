"""What a hostile broker account and an operator's tools meet on a live job: real Mosquitto, real daemons.

- junk retained on the job's instruction topic is put back by the master, so a slave
  started afterwards still enrolls (issue 11, finding 8);
- the Prometheus endpoint of a training master answers with the documented names (issue 12).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest

from fedmq.demo import _PYTHON, LocalFleet, Watcher

from support import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.broker]




def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)
def test_junk_retained_on_the_instruction_is_put_back_and_a_new_slave_still_enrolls(mosquitto, tmp_path: Path) -> None:
    mosquitto_pub = shutil.which("mosquitto_pub")
    if mosquitto_pub is None:
        pytest.skip("mosquitto_pub not found (apt-get install mosquitto-clients)")
    fleet = LocalFleet(tmp_path / "fleet", mosquitto.settings, slaves=1, rounds=2,
                       job={"rounds": {"min_slaves": 1, "deadline": 30.0}})
    watcher = Watcher(mosquitto.settings)
    try:
        fleet.start("master")
        wait_for(lambda: watcher.status.get("state") == "waiting", 120, "the master's first status")
        for junk in (b"junk", b"\xd2\x84\x40\xa0\x40\x40"):  # not CBOR; a COSE_Sign1 of nothing
            subprocess.run([mosquitto_pub, "-p", str(mosquitto.port), "-r", "-q", "1",
                            "-t", "fedmq/digits/instruction", "-m", junk.decode("latin-1")], check=True)
        wait_for(lambda: "overwritten by someone else" in fleet.log("master"), 60, "the master to notice")
        fleet.start("slave-00")
        wait_for(lambda: watcher.status.get("state") == "finished", 180, "the job to finish with the new slave")
        assert watcher.status["slaves"]["slave-00"]["enrolled"]
    finally:
        fleet.stop_all()
        watcher.close()


@pytest.mark.timeout(300)
def test_a_training_masters_prometheus_endpoint_shows_the_documented_metrics(mosquitto, tmp_path: Path) -> None:
    pytest.importorskip("prometheus_client")
    fleet = LocalFleet(tmp_path / "fleet", mosquitto.settings, slaves=2, rounds=3,
                       job={"rounds": {"min_slaves": 2, "deadline": 30.0}})
    port = free_port()
    watcher = Watcher(mosquitto.settings)
    master = None
    try:
        for name in fleet.names:
            fleet.start(name)
        with open(fleet.root / "logs" / "master.log", "ab") as log:
            master = subprocess.Popen([*_PYTHON, "-m", "fedmq", "master", "run", "--config",
                                       str(fleet.configs["master"]), "--metrics-port", str(port)],
                                      stdout=log, stderr=subprocess.STDOUT, cwd=fleet.root, start_new_session=True)
        seen: dict[str, str] = {}

        def scraped_a_version() -> bool:
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            except OSError:
                return False
            seen["text"] = text
            return any(line.startswith("fedmq_model_version") and not line.rstrip().endswith(" 0.0")
                       for line in text.splitlines())

        wait_for(scraped_a_version, 180, "a model version on /metrics")
        for name in ("fedmq_round", "fedmq_model_version", "fedmq_accuracy", "fedmq_slaves_online",
                     "fedmq_slaves_enrolled", "fedmq_updates_accepted_total", "fedmq_bytes_in_total",
                     "fedmq_aggregation_seconds", "fedmq_status_updated_timestamp_seconds"):
            assert f"\n{name}" in seen["text"], name
    finally:
        if master is not None:
            master.terminate()
            master.wait(timeout=60)
        fleet.stop_all()
        watcher.close()
