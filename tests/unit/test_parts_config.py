"""Job files with model parts: `[distill]` and `[multitask]` are checked at `fedmq master run`,
and a mistake is one line naming the key (exit 2), before anything connects."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from fedmq.cli import main
from fedmq.common.errors import ConfigError
from fedmq.common.jobconfig import parse_job, parse_slave
from fedmq.common.keys import Identity, write_identity
from fedmq.common.modelspec import build_model
from fedmq.demo import to_toml
from fedmq.master.jobmodel import write_weights

TEACHER = {"arch": "mlp", "sizes": [64, 32, 10], "seed": 0}
BASE = {"job": {"id": "j"}, "model": TEACHER, "enrollment": {"mode": "open"}, "master": {"key": "m.key"}}
DISTILL = {"job": {"id": "j", "update": "student"},
           "distill": {"teacher": "t.cbor", "students": {"half": {"arch": "mlp", "sizes": [64, 16, 10]}}}}
MULTITASK = {"model": {"arch": "mlp", "sizes": [64, 32], "relu_last": True},
             "multitask": {"tasks": ["digit", "parity"], "heads": {"digit": {"arch": "mlp", "sizes": [32, 10]},
                                                                    "parity": {"arch": "mlp", "sizes": [32, 2]}}}}


def job(*overrides: dict) -> dict:
    data: dict = {k: dict(v) for k, v in BASE.items()}
    for over in overrides:
        for section, values in over.items():
            data[section] = {**data.get(section, {}), **values}
    return data


def test_good_job_files_parse():
    cfg = parse_job(job(DISTILL), Path("/x"))
    assert cfg.distill.teacher == Path("/x/t.cbor") and list(cfg.distill.students) == ["half"]
    cfg = parse_job(job(MULTITASK), Path("/x"))
    assert cfg.multitask.tasks == ("digit", "parity") and cfg.multitask.min_queue == 0
    assert parse_job(job(), Path("/x")).distill is None
    slave = parse_slave({"slave": {"id": "s", "job": "j", "key": "k", "master_key": "m", "data": "d.npz",
                                   "student": "half"}}, Path("/x"))
    assert slave.student == "half"


@pytest.mark.parametrize("data, message", [
    (job({"job": {"update": "student"}}), "distill.students: required with job.update = \"student\""),
    (job(DISTILL, {"distill": {"teacher": None}}), "distill.teacher: required with job.update"),
    (job({"distill": DISTILL["distill"]}), "distill: only used with job.update = \"student\""),
    (job(DISTILL, {"distill": {"students": {"a.b": TEACHER}}}), "distill.students.a.b: 'a.b' must be"),
    (job(MULTITASK, {"multitask": {"heads": {**MULTITASK["multitask"]["heads"], "speech": TEACHER}}}),
     "multitask.heads.speech: names no task of multitask.tasks (digit, parity)"),
    (job(MULTITASK, {"multitask": {"heads": {"digit": TEACHER}}}),
     "multitask.tasks: task 'parity' has no head (add [multitask.heads.parity])"),
    (job(MULTITASK, {"multitask": {"tasks": []}}), "multitask.tasks: required with [multitask.heads]"),
    (job(MULTITASK, {"job": {"update": "gradient"}}), "job.update: a [multitask] job trains with \"delta\""),
    (job(MULTITASK, DISTILL), "job.update: a [multitask] job trains with \"delta\" updates, not 'student'"),
    (job(MULTITASK, {"compression": {"downlink": {"delta": True}}}), "compression.downlink.delta: not supported"),
])
def test_bad_part_tables_are_one_line_naming_the_key(data, message):
    data = {k: {kk: vv for kk, vv in v.items() if vv is not None} for k, v in data.items()}
    with pytest.raises(ConfigError) as exc:
        parse_job(data, Path("/x"))
    assert str(exc.value).startswith(message) and "\n" not in str(exc.value)


@pytest.fixture
def master_dir(tmp_path: Path) -> Path:
    write_identity(Identity.generate("master"), tmp_path)
    write_weights(tmp_path / "t.cbor", build_model(TEACHER))
    return tmp_path


def run_master(where: Path, data: dict) -> tuple[int, str]:
    data = job(data, {"master": {"key": "master.key", "state_dir": "state"}, "broker": {"port": 1}})
    (where / "job.toml").write_text(to_toml(data))
    result = CliRunner().invoke(main, ["master", "run", "-c", str(where / "job.toml")])
    return result.exit_code, result.stderr


@pytest.mark.parametrize("data, message", [
    (job(DISTILL, {"distill": {"students": {"wide": {"arch": "mlp", "sizes": [64, 16, 5]}}}}),
     "distill.students.wide: outputs [N, 5], the teacher ([model]) outputs [N, 10]"),
    (job(DISTILL, {"distill": {"students": {"narrow": {"arch": "mlp", "sizes": [32, 16, 10]}}}}),
     "distill.students.narrow: takes inputs of shape [N, 32], the teacher ([model]) takes [N, 64]"),
    (job(DISTILL, {"distill": {"teacher": "missing.cbor"}}), "distill.teacher: "),
    (job(DISTILL, {"model": {"arch": "mlp", "sizes": [64, 8, 10]}}), "distill.teacher: "),
    (job(MULTITASK, {"multitask": {"heads": {"digit": {"arch": "mlp", "sizes": [16, 10]},
                                             "parity": {"arch": "mlp", "sizes": [32, 2]}}}}),
     "multitask.heads.digit: does not take the encoder's output of shape [N, 32]"),
    (job(MULTITASK, {"strategy": {"name": "fedbuff"}}), "strategy.name: 'fedbuff' is asynchronous"),
])
def test_fedmq_master_run_refuses_parts_that_do_not_fit(master_dir, data, message):
    code, err = run_master(master_dir, data)
    assert code == 2, err
    assert err.startswith(f"fedmq: error: {message}") and len(err.strip().splitlines()) == 1, err


def test_the_readme_examples_of_parts_parse_when_uncommented():
    """README's job.toml shows [distill] and [multitask] commented out: as a user would
    uncomment them (each with [model] to match), they load."""
    import re
    import tomllib

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()

    def table(name: str) -> dict:
        text = re.search(rf"^\[{name}\][^\n]*\n(.*?)\n\n", readme, flags=re.S | re.M).group(1)
        lines = [re.sub(r"^# (\S.*?)\s+#.*$", r"\1", line) for line in text.splitlines() if not line.startswith("#  ")]
        return tomllib.loads("\n".join(line for line in lines if not line.startswith("#")))

    distill = parse_job(job({"job": {"update": "student"}, "distill": table("distill")}), Path("/x"))
    assert list(distill.distill.students) == ["same", "half"] and distill.distill.teacher == Path("/x/teacher.cbor")
    multitask = parse_job(job({"model": MULTITASK["model"] | {"sizes": [64, 128]}, "multitask": table("multitask")}),
                          Path("/x"))
    assert multitask.multitask.tasks == ("digit", "parity")
