"""Every MQTT topic name fedmq uses, built and parsed in one place.

    PREFIX/JOB/instruction      master, retained: what to train (signed)
    PREFIX/JOB/model            master, retained: latest full model (signed)
    PREFIX/JOB/model/PART       master, retained: one part of a model that has parts (signed; common/layout.py)
    PREFIX/JOB/delta            master: model delta from one version to the next (signed)
    PREFIX/JOB/round            master, retained: current round announcement (signed)
    PREFIX/JOB/to/SLAVE         master -> one slave: its parameters after enrollment, re-confirm requests (signed)
    PREFIX/JOB/status           master, retained: JSON for humans and dashboards
    PREFIX/JOB/metrics          master, retained: JSON, one message per aggregation
    PREFIX/JOB/alive            master, retained, also its MQTT will: JSON liveness
    PREFIX/JOB/confirm/SLAVE    slave: accepts or declines the instruction (signed)
    PREFIX/JOB/update/SLAVE     slave: gradients / weight delta / student params (signed)
    PREFIX/JOB/presence/SLAVE   slave, retained, also its MQTT will: online/offline (signed)
    PREFIX/JOB/collect          master (root), retained: which updates each worker must sum (signed)
    PREFIX/JOB/partial/WORKER   aggregator worker: its tally and partial sums (signed)

A sharded job's aggregator workers (`[shard]`, master/sharded.py) read the slaves'
updates through the shared subscription `$share/GROUP/PREFIX/JOB/update/+`, so the
broker hands each update to one of them.

A retained message too large for one publish is split over `TOPIC/chunk/I` (MQTT keeps
one retained message per topic); it is still signed for TOPIC, and receivers strip
the suffix before verifying (`split_chunk_topic`).

One slave publishes only below its own id, which is what the broker ACL enforces.
`TOPIC_ROLES` says who writes and who reads each topic; the ACL generator
(fedmq/mosquitto_files.py) derives every rule from it. The prefix may contain '/',
ids may not.

MQTT client ids (`master_client_id`, `slave_client_id`) are also the broker account
names: the generated Mosquitto configuration replaces a client's id by its user
name, so no account can take over another party's session.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ConfigError

DEFAULT_PREFIX = "fedmq"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}\Z")  # \Z: "$" would let a trailing newline through
_PREFIX = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*\Z")

MASTER, SLAVE, WORKER = "master", "slave", "worker"
DIRECT = "to"
PARTIAL = "partial"
CHUNK = "chunk"


@dataclass(frozen=True)
class TopicRole:
    """Who writes and who reads one topic of a job, and how it is published.

    ``per_slave``: one topic per party, NAME/ID, where ID is the id of a party of kind
    ``owner`` (a slave, or for `partial` an aggregator worker); that party is the only
    one of its kind that writes it (slave topics) or reads it (the master's direct
    topic); parties of other kinds use NAME/+. ``chunked``: a
    message too large for one publish goes to NAME/chunk/I (`chunk_topic`), so rights
    on NAME cover NAME/#. ``keyed``: NAME/KEY topics carry one message each besides
    NAME itself (the parts of a model: model/PART, `Topics.model_part`), covered by the
    same NAME/# rights. The master reads its own retained topics back: it resubscribes
    to them to re-assert them when something else overwrote them.
    """

    name: str
    writer: str
    readers: frozenset[str]
    per_slave: bool = False
    retained: bool = False
    chunked: bool = False
    keyed: bool = False
    owner: str = SLAVE
    sharded: bool = False  # used only by jobs with aggregator workers ([shard])


TOPIC_ROLES: tuple[TopicRole, ...] = (
    TopicRole("instruction", MASTER, frozenset({MASTER, SLAVE}), retained=True, chunked=True),
    TopicRole("model", MASTER, frozenset({MASTER, SLAVE, WORKER}), retained=True, chunked=True, keyed=True),
    TopicRole("delta", MASTER, frozenset({SLAVE})),
    TopicRole("round", MASTER, frozenset({MASTER, SLAVE, WORKER}), retained=True, chunked=True),
    TopicRole("status", MASTER, frozenset({MASTER, SLAVE}), retained=True),
    TopicRole("metrics", MASTER, frozenset({MASTER}), retained=True),
    TopicRole("alive", MASTER, frozenset({MASTER, SLAVE}), retained=True),
    TopicRole(DIRECT, MASTER, frozenset({SLAVE}), per_slave=True),
    TopicRole("confirm", SLAVE, frozenset({MASTER}), per_slave=True),
    TopicRole("update", SLAVE, frozenset({MASTER, WORKER}), per_slave=True),
    TopicRole("presence", SLAVE, frozenset({MASTER}), per_slave=True, retained=True),
    TopicRole("collect", MASTER, frozenset({MASTER, WORKER}), retained=True, chunked=True, sharded=True),
    TopicRole(PARTIAL, WORKER, frozenset({MASTER}), per_slave=True, owner=WORKER, sharded=True),
)

MASTER_TOPICS = tuple(r.name for r in TOPIC_ROLES if r.writer == MASTER and not r.per_slave)
SLAVE_TOPICS = tuple(r.name for r in TOPIC_ROLES if r.writer == SLAVE)
WORKER_TOPICS = tuple(r.name for r in TOPIC_ROLES if r.writer == WORKER)
KEYED_TOPICS = tuple(r.name for r in TOPIC_ROLES if r.keyed)
RETAINED_CHUNKED = tuple(r.name for r in TOPIC_ROLES if r.retained and r.chunked)


def master_client_id(job: str) -> str:
    """The master's MQTT client id, which is also its broker account name."""
    return f"fedmq-master-{check_id(job, 'job id')}"


