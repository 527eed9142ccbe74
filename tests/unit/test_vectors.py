"""The committed test vectors (docs/vectors/, written by tools/make_vectors.py).

Guards the wire format against silent change: every published sample must still
verify with the public key and topic listed in index.json and decode (tensors
included) through `fedmq decode`'s logic and through the CLI itself, and every
message kind in `messages.KINDS` must have a sample. Nothing is regenerated here;
if this fails after a deliberate protocol change, rerun the tool and commit.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedmq.cli import main
from fedmq.cli.decode import decode_payloads
from fedmq.common import messages
from fedmq.common.errors import ProtocolError
from fedmq.common.keys import KeyRing, load_public_key
from fedmq.common.topics import Topics

VECTORS = Path(__file__).resolve().parents[2] / "docs" / "vectors"
INDEX = json.loads((VECTORS / "index.json").read_text())


def grouped() -> dict[str, list[dict]]:
    """index.json entries by message: the chunks of one message share the name before the index."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for entry in INDEX:
        name = entry["file"].split(".")[0]
        groups[name].append(entry)
    for name, entries in groups.items():
        entries.sort(key=lambda e: e.get("chunk", [0])[0])
        first = entries[0]
        assert all((e["topic"], e["public_key"], e["kind"]) == (first["topic"], first["public_key"], first["kind"])
                   for e in entries), name
        if len(entries) > 1 or "chunk" in first:
            assert [e["chunk"] for e in entries] == [[i, len(entries)] for i in range(len(entries))], name
    return dict(groups)


GROUPS = grouped()


def keyring_of(entry: dict) -> KeyRing:
    """Only the key index.json names: the vector must verify with exactly that key."""
    ring = KeyRing()
    ring.add(Path(entry["public_key"]).stem, load_public_key(VECTORS / entry["public_key"]))
    return ring


def test_index_lists_existing_files_only_and_every_file_is_listed() -> None:
    listed = {e["file"] for e in INDEX}
    assert len(listed) == len(INDEX)
    assert listed == {p.name for p in VECTORS.glob("*.cbor")}
    assert {e["public_key"] for e in INDEX} <= {p.name for p in VECTORS.glob("*.pub")}


def test_every_message_kind_has_a_vector() -> None:
    assert set(messages.KINDS) <= {e["kind"] for e in INDEX}


def test_vectors_include_a_chunked_message() -> None:
    assert any(len(entries) > 1 for entries in GROUPS.values())


@pytest.mark.parametrize("name", sorted(GROUPS))
def test_vector_verifies_and_decodes(name: str) -> None:
    entries = GROUPS[name]
    entry = entries[0]
    payloads = [(VECTORS / e["file"]).read_bytes() for e in entries]
    summary = decode_payloads(payloads, entry["topic"], keyring_of(entry))
    assert summary["verified"] is True and summary["enrolled_key"] is True
    assert summary["kind"] == entry["kind"] and summary["topic"] == entry["topic"]
    manifest = summary["manifest"]
    assert manifest["sender"] == Path(entry["public_key"]).stem and manifest["topic"] == entry["topic"]
    assert manifest["chunks"] == len(entries)
    spec = messages.KINDS[entry["kind"]]
    topic_name = Topics(manifest["job"]).parse(entry["topic"])[0]
    assert topic_name in spec.topics
    assert set(spec.fields) <= set(summary["body"]) | {"tensors"}
    if "tensors" in spec.fields:
        assert summary["tensors"], name
        for t in summary["tensors"]:
            assert set(t) == {"name", "dtype", "shape"} and all(isinstance(d, int) for d in t["shape"])


@pytest.mark.parametrize("name", sorted(GROUPS))
def test_vector_is_rejected_on_another_topic_or_with_another_key(name: str) -> None:
    entries = GROUPS[name]
    entry = entries[0]
    payloads = [(VECTORS / e["file"]).read_bytes() for e in entries]
    with pytest.raises(ProtocolError) as exc:
        decode_payloads(payloads, entry["topic"] + "-x", keyring_of(entry))
    assert exc.value.reason in ("wrong_topic", "unknown_kid", "bad_signature")
    if entry["kind"] not in messages.SELF_SIGNED_KINDS:
        with pytest.raises(ProtocolError) as exc:
            decode_payloads(payloads, entry["topic"], KeyRing())
        assert exc.value.reason == "unknown_kid"


