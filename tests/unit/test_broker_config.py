"""`fedmq broker config` and what it renders: password entries, ACL, mosquitto.conf,
certificates, the output directory's modes and its new/--update/--force runs.

That Mosquitto accepts all of it (password hashes included) is tested with a real
broker in tests/integration/test_broker.py.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmq import pki
from fedmq.cli import main
from fedmq.common.errors import ConfigError
from fedmq.common.topics import (MASTER_TOPICS, SLAVE_TOPICS, TOPIC_ROLES, Topics, master_client_id,
                                 slave_client_id)
from fedmq.mosquitto_files import BrokerLayout, JobAccounts, passwd_entry, render_acl, render_conf

BROKER_CFG = Path(__file__).resolve().parents[2] / "broker_cfg"
EXAMPLE_ARGS = ["--job", "digits", "--slaves", "slave-01,slave-02,slave-03", "--host", "broker.example.org"]
BRIDGE_ARGS = ["--job", "digits", "--relay", "site-a", "--remote", "central.example.org:8883",
               "--ca", "/etc/mosquitto/certs/central-ca.crt"]


def run(*args: str):
    return CliRunner().invoke(main, ["broker", "config", *args])


def generate(out: Path, *args: str, slaves: str = "s1,s2") -> str:
    result = run("--job", "j", "--slaves", slaves, "--out", str(out), *args)
    assert result.exit_code == 0, result.output
    return result.output


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------- client ids

def test_client_ids_are_the_account_names_and_cannot_collide():
    assert master_client_id("digits") == "fedmq-master-digits"
    assert slave_client_id("slave-01", "digits") == "slave-01@digits"
    with pytest.raises(ConfigError):
        slave_client_id("a@b", "digits")  # '@' is no id character: no slave id can forge one


def test_topic_table_and_topic_names_agree():
    assert MASTER_TOPICS == ("instruction", "model", "delta", "round", "status", "metrics", "alive", "collect")
    assert SLAVE_TOPICS == ("confirm", "update", "presence")
    topics = Topics("j")
    assert topics.parse("fedmq/j/alive") == ("alive", None)
    assert {r.name for r in TOPIC_ROLES if r.chunked} <= {r.name for r in TOPIC_ROLES if r.retained}


# ----------------------------------------------------------------- passwords

def test_passwd_entry_is_mosquitto_2_pbkdf2_sha512():
    line = passwd_entry("slave-01@digits", "secret", salt=bytes(range(12)))
    user, rest = line.split(":")
    empty, kind, iterations, salt, digest = rest.split("$")
    assert (user, empty, kind, iterations) == ("slave-01@digits", "", "7", "101")
    assert base64.b64decode(salt) == bytes(range(12))
    assert base64.b64decode(digest) == hashlib.pbkdf2_hmac("sha512", b"secret", bytes(range(12)), 101)
    assert passwd_entry("u", "secret") != passwd_entry("u", "secret")  # fresh salt each time


def test_passwd_entry_refuses_a_colon_in_the_user_name():
    with pytest.raises(ConfigError):
        passwd_entry("a:b", "x")


# ----------------------------------------------------------------------- ACL

def acl_blocks(text: str) -> dict[str, list[str]]:
    blocks: dict[str, list[str]] = {}
    user = None
    for line in text.splitlines():
        if line.startswith("user "):
            user = line.split()[1]
            blocks[user] = []
        elif line.startswith("topic ") and user is not None:
            blocks[user].append(line)
    return blocks


def test_acl_grants_each_account_exactly_its_topics():
    blocks = acl_blocks(render_acl(JobAccounts("digits", ("s1", "s2"), ("fedmq-monitor", "ops"))))
    b = "fedmq/digits"
    assert blocks["fedmq-master-digits"] == [
        f"topic readwrite {b}/instruction/#", f"topic readwrite {b}/model/#", f"topic write {b}/delta",
        f"topic readwrite {b}/round/#", f"topic readwrite {b}/status", f"topic readwrite {b}/metrics",
        f"topic readwrite {b}/alive", f"topic write {b}/to/+", f"topic read {b}/confirm/+",
        f"topic read {b}/update/+", f"topic read {b}/presence/+"]
    assert blocks["s1@digits"] == [
        f"topic read {b}/instruction/#", f"topic read {b}/model/#", f"topic read {b}/delta",
        f"topic read {b}/round/#", f"topic read {b}/status", f"topic read {b}/alive", f"topic read {b}/to/s1",
        f"topic write {b}/confirm/s1", f"topic write {b}/update/s1", f"topic write {b}/presence/s1"]
    assert blocks["s2@digits"] == [line.replace("s1", "s2") for line in blocks["s1@digits"]]
    for monitor in ("fedmq-monitor", "ops"):
        assert blocks[monitor] == [f"topic read {b}/#", "topic read $SYS/#"]
    assert set(blocks) == {"fedmq-master-digits", "s1@digits", "s2@digits", "fedmq-monitor", "ops"}
    assert "pattern" not in render_acl(JobAccounts("digits", ("s1",)))


def test_acl_uses_the_prefix():
    blocks = acl_blocks(render_acl(JobAccounts("j", ("s1",), prefix="site/a")))
    assert all(" site/a/j/" in line for line in blocks["s1@j"])


@pytest.mark.parametrize("accounts, match", [
    (dict(job="j", slaves=()), "at least one slave"),
    (dict(job="j", slaves=("s1", "s1")), "given twice: s1@j"),
    (dict(job="j", slaves=("s1",), monitors=("fedmq-master-j",)), "given twice"),
    (dict(job="j", slaves=("bad id",)), "slave id"),
    (dict(job="j/k", slaves=("s1",)), "job id"),
    (dict(job="j", slaves=("s1",), prefix="a/#"), "prefix"),
])
def test_bad_accounts_are_config_errors(accounts, match):
    with pytest.raises(ConfigError, match=match):
        JobAccounts(**accounts)


# ------------------------------------------------------------ mosquitto.conf

def conf_lines(layout: BrokerLayout) -> list[str]:
    return [line for line in render_conf("j", layout).splitlines() if line and not line.startswith("#")]


def test_conf_binds_client_ids_on_every_listener_and_uses_the_layout():
    lines = conf_lines(BrokerLayout(etc="/srv/mq", data_dir="/srv/mq/data", tls_port=9883, listen="10.0.0.1",
                                    local_port=9884, log_dest="stderr"))
    assert lines.count("use_username_as_clientid true") == 2
    listeners = [i for i, line in enumerate(lines) if line.startswith("listener ")]
    assert [lines[i] for i in listeners] == ["listener 9883 10.0.0.1", "listener 9884 127.0.0.1"]
    assert all("use_username_as_clientid true" in lines[i:j] for i, j in zip(listeners, [*listeners[1:], None]))
    for line in ("cafile /srv/mq/certs/ca.crt", "certfile /srv/mq/certs/server.crt",
                 "keyfile /srv/mq/certs/server.key", "password_file /srv/mq/fedmq.passwd",
                 "acl_file /srv/mq/fedmq.acl", "persistence_location /srv/mq/data/", "log_dest stderr",
                 "allow_anonymous false", "persistence true", "max_queued_messages 10000",
                 "max_packet_size 2097152", "require_certificate false"):
        assert line in lines


def test_conf_with_client_certificates():
    lines = conf_lines(BrokerLayout(client_auth="certificate"))
    assert "require_certificate true" in lines and "use_identity_as_username true" in lines
    assert "listener 8883" in lines  # all interfaces by default


@pytest.mark.parametrize("layout, match", [
    (dict(etc="relative"), "absolute path"),
    (dict(data_dir="/a b"), "without white space"),
    (dict(tls_port=0), "TLS port"),
    (dict(local_port=8883), "must differ"),
    (dict(client_auth="psk"), "client auth"),
])
def test_bad_layouts_are_config_errors(layout, match):
    with pytest.raises(ConfigError, match=match):
        BrokerLayout(**layout)


# ------------------------------------------------------------- certificates

def test_certificates_chain_to_the_ca_with_the_hosts_and_account_names(tmp_path):
    generate(tmp_path, "--host", "broker.example.org", "--host", "10.1.2.3", "--host", "::1")
    certs = tmp_path / "certs"
    ca = pki.load(certs / "ca.crt", certs / "ca.key")
    assert ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server = pki.load(certs / "server.crt", certs / "server.key").cert
    assert pki.signed_by(server, ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3"), ipaddress.ip_address("::1")]
    assert server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == \
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
    for account in ("fedmq-master-j", "s1@j", "s2@j", "fedmq-monitor"):
        client = pki.load(certs / f"{account}.crt", certs / f"{account}.key").cert
        assert pki.signed_by(client, ca)
        assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == account
        assert ExtendedKeyUsageOID.CLIENT_AUTH in client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value


def test_default_hosts_are_localhost_and_loopback(tmp_path):
    generate(tmp_path)
    assert pki.server_hosts(x509.load_pem_x509_certificate((tmp_path / "certs/server.crt").read_bytes())) == \
        ["localhost", "127.0.0.1"]


def test_a_bad_host_is_a_config_error(tmp_path):
    result = run("--job", "j", "--slaves", "s1", "--out", str(tmp_path / "o"), "--host", "a b")
    assert result.exit_code == 2 and "host 'a b'" in result.output


# ---------------------------------------------------------------- directory

def test_secrets_are_private_and_never_printed(tmp_path):
    output = generate(tmp_path)
    accounts = ["fedmq-master-j", "s1@j", "s2@j", "fedmq-monitor"]
    assert sorted(p.name for p in (tmp_path / "passwords").iterdir()) == sorted(accounts)
    assert mode(tmp_path / "passwords") == 0o700
    passwd = (tmp_path / "fedmq.passwd").read_text().splitlines()
    assert [line.split(":")[0] for line in passwd] == accounts
    for account, line in zip(accounts, passwd):
        secret = tmp_path / "passwords" / account
        password = secret.read_text()
        assert mode(secret) == 0o600 and len(password) >= 32 and not password.endswith("\n")
        assert password not in output
        _, _, _, salt, digest = line.split(":")[1].split("$")
        assert base64.b64decode(digest) == hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(salt), 101)
    for key in (tmp_path / "certs").glob("*.key"):
        assert mode(key) == 0o600, key
    assert mode(tmp_path / "fedmq.passwd") == 0o600
    assert len({(tmp_path / "passwords" / a).read_text() for a in accounts}) == len(accounts)


def test_refuses_to_overwrite_without_force(tmp_path):
    generate(tmp_path)
    before = (tmp_path / "passwords" / "s1@j").read_text()
    result = run("--job", "j", "--slaves", "s1", "--out", str(tmp_path))
    assert result.exit_code == 2
    assert "already holds a broker configuration" in result.output and "--force" in result.output
    assert (tmp_path / "passwords" / "s1@j").read_text() == before


def test_force_replaces_everything(tmp_path):
    generate(tmp_path)
    ca_before = (tmp_path / "certs" / "ca.crt").read_bytes()
    password_before = (tmp_path / "passwords" / "s1@j").read_text()
    generate(tmp_path, "--force", slaves="s1")
    assert (tmp_path / "certs" / "ca.crt").read_bytes() != ca_before
    assert (tmp_path / "passwords" / "s1@j").read_text() != password_before
    assert not (tmp_path / "passwords" / "s2@j").exists() and not (tmp_path / "certs" / "s2@j.crt").exists()


def test_update_adds_and_removes_slaves_keeping_the_rest(tmp_path):
    generate(tmp_path, "--host", "broker.example.org")
    kept = {p: p.read_bytes() for p in [tmp_path / "certs" / n for n in ("ca.crt", "ca.key", "server.crt",
                                                                          "s1@j.crt", "s1@j.key")]
            + [tmp_path / "passwords" / n for n in ("s1@j", "fedmq-master-j")]}
    output = generate(tmp_path, "--update", slaves="s1,s3")
    assert {p: p.read_bytes() for p in kept} == kept
    assert (tmp_path / "passwords" / "s3@j").is_file() and (tmp_path / "certs" / "s3@j.crt").is_file()
    assert not (tmp_path / "passwords" / "s2@j").exists() and not (tmp_path / "certs" / "s2@j.key").exists()
    assert "removed" in output and (tmp_path / "passwords" / "s3@j").read_text() not in output
    users = [line.split(":")[0] for line in (tmp_path / "fedmq.passwd").read_text().splitlines()]
    assert users == ["fedmq-master-j", "s1@j", "s3@j", "fedmq-monitor"]
    acl = (tmp_path / "fedmq.acl").read_text()
    assert "user s3@j" in acl and "s2" not in acl
    ca = pki.load(tmp_path / "certs" / "ca.crt", tmp_path / "certs" / "ca.key")
    assert pki.signed_by(x509.load_pem_x509_certificate((tmp_path / "certs" / "s3@j.crt").read_bytes()), ca)


def test_update_uses_a_password_placed_in_passwords_for_a_new_slave(tmp_path):
    """A device that made its own password (deploy/install-slave.sh) joins with it."""
    generate(tmp_path)
    (tmp_path / "passwords" / "s3@j").write_text("device-made-password\n")
    generate(tmp_path, "--update", slaves="s1,s2,s3")
    line = next(l for l in (tmp_path / "fedmq.passwd").read_text().splitlines() if l.startswith("s3@j:"))
    _, _, _, salt, digest = line.split(":")[1].split("$")
    assert base64.b64decode(digest) == hashlib.pbkdf2_hmac("sha512", b"device-made-password",
                                                           base64.b64decode(salt), 101)


def test_update_reissues_the_server_certificate_for_new_hosts(tmp_path):
    generate(tmp_path)
    generate(tmp_path, "--update", "--host", "mq.example.org")
    server = x509.load_pem_x509_certificate((tmp_path / "certs" / "server.crt").read_bytes())
    assert pki.server_hosts(server) == ["mq.example.org"]


def test_update_needs_an_existing_configuration(tmp_path):
    result = run("--job", "j", "--slaves", "s1", "--out", str(tmp_path / "none"), "--update")
    assert result.exit_code == 2 and "no broker configuration to update" in result.output


def test_ca_from_another_directory_signs_without_its_key_being_copied(tmp_path):
    generate(tmp_path / "first")
    ca_dir = tmp_path / "first" / "certs"
    generate(tmp_path / "second", "--ca", str(ca_dir))
    certs = tmp_path / "second" / "certs"
    assert (certs / "ca.crt").read_bytes() == (ca_dir / "ca.crt").read_bytes()
    assert not (certs / "ca.key").exists()
    ca = pki.load(ca_dir / "ca.crt", ca_dir / "ca.key")
    assert pki.signed_by(x509.load_pem_x509_certificate((certs / "server.crt").read_bytes()), ca)
    # Updating it needs the CA again; it keeps everything issued.
    result = run("--job", "j", "--slaves", "s1", "--out", str(tmp_path / "second"), "--update")
    assert result.exit_code == 2 and "--ca DIR" in result.output
    generate(tmp_path / "second", "--update", "--ca", str(ca_dir), slaves="s1,s2,s3")


def test_force_and_update_exclude_each_other(tmp_path):
    result = run("--job", "j", "--slaves", "s1", "--out", str(tmp_path), "--force", "--update")
    assert result.exit_code == 2 and "exclude each other" in result.output


def test_monitor_accounts_replace_the_default(tmp_path):
    generate(tmp_path, "--monitor", "ops-1", "--monitor", "ops-2")
    assert sorted(p.name for p in (tmp_path / "passwords").iterdir()) == ["fedmq-master-j", "ops-1", "ops-2",
                                                                          "s1@j", "s2@j"]
    result = run("--job", "j", "--slaves", "s1", "--out", str(tmp_path / "o"), "--monitor", "server")
    assert result.exit_code == 2 and "reserved" in result.output


def test_shipped_examples_are_the_generators_output(tmp_path):
    """broker_cfg/ holds what `fedmq broker config` writes for the example job, minus
    the secrets (passwords, keys, certificates): regenerate it when this fails."""
    result = run(*EXAMPLE_ARGS, "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    for name in ("mosquitto.conf", "fedmq.acl", "README.txt"):
        assert (BROKER_CFG / name).read_text() == (tmp_path / name).read_text(), (
            f"broker_cfg/{name} is stale: fedmq broker config {' '.join(EXAMPLE_ARGS)} --out DIR")
    bridge = CliRunner().invoke(main, ["broker", "bridge", *BRIDGE_ARGS])
    assert bridge.exit_code == 0 and (BROKER_CFG / "bridge-site.conf").read_text() == bridge.output, (
        f"broker_cfg/bridge-site.conf is stale: fedmq broker bridge {' '.join(BRIDGE_ARGS)} > FILE")
    assert sorted(p.name for p in BROKER_CFG.iterdir()) == ["README.txt", "bridge-site.conf", "fedmq.acl",
                                                            "mosquitto.conf"]
