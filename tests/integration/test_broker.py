"""The broker launcher, the embedded (amqtt) broker, and the production broker
configuration written by `fedmq broker config`, run for real on loopback ports."""

from __future__ import annotations

import logging
import os
import pwd
import queue
import re
import signal
import socket
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedmq.broker import (BrokerHandle, BrokerStartError, _ephemeral_port_range, embedded_available,
                          free_port, start_broker)
from fedmq.common.errors import ConfigError
from fedmq.common.brokerconfig import BrokerConfig
from fedmq.common.transport import Inbound, Transport
from fedmq.cli import main as cli_main
from fedmq.demo import LocalFleet

pytestmark = [pytest.mark.timeout(60)]

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
#
# `fedmq broker config` writes the broker directory; its --etc and --data-dir point
# at that directory itself, so the generated mosquitto.conf uses the generated files
# where they are. One line is added to run it: `user`, so that a broker started as
# root keeps access to the temp dir instead of switching to the `mosquitto` user.

JOB = "digits"
SLAVES = ("s1", "s2", "s3")
MASTER = f"fedmq-master-{JOB}"
MONITOR = "fedmq-monitor"


def slave_account(slave: str) -> str:
    return f"{slave}@{JOB}"


def generate(out: Path, *args: str) -> None:
    result = CliRunner().invoke(cli_main, ["broker", "config", "--job", JOB, "--slaves", ",".join(SLAVES),
                                           "--out", str(out), *args])
    assert result.exit_code == 0, result.output


@dataclass
class ProductionBroker:
    """A broker running the generated configuration: its TLS and loopback ports, its files."""

    handle: BrokerHandle
    root: Path
    local_port: int

    def config(self, account: str, *, local: bool = False, password: str | None = None,
               cert: bool = False, ca: Path | None = None) -> BrokerConfig:
        """How `account` reaches the broker: over TLS with its password file (or its
        client certificate), or on the loopback listener."""
        table: dict[str, object] = {"host": "127.0.0.1", "keepalive": 10}
        if local:
            table["port"] = self.local_port
        else:
            table.update(port=self.handle.port, tls_ca=str(ca or self.root / "certs" / "ca.crt"))
        if cert:
            table.update(tls_cert=str(self.root / "certs" / f"{account}.crt"),
                         tls_key=str(self.root / "certs" / f"{account}.key"))
        else:
            table["username"] = account
            if password is None:
                table["password_file"] = str(self.root / "passwords" / account)
            else:
                table["password"] = password
        return BrokerConfig.from_mapping(table)


def start_production_broker(mosquitto_bin: str, root: Path, *args: str) -> tuple[BrokerHandle, int]:
    """The broker directory generated into `root` (`args` may add --slaves), running."""
    tls_port, local_port = free_port(), free_port()
    generate(root, "--etc", str(root), "--data-dir", str(root), "--tls-port", str(tls_port),
             "--listen", "127.0.0.1", "--local-port", str(local_port), "--log-dest", "stderr",
             "--host", "127.0.0.1", *args)
    run_conf = root / "run.conf"
    run_conf.write_text((root / "mosquitto.conf").read_text() + f"\nuser {pwd.getpwuid(os.geteuid()).pw_name}\n")
    handle = BrokerHandle("mosquitto", [mosquitto_bin, "-c", str(run_conf)], signal.SIGTERM,
                          tls_port, root, root / "mosquitto.log")
    return handle.start(), local_port


@pytest.fixture(scope="module")
def production_broker(mosquitto_bin, tmp_path_factory):
    """The generated configuration with password logins."""
    root = tmp_path_factory.mktemp("prod-broker")
    handle, local_port = start_production_broker(mosquitto_bin, root)
    with handle:
        yield ProductionBroker(handle, root, local_port)


@pytest.fixture(scope="module")
def certificate_broker(mosquitto_bin, tmp_path_factory):
    """The generated configuration with client certificates (--client-auth certificate)."""
    root = tmp_path_factory.mktemp("cert-broker")
    handle, local_port = start_production_broker(mosquitto_bin, root, "--client-auth", "certificate")
    with handle:
        yield ProductionBroker(handle, root, local_port)


