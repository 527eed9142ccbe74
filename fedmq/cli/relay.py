"""`fedmq relay`: a site aggregator, master of its devices' job and one slave of an upstream job."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from fedmq.common.shell import setup_logging

from .errors import user_errors
from .run import _broker, _config, _threads, _verbose, with_broker


@click.command()
@_config
@_broker
@_threads
@click.option("--metrics-port", type=click.IntRange(1, 65535), metavar="PORT",
              help="Serve the site job's Prometheus metrics on 127.0.0.1:PORT/metrics (needs fedmq[metrics]).")
@_verbose
@user_errors
def relay(config: Path, broker: tuple[str, int] | None, threads: int, metrics_port: int | None, verbose: bool) -> None:
    """Aggregate a site's devices and exchange with an upstream job (relay.toml).

    The relay is the master of the site's job (the job-file tables of relay.toml;
    --broker overrides the site's [broker]) and one slave of the upstream job
    ([relay], [upstream_broker]); it runs until stopped and resumes after a crash."""
    from fedmq.relay.config import load_relay

    cfg = load_relay(config)
    cfg = dataclasses.replace(cfg, down=with_broker(cfg.down, broker))
    setup_logging(verbose)
    from fedmq.relay.daemon import RelayDaemon  # torch: only once the config is good

    RelayDaemon(cfg, threads=threads, metrics_port=metrics_port).run()
