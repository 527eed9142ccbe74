"""Broken configuration files: the daemons exit non-zero with one line naming the problem."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from fedmq.cli import main
from fedmq.common.errors import ConfigError
from fedmq.common.jobconfig import load_job, load_slave

GOOD_JOB = """
[job]
id = "digits"
[model]
arch = "mlp"
sizes = [64, 16, 10]
[enrollment]
mode = "open"
[master]
key = "master.key"
"""

GOOD_SLAVE = """
[slave]
id = "s1"
job = "digits"
key = "s1.key"
master_key = "master.pub"
data = "reference:0/8"
"""


def run(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(main, args)
    return result.exit_code, result.output


@pytest.mark.parametrize("text, fragment", [
    (GOOD_JOB + "\n[train]\nlrr = 0.1\n", "train.lrr: unknown key"),
    (GOOD_JOB.replace('id = "digits"', 'id = "a/b"'), "job.id"),
    (GOOD_JOB + "\n[train]\nepochs = \"two\"\n", "train.epochs: expected int"),
    (GOOD_JOB.replace('mode = "open"', 'mode = "allowlist"'), "enrollment.keys: required"),
    (GOOD_JOB + "\n[broker]\nport = 99999\n", "broker"),
    (GOOD_JOB.replace("[job]", "[jobs]"), "job.id: required"),
    ("[job\nid=1", "not valid TOML"),
])
def test_bad_job_file_is_one_line_and_exit_2(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "job.toml"
    path.write_text(text)
    code, out = run(["master", "run", "--config", str(path)])
    assert code == 2
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedmq: error:") and fragment in lines[0], out
    assert "Traceback" not in out


def test_missing_files_are_named(tmp_path: Path) -> None:
    code, out = run(["master", "run", "--config", str(tmp_path / "nope.toml")])
    assert code == 2 and "nope.toml does not exist" in out
    job = tmp_path / "job.toml"
    job.write_text(GOOD_JOB)
    code, out = run(["master", "run", "--config", str(job)])  # master.key does not exist
    assert code == 2 and "master.key does not exist" in out and len(out.strip().splitlines()) == 1


def test_bad_slave_file(tmp_path: Path) -> None:
    path = tmp_path / "slave.toml"
    path.write_text(GOOD_SLAVE.replace('data = "reference:0/8"', ""))
    code, out = run(["slave", "run", "--config", str(path)])
    assert code == 2 and "slave.data: required" in out
    path.write_text(GOOD_SLAVE + 'slowdown = 0.5\n')
    code, out = run(["slave", "run", "--config", str(path)])
    assert code == 2 and "slave.slowdown" in out
    path.write_text(GOOD_SLAVE)
    code, out = run(["slave", "run", "--config", str(path)])  # s1.key does not exist
    assert code == 2 and "s1.key does not exist" in out


def test_good_files_parse_with_paths_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "job.toml").write_text(GOOD_JOB)
    cfg = load_job(tmp_path / "job.toml")
    assert cfg.master_key == (tmp_path / "master.key").resolve() and cfg.enrollment == "open"
    assert cfg.train.lr == 0.1 and cfg.policy.deadline == 60.0 and cfg.broker.port == 1883
    (tmp_path / "job.toml").write_text(GOOD_JOB + 'eval = "data/test.npz"\n')  # in [master]
    assert load_job(tmp_path / "job.toml").eval_data == str((tmp_path / "data" / "test.npz").resolve())
    (tmp_path / "job.toml").write_text(GOOD_JOB + 'eval = "reference:test"\n')
    assert load_job(tmp_path / "job.toml").eval_data == "reference:test"
    (tmp_path / "slave.toml").write_text(GOOD_SLAVE)
    scfg = load_slave(tmp_path / "slave.toml")
    assert scfg.data == "reference:0/8" and scfg.key == (tmp_path / "s1.key").resolve()
    with pytest.raises(ConfigError):
        load_slave(tmp_path / "job.toml")


@pytest.mark.parametrize("value, ok", [("0", True), ("0.25", True), ("1", True), ("1.5", False), ("-0.1", False),
                                       ("nan", False), ('"often"', False)])
def test_slave_disconnect_rate_is_a_probability(tmp_path: Path, value: str, ok: bool) -> None:
    path = tmp_path / "slave.toml"
    path.write_text(GOOD_SLAVE)
    assert load_slave(path).disconnect_rate == 0.0  # no chaos unless asked for
    path.write_text(GOOD_SLAVE + f"disconnect_rate = {value}\n")
    if ok:
        assert load_slave(path).disconnect_rate == float(value)
    else:
        with pytest.raises(ConfigError, match="slave.disconnect_rate"):
            load_slave(path)
