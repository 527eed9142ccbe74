"""The relay's file (relay.toml): its site's job, as a job file has it, plus `[relay]` and `[upstream_broker]`.

A relay is the master of its site's job -- every table of a job file (`[job]`,
`[model]`, `[train]`, `[strategy]`, `[rounds]`, `[enrollment]`, `[master]`,
`[broker]`) means what it means there -- and one slave of an upstream job, which
`[relay]` describes (its id and key upstream, the upstream job and master key, when
to exchange) and `[upstream_broker]` reaches (the keys of a `[broker]` table).
Environment overrides work as for every file: `FEDMQ_RELAY_EXCHANGE_ROUNDS`,
`FEDMQ_UPSTREAM_BROKER_HOST`, and `FEDMQ_BROKER_HOST` for the site's broker.

Reading it never loads torch.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from fedmq.common.errors import ConfigError
from fedmq.common.jobconfig import JobConfig, SlaveConfig, _load_toml, _Table, broker_settings, parse_job
from fedmq.common.topics import DEFAULT_PREFIX, Topics, check_id

#: The site's job never finishes by itself: the relay serves until it is stopped.
LOCAL_ROUNDS_UNBOUNDED = 2**31 - 1


@dataclass(frozen=True)
class RelayConfig:
    """`down`: the site's job (the relay is its master). `up`: the upstream job as its
    slave sees it. Every `exchange_rounds` local rounds -- or sooner, once the local
    rounds processed `exchange_samples` samples (0: no such limit) -- the relay sends
    upstream the difference its devices made to the upstream model."""

    down: JobConfig
    up: SlaveConfig
    exchange_rounds: int = 1
    exchange_samples: int = 0


def load_relay(path: Path | str, environ: Mapping[str, str] | None = None) -> RelayConfig:
    path = Path(path)
    return parse_relay(_load_toml(path), path.resolve().parent, os.environ if environ is None else environ)


def parse_relay(data: Mapping[str, Any], base: Path, environ: Mapping[str, str] | None = None) -> RelayConfig:
    environ = environ or {}
    rest = dict(data)
    own = {k: rest.pop(k) for k in ("relay", "upstream_broker") if k in rest}
    if "relay" not in own:
        raise ConfigError("relay: required (the relay's id, key and upstream job)")
    down = parse_job(rest, base, environ)
    root = _Table(own, "", environ=environ)
    r = root.sub("relay")
    relay_id = check_id(r.get("id", str), "relay.id")
    key = r.get("key", str)
    up_job = check_id(r.get("upstream_job", str), "relay.upstream_job")
    up_prefix = r.get("upstream_prefix", str, DEFAULT_PREFIX)
    up_master_key = r.get("upstream_master_key", str)
    up_master_name = check_id(r.get("upstream_master_name", str, "master"), "relay.upstream_master_name")
    exchange_rounds = r.get("exchange_rounds", int, 1, check=lambda v: v >= 1)
    exchange_samples = r.get("exchange_samples", int, 0, check=lambda v: v >= 0)
    state_dir = r.get("state_dir", str, f"state/{relay_id}-upstream")
    r.done()
    up_broker = broker_settings(root.sub("upstream_broker"), base)
    root.done()
    if down.target_accuracy is not None:
        raise ConfigError("job.target_accuracy: a relay's site job does not finish by itself (the upstream job does)")
    if down.shard is not None:
        raise ConfigError("shard: a relay's site job cannot be sharded")
    if down.distill is not None or down.multitask is not None:
        raise ConfigError("a relay's site job is one model: [distill] and [multitask] are not relayed")
    up_topics = Topics(up_job, up_prefix)
    if up_topics.base == down.topics.base:
        raise ConfigError(f"relay.upstream_job: {up_topics.base} is also the site job's topic base; give the site "
                          "job its own id (or prefix)")
    up = SlaveConfig(
        slave_id=relay_id, job=up_job, key=_resolve(base, key), master_key=_resolve(base, up_master_key),
        data="relay:", state_dir=_resolve(base, state_dir), broker=up_broker, tasks=(down.task,), prefix=up_prefix,
        update_kinds=("delta",), master_name=up_master_name)
    return RelayConfig(dataclasses.replace(down, rounds=LOCAL_ROUNDS_UNBOUNDED), up, exchange_rounds,
                       exchange_samples)


def _resolve(base: Path, value: str) -> Path:
    return (base / value).expanduser().resolve()
