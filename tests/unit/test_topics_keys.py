"""Topic names (common/topics.py), key files (common/keys.py) and `fedmq keys`.

Guards that every topic builds and parses back, that ids which would act as MQTT
wildcards or extra levels are refused, that key files are created private and
refused when they are not, and that the CLI reports user errors as one line and
exit status 2, never as a traceback.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from fedmq.cli import main
from fedmq.common.errors import ConfigError
from fedmq.common.keys import Identity, KeyRing, key_id, load_identity, load_public_key, write_identity
from fedmq.common.topics import (DIRECT, MASTER_TOPICS, SLAVE_TOPICS, TOPIC_ROLES, Topics, check_id, chunk_topic,
                                 split_chunk_topic)

BAD_IDS = ["a/b", "a+", "+", "#", "a#", "", "a b", "-lead", ".", "x" * 65, "ü", "a\x00", "abc\n", "\n"]


# ------------------------------------------------------------------ topics


@pytest.mark.parametrize("prefix", ["fedmq", "site/a/fedmq"])
def test_every_topic_builds_and_parses_back(prefix: str) -> None:
    t = Topics("digits-1", prefix=prefix)
    for name in MASTER_TOPICS:
        topic = t.master(name)
        assert topic == f"{prefix}/digits-1/{name}"
        assert t.parse(topic) == (name, None)
    for name in SLAVE_TOPICS:
        topic = t.slave(name, "slave_7.b")
        assert topic == f"{prefix}/digits-1/{name}/slave_7.b"
        assert t.parse(topic) == (name, "slave_7.b")
        assert t.slaves(name) == f"{prefix}/digits-1/{name}/+"
    assert t.parse(t.direct("s1")) == (DIRECT, "s1")
    assert t.everything == f"{prefix}/digits-1/#"
    # the parts of a model that has parts: model/PART, retained and chunked like model itself
    assert t.model_part("heads.digit") == f"{prefix}/digits-1/model/heads.digit"
    assert t.parse(t.model_part("heads.digit")) == ("model", "heads.digit")
    assert t.retained_chunked(t.model_part("teacher")) and t.retained_chunked(t.master("round"))
    assert not t.retained_chunked(t.direct("s1")) and not t.retained_chunked(t.master("status"))
    assert all(r.chunked for r in TOPIC_ROLES if r.keyed)  # the ACL's NAME/# rights cover NAME/KEY too


def test_parse_rejects_foreign_and_malformed_topics() -> None:
    t = Topics("job")
    for topic in ["fedmq/other/model", "fedmq/job", "fedmq/job/", "fedmq/job/bogus", "fedmq/job/update",
                  "fedmq/job/update/a/b", "fedmq/job/update/+", "fedmq/job/model/chunk", "fedmq/job/model/a/b",
                  "fedmq/job/round/x", "fedmqx/job/model",
                  "fedmq/job/status/s1", "fedmq/job/update/s1\n", "fedmq/job/model\n"]:
        assert t.parse(topic) is None, topic


def test_retained_chunk_topics_map_back_to_the_signed_topic() -> None:
    t = Topics("job")
    for topic in [t.master("model"), t.master("instruction"), t.direct("s1")]:
        for i in (0, 7, 123):
            assert chunk_topic(topic, i) == f"{topic}/chunk/{i}"
            assert split_chunk_topic(chunk_topic(topic, i)) == topic
        assert split_chunk_topic(topic) == topic
    # only a trailing chunk/<number> is a chunk suffix
    for topic in ["fedmq/job/update/chunk", "fedmq/job/chunk/x", "fedmq/job/model/chunk/", "fedmq/job/model/chunk/1/2"]:
        assert split_chunk_topic(topic) == topic


@pytest.mark.parametrize("bad", BAD_IDS, ids=repr)
def test_ids_that_are_not_one_tame_topic_level_are_rejected(bad: str) -> None:
    with pytest.raises(ConfigError):
        Topics(bad)
    with pytest.raises(ConfigError):
        Topics("job").slave("update", bad)
    with pytest.raises(ConfigError):
        Topics("job").direct(bad)
    with pytest.raises(ConfigError):
        check_id(bad, "slave id")


@pytest.mark.parametrize("prefix", ["a/+", "#", "a//b", "/a", "a/", "", "a b", "a/b\n"])
def test_prefix_must_not_contain_wildcards_or_empty_levels(prefix: str) -> None:
    with pytest.raises(ConfigError):
        Topics("job", prefix=prefix)


def test_check_id_accepts_the_id_alphabet() -> None:
    assert check_id("A-z_0.9", "slave id") == "A-z_0.9"
    assert check_id("x" * 64, "slave id") == "x" * 64


# ------------------------------------------------------------------ key files


def test_write_identity_creates_a_private_key_and_a_public_key(tmp_path: Path) -> None:
    ident = Identity.generate("slave-01")
    key, pub = write_identity(ident, tmp_path / "keys")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert load_identity(key).kid == ident.kid == key_id(load_public_key(pub))
    assert load_identity(key).name == "slave-01"
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        write_identity(Identity.generate("slave-01"), tmp_path / "keys")
    write_identity(Identity.generate("slave-01"), tmp_path / "keys", overwrite=True)
    assert load_identity(key).kid != ident.kid


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o700 | 0o070])
def test_a_private_key_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    key, _ = write_identity(Identity.generate("m"), tmp_path)
    os.chmod(key, mode)
    with pytest.raises(ConfigError) as exc:
        load_identity(key)
    assert "chmod 600" in str(exc.value) and str(key) in str(exc.value)


def test_missing_or_invalid_key_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_identity(tmp_path / "nope.key")
    bad = tmp_path / "bad.key"
    bad.write_bytes(b"not a key")
    bad.chmod(0o600)
    with pytest.raises(ConfigError):
        load_identity(bad)
    with pytest.raises(ConfigError):
        load_public_key(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_public_key(tmp_path / "nope.pub")


def test_keyring_from_directory_names_keys_by_file_stem(tmp_path: Path) -> None:
    a, b = Identity.generate("a"), Identity.generate("b")
    write_identity(a, tmp_path)
    write_identity(b, tmp_path)
    ring = KeyRing.from_dir(tmp_path)
    assert ring.names() == ["a", "b"] and len(ring) == 2
    assert ring.lookup(a.kid)[0] == "a" and b.kid in ring
    assert ring.lookup(b"\x00" * 16) is None
    with pytest.raises(ConfigError):
        KeyRing.from_dir(tmp_path / "missing")


# ------------------------------------------------------------------ `fedmq keys`


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def assert_user_error(result: Result, *words: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedmq: error: "), result.stderr
    assert "Traceback" not in result.output + result.stderr
    for w in words:
        assert w in lines[0]


def test_keys_generate_writes_a_0600_key_and_a_pub(tmp_path: Path) -> None:
    result = run("keys", "generate", "slave-01", "--dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    key, pub = tmp_path / "slave-01.key", tmp_path / "slave-01.pub"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in key.read_bytes() and b"PUBLIC KEY" in pub.read_bytes()
    kid = load_identity(key).kid.hex()
    assert f"kid {kid}" in result.output


def test_keys_generate_refuses_to_overwrite(tmp_path: Path) -> None:
    assert run("keys", "generate", "m", "--dir", str(tmp_path)).exit_code == 0
    before = (tmp_path / "m.key").read_bytes()
    assert_user_error(run("keys", "generate", "m", "--dir", str(tmp_path)), "refusing to overwrite")
    assert (tmp_path / "m.key").read_bytes() == before
    assert run("keys", "generate", "m", "--dir", str(tmp_path), "--force").exit_code == 0
    assert (tmp_path / "m.key").read_bytes() != before


@pytest.mark.parametrize("bad", ["a/b", "+", "#"])
def test_keys_generate_refuses_names_that_are_not_ids(tmp_path: Path, bad: str) -> None:
    assert_user_error(run("keys", "generate", bad, "--dir", str(tmp_path)), "key name")
    assert list(tmp_path.iterdir()) == []


def test_keys_show_prints_the_kid_of_both_files(tmp_path: Path) -> None:
    run("keys", "generate", "m", "--dir", str(tmp_path))
    kid = load_identity(tmp_path / "m.key").kid.hex()
    for name in ("m.key", "m.pub"):
        result = run("keys", "show", str(tmp_path / name))
        assert result.exit_code == 0 and result.output.strip() == kid


@pytest.mark.parametrize("mode", [0o640, 0o604])
def test_keys_show_refuses_a_readable_private_key_in_one_line(tmp_path: Path, mode: int) -> None:
    run("keys", "generate", "m", "--dir", str(tmp_path))
    (tmp_path / "m.key").chmod(mode)
    assert_user_error(run("keys", "show", str(tmp_path / "m.key")), "chmod 600")


def test_keys_show_of_missing_or_garbage_files_is_a_one_line_error(tmp_path: Path) -> None:
    assert_user_error(run("keys", "show", str(tmp_path / "missing.pub")))
    (tmp_path / "junk.pub").write_text("hello\n")
    assert_user_error(run("keys", "show", str(tmp_path / "junk.pub")))
