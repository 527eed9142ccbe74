"""The documented field lists say what the code does: README's config keys, PROTOCOL's status and metrics.

A key the code reads but the README does not show, or a status field the master sends
that PROTOCOL.md section 10 does not list (or the reverse), fails here.
"""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from fedmq.common import jobconfig
from fedmq.common.brokerconfig import BrokerConfig
from fedmq.common.compression_settings import preset
from fedmq.common.modelspec import build_model
from fedmq.common.partsconfig import DistillConfig
from fedmq.common.privacy_settings import DPSettings
from fedmq.master.jobmodel import write_weights

ROOT = Path(__file__).resolve().parents[2]
UNCHECKED = {"model", "strategy", "compression", "privacy"}  # tables with parsers of their own (which name the key)


def _toml_block(text: str, after: str) -> str:
    start = text.index(after)
    return text[text.index("```toml", start) + 7: text.index("```", text.index("```toml", start) + 7)]


def _documented_keys(block: str) -> dict[str, set[str]]:
    """Section -> keys shown in a README TOML block, commented-out ones included."""
    keys: dict[str, set[str]] = {}
    section = ""
    for line in block.splitlines():
        if m := re.match(r"^\[(\w+)\]", line):
            section = m.group(1)
            keys.setdefault(section, set())
        elif m := re.match(r"^#? ?([a-z_0-9]+) *=", line):
            keys[section].add(m.group(1))
    return keys


def _read_keys(parse, data: dict) -> dict[str, set[str]]:
    """Section -> every key the parser asks for (by watching `_Table.get`)."""
    asked: dict[str, set[str]] = {}
    original = jobconfig._Table.get

    def spy(self, key, *args, **kwargs):
        asked.setdefault(self.path, set()).add(key)
        return original(self, key, *args, **kwargs)

    jobconfig._Table.get = spy
    try:
        parse(data, ROOT)
    finally:
        jobconfig._Table.get = original
    broker = {f.name for f in fields(BrokerConfig)} | {"password_file"}
    return {**{k: v for k, v in asked.items() if k}, "broker": broker}


@pytest.mark.parametrize("which", ["job", "slave"])
def test_readme_shows_every_config_key_the_code_reads(which: str) -> None:
    readme = (ROOT / "README.md").read_text()
    if which == "job":
        documented = _documented_keys(_toml_block(readme, "`job.toml` (the master's"))
        read = _read_keys(jobconfig.parse_job, {"job": {"id": "j"}, "model": {"arch": "mlp", "sizes": [2, 2]},
                                                "enrollment": {"mode": "open"}, "master": {"key": "m.key"}})
    else:
        documented = _documented_keys(_toml_block(readme, "`slave.toml` (one per device)"))
        read = _read_keys(jobconfig.parse_slave, {"slave": {"id": "s", "job": "j", "key": "s.key",
                                                            "master_key": "m.pub", "data": "x.npz"}})
        documented["broker"] = _documented_keys(_toml_block(readme, "`job.toml` (the master's"))["broker"]  # "as in job.toml"
    for section, keys in read.items():
        assert documented.get(section, set()) == keys, f"[{section}] in README vs the code"
    assert set(documented) - UNCHECKED == set(read)


def _table_fields(text: str, heading: str) -> set[str]:
    """The `field` column of the first table after `heading`."""
    start = text.index(heading)
    rows = []
    for line in text[start:].splitlines()[1:]:
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            break
    names: set[str] = set()
    for row in rows[2:]:
        names |= set(re.findall(r"`([a-z_]+)`", row.split("|")[1]))
    return names


DISTILL_MODEL = {"arch": "mlp", "sizes": [64, 32, 10], "seed": 0}


def test_protocol_lists_exactly_the_status_and_metrics_fields_the_master_sends(fleet, tmp_path) -> None:
    protocol = (ROOT / "docs" / "PROTOCOL.md").read_text()
    sync = fleet(2, rounds=2, policy={"min_slaves": 2})
    asynchronous = fleet(2, rounds=2, strategy={"name": "fedbuff", "buffer_size": 2}, policy={"min_slaves": 2})
    private = fleet(2, rounds=2, policy={"min_slaves": 2}, privacy=DPSettings(clip_norm=1.0, noise_multiplier=0.5),
                    compression=preset("topk"))
    write_weights(tmp_path / "teacher.cbor", build_model(DISTILL_MODEL))  # a model with parts: students
    parts = fleet(2, rounds=2, policy={"min_slaves": 2}, update="student", model=DISTILL_MODEL,
                  distill=DistillConfig(tmp_path / "teacher.cbor", {"small": {"arch": "mlp", "sizes": [64, 8, 10]}}))
    status = set(sync.json["fedmq/digits/status"]) | set(private.json["fedmq/digits/status"])
    metrics = {key for bus in (sync, asynchronous, private, parts) for key in bus.json["fedmq/digits/metrics"]}
    assert _table_fields(protocol, "`PREFIX/JOB/status` (retained") == status
    assert _table_fields(protocol, "`PREFIX/JOB/metrics` (retained") == metrics


def test_the_readme_config_files_parse_as_written() -> None:
    """Pasted as shown (and with its commented-out keys uncommented), README's files load."""
    import tomllib

    readme = (ROOT / "README.md").read_text()
    for heading, parse in (("`job.toml` (the master's", jobconfig.parse_job), ("`slave.toml` (one per device)",
                                                                               jobconfig.parse_slave)):
        block = _toml_block(readme, heading)
        parse(tomllib.loads(block), ROOT)
    job = _toml_block(readme, "`job.toml` (the master's")
    compression = re.search(r"^\[compression\][^\n]*\n(.*?)\n\n", job, flags=re.S | re.M).group(1)
    uncommented = re.sub(r"^# (\S.*?)\s+#.*$", r"\1", compression, flags=re.M)
    from fedmq.common.compression_settings import parse_compression

    settings = parse_compression(tomllib.loads(uncommented.replace("[compression.", "[")))
    assert settings.uplink.topk == 0.01 and settings.downlink.delta and settings.uplink.error_feedback