def slave_client_id(slave_id: str, job: str) -> str:
    """A slave's MQTT client id and broker account name: one session per device and job.

    '@' never occurs in ids, so no slave's id can collide with another's or the master's.
    """
    return f"{check_id(slave_id, 'slave id')}@{check_id(job, 'job id')}"


def worker_client_id(worker: str, job: str) -> str:
    """An aggregator worker's MQTT client id and broker account name (`[shard]` jobs)."""
    return f"fedmq-worker-{check_id(worker, 'worker id')}@{check_id(job, 'job id')}"


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

    def worker(self, worker_id: str) -> str:
        """The topic an aggregator worker publishes its tallies and partial sums on."""
        return f"{self.base}/{PARTIAL}/{check_id(worker_id, 'worker id')}"

    @property
    def partials(self) -> str:
        """Subscription filter for every worker's `partial` topic (the root's)."""
        return f"{self.base}/{PARTIAL}/+"

    def shared_updates(self, group: str) -> str:
        """The shared subscription through which a job's workers split its updates (MQTT 5)."""
        return f"$share/{group}/{self.slaves('update')}"

    def direct(self, slave_id: str) -> str:
        return f"{self.base}/{DIRECT}/{check_id(slave_id, 'slave id')}"

    def model_part(self, part: str) -> str:
        """The retained topic of one part of a model that has parts (e.g. model/heads.digit)."""
        if part == CHUNK:
            raise ConfigError("a model part cannot be named 'chunk'")
        return f"{self.master('model')}/{check_id(part, 'model part')}"

    def retained_chunked(self, topic: str) -> bool:
        """Whether `topic` is one of this job's retained topics that may come in chunks
        (a subscriber also takes TOPIC/chunk/+ and, as a new process, the retained copy)."""
        parsed = self.parse(topic)
        return parsed is not None and parsed[0] in RETAINED_CHUNKED

    @property
    def everything(self) -> str:
        return f"{self.base}/#"

    def parse(self, topic: str) -> tuple[str, str | None] | None:
        """(name, slave or worker id, or part, or None) for one of this job's topics, else None."""
        if not topic.startswith(self.base + "/"):
            return None
        rest = topic[len(self.base) + 1 :].split("/")
        if len(rest) == 1 and rest[0] in MASTER_TOPICS:
            return rest[0], None
        if len(rest) == 2 and (rest[0] in SLAVE_TOPICS + WORKER_TOPICS or rest[0] in KEYED_TOPICS
                               or rest[0] == DIRECT) and _ID.match(rest[1]) and rest[1] != CHUNK:
            return rest[0], rest[1]
        return None