def test_self_signed_vectors_verify_without_any_trusted_key() -> None:
    for name, entries in GROUPS.items():
        if entries[0]["kind"] in messages.SELF_SIGNED_KINDS:
            payloads = [(VECTORS / e["file"]).read_bytes() for e in entries]
            summary = decode_payloads(payloads, entries[0]["topic"], KeyRing())
            assert summary["verified"] is True and summary["enrolled_key"] is False


def test_update_vector_tensors_match_the_generator() -> None:
    # tools/make_vectors.py: the update carries torch.full_like(w, 0.001) for an MLP 64-16-10
    entries = GROUPS["update"]  # (update-topk, update-int8, update-half: compressed forms)
    payloads = [(VECTORS / e["file"]).read_bytes() for e in entries]
    summary = decode_payloads(payloads, entries[0]["topic"], keyring_of(entries[0]))
    assert summary["tensors"] == [
        {"name": "0.weight", "dtype": "float32", "shape": [16, 64]},
        {"name": "0.bias", "dtype": "float32", "shape": [16]},
        {"name": "2.weight", "dtype": "float32", "shape": [10, 16]},
        {"name": "2.bias", "dtype": "float32", "shape": [10]},
    ]
    assert summary["body"]["kind"] == "delta" and summary["body"]["samples"] == 180


@pytest.mark.parametrize("name", sorted(GROUPS))
def test_fedmq_decode_cli_on_every_vector(name: str, tmp_path: Path) -> None:
    entries = GROUPS[name]
    entry = entries[0]
    keys = tmp_path / "keys"
    keys.mkdir()
    shutil.copy(VECTORS / entry["public_key"], keys / entry["public_key"])
    files = [str(VECTORS / e["file"]) for e in reversed(entries)]  # chunk files in any order
    result = CliRunner().invoke(main, ["decode", *files, "--topic", entry["topic"], "--keys", str(keys)])
    assert result.exit_code == 0, result.output + result.stderr
    out = json.loads(result.stdout)
    assert out["verified"] is True and out["kind"] == entry["kind"]
    assert out == decode_payloads([(VECTORS / e["file"]).read_bytes() for e in entries], entry["topic"],
                                  keyring_of(entry))


def test_fedmq_decode_cli_reports_a_rejection_as_json_and_exit_1(tmp_path: Path) -> None:
    entry = GROUPS["presence"][0]
    keys = tmp_path / "keys"
    keys.mkdir()
    shutil.copy(VECTORS / entry["public_key"], keys)
    result = CliRunner().invoke(main, ["decode", str(VECTORS / entry["file"]), "--topic", "fedmq/digits/model",
                                       "--keys", str(keys)])
    assert result.exit_code == 1
    out = json.loads(result.stdout)
    assert set(out) == {"verified", "reason", "detail"}
    assert out["verified"] is False and out["reason"] == "wrong_topic"


def test_fedmq_decode_cli_with_a_missing_chunk(tmp_path: Path) -> None:
    (entries,) = [g for g in GROUPS.values() if g[0]["kind"] == messages.MODEL and g[0]["topic"].endswith("/model")]
    result = CliRunner().invoke(main, ["decode", str(VECTORS / entries[0]["file"]), "--topic", entries[0]["topic"],
                                       "--keys", str(VECTORS)])
    assert result.exit_code == 1 and json.loads(result.stdout)["reason"] == "bad_chunk"


def test_fedmq_decode_cli_with_a_missing_key_directory_is_a_user_error(tmp_path: Path) -> None:
    entry = GROUPS["presence"][0]
    result = CliRunner().invoke(main, ["decode", str(VECTORS / entry["file"]), "--topic", entry["topic"],
                                       "--keys", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert result.stderr.startswith("fedmq: error: ") and len(result.stderr.strip().splitlines()) == 1
