"""Options several commands share: the one HOST:PORT parser, and how to reach and log in to a broker.

The tools that watch a job (`fedmq status`, `fedmq monitor`) have no config file, so
they take the `[broker]` settings the daemons read from theirs as flags of the same
names, over the same `FEDMQ_BROKER_*` environment variables (a flag wins).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, TypeVar

import click

from fedmq.common.jobconfig import tool_broker

from .errors import user_errors

F = TypeVar("F", bound=Callable[..., Any])

def parse_host_port(text: str) -> tuple[str, int]:
    """("host", port) from "host:port" ("[::1]:1883" for an IPv6 address); ValueError if it is not one."""
    host, _, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host, int(port)


class HostPort(click.ParamType):
    """A click type for HOST:PORT: the value is a (host, port) tuple."""

    name = "HOST:PORT"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, int]:
        if isinstance(value, tuple):
            return value
        try:
            return parse_host_port(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


HOST_PORT = HostPort()

_FILE = click.Path(dir_okay=False, path_type=Path)
_BROKER_OPTIONS = (
    click.option("--broker", "address", type=HOST_PORT, metavar="HOST:PORT",
                 help="Broker address (default 127.0.0.1:1883, or port 8883 with TLS)."),
    click.option("--tls", is_flag=True, default=None, help="TLS with the system's CAs (implied by --tls-*)."),
    click.option("--tls-ca", type=_FILE, help="CA certificate that signed the broker's certificate."),
    click.option("--tls-cert", type=_FILE, help="Client certificate, if the broker asks for one."),
    click.option("--tls-key", type=_FILE, help="The client certificate's key."),
    click.option("--username", help="Broker user name (e.g. fedmq-monitor)."),
    click.option("--password-file", type=_FILE, help="File holding the broker password."),
)


def broker_options(func: F) -> F:
    """Add the broker options to a command, handed to it as one `broker: BrokerConfig`.

    Unset flags fall back to the `FEDMQ_BROKER_*` variables (FEDMQ_BROKER_HOST,
    FEDMQ_BROKER_PORT, FEDMQ_BROKER_USERNAME, FEDMQ_BROKER_PASSWORD or
    FEDMQ_BROKER_PASSWORD_FILE, FEDMQ_BROKER_TLS_CA, ...), as for the daemons.
    """

    @functools.wraps(func)
    @user_errors
    def wrapper(*args: Any, address: tuple[str, int] | None, tls: bool | None, tls_ca: Path | None,
                tls_cert: Path | None, tls_key: Path | None, username: str | None, password_file: Path | None,
                **kwargs: Any) -> Any:
        flags: dict[str, Any] = {"host": address[0], "port": address[1]} if address else {}
        for key, value in (("tls", tls), ("tls_ca", tls_ca), ("tls_cert", tls_cert), ("tls_key", tls_key),
                           ("username", username), ("password_file", password_file)):
            if value is not None:
                flags[key] = str(value) if isinstance(value, Path) else value
        return func(*args, broker=tool_broker(flags), **kwargs)

    for option in reversed(_BROKER_OPTIONS):
        wrapper = option(wrapper)
    return wrapper  # type: ignore[return-value]