@pytest.fixture
def clients():
    """``clients(cfg, client_id, on_message=None, **kw)``: a started `Transport` with a
    clean session (nothing carries over between tests), stopped at teardown."""
    made: list[Transport] = []

    def make(cfg: BrokerConfig, client_id: str, on_message=None, *, start: bool = True, **kw) -> Transport:
        transport = Transport(cfg, client_id, on_message or (lambda _m: None), clean_start=True, **kw)
        made.append(transport)
        if start:
            transport.start()
        return transport

    yield make
    for transport in made:
        transport.stop()


def base(job: str = JOB) -> str:
    return f"fedmq/{job}"


def take_until(q: queue.Queue[Inbound], last: bytes) -> list[tuple[str, bytes]]:
    """Every (topic, payload) delivered up to and including the message `last`.

    The broker handles one client's packets in order and delivers them to a
    subscriber in that order: once a sentinel published last has arrived, nothing
    published before it by the same client is still on its way.
    """
    got = []
    while True:
        msg = receive(q)
        got.append((msg.topic, msg.payload))
        if msg.payload == last:
            return got


def settled(*transports: Transport) -> None:
    """Once a client's publish is acknowledged, its earlier SUBSCRIBEs are in effect
    (the broker handles one client's packets in order)."""
    for t in transports:
        assert t.wait_connected(WAIT)
    for t in transports:
        t.publish(f"{base()}/nowhere/{uuid.uuid4().hex}", b"", qos=1)  # refused or not, it is acked
        assert t.flush(WAIT)


class Watch:
    """Counts a transport's connects and disconnects."""

    def __init__(self) -> None:
        self.connects: list[bool] = []
        self.disconnects = 0

    def kwargs(self) -> dict[str, object]:
        return {"on_connect": self.connects.append, "on_disconnect": self._disconnected}

    def _disconnected(self) -> None:
        self.disconnects += 1


@pytest.mark.broker
@pytest.mark.parametrize("listener", ["tls", "loopback"])
@pytest.mark.parametrize("victim", [MASTER, slave_account("s2")])
def test_an_account_cannot_take_over_another_accounts_session(production_broker, clients, listener, victim):
    """s1's account connecting with the victim's client id gets its own account name
    as client id instead (use_username_as_clientid on each listener): the victim
    stays connected and receives what is published to it."""
    local = listener == "loopback"
    victim_topic = f"{base()}/update/+" if victim == MASTER else f"{base()}/to/s2"
    inbox: queue.Queue[Inbound] = queue.Queue()
    watch = Watch()
    victim_client = clients(production_broker.config(victim, local=local), victim, inbox.put, **watch.kwargs())
    victim_client.subscribe(victim_topic)
    settled(victim_client)

    log = production_broker.handle.log_path
    renamed = f"as {slave_account('s1')} ("  # "New client connected from ... as s1@digits (p5, ...)"
    before = log.read_text().count(renamed)
    intruder = clients(production_broker.config(slave_account("s1"), local=local), victim)
    assert intruder.wait_connected(WAIT)
    wait_until(lambda: log.read_text().count(renamed) > before,
               "the broker logged the intruder under its own account name")
    # Something for the victim, sent after the intruder's connection was established.
    if victim == MASTER:
        intruder.publish(f"{base()}/update/s1", b"after the intruder connected")
        assert intruder.flush(WAIT)
    else:
        master = clients(production_broker.config(MASTER, local=local), MASTER)
        master.publish(f"{base()}/to/s2", b"after the intruder connected")
        assert master.flush(WAIT)
    assert receive(inbox).payload == b"after the intruder connected"
    assert watch.connects == [False] and watch.disconnects == 0
    assert victim_client.connected


