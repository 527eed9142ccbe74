"""deploy/install-slave.sh run for real below a temporary root, and a fleet deployed its way.

`--root DIR` puts every path the installer writes below DIR (and enables the unit
offline, `systemctl --root`); `--skip-pip` uses the Python environment already in
ROOT/opt/fedmq, which these tests provide: one that runs this checkout's fedmq,
instead of minutes of pip. Roots are made in /tmp with mode 0755, not in pytest's
tmp_path (below a 0700 directory), so that an unprivileged user reaches them as it
reaches / on a device.

The service's view is reproduced without systemd: the daemons run as `nobody`
(setpriv), with the credentials systemd would make (`LoadCredential=`: root-owned
copies, mode 0400, read access for the service's user by a POSIX ACL entry) and a
state directory owned by that user (`StateDirectory=`). Those tests need root and
setpriv and are skipped, with the reason, without them.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import sysconfig
import tempfile
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fedmq.common.keys import Identity, write_identity
from fedmq.demo import to_toml

from support import wait_for

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
INSTALLER = REPO / "deploy" / "install-slave.sh"
NOBODY = 65534
SLAVE_UNIT = "fedmq-slave@s1.service"
MASTER_UNIT = "fedmq-master.service"


# ------------------------------------------------------------------ harness


@pytest.fixture
def make_root() -> Iterator[Callable[[], Path]]:
    made: list[Path] = []

    def make() -> Path:
        root = Path(tempfile.mkdtemp(prefix="fedmq-root-", dir="/tmp"))
        root.chmod(0o755)
        (root / "etc").mkdir()
        (root / "etc" / "group").write_text("")  # what `groupadd --prefix ROOT` edits
        made.append(root)
        return root

    yield make
    for root in made:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def root(make_root) -> Path:
    return make_root()


@pytest.fixture
def master_pub(root: Path) -> Path:
    _, pub = write_identity(Identity.generate("master"), root / "from-master")
    return pub


def can_switch_users() -> str | None:
    """Why the tests cannot act as an unprivileged user here, or None if they can."""
    if os.geteuid() != 0:
        return "needs root to act as user nobody"
    if shutil.which("setpriv") is None:
        return "needs setpriv (util-linux)"
    return None


def nobody_argv(argv: list[str]) -> list[str]:
    # through env: setpriv (util-linux 2.38) runs a program below /root (0700) that
    # nobody could not run itself; the exec must happen as nobody
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--", "/usr/bin/env", *argv]


def as_nobody(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(nobody_argv(argv), capture_output=True, text=True, **kwargs)


def interpreter_for_nobody() -> str | None:
    """A Python of this version that user nobody may run and that imports this venv's
    packages (the test's own interpreter may live below /root, 0700)."""
    want = "%d.%d" % sys.version_info[:2]
    purelib = sysconfig.get_paths()["purelib"]
    for candidate in (os.path.realpath(sys._base_executable), f"/usr/bin/python{want}", f"/usr/local/bin/python{want}"):
        if not os.path.exists(candidate):
            continue
        probe = as_nobody([candidate, "-c", f"import site, sys; site.addsitedir({purelib!r}); import fedmq.cli; "
                                            "print('%d.%d' % sys.version_info[:2])"], cwd="/")
        if probe.returncode == 0 and probe.stdout.strip() == want:
            return candidate
    return None


def provide_environment(root: Path, *, for_nobody: bool = False) -> None:
    """What `--skip-pip` expects in ROOT/opt/fedmq: a bin/fedmq running this checkout.

    For nobody: a venv of an interpreter nobody may run, seeing this venv's packages
    through a .pth file (the same torch, no download)."""
    prefix = root / "opt" / "fedmq"
    python = sys.executable
    if for_nobody:
        reason = can_switch_users()
        base = None if reason else interpreter_for_nobody()
        if base is None:
            pytest.skip(reason or "no Python interpreter that user nobody may run with this venv's packages")
        subprocess.run([base, "-m", "venv", "--without-pip", str(prefix)], check=True)
        site = Path(sysconfig.get_paths(vars={"base": str(prefix)})["purelib"])
        site.mkdir(parents=True, exist_ok=True)
        purelib = sysconfig.get_paths()["purelib"]
        (site / "fedmq-checkout.pth").write_text(f"import site; site.addsitedir({purelib!r})\n")
        python = str(prefix / "bin" / "python")
    (prefix / "bin").mkdir(parents=True, exist_ok=True)
    script = prefix / "bin" / "fedmq"
    script.write_text(f'#!/bin/sh\nexec {python} -m fedmq "$@"\n')
    script.chmod(0o755)


def install(root: Path, *args: str, env: dict[str, str] | None = None, user: str = "root") -> subprocess.CompletedProcess:
    argv = ["bash", str(INSTALLER), "--root", str(root), "--skip-pip", *args]
    environ = {**os.environ, **(env or {})}
    if user == "nobody":
        return as_nobody(argv, env={**environ, "PATH": "/usr/bin:/bin"}, cwd="/", timeout=120)
    return subprocess.run(argv, capture_output=True, text=True, env=environ, timeout=120)


def full_install(root: Path, master_pub: Path, *extra: str, slave: str = "s1", data: str = "reference:0/2",
                 broker: str = "broker.example.org") -> subprocess.CompletedProcess:
    return install(root, "--id", slave, "--job", "digits", "--broker", broker, "--master-key", str(master_pub),
                   "--data", data, *extra)


def tree(root: Path) -> dict[str, tuple[int, str]]:
    """Every path below root: mode and content digest (or link target)."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        if path.is_symlink():
            what = os.readlink(path)
        elif path.is_file():
            what = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            what = "dir"
        out[str(path.relative_to(root))] = (st.st_mode, what)
    return out


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o7777


# ------------------------------------------------------------------ the installer


def test_a_dry_run_prints_every_action_and_changes_nothing(root: Path, master_pub: Path) -> None:
    provide_environment(root)
    before = tree(root)
    result = full_install(root, master_pub, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert tree(root) == before
    out = result.stdout
    etc = root / "etc" / "fedmq"
    for action in (f"+ groupadd --system --prefix {root} fedmq",
                   f"+ {root}/opt/fedmq/bin/fedmq keys generate s1 --dir {etc}/keys",
                   f"+ install -m 0644 {master_pub} {etc}/s1.master.pub",
                   f"+ generate a random broker password into {etc}/keys/s1.broker-password (mode 0600)",
                   f"+ write {etc}/s1.toml (mode 0644)",
                   '|   data = "reference:0/2"',
                   '|   username = "s1@digits"',
                   f"+ install -m 0644 {REPO}/deploy/fedmq-slave@.service {root}/etc/systemd/system/fedmq-slave@.service",
                   f"+ systemctl --root={root} enable {SLAVE_UNIT}",
                   "Dry run: nothing was changed."):
        assert action in out, (action, out)


def test_a_dry_run_needs_no_root(root: Path, master_pub: Path) -> None:
    if reason := can_switch_users():
        pytest.skip(reason)
    master_pub.parent.chmod(0o755)
    before = tree(root)
    result = install(root, "--id", "s1", "--job", "digits", "--broker", "b", "--master-key", str(master_pub),
                     "--data", "reference:0/2", "--dry-run", user="nobody")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Dry run: nothing was changed." in result.stdout and tree(root) == before


def test_the_installed_layout_lets_the_service_user_read_what_it_needs(root: Path, master_pub: Path) -> None:
    provide_environment(root)
    result = full_install(root, master_pub)
    assert result.returncode == 0, result.stdout + result.stderr
    etc = root / "etc" / "fedmq"
    assert mode(etc) == 0o755 and mode(etc / "keys") == 0o700
    assert mode(etc / "keys" / "s1.key") == 0o600 and mode(etc / "keys" / "s1.broker-password") == 0o600
    assert mode(etc / "s1.master.pub") == 0o644 and mode(etc / "s1.toml") == 0o644
    assert (etc / "s1.master.pub").read_bytes() == master_pub.read_bytes()
    units = root / "etc" / "systemd" / "system"
    assert (units / "fedmq-slave@.service").read_bytes() == (REPO / "deploy" / "fedmq-slave@.service").read_bytes()
    assert (units / "multi-user.target.wants" / SLAVE_UNIT).is_symlink()
    assert re.search(r"^fedmq:x:\d+:", (root / "etc" / "group").read_text(), flags=re.M)
    config = tomllib.loads((etc / "s1.toml").read_text())
    credentials = f"{root}/run/credentials/{SLAVE_UNIT}"
    assert config["slave"] == {
        "id": "s1", "job": "digits", "key": f"{credentials}/signing.key", "master_key": f"{etc}/s1.master.pub",
        "master_name": "master", "data": "reference:0/2", "state_dir": f"{root}/var/lib/fedmq/s1"}
    assert config["broker"] == {"host": "broker.example.org", "port": 1883, "username": "s1@digits",
                                "password_file": f"{credentials}/broker-password"}
    if reason := can_switch_users():
        pytest.skip(f"layout checked; reading it as the service user {reason}")
    for public in (etc / "s1.toml", etc / "s1.master.pub"):
        assert as_nobody(["cat", str(public)]).returncode == 0, public
    for secret in (etc / "keys" / "s1.key", etc / "keys" / "s1.broker-password"):
        assert as_nobody(["cat", str(secret)]).returncode != 0, secret


def test_running_it_again_applies_a_new_broker_and_data_and_keeps_the_rest(root: Path, master_pub: Path) -> None:
    provide_environment(root)
    assert full_install(root, master_pub).returncode == 0
    etc = root / "etc" / "fedmq"
    key, password = (etc / "keys" / "s1.key").read_bytes(), (etc / "keys" / "s1.broker-password").read_bytes()
    first = (etc / "s1.toml").read_text()
    result = install(root, "--id", "s1", "--broker", "other.example.org:8884", "--data", "reference:1/2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert '-data = "reference:0/2"' in result.stdout and '+data = "reference:1/2"' in result.stdout
    config = tomllib.loads((etc / "s1.toml").read_text())
    assert config["slave"]["data"] == "reference:1/2" and config["slave"]["job"] == "digits"
    assert config["broker"]["host"] == "other.example.org" and config["broker"]["port"] == 8884
    assert (etc / "s1.toml.old").read_text() == first
    assert (etc / "keys" / "s1.key").read_bytes() == key and (etc / "keys" / "s1.broker-password").read_bytes() == password
    # the change is applied by restarting the unit (not possible offline, and said so)
    assert f"skipped systemctl restart {SLAVE_UNIT}" in result.stdout
    again = install(root, "--id", "s1")
    assert again.returncode == 0 and "s1.toml is unchanged" in again.stdout


def test_a_config_it_did_not_write_is_left_alone_and_it_says_why(root: Path, master_pub: Path) -> None:
    provide_environment(root)
    config = root / "etc" / "fedmq" / "s1.toml"
    config.parent.mkdir(parents=True)
    config.write_text("# my own\n[slave]\nid = \"s1\"\n")
    result = full_install(root, master_pub)
    assert result.returncode == 1
    assert "was not written by install-slave.sh" in result.stderr and "not overwriting it" in result.stderr
    assert config.read_text() == "# my own\n[slave]\nid = \"s1\"\n"


def test_a_first_install_names_the_missing_options(root: Path) -> None:
    result = install(root, "--id", "s1", "--dry-run")
    assert result.returncode == 1
    assert "missing --job --broker --master-key --data" in result.stderr


@pytest.mark.parametrize("machine, message", [
    ("armv7l", "32-bit ARM (armv7l): PyTorch publishes no wheels for it"),
    ("armv6l", "32-bit ARM (armv6l)"),
    ("riscv64", "unsupported CPU architecture riscv64"),
    ("aarch64", None),
    ("x86_64", None),
])
def test_the_cpu_architecture_is_checked(root: Path, master_pub: Path, machine: str, message: str | None) -> None:
    result = install(root, "--id", "s1", "--job", "digits", "--broker", "b", "--master-key", str(master_pub),
                     "--data", "reference:0/2", "--dry-run", env={"INSTALL_SLAVE_MACHINE": machine})
    if message is None:
        assert result.returncode == 0, result.stderr
    else:
        assert result.returncode == 1 and message in result.stderr and "x86_64 and aarch64" in result.stderr


@pytest.mark.parametrize("data, message", [
    ("reference:8/8", "shard 8 of 8 does not exist"),
    ("reference:first", "expected reference:I, reference:I/N"),
    ("/nonexistent/data.npz", "does not exist"),
    ("/home/pi/data.npz", "the service cannot see /home"),
    ("data.txt", "expected a .npz or .csv file, module:function or reference:I/N"),
])
def test_the_data_is_validated_before_anything_is_installed(root: Path, master_pub: Path, data: str,
                                                              message: str) -> None:
    before = tree(root)
    result = full_install(root, master_pub, "--dry-run", data=data)
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert tree(root) == before


def test_data_the_service_user_cannot_read_is_refused_with_the_fix(root: Path, master_pub: Path) -> None:
    if reason := can_switch_users():
        pytest.skip(reason)
    provide_environment(root)
    data = root / "srv" / "data.npz"
    data.parent.mkdir()
    data.parent.chmod(0o755)
    data.write_bytes(b"")
    data.chmod(0o600)
    result = full_install(root, master_pub, "--no-systemd", data=str(data))
    assert result.returncode == 1
    assert "not readable by the service" in result.stderr and "chgrp fedmq" in result.stderr
    data.chmod(0o644)
    assert "not readable" not in full_install(root, master_pub, "--dry-run", data=str(data)).stderr


def test_uninstall_keeps_the_identity_and_state_unless_purged(root: Path, master_pub: Path) -> None:
    provide_environment(root)
    assert full_install(root, master_pub).returncode == 0
    assert full_install(root, master_pub, slave="s2").returncode == 0
    etc, units = root / "etc" / "fedmq", root / "etc" / "systemd" / "system"
    state = root / "var" / "lib" / "fedmq" / "s1"
    state.mkdir(parents=True)
    (state / "state.cbor").write_bytes(b"\xa0")
    key = (etc / "keys" / "s1.key").read_bytes()

    dry = install(root, "--id", "s1", "--uninstall", "--dry-run")
    assert dry.returncode == 0 and f"+ rm -f {etc}/s1.toml" in dry.stdout and (etc / "s1.toml").exists()
    result = install(root, "--id", "s1", "--uninstall")
    assert result.returncode == 0, result.stderr
    assert not (etc / "s1.toml").exists() and not (etc / "s1.master.pub").exists()
    assert not (units / "multi-user.target.wants" / SLAVE_UNIT).exists()
    assert (etc / "keys" / "s1.key").read_bytes() == key and (state / "state.cbor").exists()
    # s2 still uses the environment and the unit
    assert (root / "opt" / "fedmq").exists() and (units / "fedmq-slave@.service").exists()
    assert "still used by s2.toml" in result.stdout

    assert full_install(root, master_pub).returncode == 0  # back, with the same identity
    assert (etc / "keys" / "s1.key").read_bytes() == key
    assert install(root, "--id", "s1", "--uninstall", "--purge").returncode == 0
    assert not (etc / "keys" / "s1.key").exists() and not state.exists()
    assert install(root, "--id", "s2", "--uninstall", "--purge").returncode == 0
    assert not (root / "opt" / "fedmq").exists() and not (units / "fedmq-slave@.service").exists()
    assert not etc.exists()
    assert install(root, "--id", "s2", "--uninstall").returncode == 0  # nothing left: still fine


def documented_installer_commands() -> list[list[str]]:
    """Every `deploy/install-slave.sh ...` command in docs/OPERATIONS.md, as argv."""
    text = (REPO / "docs" / "OPERATIONS.md").read_text().replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in text.splitlines()
            if line.startswith("deploy/install-slave.sh ")]


def test_the_installer_commands_in_the_docs_work_as_written(root: Path) -> None:
    """In the order the docs give them: install, change, upgrade, remove. Below a root,
    with its files where the docs have them (/srv/fedmq, ca.crt and master.pub here)."""
    commands = documented_installer_commands()
    assert [c[1:4] for c in commands[:1]] == [["--id", "slave-17", "--job"]] and len(commands) >= 6, commands
    provide_environment(root)
    cwd = root / "operator"
    write_identity(Identity.generate("master"), cwd)
    (cwd / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    srv = root / "srv" / "fedmq"
    srv.mkdir(parents=True)
    for name in ("data.npz", "data-2.npz"):
        (srv / name).write_bytes(b"")
    for argv in commands:
        argv = [str(root) + a if a.startswith("/srv/fedmq/") else a for a in argv[1:]]
        result = subprocess.run(["bash", str(INSTALLER), "--root", str(root), "--skip-pip", *argv],
                                capture_output=True, text=True, cwd=cwd, timeout=120)
        assert result.returncode == 0, (argv, result.stdout, result.stderr)
    assert not (root / "etc" / "fedmq").exists()  # the last one purged everything


# ------------------------------------------------------------------ the service's view


def grant(path: Path, uid: int, perms: int) -> None:
    """A POSIX ACL entry user:UID:perms on a root-owned file, as systemd grants a credential
    (set through the xattr: no setfacl needed); a chown where the file system has no ACLs."""
    undefined = 0xFFFFFFFF
    entries = [(0x01, 4 | (perms & 1), undefined), (0x02, perms, uid), (0x04, 0, undefined),
               (0x10, perms, undefined), (0x20, 0, undefined)]
    try:
        os.setxattr(path, "system.posix_acl_access",
                    struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries))
    except OSError:
        os.chown(path, uid, -1)


def systemd_credentials(root: Path, unit: str, files: dict[str, Path]) -> Path:
    """ROOT/run/credentials/UNIT as systemd makes it for LoadCredential= (the service user: nobody)."""
    directory = root / "run" / "credentials" / unit
    directory.mkdir(parents=True)
    for name, source in files.items():
        shutil.copyfile(source, directory / name)
        (directory / name).chmod(0o400)
        grant(directory / name, NOBODY, 4)
    directory.chmod(0o500)
    grant(directory, NOBODY, 5)
    return directory


def state_directory(root: Path, name: str) -> Path:
    """ROOT/var/lib/fedmq/NAME as StateDirectory= makes it: owned by the service user, 0700."""
    path = root / "var" / "lib" / "fedmq" / name
    path.mkdir(parents=True)
    path.parent.chmod(0o755)
    os.chown(path, NOBODY, NOBODY)
    path.chmod(0o700)
    return path


def start_service(root: Path, argv: list[str], credentials: Path, log: Path) -> subprocess.Popen:
    """ExecStart as the service user, with $CREDENTIALS_DIRECTORY as systemd sets it."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1", "CREDENTIALS_DIRECTORY": str(credentials)}
    with open(log, "wb") as out:
        return subprocess.Popen(nobody_argv([str(root / "opt" / "fedmq" / "bin" / "fedmq"), *argv]),
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd="/", start_new_session=True)


def stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait()




def master_host(server: Path, broker: dict, rounds: int) -> Path:
    """The master's host laid out as docs/OPERATIONS.md, "Running the master", says, with
    deploy/master.toml; returns its credentials directory."""
    etc = server / "etc" / "fedmq"
    (etc / "slaves").mkdir(parents=True)
    etc.chmod(0o755)
    (etc / "slaves").chmod(0o755)
    write_identity(Identity.generate("master"), etc / "keys")  # fedmq keys generate master --dir /etc/fedmq/keys
    (etc / "keys").chmod(0o700)
    (etc / "keys" / "master.broker-password").write_text("secret\n")
    job = tomllib.loads((REPO / "deploy" / "master.toml").read_text())
    reroot = lambda path: f"{server}{path}"  # noqa: E731 - the paths of the example, below this root
    job["enrollment"]["keys"] = reroot(job["enrollment"]["keys"])
    job["master"].update(key=reroot(job["master"]["key"]), state_dir=reroot(job["master"]["state_dir"]))
    job["broker"] = {**job["broker"], **broker, "password_file": reroot(job["broker"]["password_file"])}
    job["job"]["rounds"] = rounds
    job["rounds"]["min_slaves"] = 1
    (etc / "master.toml").write_text(to_toml(job))
    (etc / "master.toml").chmod(0o644)
    state_directory(server, "master")
    # the unit's LoadCredential lines: signing.key (named so, whatever the master's name) and broker-password
    return systemd_credentials(server, MASTER_UNIT, {"signing.key": etc / "keys" / "master.key",
                                                     "broker-password": etc / "keys" / "master.broker-password"})


