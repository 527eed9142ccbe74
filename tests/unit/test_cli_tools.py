"""The watching tools without a broker: HOST:PORT, status verdicts, key trees, captured files, failure reports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedmq.cli import main
from fedmq.cli.monitor import summarize as monitor_line
from fedmq.cli.options import parse_host_port
from fedmq.cli.status import STALE_AFTER, render, summarize
from fedmq.common import messages
from fedmq.common.channel import Inbox
from fedmq.common.errors import ConfigError
from fedmq.common.keys import Identity, KeyRing, write_identity
from fedmq.common.transport import FailureReport, Inbound

VECTORS = Path(__file__).resolve().parents[2] / "docs" / "vectors"
NOW = 1_800_000_000.0


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:1883", ("127.0.0.1", 1883)), ("broker.example:8883", ("broker.example", 8883)),
    ("[::1]:1883", ("::1", 1883)),
])
def test_host_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text) == expected


@pytest.mark.parametrize("text", ["1883", ":1883", "host:", "host:port", "host:0", "host:65536", ""])
def test_not_host_port(text: str) -> None:
    with pytest.raises(ValueError, match="is not HOST:PORT"):
        parse_host_port(text)


def test_every_broker_flag_takes_the_same_host_port() -> None:
    for args in (["status", "--broker", "nope"], ["monitor", "--job", "j", "--keys", ".", "--broker", "nope"],
                 ["master", "run", "-c", "x.toml", "--broker", "nope"], ["demo", "--broker", "nope"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and "'nope' is not HOST:PORT" in result.output, (args, result.output)


def _status(**over) -> dict:
    status = {"job": "digits", "state": "training", "version": 4, "round": 5, "rounds": 30, "last_accuracy": 0.8,
              "slaves": {"a": {"enrolled": True, "online": True}, "b": {"enrolled": True, "online": False},
                         "c": {"enrolled": False, "online": True}},
              "rejected": {"replay": 2, "bad_signature": 5, "malformed": 1, "wrong_topic": 1}, "updated": NOW - 3}
    return {**status, **over}


def test_status_verdicts() -> None:
    alive = {"job": "digits", "alive": True, "since": NOW - 100}
    row = summarize("digits", _status(), alive, NOW)
    assert row["master"] == "alive" and not row["gone"] and row["age_seconds"] == 3
    assert (row["slaves_online"], row["slaves_enrolled"], row["rejected"]) == (1, 2, 9)
    assert list(row["rejected_by_reason"]) == ["bad_signature", "replay", "malformed", "wrong_topic"]
    gone = summarize("digits", _status(), {**alive, "alive": False}, NOW)
    assert gone["gone"] and "alive: false" in gone["why"]
    stale = summarize("digits", _status(updated=NOW - STALE_AFTER - 1), alive, NOW)
    assert stale["gone"] and "not updated for 31 s" in stale["why"]
    no_alive_topic = summarize("digits", _status(), None, NOW)
    assert no_alive_topic["master"] == "alive"
    finished = summarize("digits", _status(state="finished", updated=NOW - 3600), {**alive, "alive": False}, NOW)
    assert finished["master"] == "finished" and not finished["gone"]
    starting = summarize("digits", None, alive, NOW)
    assert starting["master"] == "starting" and not starting["gone"]
    table = render([row, gone]).splitlines()
    assert table[0].split() == ["JOB", "MASTER", "STATE", "ROUND", "VERSION", "ACCURACY", "SLAVES", "REJECTED", "AGE"]
    assert "digits  alive" in table[1] and "5/30" in table[1] and "1/2 online" in table[1]
    assert "9 (bad_signature 5, replay 2, malformed 1)" in table[1] and "wrong_topic" not in table[1]
    assert "gone" in table[2]


def _documented_layout(root: Path) -> Path:
    """keys/master.pub beside keys/slaves/NAME.pub, as README and OPERATIONS show it."""
    keys = root / "keys"
    (keys / "slaves").mkdir(parents=True)
    for pub in VECTORS.glob("*.pub"):
        shutil.copy(pub, keys / ("" if pub.stem == "master" else "slaves") / pub.name)
    return keys


def test_monitor_verifies_the_documented_key_layout(tmp_path: Path) -> None:
    keys = _documented_layout(tmp_path)
    assert len(KeyRing.from_dir(keys)) == 1  # the flat reading sees only master.pub: slaves were unknown_kid
    inbox = Inbox(KeyRing.from_tree(keys), "digits", self_signed=messages.SELF_SIGNED_KINDS)
    index = json.loads((VECTORS / "index.json").read_text())
    for entry in index:
        line = monitor_line(inbox, Inbound(entry["topic"], (VECTORS / entry["file"]).read_bytes(), 1, False, 1), 0.0)
        if line is not None:
            assert line["verified"] is True, line
    assert {e["public_key"] for e in index} - {"master.pub"}, "the vectors include slave messages"


def test_a_key_tree_refuses_two_keys_for_one_name(tmp_path: Path) -> None:
    write_identity(Identity.generate("dev-01"), tmp_path / "a")
    write_identity(Identity.generate("dev-01"), tmp_path / "b")
    with pytest.raises(ConfigError, match="different keys for one name 'dev-01'"):
        KeyRing.from_tree(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        KeyRing.from_tree(tmp_path / "nope")


def test_decode_a_capture_with_a_trailing_newline(tmp_path: Path) -> None:
    keys = _documented_layout(tmp_path)
    entry = next(e for e in json.loads((VECTORS / "index.json").read_text()) if e["kind"] == "delta")  # one file, with tensors
    capture = tmp_path / "capture.bin"
    capture.write_bytes((VECTORS / entry["file"]).read_bytes() + b"\n")  # mosquitto_sub without -N
    result = CliRunner().invoke(main, ["decode", str(capture), "--topic", entry["topic"], "--keys", str(keys)])
    assert result.exit_code == 0, result.output
    assert "ends with a newline" in result.stderr and "-N" in result.stderr
    assert json.loads(result.stdout)["verified"] is True
    capture.write_bytes(b"\xa1junk\n")
    result = CliRunner().invoke(main, ["decode", str(capture), "--topic", entry["topic"], "--keys", str(keys)])
    assert result.exit_code == 1 and "capture with mosquitto_sub -N" in result.stdout


def test_failure_reports_are_bounded_but_repeated() -> None:
    report = FailureReport(60.0)
    assert report.due("not authorized", 0.0) == 1  # the first one at once
    assert [report.due("not authorized", t) for t in (0.2, 0.6, 1.4, 3.0, 30.0)] == [None] * 5
    assert report.due("not authorized", 60.0) == 6  # again after the interval, with the count since
    assert report.due("connection refused", 61.0) == 1  # a different failure at once
    assert report.due("connection refused", 62.0) is None
    report.clear()  # connected: the next failure is news
    assert report.due("connection refused", 63.0) == 1
