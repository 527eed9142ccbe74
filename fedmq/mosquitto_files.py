"""Render a job's Mosquitto files: broker configuration, ACL and password-file entries.

Pure functions of the job's accounts and the broker's layout (no file I/O); the
`fedmq broker config` command (fedmq/brokerdir.py) writes what they return. The ACL
is derived from `TOPIC_ROLES` in common/topics.py, so the topics a party may use are
stated once, beside the code that builds the topic names.

Every account name is also an MQTT client id: the configuration sets
``use_username_as_clientid``, so the broker replaces whatever client id a client
sends by its user name. Without it any account could connect with the master's (or
another slave's) client id and take over that session: MQTT lets a new connection
with a taken client id disconnect the old one.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from dataclasses import dataclass

from fedmq.common.errors import ConfigError
from fedmq.common.topics import (DEFAULT_PREFIX, MASTER, SLAVE, TOPIC_ROLES, WORKER, TopicRole, Topics, check_id,
                                 master_client_id, slave_client_id, worker_client_id)

DEFAULT_MONITOR = "fedmq-monitor"
CLIENT_AUTH = ("password", "certificate")

# mosquitto_passwd (Mosquitto 2.0) writes `user:$7$ITERATIONS$SALT$HASH`: PBKDF2-HMAC-
# SHA512 over the password with a 12-byte random salt, salt and the 64-byte digest in
# standard base64. 101 iterations is its default, and what every 2.0 broker accepts.
PASSWD_ITERATIONS = 101
PASSWD_SALT_BYTES = 12


@dataclass(frozen=True)
class JobAccounts:
    """The broker accounts of one job: its master, its slaves and read-only monitors.

    Each concurrent monitoring tool needs its own monitor account: two clients of one
    account have the same client id, so each connection would drop the other.
    """

    job: str
    slaves: tuple[str, ...]
    monitors: tuple[str, ...] = (DEFAULT_MONITOR,)
    prefix: str = DEFAULT_PREFIX
    workers: tuple[str, ...] = ()  # aggregator workers of a sharded job ([shard] workers)

    def __post_init__(self) -> None:
        Topics(self.job, self.prefix)  # checks the job id and the prefix
        if not self.slaves:
            raise ConfigError("give at least one slave id")
        for slave in self.slaves:
            check_id(slave, "slave id")
        for monitor in self.monitors:
            check_id(monitor, "monitor account")
        for worker in self.workers:
            check_id(worker, "worker id")
        names = self.names
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"account names given twice: {', '.join(duplicates)}")

    @property
    def topics(self) -> Topics:
        return Topics(self.job, self.prefix)

    @property
    def master(self) -> str:
        return master_client_id(self.job)

    def slave(self, slave_id: str) -> str:
        return slave_client_id(slave_id, self.job)

    def worker(self, worker_id: str) -> str:
        return worker_client_id(worker_id, self.job)

    @property
    def names(self) -> tuple[str, ...]:
        """Every account name: the master, the slaves, the workers, the monitors, in that order."""
        return (self.master, *(self.slave(s) for s in self.slaves), *(self.worker(w) for w in self.workers),
                *self.monitors)


@dataclass(frozen=True)
class BrokerLayout:
    """Where the installed broker keeps its files and which ports it listens on.

    ``client_auth``: "password" (clients log in with user name and password over
    TLS) or "certificate" (the TLS listener requires a client certificate signed by
    the CA and takes its CN as the user name; the password file then serves only the
    loopback listener).
    """

    etc: str = "/etc/mosquitto"
    data_dir: str = "/var/lib/mosquitto"
    tls_port: int = 8883
    listen: str | None = None
    local_port: int = 1883
    log_dest: str = "syslog"
    client_auth: str = "password"

    def __post_init__(self) -> None:
        problems = []
        for what, path in (("etc", self.etc), ("data dir", self.data_dir)):
            if not path.startswith("/") or any(c.isspace() for c in path):
                problems.append(f"{what} {path!r} must be an absolute path without white space")
        for what, port in (("TLS port", self.tls_port), ("local port", self.local_port)):
            if not 1 <= port <= 65535:
                problems.append(f"{what} must be 1..65535, not {port}")
        if self.tls_port == self.local_port:
            problems.append("the TLS port and the local port must differ")
        if self.listen is not None and (not self.listen or any(c.isspace() for c in self.listen)):
            problems.append(f"listen address {self.listen!r} must be one word")
        if self.client_auth not in CLIENT_AUTH:
            problems.append(f"client auth must be one of {', '.join(CLIENT_AUTH)}, not {self.client_auth!r}")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def certs(self) -> str:
        return f"{self.etc.rstrip('/')}/certs"

    @property
    def conf_path(self) -> str:
        return f"{self.etc.rstrip('/')}/mosquitto.conf"

    @property
    def passwd_path(self) -> str:
        return f"{self.etc.rstrip('/')}/fedmq.passwd"

    @property
    def acl_path(self) -> str:
        return f"{self.etc.rstrip('/')}/fedmq.acl"


# ------------------------------------------------------------------ passwords

def new_password() -> str:
    """A random broker password: 32 URL-safe characters (192 bits)."""
    return secrets.token_urlsafe(24)


def passwd_entry(user: str, password: str, salt: bytes | None = None) -> str:
    """One line of a Mosquitto 2.0 password file, as `mosquitto_passwd -b` writes it."""
    if ":" in user or not user:
        raise ConfigError(f"broker account {user!r} must be non-empty and without ':'")
    salt = secrets.token_bytes(PASSWD_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, PASSWD_ITERATIONS)
    b64 = base64.b64encode
    return f"{user}:$7${PASSWD_ITERATIONS}${b64(salt).decode()}${b64(digest).decode()}"


def render_passwd(passwords: dict[str, str]) -> str:
    """The password file for these accounts (name -> password), one entry per line."""
    return "".join(passwd_entry(user, password) + "\n" for user, password in passwords.items())


# ------------------------------------------------------------------------ ACL

def _filter(topics: Topics, role: TopicRole, own_id: str | None) -> str:
    """The topic filter for one role: per-party roles name `own_id`, or all ('+') when None."""
    topic = f"{topics.base}/{role.name}"
    if role.per_slave:
        topic += f"/{own_id if own_id is not None else '+'}"
    return f"{topic}/#" if role.chunked else topic


def _access(reads: bool, writes: bool) -> str | None:
    return {(True, True): "readwrite", (True, False): "read", (False, True): "write"}.get((reads, writes))


def _rules(party: str, topics: Topics, own_id: str | None, *, sharded: bool = False) -> list[str]:
    """The rules of one account of kind `party` (its id `own_id`); `sharded`: the job
    has aggregator workers, so the roles only such jobs use are included."""
    lines = []
    for role in TOPIC_ROLES:
        access = _access(party in role.readers, role.writer == party)
        if access is not None and (sharded or not role.sharded):
            lines.append(f"topic {access} {_filter(topics, role, own_id if role.owner == party else None)}")
    return lines


def render_acl(accounts: JobAccounts) -> str:
    """The Mosquitto acl_file for one job: explicit rules per account, nothing else."""
    topics = accounts.topics
    base = topics.base
    out = [
        f"# Mosquitto ACL (acl_file) for fedmq job {accounts.job!r}, topics below {base}/.",
        "# Written by `fedmq broker config`: regenerate it rather than edit it.",
        "#",
        "# Nothing is allowed unless a line grants it. The rules name user names, which",
        "# are also the client ids (use_username_as_clientid in mosquitto.conf): a client",
        "# cannot pick another account's client id and take over its session.",
        "# `NAME/#` also covers NAME/chunk/I, where a retained message too large for one",
        "# publish is split (common/topics.py). A refused publish is answered \"Not",
        "# authorized\" to MQTT v5 clients and dropped silently for MQTT 3.1.1 clients; a",
        "# subscription matching more than an account may read delivers only what it may.",
        "# A broker serving several jobs concatenates their ACL files (one acl_file).",
        "",
        "# The master: publishes the broadcasts and each slave's direct topic, reads the",
        "# slaves' topics and its own retained topics (to re-assert them if overwritten).",
        f"user {accounts.master}",
        *_rules(MASTER, topics, None, sharded=bool(accounts.workers)),
    ]
    for slave in accounts.slaves:
        out += [
            "",
            f"# Slave {slave!r}: reads the broadcasts and its own inbox, writes only its own topics.",
            f"user {accounts.slave(slave)}",
            *_rules(SLAVE, topics, slave),
        ]
    for worker in accounts.workers:
        out += [
            "",
            f"# Aggregator worker {worker!r}: reads every update (through the shared subscription",
            f"# $share/GROUP/{base}/update/+), the rounds, models and collect requests; writes its partial sums.",
            f"user {accounts.worker(worker)}",
            *_rules(WORKER, topics, worker, sharded=True),
        ]
    for monitor in accounts.monitors:
        out += [
            "",
            "# Read-only monitor: sees the whole job, slaves' updates included.",
            f"user {monitor}",
            f"topic read {topics.everything}",
            "topic read $SYS/#",
        ]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------- mosquitto.conf

def _tls_auth(layout: BrokerLayout) -> str:
    if layout.client_auth == "certificate":
        return """\
