"""Every MQTT topic name fedmq uses, built and parsed in one place.

    PREFIX/JOB/instruction      master, retained: what to train (signed)
    PREFIX/JOB/model            master, retained: latest full model (signed)
    PREFIX/JOB/delta            master: model delta from one version to the next (signed)
    PREFIX/JOB/round            master, retained: current round announcement (signed)
    PREFIX/JOB/to/SLAVE         master -> one slave: initial parameters, verdicts (signed)
    PREFIX/JOB/status           master, retained: JSON for humans and dashboards
    PREFIX/JOB/metrics          master: JSON, one message per aggregation
    PREFIX/JOB/alive            master, retained, also its MQTT will: JSON liveness
    PREFIX/JOB/confirm/SLAVE    slave: accepts or declines the instruction (signed)
    PREFIX/JOB/update/SLAVE     slave: gradients / weight delta / student params (signed)
    PREFIX/JOB/presence/SLAVE   slave, retained, also its MQTT will: online/offline (signed)

A retained message too large for one publish is split over `TOPIC/chunk/I` (MQTT keeps
one retained message per topic); it is still signed for TOPIC, and receivers strip
the suffix before verifying (`split_chunk_topic`).

One slave publishes only below its own id, which is what the broker ACL enforces
(see broker_cfg/acl). The prefix may contain '/', ids may not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ConfigError

DEFAULT_PREFIX = "fedmq"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}\Z")  # \Z: "$" would let a trailing newline through
_PREFIX = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*\Z")

MASTER_TOPICS = ("instruction", "model", "delta", "round", "status", "metrics", "alive")
SLAVE_TOPICS = ("confirm", "update", "presence")
DIRECT = "to"
CHUNK = "chunk"


def chunk_topic(topic: str, index: int) -> str:
    return f"{topic}/{CHUNK}/{index}"


def split_chunk_topic(topic: str) -> str:
    """The topic a (possibly chunk-suffixed) retained publish was signed for."""
    head, _, index = topic.rpartition("/")
    base, _, level = head.rpartition("/")
    return base if level == CHUNK and index.isdigit() else topic


def every_job(name: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Subscription filter for one master topic of every job under `prefix` (`fedmq status`)."""
    assert name in MASTER_TOPICS, name
    return f"{prefix}/+/{name}"


def job_of(topic: str, prefix: str = DEFAULT_PREFIX) -> tuple[str, str] | None:
    """(job, master topic name) of a topic `every_job` matches, else None."""
    rest = topic.removeprefix(prefix + "/").split("/") if topic.startswith(prefix + "/") else []
    if len(rest) == 2 and _ID.match(rest[0]) and rest[1] in MASTER_TOPICS:
        return rest[0], rest[1]
    return None


def check_id(value: str, what: str) -> str:
    """Job and slave ids become topic levels and file names: keep them tame."""
    if not isinstance(value, str) or not _ID.match(value):
        raise ConfigError(f"{what} {value!r} must be 1-64 characters of letters, digits, '_', '.', '-'")
    return value


@dataclass(frozen=True)
class Topics:
    job: str
    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        check_id(self.job, "job id")
        if not _PREFIX.match(self.prefix):
            raise ConfigError(f"topic prefix {self.prefix!r} must be '/'-separated words without wildcards")

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.job}"

    def master(self, name: str) -> str:
        assert name in MASTER_TOPICS, name
        return f"{self.base}/{name}"

    def slave(self, name: str, slave_id: str) -> str:
        assert name in SLAVE_TOPICS, name
        return f"{self.base}/{name}/{check_id(slave_id, 'slave id')}"

    def slaves(self, name: str) -> str:
        """Subscription filter for one slave topic of every slave."""
        assert name in SLAVE_TOPICS, name
        return f"{self.base}/{name}/+"

    def direct(self, slave_id: str) -> str:
        return f"{self.base}/{DIRECT}/{check_id(slave_id, 'slave id')}"

    @property
    def everything(self) -> str:
        return f"{self.base}/#"

    def parse(self, topic: str) -> tuple[str, str | None] | None:
        """(name, slave id or None) for one of this job's topics, else None."""
        if not topic.startswith(self.base + "/"):
            return None
        rest = topic[len(self.base) + 1 :].split("/")
        if len(rest) == 1 and rest[0] in MASTER_TOPICS:
            return rest[0], None
        if len(rest) == 2 and (rest[0] in SLAVE_TOPICS or rest[0] == DIRECT) and _ID.match(rest[1]):
            return rest[0], rest[1]
        return None