@pytest.mark.broker
def test_acl_slave_writes_only_its_own_topics(production_broker, clients, caplog):
    to_master: queue.Queue[Inbound] = queue.Queue()
    master = clients(production_broker.config(MASTER), MASTER, to_master.put)
    master.subscribe(f"{base()}/update/+")
    master.subscribe(f"{base()}/confirm/+")
    master.subscribe(f"{base()}/presence/+")
    to_s2: queue.Queue[Inbound] = queue.Queue()
    s2 = clients(production_broker.config(slave_account("s2")), slave_account("s2"), to_s2.put)
    for name in ("instruction/#", "model/#", "round/#", "delta", "status", "alive", "to/s2"):
        s2.subscribe(f"{base()}/{name}")
    s1 = clients(production_broker.config(slave_account("s1")), slave_account("s1"))
    settled(master, s2, s1)

    forged = ["instruction", "model", "model/chunk/0", "round", "delta", "status", "metrics", "alive",
              "to/s2", "update/s2", "confirm/s2", "presence/s2"]
    with caplog.at_level(logging.ERROR, logger="fedmq.common.transport"):
        for name in forged:
            s1.publish(f"{base()}/{name}", b"forged by s1")
        for name in ("confirm/s1", "presence/s1", "update/s1"):
            s1.publish(f"{base()}/{name}", f"own {name}".encode())
        assert s1.flush(WAIT)
        master.publish(f"{base()}/to/s2", b"end")  # s2's sentinel
        assert master.flush(WAIT)

    assert take_until(to_master, b"own update/s1") == [
        (f"{base()}/confirm/s1", b"own confirm/s1"), (f"{base()}/presence/s1", b"own presence/s1"),
        (f"{base()}/update/s1", b"own update/s1")]
    assert take_until(to_s2, b"end") == [(f"{base()}/to/s2", b"end")]
    for name in forged:
        assert f"refused the message on {base()}/{name}: Not authorized" in caplog.text


@pytest.mark.broker
def test_acl_slave_reads_only_the_broadcasts_and_its_own_inbox(production_broker, clients):
    to_s1: queue.Queue[Inbound] = queue.Queue()
    s1 = clients(production_broker.config(slave_account("s1")), slave_account("s1"), to_s1.put)
    s1.subscribe(f"{base()}/#")  # asks for everything; gets what it may read
    master = clients(production_broker.config(MASTER), MASTER)
    s2 = clients(production_broker.config(slave_account("s2")), slave_account("s2"))
    settled(s1, master, s2)

    s2.publish(f"{base()}/update/s2", b"s2's update")
    s2.publish(f"{base()}/confirm/s2", b"s2's confirm")
    assert s2.flush(WAIT)
    for name in ("to/s2", "metrics", "delta", "to/s1"):
        master.publish(f"{base()}/{name}", name.encode())
    assert master.flush(WAIT)
    assert take_until(to_s1, b"to/s1") == [(f"{base()}/delta", b"delta"), (f"{base()}/to/s1", b"to/s1")]


@pytest.mark.broker
def test_acl_master_does_its_job_and_reads_back_its_retained_topics(production_broker, clients, caplog):
    job = f"j{uuid.uuid4().hex[:6]}"  # not the broker's job: nothing allowed there
    master_topics = ["instruction", "model", "model/chunk/0", "round", "round/chunk/1", "status", "metrics",
                     "alive"]
    with caplog.at_level(logging.ERROR, logger="fedmq.common.transport"):
        master = clients(production_broker.config(MASTER), MASTER)
        for name in master_topics:
            master.publish(f"{base()}/{name}", f"master {name}".encode(), retain=True)
        master.publish(f"{base()}/delta", b"master delta")
        master.publish(f"{base()}/to/s3", b"master to s3")
        master.publish(f"{base(job)}/model", b"another job's model")
        assert master.flush(WAIT)
    assert caplog.text.count("Not authorized") == 1
    assert f"refused the message on {base(job)}/model: Not authorized" in caplog.text

    master.stop()  # one connection per account: a second one would take over its session

    # A fresh subscription gets the retained messages: the master's own and, for a
    # slave, those it reads.
    back: queue.Queue[Inbound] = queue.Queue()
    reader = clients(production_broker.config(MASTER), MASTER, back.put)
    for name in master_topics:
        reader.subscribe(f"{base()}/{name}")
    assert {receive(back).payload for _ in master_topics} == {f"master {n}".encode() for n in master_topics}
    s3_inbox: queue.Queue[Inbound] = queue.Queue()
    s3 = clients(production_broker.config(slave_account("s3")), slave_account("s3"), s3_inbox.put)
    s3.subscribe(f"{base()}/model/#")
    assert {receive(s3_inbox).payload for _ in range(2)} == {b"master model", b"master model/chunk/0"}
    for name in master_topics:  # leave no retained message behind
        reader.publish(f"{base()}/{name}", b"", retain=True)
    assert reader.flush(WAIT)


