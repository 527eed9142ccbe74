"""The `[shard]` table of a job file: the aggregator workers that share one job's updates.

With `[shard] workers = ["w1", "w2"]` the job's updates are not read by the master but
by N worker processes (`fedmq worker -c job.toml --id W`), which share them through
an MQTT shared subscription; each verifies, journals and sums its share, and the
master (the *root*) combines their partial sums (docs/PROTOCOL.md section 11.10).
What may be sharded is checked where the strategy is built (master/sharded.py:
`check_shardable`), so that reading a config never loads torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .topics import check_id

_GROUP = re.compile(r"^[A-Za-z0-9_.\-]{1,64}\Z")  # a topic level without wildcards


@dataclass(frozen=True)
class ShardSettings:
    """Who the workers are and how the root and they find each other.

    `keys`: a directory holding every worker's public key `W.pub` (the root trusts
    partial sums signed by those only) and, on a worker's host, its `W.key`.
    `master_pub`: the master's public key, which workers pin (they verify rounds,
    models and collect requests with it). `group`: the shared subscription group
    name. `collect_timeout`: seconds the root waits for the partial sums it asked
    for before it gives up on the workers that did not answer.
    """

    workers: tuple[str, ...]
    keys: Path
    master_pub: Path
    group: str
    collect_timeout: float = 60.0

    def worker_key(self, worker: str) -> Path:
        return self.keys / f"{worker}.key"


def parse_shard(table: Any, base: Path, job: str, master_key: Path) -> ShardSettings | None:
    """The `[shard]` table (a jobconfig `_Table`), or None when the job is not sharded.

    Paths are relative to the job file; `master_pub` defaults to the master's key
    file with the suffix `.pub` (how `fedmq keys` writes a pair)."""
    workers = table.get("workers", list, [])
    keys = table.get("keys", str, None)
    master_pub = table.get("master_pub", str, None)
    group = table.get("group", str, f"fedmq-{job}")
    timeout = table.get("collect_timeout", float, 60.0, check=lambda v: v > 0)
    table.done()
    if not workers:
        if keys is not None or master_pub is not None:
            raise ConfigError("shard.workers: required when [shard] is given (the worker ids)")
        return None
    for w in workers:
        check_id(w, "shard.workers entry")
    if len(set(workers)) != len(workers):
        raise ConfigError(f"shard.workers: an id is given twice: {workers}")
    if keys is None:
        raise ConfigError("shard.keys: required (a directory with each worker's W.pub)")
    if not _GROUP.match(group):
        raise ConfigError(f"shard.group {group!r} must be 1-64 letters, digits, '_', '.', '-'")
    return ShardSettings(
        workers=tuple(workers), keys=(base / keys).expanduser().resolve(),
        master_pub=(base / master_pub).expanduser().resolve() if master_pub else master_key.with_suffix(".pub"),
        group=group, collect_timeout=timeout)
