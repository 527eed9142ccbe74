"""`fedmq master run` for a job with `[shard] workers`: the master daemon driving a `RootCore`.

Everything of the master daemon stays (checkpoint, journal with group commit,
allowlist, liveness, Prometheus); what changes is the core it drives
(master/sharded.py), what it subscribes to -- the slaves' confirms and presence and
the workers' `partial` topics, not the updates, which the workers take -- and the
keys it trusts besides the slaves': each worker's `W.pub` from `[shard] keys`.
"""

from __future__ import annotations

import logging
import time
import uuid

from fedmq.common.errors import ConfigError
from fedmq.common.jobconfig import JobConfig
from fedmq.common.keys import load_public_key

from .core import MasterCore
from .daemon import MasterDaemon, _evaluator
from .job import make_job_strategy
from .jobmodel import job_model
from .sharded import RootCore, ShardedRounds, check_shardable


class RootDaemon(MasterDaemon):
    def __init__(self, cfg: JobConfig, log: logging.Logger | None = None, **kwargs) -> None:
        if cfg.shard is None:
            raise ConfigError("the root of a sharded job needs [shard] workers in the job file")
        super().__init__(cfg, log, **kwargs)
        ring = self.shell.inbox.keyring
        clash = sorted(set(cfg.shard.workers) & set(ring.names()))
        if clash:
            raise ConfigError(f"[shard] workers {', '.join(clash)}: also the names of slave keys in the allowlist; "
                              "worker ids and slave ids must differ")
        for worker in cfg.shard.workers:  # kept when the allowlist is read again, like keys learned in open mode
            self._learned.add(ring.add(worker, load_public_key(cfg.shard.keys / f"{worker}.pub")))
        self.log.info("sharded job: %d aggregator worker(s) (%s) take the updates through $share/%s/",
                      len(cfg.shard.workers), ", ".join(cfg.shard.workers), cfg.shard.group)

    def _make_core(self, cfg: JobConfig) -> RootCore:  # type: ignore[override]
        strategy = make_job_strategy(cfg)
        check_shardable(cfg, strategy)
        assert cfg.shard is not None
        master = MasterCore(cfg, job_model(cfg), strategy, evaluate=_evaluator(cfg), timer=time.perf_counter,
                            run=uuid.uuid4().hex[:12], schedule=ShardedRounds(strategy, cfg.policy))
        return RootCore(master, cfg.shard)

    def _subscriptions(self) -> list[str]:
        topics = self.cfg.topics
        return [topics.slaves("confirm"), topics.slaves("presence"), topics.partials]
