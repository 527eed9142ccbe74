"""Write a job's broker directory (`fedmq broker config`): configuration, ACL, secrets, certificates.

The directory is what an operator installs on the broker host and hands out to the
devices (README.txt in it says which file goes where). Three ways to run:

- new (default): the directory must not hold a broker configuration yet;
- ``update``: keep the CA, every existing account's password and certificate and the
  server certificate, make what new accounts need, delete what removed accounts had,
  and rewrite the configuration, ACL and password file -- how slaves are added or
  removed without touching the devices already installed;
- ``force``: replace everything (a new CA, new passwords for everybody).

``ca_dir`` names a directory with ``ca.crt`` and ``ca.key`` to issue from instead of
a new CA (e.g. one kept offline, or shared by the jobs of one broker); its key is
not copied into the output.

Secrets (keys, passwords) are written with mode 0600 and never printed or logged.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedmq import pki
from fedmq.common.errors import ConfigError
from fedmq.mosquitto_files import (BrokerLayout, JobAccounts, new_password, render_acl, render_conf,
                                   render_passwd)

NEW, UPDATE, FORCE = "new", "update", "force"
CONF, ACL, PASSWD, README = "mosquitto.conf", "fedmq.acl", "fedmq.passwd", "README.txt"
PASSWORDS, CERTS = "passwords", "certs"
GENERATED = (CONF, ACL, PASSWD, README, PASSWORDS, CERTS)
# File stems in certs/ that are not accounts.
_CERT_STEMS = ("ca", "server")


@dataclass
class Outcome:
    """What a run did, by path (never content): written, kept from before, removed."""

    written: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)


def _write(path: Path, data: bytes, mode: int, outcome: Outcome) -> None:
    """Write `data` with `mode` (also when the file existed with another mode) before any byte lands."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)
    outcome.written.append(path)


def _write_issued(stem: Path, issued: pki.Issued, outcome: Outcome) -> None:
    _write(stem.with_name(stem.name + ".key"), issued.key_pem, 0o600, outcome)
    _write(stem.with_name(stem.name + ".crt"), issued.cert_pem, 0o644, outcome)


def _existing_pair(stem: Path, ca: pki.Issued) -> pki.Issued | None:
    """An earlier certificate and key at `stem`.crt/.key issued by `ca`, else None."""
    crt, key = stem.with_name(stem.name + ".crt"), stem.with_name(stem.name + ".key")
    if not (crt.is_file() and key.is_file()):
        return None
    try:
        pair = pki.load(crt, key)
    except ConfigError:
        return None
    return pair if pki.signed_by(pair.cert, ca) else None


def _choose_ca(certs: Path, mode: str, ca_dir: Path | None, outcome: Outcome) -> pki.Issued:
    own_crt, own_key = certs / "ca.crt", certs / "ca.key"
    if ca_dir is not None:
        ca = pki.load(ca_dir / "ca.crt", ca_dir / "ca.key")
        if ca_dir.resolve() == certs.resolve():
            outcome.kept += [own_crt, own_key]
            return ca
        if mode == UPDATE and own_key.is_file() and pki.load(own_crt, own_key).cert != ca.cert:
            raise ConfigError(f"{certs} has its own CA, not the one in {ca_dir}; --force replaces it")
        if own_key.exists():  # a replaced CA's key (--force), or the same CA's key from an earlier run
            own_key.unlink()
            outcome.removed.append(own_key)
        _write(own_crt, ca.cert_pem, 0o644, outcome)
        return ca
    if mode == UPDATE:
        if not own_key.is_file():
            raise ConfigError(f"no CA key in {certs} to keep: give --ca DIR (the directory with ca.crt and ca.key)")
        outcome.kept += [own_crt, own_key]
        return pki.load(own_crt, own_key)
    ca = pki.new_ca()
    _write_issued(certs / "ca", ca, outcome)
    return ca