@pytest.mark.broker
@pytest.mark.timeout(600)
def test_a_fleet_deployed_the_documented_way_trains(make_root, mosquitto, tmp_path: Path) -> None:
    """Both fixed defects at once: the master's key reaches it as signing.key yet it signs
    as "master", and the installed slave, an unprivileged user, reads its master.pub."""
    server, device = make_root(), make_root()
    provide_environment(server, for_nobody=True)
    provide_environment(device, for_nobody=True)
    master_creds = master_host(server, mosquitto.settings, rounds=2)
    master_pub = server / "etc" / "fedmq" / "keys" / "master.pub"
    result = full_install(device, master_pub, broker=f"{mosquitto.host}:{mosquitto.port}")
    assert result.returncode == 0, result.stdout + result.stderr
    etc = device / "etc" / "fedmq"
    shutil.copyfile(etc / "keys" / "s1.pub", server / "etc" / "fedmq" / "slaves" / "s1.pub")  # enrolment
    (server / "etc" / "fedmq" / "slaves" / "s1.pub").chmod(0o644)
    slave_creds = systemd_credentials(device, SLAVE_UNIT, {"signing.key": etc / "keys" / "s1.key",
                                                          "broker-password": etc / "keys" / "s1.broker-password"})
    slave_state = state_directory(device, "s1")

    slave_log, master_log = tmp_path / "slave.log", tmp_path / "master.log"
    slave = start_service(device, ["slave", "run", "--config", str(etc / "s1.toml")], slave_creds, slave_log)
    master = start_service(server, ["master", "run", "--config", str(server / "etc/fedmq/master.toml")],
                           master_creds, master_log)
    try:
        wait_for(lambda: "connecting to broker" in slave_log.read_text() or slave.poll() is not None, 180,
                 "the slave to get past its config and keys")
        # the master's retained instruction, verified: or rejected (as when it signed as "signing")
        wait_for(lambda: re.search("confirming instruction|rejected", slave_log.read_text()) or slave.poll() is not None,
                 240, "the slave to answer the master's instruction")
        assert "confirming instruction" in slave_log.read_text(), slave_log.read_text()
        assert master.wait(timeout=400) == 0, master_log.read_text()
        assert "job digits finished" in master_log.read_text()
        wait_for(lambda: (slave_state / "state.cbor").exists(), 60, "the slave's state file")
        assert (server / "var/lib/fedmq/master/heartbeat").exists() and (slave_state / "heartbeat").exists()
        assert (server / "var/lib/fedmq/master/checkpoint.cbor").stat().st_uid == NOBODY
    finally:
        stop(master)
        slave_code = stop(slave)
    assert slave_code == 0, slave_log.read_text()
    for log in (master_log, slave_log):
        text = log.read_text()
        assert "wrong_sender" not in text and "Traceback" not in text and "rejected" not in text, text