@pytest.mark.broker
def test_acl_monitor_reads_everything_of_the_job_and_writes_nothing(production_broker, clients, caplog):
    seen: queue.Queue[Inbound] = queue.Queue()
    monitor = clients(production_broker.config(MONITOR, local=True), "any id", seen.put)
    monitor.subscribe(f"{base()}/#")
    monitor.subscribe("$SYS/broker/version")
    s1 = clients(production_broker.config(slave_account("s1")), slave_account("s1"))
    settled(monitor, s1)
    wait_until(lambda: receive(seen).topic == "$SYS/broker/version", "the broker's version from $SYS")

    with caplog.at_level(logging.ERROR, logger="fedmq.common.transport"):
        for name in ("model", "status", "update/s1"):
            monitor.publish(f"{base()}/{name}", b"from the monitor")
        assert monitor.flush(WAIT)
    s1.publish(f"{base()}/update/s1", b"s1's update")
    assert s1.flush(WAIT)
    got = take_until(seen, b"s1's update")  # after whatever the monitor published: none of it
    assert got[-1] == (f"{base()}/update/s1", b"s1's update")
    assert b"from the monitor" not in {payload for _, payload in got}
    for name in ("model", "status", "update/s1"):
        assert f"refused the message on {base()}/{name}: Not authorized" in caplog.text


@pytest.mark.broker
def test_password_files_authenticate_and_a_wrong_password_is_refused(production_broker, clients, caplog):
    for account in (MASTER, slave_account("s3"), MONITOR):
        assert clients(production_broker.config(account), account).wait_connected(WAIT), account
    with caplog.at_level(logging.ERROR, logger="fedmq.common.transport"):
        intruder = clients(production_broker.config(slave_account("s1"), password="guess"), "s1-intruder")
        wait_until(lambda: "refused the connection of 's1-intruder'" in caplog.text, "refusal logged")
        assert not intruder.connected
    assert "guess" not in caplog.text


@pytest.mark.broker
def test_broker_certificate_from_another_ca_is_not_trusted(production_broker, clients, caplog, tmp_path):
    generate(tmp_path / "other")
    cfg = production_broker.config(slave_account("s1"), ca=tmp_path / "other" / "certs" / "ca.crt")
    with caplog.at_level(logging.WARNING, logger="fedmq.common.transport"):
        client = clients(cfg, "s1-wrong-ca")
        wait_until(lambda: "CERTIFICATE_VERIFY_FAILED" in caplog.text, "verification failure logged")
        assert not client.connected


