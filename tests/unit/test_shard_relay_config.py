"""What a sharded job and a relay need from the broker and their files: ACL rules, the bridge, config parsing."""

from __future__ import annotations


import pytest
from click.testing import CliRunner

from fedmq.cli import main
from fedmq.common.errors import ConfigError
from fedmq.common.jobconfig import parse_job
from fedmq.common.topics import Topics, worker_client_id
from fedmq.mosquitto_files import JobAccounts, RelayBridge, render_acl, render_bridge
from fedmq.relay.config import LOCAL_ROUNDS_UNBOUNDED, parse_relay

from .test_broker_config import acl_blocks

JOB = {"job": {"id": "digits"}, "model": {"arch": "mlp", "sizes": [64, 10]}, "enrollment": {"keys": "keys"},
       "master": {"key": "keys/master.key"}}


def test_workers_get_the_shared_updates_the_rounds_and_their_own_partial_topic():
    blocks = acl_blocks(render_acl(JobAccounts("digits", ("s1",), workers=("w1", "w2"))))
    b = "fedmq/digits"
    assert worker_client_id("w1", "digits") == "fedmq-worker-w1@digits"
    assert blocks["fedmq-worker-w1@digits"] == [
        f"topic read {b}/model/#", f"topic read {b}/round/#", f"topic read {b}/update/+",
        f"topic read {b}/collect/#", f"topic write {b}/partial/w1"]
    assert f"topic readwrite {b}/collect/#" in blocks["fedmq-master-digits"]
    assert f"topic read {b}/partial/+" in blocks["fedmq-master-digits"]
    assert not any("partial" in line or "collect" in line for line in blocks["s1@digits"])
    # an unsharded job's ACL does not mention them
    plain = render_acl(JobAccounts("digits", ("s1",)))
    assert "partial" not in plain and "collect" not in plain
    assert Topics("digits").shared_updates("g") == "$share/g/fedmq/digits/update/+"
    assert Topics("digits").parse("fedmq/digits/partial/w1") == ("partial", "w1")


