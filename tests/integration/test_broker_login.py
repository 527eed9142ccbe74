"""Logging in to a broker with a password: the tools' credentials, and what a refusal does.

A wrong password once made every device reconnect about 2.5 times a second, for ever;
the refused attempts must follow the same exponential backoff (0.2 s doubling to 30 s)
as lost connections, and the reason must reach the log at a bounded rate. A port that
is no broker at all is reported as such.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import pwd
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedmq.broker import BrokerHandle, free_port
from fedmq.cli import main
from fedmq.common.brokerconfig import BrokerConfig
from fedmq.common.transport import Transport

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]
VECTORS = Path(__file__).resolve().parents[2] / "docs" / "vectors"

#: Attempts an exponential backoff from 0.2 s allows in 20 s: 0.2+0.4+...+12.8 = 25.4 s,
#: so at most 7 (the first and six retries); 8 leaves room for a slow machine.
MAX_ATTEMPTS_IN_20_S = 8


@pytest.fixture
def password_broker(mosquitto_bin: str, tmp_path: Path) -> Iterator[BrokerHandle]:
    """A Mosquitto that admits only user `good` with password `right`."""
    data = tmp_path / "pw-broker"
    data.mkdir()
    passwd = data / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwd), "good", "right"], check=True,
                   capture_output=True)
    port = free_port()
    conf = data / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {passwd}\n"
                    f"user {pwd.getpwuid(os.geteuid()).pw_name}\npersistence false\n"
                    "log_dest stderr\nlog_type all\nconnection_messages true\n")
    handle = BrokerHandle("mosquitto", [mosquitto_bin, "-c", str(conf)], signal.SIGTERM, port, data,
                          data / "mosquitto.log")
    with handle.start():
        yield handle


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def shown(self) -> list[str]:
        """Messages at WARNING or above: what an operator sees."""
        return [r.getMessage() for r in self.records if r.levelno >= logging.WARNING]


def _logger(name: str) -> tuple[logging.Logger, Records]:
    log = logging.getLogger(f"test.{name}.{time.time_ns()}")
    log.setLevel(logging.DEBUG)
    log.propagate = False
    records = Records()
    log.addHandler(records)
    return log, records


@pytest.mark.slow
def test_wrong_password_backs_off_and_says_not_authorized(password_broker: BrokerHandle) -> None:
    log, records = _logger("wrongpw")
    cfg = BrokerConfig(host=password_broker.host, port=password_broker.port, username="good", password="wrong")
    transport = Transport(cfg, "wrong-password-client", lambda _m: None, logger=log)
    transport.start()
    try:
        time.sleep(20)  # the measurement window itself, not a wait for progress
    finally:
        transport.stop()
    broker_log = password_broker.log_path.read_text(errors="replace")
    attempts = broker_log.count("New connection from")
    assert 2 <= attempts <= MAX_ATTEMPTS_IN_20_S, broker_log
    assert not transport.connected
    assert "not authorized" in (transport.last_error or "").lower()
    shown = records.shown()
    assert shown and all("refused the connection" in m and "not authorized" in m.lower() for m in shown), shown
    assert len(shown) < attempts, "every attempt was logged, not the reason at a bounded rate"

    # The right password still gets in (the broker did not lock the account).
    good = Transport(BrokerConfig(host=password_broker.host, port=password_broker.port, username="good",
                                  password="right"), "right-password-client", lambda _m: None, logger=log)
    good.start()
    try:
        assert good.wait_connected(20)
    finally:
        good.stop()


@pytest.mark.slow
def test_a_port_that_is_not_mqtt_is_reported_and_backed_off() -> None:
    """Something that answers like an HTTP server: clearly reported, retried with backoff."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    accepted = []
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            accepted.append(time.monotonic())
            with conn:
                conn.recv(1024)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    log, records = _logger("http")
    transport = Transport(BrokerConfig(host="127.0.0.1", port=port), "http-probe", lambda _m: None, logger=log)
    transport.start()
    try:
        time.sleep(10)  # the measurement window
    finally:
        transport.stop()
        stop.set()
        thread.join()
        server.close()
    # 0.2 + 0.4 + 0.8 + 1.6 + 3.2 = 6.2 s: at most 6 attempts in 10 s (7 for a slow machine)
    assert 2 <= len(accepted) <= 7, accepted
    shown = records.shown()
    assert shown and "no MQTT handshake" in shown[0] and "is it an MQTT listener?" in shown[0], shown
    assert len(shown) < len(accepted)
    assert "is it an MQTT listener?" in (transport.last_error or "")


def test_tools_log_in_with_the_documented_options(password_broker: BrokerHandle, tmp_path: Path) -> None:
    """`fedmq monitor` and `fedmq status` with --username/--password-file, and the key
    layout the docs show (keys/master.pub, keys/slaves/NAME.pub): every message verified."""
    keys = tmp_path / "keys"
    (keys / "slaves").mkdir(parents=True)
    for pub in VECTORS.glob("*.pub"):
        shutil.copy(pub, keys / ("" if pub.stem == "master" else "slaves") / pub.name)
    (tmp_path / "pw").write_text("right\n")
    (tmp_path / "wrong").write_text("wrong\n")
    broker = ["--broker", f"{password_broker.host}:{password_broker.port}", "--username", "good"]
    index = {e["kind"]: e for e in json.loads((VECTORS / "index.json").read_text())}
    publisher = Transport(BrokerConfig(host=password_broker.host, port=password_broker.port, username="good",
                                       password="right"), "publisher", lambda _m: None)
    publisher.start()
    try:
        for kind in ("instruction", "confirm"):  # the master's, and a slave's (was unknown_kid)
            publisher.publish(index[kind]["topic"], (VECTORS / index[kind]["file"]).read_bytes(), retain=True)
        publisher.publish("fedmq/digits/status", json.dumps({"job": "digits", "state": "training",
                                                             "updated": time.time()}).encode(), retain=True)
        assert publisher.flush(20)
    finally:
        publisher.stop()

    result = CliRunner().invoke(main, ["monitor", "--job", "digits", "--keys", str(keys), *broker,
                                       "--password-file", str(tmp_path / "pw"), "--count", "3", "--seconds", "30"])
    assert result.exit_code == 0, result.output
    lines = {json.loads(line)["topic"].rsplit("/", 1)[-1]: json.loads(line) for line in result.stdout.splitlines()}
    assert lines["instruction"]["verified"] and lines["slave-01"]["verified"], lines
    assert lines["slave-01"]["sender"] == "slave-01" and lines["status"]["json"]["state"] == "training"

    result = CliRunner().invoke(main, ["status", *broker, "--password-file", str(tmp_path / "pw")])
    assert result.exit_code == 0 and "digits" in result.stdout, result.output
    result = CliRunner().invoke(main, ["status", *broker, "--password-file", str(tmp_path / "wrong"),
                                       "--timeout", "3"])
    assert result.exit_code == 1 and "refused the connection" in result.stderr
    assert "not authorized" in result.stderr.lower(), result.stderr