# Client certificates (fedmq broker config --client-auth certificate): every client
# must present a certificate signed by cafile; its CN (the account name) becomes the
# user name, and no password is asked on this listener.
require_certificate true
use_identity_as_username true"""
    return """\
# Clients log in with user name and password (fedmq.passwd). To require client
# certificates instead, regenerate with --client-auth certificate: the certificate's
# CN (the account name) then is the user name.
require_certificate false"""


def render_conf(job: str, layout: BrokerLayout) -> str:
    """mosquitto.conf for a production broker (Mosquitto 2.0 or newer)."""
    listen = f" {layout.listen}" if layout.listen else ""
    return f"""\
# Mosquitto 2.0+ configuration for a production fedmq broker (job {job!r}), written by
# `fedmq broker config`; README.txt beside it says how to install it, and
# docs/OPERATIONS.md walks through it. Check it with:
#   mosquitto -c {layout.conf_path} -v
# (Ctrl-C once it says "Opening ipv4 listen socket").

# One set of security settings (password file, ACL) for all listeners.
per_listener_settings false

# ---------------------------------------------------------------- listeners
# Devices and the master connect here, over TLS only.
listener {layout.tls_port}{listen}
protocol mqtt
cafile {layout.certs}/ca.crt
certfile {layout.certs}/server.crt
keyfile {layout.certs}/server.key
tls_version tlsv1.2
{_tls_auth(layout)}
# The account name is the client id: the broker replaces the client id a client
# sends by its user name. Without this, any account could connect with the master's
# or another slave's client id and so disconnect it (MQTT hands a client id's session
# to its newest connection). A setting of each listener, hence repeated below.
use_username_as_clientid true

