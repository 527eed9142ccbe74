"""Start a local MQTT broker for tests, benchmarks and ``fedmq demo``.

Mosquitto is what deployments run, so it is preferred. When its binary is absent,
the pure-Python amqtt broker (extra ``fedmq[embedded]``) lets ``fedmq demo`` run
anywhere pip works; amqtt speaks MQTT 3.1.1 only and keeps sessions in memory only
(nothing survives its restart), which the demo does not need.

A broker runs as a child process in its own session (a Ctrl-C meant for the parent
does not kill it before the parent shuts it down), listens on 127.0.0.1 only, and
keeps its configuration, persistence file and log in ``data_dir``, so `stop` then
`start` resumes with the same sessions and retained messages -- which is how the
integration tests check Mosquitto's persistence.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import pwd
import random
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from fedmq.common.errors import FedmqError
from fedmq.common.brokerconfig import BrokerConfig

__all__ = [
    "BrokerHandle", "BrokerStartError", "MOSQUITTO_TEMPLATE",
    "embedded_available", "find_mosquitto", "free_port", "start_broker",
]

HOST = "127.0.0.1"

#: The Mosquitto configuration rendered for local brokers (package data: a wheel has it too).
MOSQUITTO_TEMPLATE = Path(__file__).resolve().parent / "local-broker.conf.tmpl"

# Debian puts mosquitto in /usr/sbin, which is not on a normal user's PATH.
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin")


# Brokers run in their own session, so nothing stops them when their parent exits:
# the parent does, even when it leaves by an exception (not when it is SIGKILLed).
_running: set[BrokerHandle] = set()


@atexit.register
def _stop_leftover_brokers() -> None:
    for handle in list(_running):
        handle.stop()


class BrokerStartError(FedmqError):
    """The broker could not be started; the message carries the end of its log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing uses right now, outside the ephemeral range.

    A broker is restarted on the same port (`BrokerHandle.stop` then `start`). Were
    its port an ephemeral one (what binding port 0 gives), any outgoing connection
    on the machine could get it as its source port while the broker is down -- or
    a client retrying to connect could even connect to itself on it -- and the
    restart would fail with "Address already in use". The kernel never picks a
    source port outside that range.
    """
    low, high = _ephemeral_port_range()
    ports = [p for p in range(10000, 65536) if not low <= p <= high]
    for port in random.sample(ports, min(200, len(ports))):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # all taken: settle for any
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _ephemeral_port_range() -> tuple[int, int]:
    """The range the kernel draws outgoing connections' source ports from."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        # Not Linux (or no /proc): macOS and Windows use the IANA range; Linux's default.
        return (32768, 60999) if sys.platform.startswith("linux") else (49152, 65535)


def _ensure_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Like the brokers themselves: a port with only closing connections is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise BrokerStartError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary, or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    candidates = (os.path.join(d, "mosquitto") for d in _SBIN_DIRS)
    return next((c for c in candidates if os.access(c, os.X_OK)), None)


def embedded_available() -> bool:
    return importlib.util.find_spec("amqtt") is not None


