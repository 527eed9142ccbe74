"""`fedmq master run` and `fedmq slave run`: the two daemons."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from fedmq.common.jobconfig import load_job, load_slave
from fedmq.common.shell import setup_logging

from .errors import user_errors

_config = click.option("--config", "-c", "config", required=True,
                       type=click.Path(dir_okay=False, path_type=Path), help="TOML configuration file.")
_broker = click.option("--broker", metavar="HOST:PORT", help="Override the [broker] host and port.")
_verbose = click.option("--verbose", "-v", is_flag=True, help="Debug logging.")
# One torch thread by default: a daemon shares its cores with the broker and the other
# daemons, and a second OpenMP thread that gets descheduled made torch ops on a 1 M
# tensor 10-30x slower under load (docs/BENCHMARKS.md, "Master ingest").
_threads = click.option("--threads", type=click.IntRange(1, 256), default=1, show_default=True,
                        help="torch threads (aggregation and evaluation, or local training).")


def _with_broker(cfg, broker: str | None):
    if not broker:
        return cfg
    host, _, port = broker.rpartition(":")
    if not host or not port.isdigit():
        raise click.BadParameter(f"{broker!r} is not HOST:PORT", param_hint="--broker")
    return dataclasses.replace(cfg, broker=dataclasses.replace(cfg.broker, host=host, port=int(port)))


@click.group()
def master() -> None:
    """The master: holds the global model and runs the rounds."""


@master.command("run")
@_config
@_broker
@_threads
@_verbose
@user_errors
def master_run(config: Path, broker: str | None, threads: int, verbose: bool) -> None:
    """Run a job until all its rounds are done (resumes from its checkpoint)."""
    from fedmq.master.daemon import MasterDaemon  # torch import only when running

    cfg = _with_broker(load_job(config), broker)
    setup_logging(verbose)
    MasterDaemon(cfg, threads=threads).run()


@click.group()
def slave() -> None:
    """A slave: trains on local data when the master asks."""


@slave.command("run")
@_config
@_broker
@_threads
@_verbose
@user_errors
def slave_run(config: Path, broker: str | None, threads: int, verbose: bool) -> None:
    """Serve a job: confirm its instruction, train when selected, until stopped."""
    from fedmq.slave.daemon import SlaveDaemon

    cfg = _with_broker(load_slave(config), broker)
    setup_logging(verbose)
    SlaveDaemon(cfg, threads=threads).run()
