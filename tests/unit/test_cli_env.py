"""FEDMQ_SECTION_KEY environment overrides: file < environment < flag, for every section."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmq.cli.run import with_broker
from fedmq.common.errors import ConfigError
from fedmq.common.jobconfig import load_job, load_slave, tool_broker

JOB = """
[job]
id = "digits"
rounds = 30
[model]
arch = "mlp"
sizes = [64, 16, 10]
[train]
lr = 0.1
[strategy]
name = "fedavg"
[rounds]
deadline = 60.0
[enrollment]
mode = "open"
[master]
key = "master.key"
[broker]
host = "file-host"
port = 1000
"""

SLAVE = """
[slave]
id = "s1"
job = "digits"
key = "s1.key"
master_key = "master.pub"
data = "reference:0/8"
[broker]
port = 1000
"""


@pytest.fixture
def job(tmp_path: Path) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(JOB)
    return path


@pytest.fixture
def slave(tmp_path: Path) -> Path:
    path = tmp_path / "slave.toml"
    path.write_text(SLAVE)
    return path


def test_file_then_environment_then_flag(job: Path, slave: Path, tmp_path: Path) -> None:
    cfg = load_job(job, {})
    assert (cfg.rounds, cfg.train.lr, cfg.policy.deadline, cfg.broker.port) == (30, 0.1, 60.0, 1000)
    env = {"FEDMQ_JOB_ROUNDS": "5", "FEDMQ_TRAIN_LR": "0.05", "FEDMQ_ROUNDS_DEADLINE": "30",
           "FEDMQ_ROUNDS_START_WAIT": "2.5", "FEDMQ_STRATEGY_NAME": "fedadam", "FEDMQ_MODEL_SIZES": "[64, 32, 10]",
           "FEDMQ_ENROLLMENT_MODE": "allowlist", "FEDMQ_ENROLLMENT_KEYS": "allow",
           "FEDMQ_MASTER_STATE_DIR": "/srv/state", "FEDMQ_BROKER_PORT": "2000", "FEDMQ_BROKER_TLS": "true"}
    cfg = load_job(job, env)
    assert cfg.rounds == 5 and cfg.train.lr == 0.05 and cfg.policy.deadline == 30.0 and cfg.policy.start_wait == 2.5
    assert cfg.strategy == {"name": "fedadam"} and cfg.model["sizes"] == [64, 32, 10]
    assert cfg.enrollment == "allowlist" and cfg.slave_keys == (tmp_path / "allow").resolve()  # as in the file
    assert cfg.state_dir == Path("/srv/state") and cfg.broker.port == 2000 and cfg.broker.uses_tls
    assert cfg.broker.host == "file-host"  # untouched keys keep the file's value
    flagged = with_broker(cfg, ("flag-host", 3000))
    assert (flagged.broker.host, flagged.broker.port) == ("flag-host", 3000)

    scfg = load_slave(slave, {"FEDMQ_SLAVE_DATA": "/data/x.npz", "FEDMQ_SLAVE_TASKS": '["digits", "mnist"]',
                              "FEDMQ_SLAVE_SLOWDOWN": "2", "FEDMQ_BROKER_PORT": "2000",
                              "FEDMQ_BROKER_USERNAME": "s1@digits"})
    assert scfg.data == "/data/x.npz" and scfg.tasks == ("digits", "mnist") and scfg.slowdown == 2.0
    assert scfg.broker.port == 2000 and scfg.broker.username == "s1@digits"
    assert with_broker(scfg, ("h", 3000)).broker.port == 3000


def test_the_process_environment_is_read(job: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDMQ_ROUNDS_QUORUM", "3")
    assert load_job(job).policy.quorum == 3


def test_strings_stay_strings(slave: Path, tmp_path: Path) -> None:
    """A password or an id that looks like a number or a boolean is still text."""
    secret = tmp_path / "pw"
    secret.write_text("x")
    cfg = load_slave(slave, {"FEDMQ_BROKER_USERNAME": "007", "FEDMQ_BROKER_PASSWORD": "123456",
                             "FEDMQ_SLAVE_ID": "1234", "FEDMQ_SLAVE_KEY": '"quoted.key"'})
    assert cfg.broker.username == "007" and cfg.broker.password == "123456" and cfg.slave_id == "1234"
    assert cfg.key.name == "quoted.key"  # a TOML string is unquoted


@pytest.mark.parametrize("var, value, message", [
    ("FEDMQ_ROUNDS_DEADLINE", "soon", "FEDMQ_ROUNDS_DEADLINE: expected float, got 'soon'"),
    ("FEDMQ_ROUNDS_DEADLINE", "-1", "FEDMQ_ROUNDS_DEADLINE: -1.0 is out of range"),
    ("FEDMQ_JOB_ROUNDS", "0", "FEDMQ_JOB_ROUNDS: 0 is out of range"),
    ("FEDMQ_JOB_UPDATE", "weights", "FEDMQ_JOB_UPDATE: 'weights' is out of range"),
    ("FEDMQ_TRAIN_EPOCHS", "[1]", "FEDMQ_TRAIN_EPOCHS: expected int, got [1]"),
    ("FEDMQ_BROKER_PORT", "http", "FEDMQ_BROKER_PORT: expected int, got 'http'"),
    ("FEDMQ_BROKER_PORT", "99999", "port must be 1..65535, not 99999 (from the environment: FEDMQ_BROKER_PORT)"),
    ("FEDMQ_ROUNDS_DEADLIN", "3", "FEDMQ_ROUNDS_DEADLIN: unknown key rounds.deadlin"),
    ("FEDMQ_BROKER_PROT", "5", "FEDMQ_BROKER_PROT: unknown key broker.prot"),
])
def test_bad_values_name_the_variable(job: Path, var: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_job(job, {var: value})
    assert message in str(info.value)


def test_other_sections_and_variables_are_ignored(job: Path, slave: Path) -> None:
    """A shared environment (one env file for a master and its slaves) is fine: a job file
    ignores FEDMQ_SLAVE_*, a slave file FEDMQ_ROUNDS_*, and neither reads other names."""
    env = {"FEDMQ_SLAVE_DATA": "x", "FEDMQ_PASSWORD": "x", "FEDMQ": "x", "FEDMQ_ROUNDS_QUORUM": "2"}
    assert load_job(job, env).policy.quorum == 2
    assert load_slave(slave, env).data == str(slave.parent / "x")  # relative to the file, as if written there


def test_tools_read_the_broker_variables_and_flags_win(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("from-file\n")
    env = {"FEDMQ_BROKER_HOST": "env-host", "FEDMQ_BROKER_PORT": "2000", "FEDMQ_BROKER_USERNAME": "fedmq-monitor",
           "FEDMQ_BROKER_PASSWORD": "from-env"}
    cfg = tool_broker({}, env)
    assert (cfg.host, cfg.port, cfg.username, cfg.password) == ("env-host", 2000, "fedmq-monitor", "from-env")
    cfg = tool_broker({"host": "flag-host", "port": 3000, "password_file": str(pw)}, env)
    assert (cfg.host, cfg.port, cfg.password) == ("flag-host", 3000, "from-file")
    assert tool_broker({"tls": True}, {}).port == 8883  # TLS without a port: 8883
