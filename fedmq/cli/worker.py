"""`fedmq worker`: an aggregator worker of a sharded job (`[shard]` in the job file)."""

from __future__ import annotations

from pathlib import Path

import click

from fedmq.common.jobconfig import load_job
from fedmq.common.shell import setup_logging

from .errors import user_errors
from .run import _broker, _config, _threads, _verbose, with_broker


@click.command()
@_config
@click.option("--id", "worker", required=True, help="This worker's id: one of [shard] workers.")
@click.option("--key", type=click.Path(dir_okay=False, path_type=Path),
              help="Its private key (default: [shard] keys/ID.key).")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Journal and state file (default: [master] state_dir/worker-ID).")
@_broker
@_threads
@_verbose
@user_errors
def worker(config: Path, worker: str, key: Path | None, state_dir: Path | None, broker: tuple[str, int] | None,
           threads: int, verbose: bool) -> None:
    """Take a share of a sharded job's updates: verify, journal and sum them for the master.

    Runs until stopped; the master (`fedmq master run` on the same job file) combines
    the workers' partial sums into each new version."""
    cfg = with_broker(load_job(config), broker)
    setup_logging(verbose)
    from fedmq.master.worker_daemon import WorkerDaemon  # torch: only once the config is good

    WorkerDaemon(cfg, worker, key=key, state_dir=state_dir, threads=threads).run()
