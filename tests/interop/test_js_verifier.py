"""The committed test vectors verify with an independent JavaScript implementation.

`verify_vectors.mjs` was written from docs/PROTOCOL.md alone (Node 20, no npm
packages: its own CBOR decoder, Ed25519 and SHA-256 from node:crypto). If it accepts
every vector and rejects tampered ones, the spec says enough to interoperate.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
VERIFIER = HERE / "verify_vectors.mjs"
VECTORS = HERE.parent.parent / "docs" / "vectors"
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(NODE is None, reason="node (Node.js 20+) is not on PATH; the JS interop verifier needs it")


def run_verifier(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([NODE, str(VERIFIER), str(directory)], capture_output=True, text=True, timeout=30)


def index_files(directory: Path) -> list[str]:
    return [entry["file"] for entry in json.loads((directory / "index.json").read_text())]


def reported(stdout: str, status: str) -> set[str]:
    """Files named on the verifier's `OK   FILE ...` / `FAIL FILE: ...` lines."""
    return {line.split()[1].rstrip(":") for line in stdout.splitlines() if line.split()[:1] == [status]}


def copy_vectors(tmp_path: Path) -> Path:
    target = tmp_path / "vectors"
    shutil.copytree(VECTORS, target)
    return target


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_every_committed_vector_verifies():
    result = run_verifier(VECTORS)
    assert result.returncode == 0, result.stdout + result.stderr
    files = index_files(VECTORS)
    assert len(files) >= 9  # one or more payloads for every message kind
    assert reported(result.stdout, "OK") == set(files), result.stdout
    assert not reported(result.stdout, "FAIL")
    assert f"{len(files)}/{len(files)} vectors OK" in result.stdout
    kinds = {entry["kind"] for entry in json.loads((VECTORS / "index.json").read_text())}
    assert kinds >= {"instruction", "confirm", "decline", "model", "delta", "round", "update", "presence"}


def test_flipped_signature_byte_fails(tmp_path):
    vectors = copy_vectors(tmp_path)
    flip_byte(vectors / "round.cbor", -1)  # last byte of the Ed25519 signature
    result = run_verifier(vectors)
    assert result.returncode != 0, result.stdout
    assert reported(result.stdout, "FAIL") == {"round.cbor"}, result.stdout
    assert "bad_signature" in result.stdout
    assert reported(result.stdout, "OK") == set(index_files(vectors)) - {"round.cbor"}


def test_flipped_body_byte_of_one_chunk_fails_the_whole_message(tmp_path):
    vectors = copy_vectors(tmp_path)
    flip_byte(vectors / "update.001.cbor", 100)  # inside the second slice of the body (unsigned, digest-checked)
    result = run_verifier(vectors)
    assert result.returncode != 0, result.stdout
    assert reported(result.stdout, "FAIL") == {"update.000.cbor", "update.001.cbor"}, result.stdout
    assert "digest_mismatch" in result.stdout


def test_vector_verified_against_another_topic_fails(tmp_path):
    vectors = copy_vectors(tmp_path)
    index = json.loads((vectors / "index.json").read_text())
    for entry in index:
        if entry["file"] == "instruction.cbor":
            entry["topic"] = "fedmq/digits/round"  # the topic is the external_aad
    (vectors / "index.json").write_text(json.dumps(index))
    result = run_verifier(vectors)
    assert result.returncode != 0
    assert reported(result.stdout, "FAIL") == {"instruction.cbor"}, result.stdout
    assert "wrong_topic" in result.stdout