def test_the_broker_config_command_writes_worker_accounts(tmp_path):
    result = CliRunner().invoke(main, ["broker", "config", "--job", "j", "--slaves", "s1", "--workers", "w1,w2",
                                       "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "passwords" / "fedmq-worker-w2@j").is_file()
    assert "user fedmq-worker-w1@j" in (tmp_path / "fedmq.acl").read_text()


def test_shard_table(tmp_path):
    cfg = parse_job({**JOB, "shard": {"workers": ["w1", "w2"], "keys": "workers"}}, tmp_path)
    assert cfg.shard is not None and cfg.shard.workers == ("w1", "w2")
    assert cfg.shard.group == "fedmq-digits" and cfg.shard.keys == tmp_path / "workers"
    assert cfg.shard.master_pub == tmp_path / "keys" / "master.pub"
    assert parse_job(JOB, tmp_path).shard is None
    for shard, match in [({"workers": ["w1"]}, "shard.keys: required"), ({"keys": "k"}, "workers: required"),
                         ({"workers": ["w1", "w1"], "keys": "k"}, "twice"),
                         ({"workers": ["w1"], "keys": "k", "group": "a/b"}, "shard.group")]:
        with pytest.raises(ConfigError, match=match):
            parse_job({**JOB, "shard": shard}, tmp_path)


def test_the_bridge_carries_exactly_the_relays_topics():
    text = render_bridge(RelayBridge("digits", "site-a", ("127.0.0.1", 1883), tls=False))
    topics = [line for line in text.splitlines() if line.startswith("topic ")]
    b = "fedmq/digits"
    assert topics == [f"topic {b}/instruction/# in 1", f"topic {b}/model/# in 1", f"topic {b}/delta in 1",
                      f"topic {b}/round/# in 1", f"topic {b}/status in 1", f"topic {b}/alive in 1",
                      f"topic {b}/to/site-a in 1", f"topic {b}/confirm/site-a out 1",
                      f"topic {b}/update/site-a out 1", f"topic {b}/presence/site-a out 1"]
    assert "remote_username site-a@digits" in text and "bridge_cafile" not in text
    tls = render_bridge(RelayBridge("digits", "site-a", ("c", 8883), cafile="/ca.crt", password="pw"))
    assert "bridge_cafile /ca.crt" in tls and "remote_password pw" in tls
    with pytest.raises(ConfigError):
        RelayBridge("digits", "site-a", ("c", 8883), certfile="c.crt")


def test_the_bridge_command_writes_a_password_only_to_a_private_file(tmp_path):
    (tmp_path / "pw").write_text("secret\n")
    out = tmp_path / "bridge.conf"
    result = CliRunner().invoke(main, ["broker", "bridge", "--job", "digits", "--relay", "site-a", "--remote",
                                       "c:8883", "--password-file", str(tmp_path / "pw"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "remote_password secret" in out.read_text() and out.stat().st_mode & 0o777 == 0o600
    assert "secret" not in result.output


RELAY = {**JOB, "job": {"id": "digits-site-a"},
         "relay": {"id": "site-a", "key": "keys/site-a.key", "upstream_job": "digits",
                   "upstream_master_key": "keys/central.pub", "exchange_rounds": 2},
         "upstream_broker": {"host": "central.example.org", "port": 8883, "tls": True}}


def test_relay_file(tmp_path):
    cfg = parse_relay(RELAY, tmp_path, {"FEDMQ_RELAY_EXCHANGE_SAMPLES": "500", "FEDMQ_UPSTREAM_BROKER_PORT": "9883"})
    assert cfg.down.job == "digits-site-a" and cfg.down.rounds == LOCAL_ROUNDS_UNBOUNDED
    assert (cfg.up.slave_id, cfg.up.job, cfg.up.update_kinds, cfg.up.tasks) == ("site-a", "digits", ("delta",),
                                                                                ("digits-site-a",))
    assert cfg.up.master_key == tmp_path / "keys" / "central.pub" and cfg.up.broker.port == 9883
    assert (cfg.exchange_rounds, cfg.exchange_samples) == (2, 500)
    for bad, match in [({"relay": {**RELAY["relay"], "upstream_job": "digits-site-a"}}, "topic base"),
                       ({"relay": {**RELAY["relay"], "exchange_rounds": 0}}, "out of range"),
                       ({"relay": {**RELAY["relay"], "color": "red"}}, "unknown key"),
                       ({"job": {"id": "digits-site-a", "target_accuracy": 0.9}}, "does not finish")]:
        with pytest.raises(ConfigError, match=match):
            parse_relay({**RELAY, **bad}, tmp_path)
    with pytest.raises(ConfigError, match="relay: required"):
        parse_relay(JOB, tmp_path)


def _job_file(tmp_path, **tables) -> str:
    from fedmq.demo import to_toml

    path = tmp_path / "job.toml"
    path.write_text(to_toml({**JOB, "enrollment": {"keys": str(tmp_path)}, **tables}))
    return str(path)


def test_worker_and_root_refuse_what_cannot_be_sharded_with_one_line(tmp_path):
    from fedmq.common.keys import Identity, write_identity

    write_identity(Identity.generate("master"), tmp_path / "keys")
    runner = CliRunner()
    plain = runner.invoke(main, ["worker", "-c", _job_file(tmp_path), "--id", "w1"])
    assert plain.exit_code == 2 and "no [shard] table" in plain.output
    shard = {"shard": {"workers": ["w1"], "keys": "keys"}}
    stranger = runner.invoke(main, ["worker", "-c", _job_file(tmp_path, **shard), "--id", "w9"])
    assert stranger.exit_code == 2 and "not one of [shard] workers" in stranger.output
    median = _job_file(tmp_path, **shard, strategy={"name": "fedavg", "rule": "median"})
    for argv in (["worker", "-c", median, "--id", "w1"], ["master", "run", "-c", median]):
        result = runner.invoke(main, argv)
        assert result.exit_code == 2 and "not a sum" in result.output and "Traceback" not in result.output, argv
    fedbuff = runner.invoke(main, ["worker", "-c", _job_file(tmp_path, **shard, strategy={"name": "fedbuff"}),
                                   "--id", "w1"])
    assert fedbuff.exit_code == 2 and "asynchronous" in fedbuff.output


def test_the_composed_cores_offer_everything_the_master_daemon_uses():
    """The root's and the relay's cores stand in for a MasterCore in the master daemon:
    every attribute the daemon reads off its core must be there (a new one fails here,
    not in a process-level test)."""
    import re
    from pathlib import Path

    from fedmq.master.composed import ComposedMaster

    daemon = (Path(__file__).resolve().parents[2] / "master" / "daemon.py").read_text()
    used = set(re.findall(r"self\.core\.([a-z_]+)", daemon))
    assert used and not sorted(n for n in used if not hasattr(ComposedMaster, n))