# Plain MQTT for tools on the broker host itself (mosquitto_sub -h 127.0.0.1 ...).
# Still password-protected: allow_anonymous below applies to every listener.
listener {layout.local_port} 127.0.0.1
use_username_as_clientid true

# ------------------------------------------------------------ authentication
allow_anonymous false
password_file {layout.passwd_path}
# Per-account topic rights: the master alone publishes the instruction and models, a
# slave only its own update/confirm/presence topics, and no slave reads another's
# update or direct messages.
acl_file {layout.acl_path}

# --------------------------------------------------------------- persistence
# Without persistence a broker restart loses every queued QoS 1 message, every
# persistent session (subscriptions!) and every retained config/model.
persistence true
persistence_location {layout.data_dir.rstrip('/')}/
persistence_file mosquitto.db
# Seconds between saves; the database is also written on a clean shutdown (SIGTERM)
# and on SIGUSR1. A broker crash loses at most this much.
autosave_interval 60
# MQTT v3.1.1 clients cannot say how long to keep their session; MQTT v5 clients
# (fedmq's default) send their own expiry (broker.session_expiry, 1 day by default).
# Sessions of decommissioned devices are dropped after this:
persistent_client_expiration 14d

# ------------------------------------------------------------------ delivery
# Mosquitto DROPS QoS 1 messages silently once a client's queue is full, so size it.
# Per job round, with N slaves, an update split into Cu chunks, a model delta into
# Cd chunks (chunks = ceil(size / job.chunk_size), 64 KiB by default):
#   - the master's session receives N * (Cu + 2) messages (update chunks, plus
#     confirm and presence); while the master is down for one round, the broker
#     queues that many: N = 1000 slaves, 256 KiB updates (Cu = 4)  ->  6 000;
#   - a slave's session receives 1 + Cd messages (round + delta chunks); a device
#     offline for R rounds needs R * (1 + Cd): R = 100, Cd = 2  ->  300 messages.
# The master's queue dominates: 10 000 covers 1 000 slaves with 4-chunk updates and
# one missed round, with headroom. Raise it with N x Cu (or raise job.chunk_size,
# up to max_packet_size below, to cut Cu). A slave that missed more than
# its queue holds catches up from the retained full model instead.
max_queued_messages 10000
# Bytes bound on the same queues (0 = none). The master's worst case is
# N x update size (1 000 x 1 MiB = 1 GiB): set this, and memory_limit, to what the
# host can spare.
#max_queued_bytes 1073741824
#memory_limit 0

# Unacknowledged QoS 1 messages in flight per client, broker -> client (for MQTT
# v3.1.1 clients; v5 clients announce their own Receive Maximum). The master acks an
# update only after recording it, so this also bounds how far it may lag.
max_inflight_messages 20

# Largest MQTT packet accepted (whole packet, header included), announced to v5
# clients, which then refuse to send larger ones; an oversized packet from a client
# gets it disconnected. 2 MiB, as Mosquitto 2.1's default: job.chunk_size must stay
# below it (the header and the signed envelope take a few hundred bytes).
max_packet_size 2097152
# (message_size_limit is the older, payload-only option; max_packet_size replaces it.)

# Devices behind NAT may use long keepalives; cap what a client may ask for.
max_keepalive 300

