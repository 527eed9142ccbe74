"""Interoperability: an independent COSE implementation (pycose) verifies our messages.

Guards the claim that fedmq's envelope is plain RFC 9052 COSE_Sign1 with EdDSA and
the MQTT topic as external_aad: pycose must accept a committed vector and a freshly
sealed message with the right topic, and refuse them with another topic. pycose
1.1.0 needs cbor2 < 6 while fedmq uses cbor2 6, so it lives in its own directory
(`make test` installs it into .venv/pycose-env, or set FEDMQ_PYCOSE_DIR) and runs in
a subprocess with `python -I -S`: no user site, no venv site-packages, no
PYTHON* variables, only the standard library and that directory on sys.path.
Also checks that a plain cbor2 (no hooks) sees tag 18 and, in the body, tags 40/85.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cbor2 import CBORTag

from fedmq.common import messages
from fedmq.common.envelope import HDR_BODY
from fedmq.common.keys import load_public_key, raw_public_bytes

REPO = Path(__file__).resolve().parents[2]
VECTORS = REPO / "docs" / "vectors"
NOW = 1_700_000_000.0

# Runs inside the isolated interpreter: reads cases as JSON on stdin, prints one
# result per case (True/False from verify_signature, or the error it raised).
PYCOSE_SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import cbor2
from pycose.messages import Sign1Message
from pycose.keys import OKPKey
from pycose.keys.curves import Ed25519
assert cbor2.__file__.startswith(sys.argv[1]), cbor2.__file__
results = []
for case in json.load(sys.stdin):
    try:
        msg = Sign1Message.decode(bytes.fromhex(case["message"]))
        msg.key = OKPKey(crv=Ed25519, x=bytes.fromhex(case["x"]))
        msg.external_aad = case["aad"].encode("utf-8")
        results.append(msg.verify_signature())
    except Exception as exc:
        results.append(f"{type(exc).__name__}: {exc}")
print(json.dumps({"results": results, "cbor2": cbor2.__file__}))
"""


@pytest.fixture(scope="module")
def pycose_dir() -> Path:
    path = Path(os.environ.get("FEDMQ_PYCOSE_DIR", REPO / ".venv" / "pycose-env"))
    if not (path / "pycose").is_dir():
        pytest.skip(f"pycose not found in {path}: `make test` installs it there "
                    "(pip install --target .venv/pycose-env 'pycose==1.1.0' 'cbor2<6'), or set FEDMQ_PYCOSE_DIR")
    return path


def pycose_verify(pycose_dir: Path, cases: list[dict[str, str]]) -> list[Any]:
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", PYCOSE_SCRIPT, str(pycose_dir)],
                          input=json.dumps(cases), capture_output=True, text=True, timeout=60, cwd=pycose_dir)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["cbor2"].startswith(str(pycose_dir))  # pycose's own cbor2 5, not ours
    return out["results"]


def case(message: bytes, aad: str, public_raw: bytes) -> dict[str, str]:
    return {"message": message.hex(), "aad": aad, "x": public_raw.hex()}


def test_pycose_verifies_committed_vectors_and_a_fresh_message(pycose_dir: Path, wire) -> None:
    index = json.loads((VECTORS / "index.json").read_text())
    cases, expected = [], []
    for entry in index:
        data = (VECTORS / entry["file"]).read_bytes()
        x = raw_public_bytes(load_public_key(VECTORS / entry["public_key"]))
        cases += [case(data, entry["topic"], x), case(data, entry["topic"] + "/other", x)]
        expected += [True, False]
    fresh = wire.sealed_update(seq=3) + wire.sealed_update(seq=4, chunk_size=128)  # whole and chunked
    x = raw_public_bytes(wire.slave.public_key)
    for payload in fresh:
        cases += [case(payload, wire.update_topic(), x), case(payload, wire.update_topic(wire.other), x)]
        expected += [True, False]
    # another key altogether
    cases.append(case(fresh[0], wire.update_topic(), raw_public_bytes(wire.other.public_key)))
    expected.append(False)
    assert pycose_verify(pycose_dir, cases) == expected


def test_pycose_rejects_a_tampered_signature(pycose_dir: Path, wire) -> None:
    (payload,) = wire.sealed_update(seq=5)
    tampered = wire.rebuild(payload, lambda f: f.__setitem__(3, bytes([f[3][0] ^ 1]) + f[3][1:]))
    assert pycose_verify(pycose_dir, [case(tampered, wire.update_topic(), raw_public_bytes(wire.slave.public_key))]) \
        == [False]


def find_tags(obj: Any) -> set[int]:
    if isinstance(obj, CBORTag):
        return {obj.tag} | find_tags(obj.value)
    if isinstance(obj, dict):
        return set().union(set(), *(find_tags(v) for v in obj.values()))
    if isinstance(obj, (list, tuple)):
        return set().union(set(), *(find_tags(v) for v in obj))
    return set()


def test_plain_cbor2_sees_a_cose_sign1_with_rfc8746_tensors(wire) -> None:
    (payload,) = wire.sealed_update()
    msg = cbor2.loads(payload)  # no hooks, no fedmq code
    assert isinstance(msg, CBORTag) and msg.tag == 18 and len(msg.value) == 4
    protected, unprotected, manifest, signature = msg.value
    assert cbor2.loads(protected) == {1: -8, 4: wire.slave.kid} and len(signature) == 64
    assert cbor2.loads(manifest)["kind"] == messages.UPDATE
    body = cbor2.loads(unprotected[HDR_BODY])
    assert {40, 85} <= find_tags(body["tensors"])
    w = body["tensors"]["w"]
    assert w.tag == 40 and list(w.value[0]) == [4, 3] and w.value[1].tag == 85 and len(w.value[1].value) == 48
