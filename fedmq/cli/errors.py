"""Turn the errors a user can act on into one line on stderr and exit status 2."""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import click

from fedmq.common.errors import FedmqError

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(func: F) -> F:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (FedmqError, OSError) as exc:
            click.echo(f"fedmq: error: {exc}", err=True)
            raise SystemExit(2) from None

    return wrapper  # type: ignore[return-value]
