"""The broker launcher, the embedded (amqtt) broker, and the production broker_cfg/
files (mosquitto.conf, acl, gen-certs.sh) run for real on loopback ports."""

from __future__ import annotations

import logging
import queue
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from fedmq.broker import (BrokerHandle, BrokerStartError, _ephemeral_port_range, embedded_available,
                          free_port, start_broker)
from fedmq.common.errors import ConfigError
from fedmq.common.brokerconfig import BrokerConfig
from fedmq.common.transport import Inbound, Transport

pytestmark = [pytest.mark.timeout(60)]

BROKER_CFG = Path(__file__).resolve().parents[2] / "broker_cfg"
WAIT = 10.0


def receive(q: queue.Queue[Inbound], timeout: float = WAIT) -> Inbound:
    try:
        return q.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"no message within {timeout} s") from None


def wait_until(condition: Callable[[], object], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.02)


# ------------------------------------------------------------------ launcher

def test_port_in_use_is_reported(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(BrokerStartError, match="cannot listen on 127.0.0.1:[0-9]+: Address already in use"):
            start_broker("auto", port=taken.getsockname()[1], data_dir=tmp_path)


@pytest.mark.broker
def test_mosquitto_refusing_to_start_is_reported_with_its_log(mosquitto_bin, tmp_path):
    conf = tmp_path / "bad.conf"
    conf.write_text("listener 0 127.0.0.1\nno_such_option true\n")
    handle = BrokerHandle("mosquitto", [mosquitto_bin, "-c", str(conf)], signal.SIGTERM,
                          free_port(), tmp_path, tmp_path / "mosquitto.log")
    with pytest.raises(BrokerStartError, match="(?s)exited with status.*no_such_option"):
        handle.start()
    assert not handle.running


def test_free_port_is_outside_the_ephemeral_range():
    """Else an outgoing connection could take a stopped broker's port as its source
    port, and the broker's restart would fail with "Address already in use"."""
    low, high = _ephemeral_port_range()
    for _ in range(20):
        port = free_port()
        assert not low <= port <= high
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # and nothing is using it


@pytest.mark.broker
def test_mosquitto_restarts_on_the_same_port_and_kill_is_abrupt(mosquitto):
    port = mosquitto.port
    mosquitto.kill()
    assert not mosquitto.running
    mosquitto.start()
    assert mosquitto.running and mosquitto.port == port
    assert (mosquitto.data_dir / "mosquitto.conf").is_file()


def test_unknown_kind_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="broker kind"):
        start_broker("rabbitmq", data_dir=tmp_path)


# ------------------------------------------------------------- embedded broker

@pytest.fixture
def amqtt(tmp_path):
    if not embedded_available():
        pytest.skip("amqtt is not installed (pip install 'fedmq[embedded]')")
    with start_broker("embedded", data_dir=tmp_path / "amqtt") as broker:
        yield broker


def test_embedded_broker_round_trip_and_persistent_session(amqtt, transports):
    assert (amqtt.kind, amqtt.protocol) == ("amqtt", "3.1.1")
    inbox: queue.Queue[Inbound] = queue.Queue()
    slave = transports(amqtt, "s1", inbox.put)
    slave.subscribe("fedmq/j/delta")
    slave.subscribe("fedmq/j/model")
    assert slave.wait_connected(WAIT) and slave.protocol == "3.1.1"
    master = transports(amqtt, "fedmq-master-j")
    master.publish("fedmq/j/model", b"model", retain=True)
    assert master.flush(WAIT)
    assert receive(inbox).payload == b"model"

    slave.stop()
    # amqtt loses a QoS 1 message that races with the subscriber's disconnect
    # (Mosquitto does not): wait until it has dealt with the disconnect, which it
    # logs as its connection count dropping to the master's connection alone.
    wait_until(lambda: amqtt_connections(amqtt) == 1, "amqtt noticed the slave left")
    master.publish("fedmq/j/delta", b"missed while offline")
    assert master.flush(WAIT)
    transports(amqtt, "s1", inbox.put)  # resumes the session: no new subscribe
    # amqtt also resends the retained model (at QoS 0) to a resumed session.
    payloads = {receive(inbox).payload, receive(inbox).payload}
    assert payloads == {b"missed while offline", b"model"}