@pytest.mark.broker
def test_client_certificate_is_the_account(certificate_broker, clients, caplog, tmp_path):
    """--client-auth certificate: the TLS listener takes the certificate's CN as the
    user name (hence the ACL's account and the client id); no password involved."""
    to_master: queue.Queue[Inbound] = queue.Queue()
    watch = Watch()
    master = clients(certificate_broker.config(MASTER, cert=True), MASTER, to_master.put, **watch.kwargs())
    master.subscribe(f"{base()}/update/+")
    settled(master)
    s1 = clients(certificate_broker.config(slave_account("s1"), cert=True), MASTER)  # the master's id
    with caplog.at_level(logging.ERROR, logger="fedmq.common.transport"):
        s1.publish(f"{base()}/model", b"forged by s1")
        s1.publish(f"{base()}/update/s1", b"s1's update")
        assert s1.flush(WAIT)
    assert take_until(to_master, b"s1's update") == [(f"{base()}/update/s1", b"s1's update")]
    assert f"refused the message on {base()}/model: Not authorized" in caplog.text
    assert watch.connects == [False] and watch.disconnects == 0

    # A certificate from another CA, or none, is refused during the TLS handshake.
    generate(tmp_path / "other")
    ca = certificate_broker.root / "certs" / "ca.crt"
    own, foreign = certificate_broker.root / "certs", tmp_path / "other" / "certs"
    port = certificate_broker.handle.port
    assert tls_connack(port, ca, own / f"{MONITOR}.crt", own / f"{MONITOR}.key") == CONNACK_ACCEPTED
    assert tls_connack(port, ca, foreign / f"{MONITOR}.crt", foreign / f"{MONITOR}.key") == b""
    assert tls_connack(port, ca) == b""


# MQTT 3.1.1 CONNECT: clean session, keepalive 60, client id "x"; and the CONNACK accepting it.
CONNECT = bytes([0x10, 13, 0, 4]) + b"MQTT" + bytes([4, 0x02, 0, 60, 0, 1]) + b"x"
CONNACK_ACCEPTED = bytes([0x20, 2, 0, 0])


def tls_connack(port: int, ca: Path, cert: Path | None = None, key: Path | None = None) -> bytes:
    """The broker's answer to a CONNECT over TLS with this client certificate (if
    any), or b"" if it ends the connection instead (with TLS 1.3 a refused client
    certificate shows only after the handshake, as an alert or a closed socket)."""
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(cert, key)
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(CONNECT)
                return tls.recv(4)
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            return b""


@pytest.mark.slow
@pytest.mark.broker
@pytest.mark.timeout(300)
def test_master_and_slaves_train_under_the_generated_configuration(mosquitto_bin, tmp_path):
    """The real daemons, each logged in with its own account over TLS: the ACL lets
    them do everything the protocol needs, and nobody's session is taken over."""
    root = tmp_path / "broker"
    root.mkdir()
    slaves = ("slave-00", "slave-01")
    handle, _ = start_production_broker(mosquitto_bin, root, "--slaves", ",".join(slaves))
    broker = {"host": "127.0.0.1", "port": handle.port, "tls_ca": str(root / "certs" / "ca.crt")}

    def login(account: str) -> dict[str, object]:
        return {"broker": {"username": account, "password_file": str(root / "passwords" / account)}}

    fleet = LocalFleet(tmp_path / "fleet", broker, slaves=len(slaves), rounds=2,
                       job=login(MASTER), slave_overrides={s: login(f"{s}@{JOB}") for s in slaves})
    with handle:
        try:
            fleet.start_all()
            assert fleet.procs["master"].wait(timeout=240) == 0, fleet.log("master")
        finally:
            fleet.stop_all()  # before the broker stops: else the slaves would see it go
    broker_log = handle.log_path.read_text()
    for name in ("master", *slaves):
        assert "Not authorized" not in fleet.log(name), fleet.log(name)
        assert "lost the broker connection" not in fleet.log(name), fleet.log(name)
    for account in (MASTER, *(f"{s}@{JOB}" for s in slaves)):
        assert f"as {account} (" in broker_log


@pytest.mark.broker
def test_generated_configuration_passes_mosquittos_own_check(production_broker):
    start_up = production_broker.handle.log_path.read_text().partition(" running")[0].splitlines()
    assert sum("Opening ipv4 listen socket on port" in line for line in start_up) == 2
    complaints = [line for line in start_up if ("Error" in line or "Warning" in line)
                  and "should not be run as root" not in line]  # the tests may run as root
    assert complaints == []


def test_unreadable_tls_file_is_a_config_error(tmp_path):
    cfg = BrokerConfig(tls_ca=str(tmp_path / "missing-ca.crt"))
    with pytest.raises(ConfigError, match="tls_ca: cannot read"):
        Transport(cfg, "c", lambda _m: None)
