"""How to reach and authenticate to an MQTT broker: the `[broker]` table of every config.

Kept apart from `transport.py` (the paho adapter) so that configuration, and the
cores that read it, load without paho-mqtt, sockets or threads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from fedmq.common.errors import ConfigError

#: Accepted values of `BrokerConfig.protocol`.
PROTOCOLS = ("5", "3.1.1")


@dataclass(frozen=True)
class BrokerConfig:
    """How to reach and authenticate to the broker (the job TOML's ``[broker]`` table).

    TLS is used when ``tls`` is true or any ``tls_*`` file is given; without
    ``tls_ca`` the system's trusted CAs verify the broker. ``tls_insecure`` skips
    only the host-name check (the chain is still verified) -- for brokers reached by
    an address their certificate does not name. ``session_expiry`` is how long
    (seconds) the broker keeps a disconnected client's session and queued messages
    (MQTT v5; for 3.1.1 clients the broker's ``persistent_client_expiration`` rules).
    """

    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_insecure: bool = False
    keepalive: int = 30
    session_expiry: int = 86400
    max_inflight: int = 20
    protocol: str = "5"

    def __post_init__(self) -> None:
        problems = []
        if not self.host:
            problems.append("host must not be empty")
        if not 1 <= self.port <= 65535:
            problems.append(f"port must be 1..65535, not {self.port}")
        if not 5 <= self.keepalive <= 65535:
            problems.append(f"keepalive must be 5..65535 seconds, not {self.keepalive}")
        if not 0 <= self.session_expiry <= 0xFFFFFFFF:
            problems.append(f"session_expiry must be 0..4294967295 seconds, not {self.session_expiry}")
        if not 1 <= self.max_inflight <= 65535:
            problems.append(f"max_inflight must be 1..65535, not {self.max_inflight}")
        if self.protocol not in PROTOCOLS:
            problems.append(f"protocol must be one of {', '.join(PROTOCOLS)}, not {self.protocol!r}")
        if self.password is not None and self.username is None:
            problems.append("password given without username")
        if self.tls_key is not None and self.tls_cert is None:
            problems.append("tls_key given without tls_cert")
        if problems:
            raise ConfigError("broker: " + "; ".join(problems))

    @property
    def uses_tls(self) -> bool:
        return self.tls or any(p is not None for p in (self.tls_ca, self.tls_cert, self.tls_key))

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any], *, where: str = "[broker]") -> BrokerConfig:
        """Build from a parsed TOML table, naming every bad key in one `ConfigError`.

        Besides the fields, ``password_file`` names a file holding the password (so
        the secret need not sit in the job file; systemd credentials and container
        secrets are files). ``port`` defaults to 8883 when TLS is on.
        """
        kinds = {f.name: f.type for f in fields(cls)}
        values: dict[str, Any] = {}
        problems = []
        for key, value in table.items():
            if key == "password_file":
                continue
            kind = kinds.get(key)
            if kind is None:
                problems.append(f"unknown key {key!r}")
            elif not _has_type(value, kind):
                problems.append(f"{key} must be {_type_name(kind)}, not {type(value).__name__}")
            else:
                values[key] = value
        if "password_file" in table:
            if "password" in table:
                problems.append("give either password or password_file, not both")
            elif not isinstance(table["password_file"], str):
                problems.append("password_file must be a string")
            else:
                values["password"] = _read_secret(table["password_file"], where)
        if problems:
            raise ConfigError(f"{where}: " + "; ".join(problems))
        if "port" not in values and (values.get("tls") or any(values.get(k) for k in ("tls_ca", "tls_cert", "tls_key"))):
            values["port"] = 8883
        try:
            return cls(**values)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {str(exc).removeprefix('broker: ')}") from None


def _has_type(value: Any, kind: str) -> bool:
    # Field annotations are strings (``from __future__ import annotations``).
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, str)  # "str" and "str | None"


def _type_name(kind: str) -> str:
    return {"bool": "true or false", "int": "an integer"}.get(kind, "a string")


def _read_secret(path: str, where: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read().rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read password_file {path!r}: {exc.strerror}") from None
