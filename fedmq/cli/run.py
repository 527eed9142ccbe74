"""`fedmq master run` and `fedmq slave run`: the two daemons.

The daemons (and torch, ~2 CPU seconds and 290 MB) are imported only once the
configuration has been read and found good: a mistake in it costs nothing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TypeVar

import click

from fedmq.common.jobconfig import JobConfig, SlaveConfig, load_job, load_slave
from fedmq.common.shell import setup_logging

from .errors import user_errors
from .options import HOST_PORT

C = TypeVar("C", JobConfig, SlaveConfig)

_config = click.option("--config", "-c", "config", required=True,
                       type=click.Path(dir_okay=False, path_type=Path), help="TOML configuration file.")
_broker = click.option("--broker", type=HOST_PORT, metavar="HOST:PORT", help="Override the [broker] host and port.")
_verbose = click.option("--verbose", "-v", is_flag=True, help="Debug logging.")
# One torch thread by default: a daemon shares its cores with the broker and the other
# daemons, and a second OpenMP thread that gets descheduled made torch ops on a 1 M
# tensor 10-30x slower under load (docs/BENCHMARKS.md, "Master ingest").
_threads = click.option("--threads", type=click.IntRange(1, 256), default=1, show_default=True,
                        help="torch threads (aggregation and evaluation, or local training).")


def with_broker(cfg: C, broker: tuple[str, int] | None) -> C:
    """The configuration with `--broker` applied: a flag wins over the file and the environment."""
    if broker is None:
        return cfg
    host, port = broker
    return dataclasses.replace(cfg, broker=dataclasses.replace(cfg.broker, host=host, port=port))


@click.group()
def master() -> None:
    """The master: holds the global model and runs the rounds."""


@master.command("run")
@_config
@_broker
@_threads
@click.option("--metrics-port", type=click.IntRange(1, 65535), metavar="PORT",
              help="Serve Prometheus metrics on 127.0.0.1:PORT/metrics (needs fedmq[metrics]).")
@_verbose
@user_errors
def master_run(config: Path, broker: tuple[str, int] | None, threads: int, metrics_port: int | None,
               verbose: bool) -> None:
    """Run a job until all its rounds are done (resumes from its checkpoint)."""
    cfg = with_broker(load_job(config), broker)
    setup_logging(verbose)
    if cfg.shard is not None:  # aggregator workers take the updates: this master is their root
        from fedmq.master.root_daemon import RootDaemon

        RootDaemon(cfg, threads=threads, metrics_port=metrics_port).run()
        return
    from fedmq.master.daemon import MasterDaemon  # torch: only once the config is good

    MasterDaemon(cfg, threads=threads, metrics_port=metrics_port).run()


@click.group()
def slave() -> None:
    """A slave: trains on local data when the master asks."""


@slave.command("run")
@_config
@_broker
@_threads
@_verbose
@user_errors
def slave_run(config: Path, broker: tuple[str, int] | None, threads: int, verbose: bool) -> None:
    """Serve a job: confirm its instruction, train when selected, until stopped."""
    cfg = with_broker(load_slave(config), broker)
    setup_logging(verbose)
    from fedmq.slave.daemon import SlaveDaemon  # torch: only once the config is good

    SlaveDaemon(cfg, threads=threads).run()
