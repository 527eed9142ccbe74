"""The deployment files: the master's name, systemd credentials, units, containers.

Checks the files in deploy/ against what fedmq reads (the example master.toml against
the unit that runs it), runs `systemd-analyze verify` and `docker compose config`
where those tools work here, and skips with the reason where they do not.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import struct
import subprocess
import tomllib
from pathlib import Path

import pytest

from fedmq.common.errors import ConfigError
from fedmq.common.jobconfig import parse_job, parse_slave
from fedmq.common.keys import Identity, load_identity, write_identity
from fedmq.common.shell import HEARTBEAT_FILE, touch_heartbeat

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
UNITS = ("fedmq-master.service", "fedmq-slave@.service")

JOB = {"job": {"id": "digits"}, "model": {"arch": "mlp", "sizes": [64, 16, 10]},
       "enrollment": {"mode": "open"}, "master": {"key": "signing.key"}}
SLAVE = {"slave": {"id": "s1", "job": "digits", "key": "s1.key", "master_key": "master.pub",
                   "data": "reference:0/8"}}


def _with(base: dict, table: str, **values) -> dict:
    return {**base, table: {**base[table], **values}}


# ------------------------------------------------------------------ names


def test_the_master_signs_as_its_configured_name_not_as_its_key_file(tmp_path: Path) -> None:
    assert parse_job(JOB, tmp_path).master_name == "master"
    assert parse_job(_with(JOB, "master", name="lab-master"), tmp_path).master_name == "lab-master"
    write_identity(Identity.generate("ignored"), tmp_path)
    (tmp_path / "ignored.key").rename(tmp_path / "signing.key")
    cfg = parse_job(JOB, tmp_path)
    assert load_identity(cfg.master_key, name=cfg.master_name).name == "master"
    with pytest.raises(ConfigError, match="master.name"):
        parse_job(_with(JOB, "master", name="a/b"), tmp_path)


def test_a_slave_expects_the_configured_master_name(tmp_path: Path) -> None:
    assert parse_slave(SLAVE, tmp_path).master_name == "master"
    assert parse_slave(_with(SLAVE, "slave", master_name="lab-master"), tmp_path).master_name == "lab-master"
    with pytest.raises(ConfigError, match="slave.master_name"):
        parse_slave(_with(SLAVE, "slave", master_name="+"), tmp_path)


# ------------------------------------------------------------------ systemd credentials


def grant_read_acl(path: Path, uid: int) -> None:
    """What systemd does to a credential: 0400, plus a POSIX ACL entry user:UID:r
    (the mask, r, then shows as the group bits: mode 0440)."""
    os.chmod(path, 0o400)
    undefined = 0xFFFFFFFF
    entries = [(0x01, 4, undefined), (0x02, 4, uid), (0x04, 0, undefined), (0x10, 4, undefined), (0x20, 0, undefined)]
    try:
        os.setxattr(path, "system.posix_acl_access",
                    struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries))
    except OSError as exc:
        pytest.skip(f"no POSIX ACLs on {path.parent}: {exc}")


def test_a_systemd_credential_is_accepted_as_a_private_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "credentials"
    key, _ = write_identity(Identity.generate("x"), creds)
    key = key.rename(creds / "signing.key")
    grant_read_acl(key, 65534)
    assert key.stat().st_mode & 0o777 == 0o440
    with pytest.raises(ConfigError, match="accessible by group/others"):
        load_identity(key)  # not in $CREDENTIALS_DIRECTORY: an ordinary file readable by a group
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert load_identity(key, name="master").name == "master"
    os.chmod(key, 0o444)  # readable by others: refused even there
    with pytest.raises(ConfigError, match="accessible by group/others"):
        load_identity(key)


# ------------------------------------------------------------------ heartbeat


def test_the_heartbeat_file_is_touched_and_a_failure_is_only_logged(tmp_path: Path, caplog) -> None:
    beat = tmp_path / "state" / HEARTBEAT_FILE
    touch_heartbeat(beat, logging.getLogger("t"))
    assert beat.is_file()
    os.utime(beat, (0, 0))
    touch_heartbeat(beat, logging.getLogger("t"))
    assert beat.stat().st_mtime > 0
    (tmp_path / "file").write_text("")
    touch_heartbeat(tmp_path / "file" / HEARTBEAT_FILE, logging.getLogger("t"))  # parent is a file
    assert "cannot touch the heartbeat file" in caplog.text


# ------------------------------------------------------------------ units


def unit_values(name: str, key: str) -> list[str]:
    text = (DEPLOY / name).read_text()
    return re.findall(rf"^{key}=(.*)$", text, flags=re.M)


@pytest.mark.parametrize("name", UNITS)
def test_units_stop_restarting_after_a_configuration_error(name: str) -> None:
    assert unit_values(name, "RestartPreventExitStatus") == ["2"]  # ConfigError exits 2 (fedmq/cli/errors.py)


def test_the_master_unit_needs_no_group_nothing_creates() -> None:
    assert unit_values("fedmq-master.service", "SupplementaryGroups") == []


def test_the_example_master_config_uses_the_units_paths(tmp_path: Path) -> None:
    """deploy/master.toml is what fedmq-master.service runs: credentials by their
    LoadCredential names, the state in its StateDirectory (not under read-only /etc)."""
    unit = "fedmq-master.service"
    config = re.search(r"--config (\S+)", unit_values(unit, "ExecStart")[0]).group(1)
    assert config == "/etc/fedmq/master.toml"
    data = tomllib.loads((DEPLOY / "master.toml").read_text())
    credentials = {v.split(":", 1)[0] for v in unit_values(unit, "LoadCredential")}
    run_creds = f"/run/credentials/{unit}/"
    assert data["master"]["key"] == run_creds + "signing.key" and "signing.key" in credentials
    assert data["broker"]["password_file"] == run_creds + "broker-password" and "broker-password" in credentials
    assert data["master"]["state_dir"] == "/var/lib/" + unit_values(unit, "StateDirectory")[0]
    assert data["master"]["name"] == "master"
    # and fedmq accepts the whole file (the password file is read while parsing)
    (tmp_path / "password").write_text("secret\n")
    data["broker"]["password_file"] = str(tmp_path / "password")
    cfg = parse_job(data, Path("/etc/fedmq"))
    assert cfg.master_name == "master" and str(cfg.state_dir) == "/var/lib/fedmq/master"
    assert cfg.broker.username == f"fedmq-master-{cfg.job}"  # the account is the client id


def _systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed")
    return exe


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    exe = _systemd_analyze()
    # ExecStart must name an executable that exists: point it at a stand-in here.
    binary = tmp_path / "bin" / "fedmq"
    binary.parent.mkdir()
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    probe = tmp_path / "fedmq-probe.service"
    probe.write_text(f"[Service]\nType=exec\nExecStart={binary}\n")
    trial = subprocess.run([exe, "verify", str(probe)], capture_output=True, text=True)
    if trial.returncode != 0:
        pytest.skip(f"systemd-analyze verify does not work in this sandbox: {trial.stderr.strip()[:300]}")
    for name in UNITS:
        (tmp_path / name).write_text((DEPLOY / name).read_text().replace("/opt/fedmq/bin/fedmq", str(binary)))
    (tmp_path / "fedmq-slave@slave-01.service").symlink_to("fedmq-slave@.service")  # an instance of the template
    result = subprocess.run([exe, "verify", str(tmp_path / "fedmq-master.service"),
                             str(tmp_path / "fedmq-slave@slave-01.service")], capture_output=True, text=True)
    # verify exits 0 on unknown keys and only warns: any word about our units is a failure
    ours = [line for line in result.stderr.splitlines() if "fedmq" in line]
    assert result.returncode == 0 and not ours, result.stderr


# ------------------------------------------------------------------ containers


def compose() -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())  # resolves the << merges


def test_every_container_is_read_only_without_capabilities_and_memory_limited() -> None:
    services = compose()["services"]
    for name, svc in services.items():
        assert svc.get("read_only") is True, name
        assert svc.get("cap_drop") == ["ALL"], name
        assert re.fullmatch(r"\d+[mg]", str(svc.get("mem_limit", ""))), name


def test_each_container_mounts_only_its_own_private_key() -> None:
    services = compose()["services"]
    key_volumes = {v for v in compose()["volumes"] if v.endswith("-key")}
    assert key_volumes == {"master-key", "slave-1-key", "slave-2-key"}
    for name, svc in services.items():
        mounted = {m.split(":", 1)[0] for m in svc.get("volumes", [])} & key_volumes
        if name in ("master", "slave-1", "slave-2"):
            assert mounted == {f"{name}-key"}, name
            assert f"{name}-key:/etc/fedmq/key:ro" in svc["volumes"], name
        elif name.endswith("-key"):
            assert mounted == {name}, name
        else:
            assert not mounted, name


def test_the_compose_configs_point_at_the_mounted_keys() -> None:
    job = tomllib.loads((DEPLOY / "compose" / "job.toml").read_text())
    assert job["master"]["key"] == "/etc/fedmq/key/master.key"
    assert job["enrollment"]["keys"] == "/etc/fedmq/public/slaves"
    for n in (1, 2):
        slave = tomllib.loads((DEPLOY / "compose" / f"slave-{n}.toml").read_text())["slave"]
        assert slave["key"] == f"/etc/fedmq/key/slave-{n}.key"
        assert slave["master_key"] == "/etc/fedmq/public/master.pub"
        assert slave["master_name"] == job["master"]["name"]


def test_the_image_health_check_reads_the_heartbeat_file() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")  # join continued lines
    healthcheck = re.search(r"^HEALTHCHECK .*", dockerfile, flags=re.M).group(0)
    assert f"-name {HEARTBEAT_FILE}" in healthcheck and "/var/lib/fedmq" in healthcheck


def test_docker_compose_config_accepts_the_file() -> None:
    for argv in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(argv[0]) is None:
            continue
        version = subprocess.run([*argv, "version"], capture_output=True, text=True)
        if version.returncode == 0 and not re.search(r"version 1\.", version.stdout):
            break
    else:
        pytest.skip("no Docker Compose v2 client here (`docker compose version` and `docker-compose version` fail)")
    result = subprocess.run([*argv, "-f", str(DEPLOY / "docker-compose.yml"), "config", "--quiet"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------ docs


def test_every_installer_option_the_docs_name_exists() -> None:
    docs = (REPO / "docs" / "OPERATIONS.md").read_text()
    section = docs[docs.index("## 2. Installing slaves"):docs.index("## 3. Containers")]
    script = (DEPLOY / "install-slave.sh").read_text()
    parser = script[script.index("while [ $# -gt 0 ]"):script.index("\ndone\n")]
    accepted = set(re.findall(r"--[a-z][a-z-]+", parser))
    others = {"--system", "--config", "--threads"}  # groupadd's, fedmq slave run's
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", section)) - others
    assert len(named) > 10 and named <= accepted, named - accepted