# ------------------------------------------------------------------- logging
log_dest {layout.log_dest}
log_type error
log_type warning
log_type notice
log_type information
connection_messages true
log_timestamp true
"""


# ------------------------------------------------------------------ bridge

@dataclass(frozen=True)
class RelayBridge:
    """A site broker's bridge to the central broker, for one relay of one upstream job.

    The bridge logs in to the central broker as the relay's own slave account
    (`RELAY@JOB`) and carries exactly what that account may use, derived from
    `TOPIC_ROLES`: the job's broadcasts and the relay's inbox in, the relay's own
    confirm, update and presence out. ``tls`` off is for tests on loopback only.
    """

    job: str
    relay: str
    remote: tuple[str, int]
    prefix: str = DEFAULT_PREFIX
    tls: bool = True
    cafile: str | None = None  # the central broker's CA on the site host; None: the system's CAs
    certfile: str | None = None  # a client certificate, if the central broker asks for one
    keyfile: str | None = None
    password: str | None = None  # the relay account's password (None: a placeholder line to fill in)

    def __post_init__(self) -> None:
        Topics(self.job, self.prefix)
        check_id(self.relay, "relay id")
        if (self.certfile is None) != (self.keyfile is None):
            raise ConfigError("a bridge client certificate needs both its certificate and its key")

    @property
    def account(self) -> str:
        return slave_client_id(self.relay, self.job)

    def topics(self) -> list[tuple[str, str]]:
        """(filter, "in" | "out") for every topic the relay's account reads or writes."""
        topics = Topics(self.job, self.prefix)
        out = []
        for role in TOPIC_ROLES:
            if role.sharded:
                continue
            own = self.relay if role.owner == SLAVE else None
            if SLAVE in role.readers:
                out.append((_filter(topics, role, own), "in"))
            if role.writer == SLAVE:
                out.append((_filter(topics, role, own), "out"))
        return out


def render_bridge(bridge: RelayBridge) -> str:
    """The `connection` stanza to add to the site broker's mosquitto.conf (Mosquitto 2.0+)."""
    host, port = bridge.remote
    base = Topics(bridge.job, bridge.prefix).base
    if not bridge.tls:
        security = "# No TLS: for a test on one machine only."
    else:
        trust = (f"bridge_cafile {bridge.cafile}" if bridge.cafile else
                 "# The system's CAs verify the central broker (or: bridge_cafile PATH-OF-ITS-CA.crt)\n"
                 "bridge_capath /etc/ssl/certs")
        cert = (f"\nbridge_certfile {bridge.certfile}\nbridge_keyfile {bridge.keyfile}" if bridge.certfile else "")
        security = f"{trust}{cert}\nbridge_tls_version tlsv1.2\nbridge_insecure false"
    password = (f"remote_password {bridge.password}" if bridge.password is not None else
                f"# remote_password THE-PASSWORD-OF-{bridge.account}   (passwords/{bridge.account} of the central "
                f"broker's `fedmq broker config`)")
    lines = "\n".join(f"topic {f} {direction} 1" for f, direction in bridge.topics())
    return f"""\
# Mosquitto bridge (Mosquitto 2.0+): this site broker <-> the central broker, for relay
# {bridge.relay!r} of fedmq job {bridge.job!r} (topics below {base}/). Written by
# `fedmq broker bridge`; docs/OPERATIONS.md section 13 describes the layout. Append it
# to the site broker's mosquitto.conf (or put it in a file of its include_dir) and
# restart that broker.
#
# The bridge logs in to the central broker as the relay's own slave account,
# {bridge.account} (user name and client id), so the central broker's ACL (`fedmq broker
# config --slaves ...,{bridge.relay}`) already says what may cross, and these topic lines
# carry exactly that: the job's broadcasts and the relay's inbox in, its confirm,
# update and presence out. Topics are not renamed: every message keeps its end-to-end
# signature (the topic is signed), so a bridge can delay or drop a message, never
# forge one. The retained instruction and model reach the site once, however many
# devices read them there.
connection fedmq-{bridge.job}-{bridge.relay}
address {host}:{port}
# MQTT 3.1.1 between the brokers: with cleansession false its session on the central
# broker lasts (persistent_client_expiration there), and Mosquitto passes retained
# messages on to a bridge with their retain flag, so the site keeps the model retained.
bridge_protocol_version mqttv311
remote_clientid {bridge.account}
remote_username {bridge.account}
{password}
{security}
# Keep the bridge's session on the central broker: QoS 1 messages for the site wait
# there while the link is down, and are delivered when it comes back.
cleansession false
try_private true
local_clientid fedmq-bridge-{bridge.job}-{bridge.relay}
# No $SYS notifications: the relay's account may not publish them.
notifications false
keepalive_interval 60
restart_timeout 5 60
{lines}
"""