class BrokerHandle:
    """A broker child process on a fixed port and data dir; restartable, a context manager."""

    def __init__(self, kind: str, argv: list[str], stop_signal: int, port: int,
                 data_dir: Path, log_path: Path) -> None:
        self.kind = kind
        self.host = HOST
        self.port = port
        self.data_dir = data_dir
        self.log_path = log_path
        self._argv = argv
        self._stop_signal = stop_signal
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<BrokerHandle {self.kind} {self.host}:{self.port} {state}>"

    @property
    def protocol(self) -> str:
        """The MQTT version to speak to it ("5" or "3.1.1"), as `BrokerConfig.protocol`."""
        return "5" if self.kind == "mosquitto" else "3.1.1"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The broker process's id while started, for tools that sample its CPU and memory."""
        return self._proc.pid if self._proc is not None else None

    @property
    def settings(self) -> dict[str, object]:
        """The ``[broker]`` table that reaches this broker, for a job or slave TOML file.

        For amqtt it carries a user name: amqtt queues QoS 1 messages for an offline
        persistent session only if the client logged in with one (it accepts any).
        """
        values: dict[str, object] = {"host": self.host, "port": self.port, "protocol": self.protocol}
        if self.kind == "amqtt":
            values["username"] = "fedmq"
        return values

    def broker_config(self, **overrides: object) -> BrokerConfig:
        """A `BrokerConfig` built from `settings` plus any field overrides."""
        return BrokerConfig(**{**self.settings, **overrides})  # type: ignore[arg-type]

    def start(self, timeout: float = 10.0) -> BrokerHandle:
        """Start (or restart) the broker and wait until it accepts connections."""
        if self.running:
            raise RuntimeError(f"{self!r} is already running")
        # Checked first: the readiness probe below cannot tell our broker's listener
        # from another process's.
        _ensure_port_free(self.host, self.port)
        self._log = open(self.log_path, "ab")
        self._proc = subprocess.Popen(
            self._argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            cwd=self.data_dir, start_new_session=True,
        )
        _running.add(self)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._close_log()
                _running.discard(self)
                raise BrokerStartError(f"{self.kind} exited with status {code}:\n{self.log_tail()}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise BrokerStartError(f"{self.kind} did not listen on {self.host}:{self.port} "
                               f"within {timeout:g} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful shutdown (Mosquitto writes its persistence file); SIGKILL after timeout."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(self._stop_signal)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._close_log()
        _running.discard(self)

    def kill(self) -> None:
        """SIGKILL: a crash; Mosquitto keeps only what its last autosave wrote."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._close_log()
        _running.discard(self)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> BrokerHandle:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def start_broker(kind: str = "auto", *, port: int | None = None, data_dir: Path,
                 persistence: bool = True, log_path: Path | None = None, extra_conf: str = "") -> BrokerHandle:
    """Start a broker on 127.0.0.1 and return its handle once it accepts connections.

    ``kind``: "mosquitto", "embedded" (amqtt) or "auto" (Mosquitto if installed).
    ``persistence`` applies to Mosquitto; amqtt keeps nothing across restarts.
    ``extra_conf``: lines appended to Mosquitto's configuration (a bridge to another
    broker, a larger max_packet_size); a later line wins over the template's.
    """
    if kind == "auto":
        kind = "mosquitto" if find_mosquitto() else "embedded"
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    if kind == "mosquitto":
        argv, stop_signal, name = _mosquitto(data_dir, port, persistence, extra_conf), signal.SIGTERM, "mosquitto"
    elif kind == "embedded":
        if extra_conf:
            raise BrokerStartError("extra_conf is Mosquitto configuration; the embedded broker takes none")
        argv, stop_signal, name = _amqtt(data_dir, port), signal.SIGINT, "amqtt"
    else:
        raise ValueError(f"broker kind must be auto, mosquitto or embedded, not {kind!r}")
    log_path = Path(log_path) if log_path is not None else data_dir / f"{name}.log"
    return BrokerHandle(name, argv, stop_signal, port, data_dir, log_path).start()


def _mosquitto(data_dir: Path, port: int, persistence: bool, extra_conf: str = "") -> list[str]:
    binary = find_mosquitto()
    if binary is None:
        raise BrokerStartError("mosquitto is not installed (Debian/Ubuntu: apt-get install mosquitto)")
    try:
        template = string.Template(MOSQUITTO_TEMPLATE.read_text())
    except OSError as exc:
        raise BrokerStartError(f"cannot read the broker template {MOSQUITTO_TEMPLATE}: {exc.strerror}") from None
    conf = data_dir / "mosquitto.conf"
    conf.write_text(template.substitute(
        host=HOST, port=port, user=pwd.getpwuid(os.geteuid()).pw_name,
        persistence="true" if persistence else "false", data_dir=data_dir,
    ) + (f"\n# Added by start_broker(extra_conf=...)\n{extra_conf}\n" if extra_conf else ""))
    return [binary, "-c", str(conf)]


def _amqtt(data_dir: Path, port: int) -> list[str]:
    if not embedded_available():
        raise BrokerStartError("neither mosquitto nor amqtt is installed: "
                               "apt-get install mosquitto, or pip install 'fedmq[embedded]'")
    config = {  # JSON is YAML, which is what amqtt reads
        "listeners": {"default": {"type": "tcp", "bind": f"{HOST}:{port}"}},
        # Any user name is accepted, without a password; see BrokerHandle.broker_config.
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": False}},
    }
    conf = data_dir / "amqtt.yaml"
    conf.write_text(json.dumps(config, indent=2))
    return [sys.executable, "-m", "amqtt.scripts.broker_script", "-c", str(conf)]