def amqtt_connections(broker: BrokerHandle) -> int | None:
    """The number of open connections amqtt last logged ("2/∞ connections acquired")."""
    counts = re.findall(r"(\d+)/\S+ connections acquired", broker.log_path.read_text(errors="replace"))
    return int(counts[-1]) if counts else None


# --------------------------------------------------- production configuration

MASTER, MONITOR = "fedmq-master", "fedmq-monitor"
PASSWORDS = {MASTER: "m-secret", MONITOR: "mon-secret", "s1": "s1-secret", "s2": "s2-secret"}


@pytest.fixture(scope="module")
def production_broker(mosquitto_bin, tmp_path_factory):
    """broker_cfg/mosquitto.conf with its /etc and /var paths moved to a temp dir and
    its two listeners to free loopback ports; certificates from gen-certs.sh, the ACL
    file as shipped, passwords from mosquitto_passwd."""
    passwd_tool = shutil.which("mosquitto_passwd")
    if passwd_tool is None:
        pytest.skip("mosquitto_passwd not found (apt-get install mosquitto)")
    root = tmp_path_factory.mktemp("prod-broker")
    certs = root / "certs"
    subprocess.run([str(BROKER_CFG / "gen-certs.sh"), str(certs), "127.0.0.1", "s1"],
                   check=True, capture_output=True)
    shutil.copy(BROKER_CFG / "acl", root / "fedmq.acl")
    passwd = root / "fedmq.passwd"
    passwd.touch()
    for user, password in PASSWORDS.items():
        subprocess.run([passwd_tool, "-b", str(passwd), user, password], check=True, capture_output=True)

    tls_port, local_port = free_port(), free_port()
    conf = (BROKER_CFG / "mosquitto.conf").read_text()
    for old, new in [("/etc/mosquitto/certs/", f"{certs}/"), ("/etc/mosquitto/", f"{root}/"),
                     ("/var/lib/mosquitto/", f"{root}/"), ("listener 8883", f"listener {tls_port} 127.0.0.1"),
                     ("listener 1883 127.0.0.1", f"listener {local_port} 127.0.0.1"),
                     ("log_dest syslog", "log_dest stderr")]:
        assert old in conf, f"broker_cfg/mosquitto.conf no longer contains {old!r}"
        conf = conf.replace(old, new)
    conf_path = root / "mosquitto.conf"
    conf_path.write_text(conf + "\nuser root\n")  # root keeps access to the temp dir
    with BrokerHandle("mosquitto", [mosquitto_bin, "-c", str(conf_path)], signal.SIGTERM,
                      tls_port, root, root / "mosquitto.log").start() as handle:
        yield handle


def tls_config(broker: BrokerHandle, user: str, password: str | None = None,
               ca: Path | None = None) -> BrokerConfig:
    return BrokerConfig(host="127.0.0.1", port=broker.port, username=user,
                        password=PASSWORDS[user] if password is None else password,
                        tls_ca=str(ca or broker.data_dir / "certs" / "ca.crt"), keepalive=10)


@pytest.fixture
def clients():
    made: list[Transport] = []

    def make(cfg: BrokerConfig, client_id: str, on_message=lambda _m: None, **kw) -> Transport:
        transport = Transport(cfg, client_id, on_message, **kw)
        made.append(transport)
        return transport

    yield make
    for transport in made:
        transport.stop()