def _server(certs: Path, ca: pki.Issued, hosts: Sequence[str] | None, mode: str, outcome: Outcome) -> list[str]:
    """Keep or (re)issue the server certificate; return the hosts it is valid for."""
    stem = certs / "server"
    earlier = _existing_pair(stem, ca) if mode == UPDATE else None
    if earlier is not None:
        earlier_hosts = pki.server_hosts(earlier.cert)
        if hosts is None or sorted(hosts) == sorted(earlier_hosts):
            outcome.kept += [stem.with_suffix(".crt"), stem.with_suffix(".key")]
            return earlier_hosts
    hosts = list(hosts or pki.DEFAULT_HOSTS)
    _write_issued(stem, pki.issue_server(ca, hosts), outcome)
    return hosts


def _remove_stale(out: Path, accounts: JobAccounts, outcome: Outcome) -> None:
    """Delete the passwords and client certificates of accounts no longer in the job."""
    names = set(accounts.names)
    for path in sorted((out / PASSWORDS).iterdir()):
        if path.is_file() and path.name not in names:
            path.unlink()
            outcome.removed.append(path)
    for path in sorted((out / CERTS).iterdir()):
        if path.is_file() and path.suffix in (".crt", ".key") and path.stem not in (*names, *_CERT_STEMS):
            path.unlink()
            outcome.removed.append(path)


def write_broker_dir(out: Path, accounts: JobAccounts, layout: BrokerLayout, *,
                     hosts: Sequence[str] | None = None, mode: str = NEW, ca_dir: Path | None = None) -> Outcome:
    """Write (or update) the broker directory `out` for the job of `accounts`.

    ``hosts``: the names and addresses clients reach the broker by (server certificate
    subjectAltName); default localhost and 127.0.0.1, or in ``update`` mode whatever
    the kept server certificate has.
    """
    if mode not in (NEW, UPDATE, FORCE):
        raise ValueError(f"mode must be {NEW}, {UPDATE} or {FORCE}, not {mode!r}")
    reserved = sorted(set(accounts.names) & set(_CERT_STEMS))
    if reserved:
        raise ConfigError(f"account names {', '.join(reserved)} are reserved (certs/{reserved[0]}.crt)")
    present = [name for name in GENERATED if (out / name).exists()]
    if mode == NEW and present:
        raise ConfigError(f"{out} already holds a broker configuration ({', '.join(present)}): "
                          "--update keeps its CA and passwords and adds or removes accounts, "
                          "--force replaces everything")
    if mode == UPDATE and not present:
        raise ConfigError(f"{out} holds no broker configuration to update; run without --update")

    outcome = Outcome()
    certs, passwords_dir = out / CERTS, out / PASSWORDS
    certs.mkdir(parents=True, exist_ok=True)
    passwords_dir.mkdir(mode=0o700, exist_ok=True)
    passwords_dir.chmod(0o700)

    ca = _choose_ca(certs, mode, ca_dir, outcome)
    server_names = _server(certs, ca, hosts, mode, outcome)

    passwords: dict[str, str] = {}
    for name in accounts.names:
        secret = passwords_dir / name
        if mode == UPDATE and secret.is_file():
            passwords[name] = secret.read_text(encoding="utf-8").rstrip("\r\n")
            outcome.kept.append(secret)
        else:
            passwords[name] = new_password()
            _write(secret, passwords[name].encode(), 0o600, outcome)
        stem = certs / name
        if mode == UPDATE and _existing_pair(stem, ca) is not None:
            outcome.kept += [stem.with_name(name + ".crt"), stem.with_name(name + ".key")]
        else:
            _write_issued(stem, pki.issue_client(ca, name), outcome)
    if mode != NEW:
        _remove_stale(out, accounts, outcome)

    _write(out / PASSWD, render_passwd(passwords).encode(), 0o600, outcome)
    _write(out / ACL, render_acl(accounts).encode(), 0o644, outcome)
    _write(out / CONF, render_conf(accounts.job, layout).encode(), 0o644, outcome)
    _write(out / README, render_readme(accounts, layout, server_names).encode(), 0o644, outcome)
    return outcome