@pytest.mark.broker
def test_a_master_key_the_service_user_cannot_read_is_one_line_and_exit_2(root: Path, mosquitto, tmp_path: Path) -> None:
    """The layout of the old installer (master.pub in a root-only 0700 folder): no
    restart loop of tracebacks, one line and the status the unit does not restart on."""
    provide_environment(root, for_nobody=True)
    etc = root / "etc" / "fedmq"
    write_identity(Identity.generate("master"), etc / "keys")
    write_identity(Identity.generate("s1"), etc / "keys")
    (etc / "keys").chmod(0o700)
    etc.chmod(0o755)
    (etc / "keys" / "s1.broker-password").write_text("secret\n")
    (etc / "s1.toml").write_text(to_toml({
        "slave": {"id": "s1", "job": "digits", "key": f"{root}/run/credentials/{SLAVE_UNIT}/signing.key",
                  "master_key": f"{etc}/keys/master.pub", "data": "reference:0/2",
                  "state_dir": f"{root}/var/lib/fedmq/s1"},
        "broker": {**mosquitto.settings, "username": "s1@digits", "password_file": f"{root}/run/credentials/{SLAVE_UNIT}/broker-password"}}))
    (etc / "s1.toml").chmod(0o644)
    creds = systemd_credentials(root, SLAVE_UNIT, {"signing.key": etc / "keys" / "s1.key",
                                                  "broker-password": etc / "keys" / "s1.broker-password"})
    state_directory(root, "s1")
    log = tmp_path / "slave.log"
    slave = start_service(root, ["slave", "run", "--config", str(etc / "s1.toml")], creds, log)
    try:
        code = slave.wait(timeout=180)
    finally:
        stop(slave)
    lines = log.read_text().strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("fedmq: error: public key") and "permission denied" in lines[0]