@pytest.mark.broker
def test_acl_lets_each_party_publish_only_its_own_topics(production_broker, clients, caplog):
    job = uuid.uuid4().hex[:8]
    to_master: queue.Queue[Inbound] = queue.Queue()
    master = clients(tls_config(production_broker, MASTER), f"fedmq-master-{job}", to_master.put)
    master.subscribe(f"fedmq/{job}/update/+")
    master.start()
    to_s2: queue.Queue[Inbound] = queue.Queue()
    s2 = clients(tls_config(production_broker, "s2"), "s2", to_s2.put)
    s2.subscribe(f"fedmq/{job}/model")
    s2.subscribe(f"fedmq/{job}/model/chunk/+")
    s2.subscribe(f"fedmq/{job}/update/s1")  # another slave's update: never delivered
    s2.start()
    s1 = clients(tls_config(production_broker, "s1"), "s1")
    s1.set_will(f"fedmq/{job}/presence/s1", b"offline")  # its own presence: allowed as will
    s1.start()
    assert master.wait_connected(WAIT) and s1.wait_connected(WAIT) and s2.wait_connected(WAIT)
    # A client's subscriptions are in effect once the broker has acknowledged a
    # message it published after them (the broker handles one client's packets in
    # order); messages from *other* clients could otherwise overtake them.
    s2.publish(f"fedmq/{job}/confirm/s2", b"subscriptions sent")
    assert s2.flush(WAIT)

    with caplog.at_level(logging.ERROR, logger="fedmq.common.transport"):
        master.publish(f"fedmq/{job}/model", b"global model", retain=True)
        master.publish(f"fedmq/{job}/model/chunk/0", b"model chunk", retain=True)
        assert master.flush(WAIT)  # also the master's subscription is in effect now
        s1.publish(f"fedmq/{job}/update/s2", b"forged update")  # someone else's topic
        s1.publish(f"fedmq/{job}/model", b"forged model")       # the master's topic
        s1.publish(f"fedmq/{job}/update/s1", b"own update")
        assert s1.flush(WAIT)

        assert receive(to_master).payload == b"own update"
        # Two topics: MQTT does not order them with respect to each other.
        assert {receive(to_s2).payload, receive(to_s2).payload} == {b"global model", b"model chunk"}
        with pytest.raises(AssertionError):
            receive(to_master, timeout=0.5)
        with pytest.raises(AssertionError):
            receive(to_s2, timeout=0.2)
    assert f"refused the message on fedmq/{job}/update/s2: Not authorized" in caplog.text
    assert f"refused the message on fedmq/{job}/model: Not authorized" in caplog.text


@pytest.mark.broker
def test_wrong_password_is_refused_and_logged(production_broker, clients, caplog):
    with caplog.at_level(logging.ERROR, logger="fedmq.common.transport"):
        intruder = clients(tls_config(production_broker, "s1", password="guess"), "s1-intruder")
        intruder.start()
        wait_until(lambda: "refused the connection of 's1-intruder'" in caplog.text, "refusal logged")
        assert not intruder.connected
    assert "guess" not in caplog.text


@pytest.mark.broker
def test_broker_certificate_from_another_ca_is_not_trusted(production_broker, clients, caplog, tmp_path):
    subprocess.run([str(BROKER_CFG / "gen-certs.sh"), str(tmp_path / "other"), "127.0.0.1"],
                   check=True, capture_output=True)
    cfg = tls_config(production_broker, "s1", ca=tmp_path / "other" / "ca.crt")
    with caplog.at_level(logging.WARNING, logger="fedmq.common.transport"):
        client = clients(cfg, "s1-wrong-ca")
        client.start()
        wait_until(lambda: "CERTIFICATE_VERIFY_FAILED" in caplog.text, "verification failure logged")
        assert not client.connected


def test_unreadable_tls_file_is_a_config_error(tmp_path):
    cfg = BrokerConfig(tls_ca=str(tmp_path / "missing-ca.crt"))
    with pytest.raises(ConfigError, match="tls_ca: cannot read"):
        Transport(cfg, "c", lambda _m: None)