def render_readme(accounts: JobAccounts, layout: BrokerLayout, hosts: Sequence[str]) -> str:
    """README.txt: what each file is, where it is installed, which device gets what."""
    etc, certs = layout.etc.rstrip("/"), layout.certs
    width = max(len(n) for n in accounts.names)
    roles = [f"  {accounts.master:<{width}}  the master"]
    roles += [f"  {accounts.slave(s):<{width}}  slave {s}" for s in accounts.slaves]
    roles += [f"  {accounts.worker(w):<{width}}  aggregator worker {w} (fedmq worker)" for w in accounts.workers]
    roles += [f"  {m:<{width}}  read-only monitor (fedmq monitor, mosquitto_sub)" for m in accounts.monitors]
    example = accounts.slaves[0]
    account = accounts.slave(example)
    if layout.client_auth == "certificate":
        login = [f'tls_cert = "/etc/fedmq/{account}.crt"                 # certs/{account}.crt',
                 f'tls_key = "/etc/fedmq/keys/{account}.key"             # certs/{account}.key, mode 0600']
        device_files = "certs/ACCOUNT.crt and .key"
        how = "By hand"
    else:
        login = [f'username = "{account}"',
                 f'password_file = "/etc/fedmq/keys/{example}.broker-password"   # passwords/{account}']
        device_files = "passwords/ACCOUNT"
        how = (f"deploy/install-slave.sh takes them (--ca ca.crt --password-file {account}\n"
               f"for slave {example}); by hand")
    return f"""\
Mosquitto broker configuration for fedmq job {accounts.job!r} (topics below {accounts.topics.base}/),
written by `fedmq broker config`. Run it again with --update to add or remove slaves.

Files
  {CONF:<27}broker configuration: TLS on port {layout.tls_port}, plain MQTT on 127.0.0.1:{layout.local_port},
  {'':<27}no anonymous access, persistence, queue limits (commented line by line)
  {ACL:<27}which account may read and write which topic
  {PASSWD:<27}the accounts' password hashes (Mosquitto password_file)
  {PASSWORDS + '/ACCOUNT':<27}each account's broker password (secret, mode 0600, no newline)
  {CERTS + '/ca.crt':<27}the CA: every client gets it to verify the broker
  {CERTS + '/ca.key':<27}the CA's key (secret): keep it off the broker, whoever has it can
  {'':<27}mint certificates the broker trusts (absent when issued with --ca)
  {CERTS + '/server.crt, .key':<27}the broker's certificate and key, valid for: {', '.join(hosts)}
  {CERTS + '/ACCOUNT.crt, .key':<27}a client certificate per account (CN = account name)

Accounts. The account name is also the MQTT client id: the broker replaces the id a
client sends by its user name, so no account can take over another's session. Two
tools logged in with one monitor account disconnect each other: give each its own.
{chr(10).join(roles)}

Install on the broker host, as root, from this directory (Debian/Ubuntu: apt-get
install mosquitto). The new mosquitto.conf replaces the distribution's: keep its
pid_file line if your init system needs one.
  install -d -m 0750 -g mosquitto {certs}
  install -m 0644 certs/ca.crt certs/server.crt {certs}/
  install -m 0640 -g mosquitto certs/server.key {certs}/
  install -m 0640 -g mosquitto fedmq.passwd fedmq.acl {etc}/
  install -m 0644 mosquitto.conf {layout.conf_path}
  install -d -m 0750 -o mosquitto -g mosquitto {layout.data_dir.rstrip('/')}
  systemctl stop mosquitto
  mosquitto -c {layout.conf_path} -v    # a check in the foreground: Ctrl-C once it listens
  systemctl start mosquitto
After re-installing fedmq.passwd and fedmq.acl only, `systemctl reload mosquitto`
applies them without dropping connections.

Each device gets certs/ca.crt and its own {device_files}, copied over securely.
{how}, slave {example}'s [broker] table reads:
  [broker]
  host = "{hosts[0]}"
  tls_ca = "/etc/fedmq/ca.crt"                            # certs/ca.crt
  {(chr(10) + '  ').join(login)}
The master's is the same for account {accounts.master}.
"""
