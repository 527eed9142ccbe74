"""Shared fixtures.

Brokers: every test that needs one gets its own Mosquitto on a free loopback port
(never the machine's :1883), with its config, persistence file and log in the
test's tmp_path. Tests that need the `mosquitto` binary are skipped, with the
reason, only when it is missing; CI installs it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fedmq.broker import BrokerHandle, find_mosquitto, start_broker
from fedmq.common.transport import Inbound, Transport


@pytest.fixture(scope="session")
def mosquitto_bin() -> str:
    path = find_mosquitto()
    if path is None:
        pytest.skip("mosquitto binary not found (apt-get install mosquitto)")
    return path


@pytest.fixture
def mosquitto(mosquitto_bin: str, tmp_path: Path) -> Iterator[BrokerHandle]:
    """A fresh persistent Mosquitto for this test; tests may stop, kill and restart it."""
    with start_broker("mosquitto", data_dir=tmp_path / "mosquitto") as broker:
        yield broker


@pytest.fixture(scope="session")
def shared_mosquitto(mosquitto_bin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerHandle]:
    """One Mosquitto for the session, for tests that leave no state behind
    (unique topics and client ids) and never stop it."""
    with start_broker("mosquitto", data_dir=tmp_path_factory.mktemp("shared-mosquitto")) as broker:
        yield broker


TransportFactory = Callable[..., Transport]


@pytest.fixture
def transports() -> Iterator[TransportFactory]:
    """``transports(broker, client_id, on_message=None, start=True, **kwargs)``: a
    `Transport` to `broker`, stopped at teardown. Extra keyword arguments go to
    `Transport` (clean_start, manual_ack, on_connect, ...), except ``cfg``, a dict
    of `BrokerConfig` overrides."""
    made: list[Transport] = []

    def make(broker: BrokerHandle, client_id: str, on_message: Callable[[Inbound], None] | None = None,
             *, start: bool = True, cfg: dict | None = None, **kwargs) -> Transport:
        transport = Transport(broker.broker_config(**(cfg or {})), client_id,
                              on_message or (lambda _msg: None), **kwargs)
        made.append(transport)
        if start:
            transport.start()
        return transport

    yield make
    for transport in made:
        transport.stop()
