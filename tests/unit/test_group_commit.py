"""The master's journal and group commit (common/shell.py `JournalFile`, `GroupCommit`):
records come back as written, a torn tail is dropped; no ack before the fsync that
covers its journal record, acks in arrival order, one fsync per batch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedmq.common.shell import GroupCommit, JournalFile

EMPTY_BODY = b"\xa0"  # the CBOR of {}


@pytest.fixture
def journal(tmp_path: Path):
    j = JournalFile(tmp_path / "journal.cbor")
    yield j
    j.close()


def recorder(journal: JournalFile) -> tuple[list[str], GroupCommit]:
    sent: list[str] = []

    def send(token: str) -> None:
        assert not journal.dirty, f"ack {token} sent before the journal was synced"
        sent.append(token)

    return sent, GroupCommit(journal, send, max_held=3, max_wait=0.05)


def test_acks_wait_for_the_fsync_and_keep_their_order(journal, monkeypatch):
    fsyncs: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(fd), real(fd)))
    sent, gc = recorder(journal)

    gc.ack("chunk-0", now=0.0)  # nothing journaled yet: straight out
    assert sent == ["chunk-0"]
    for n in range(2):
        journal.append({"update_id": f"u{n}"}, EMPTY_BODY)
        gc.ack(f"u{n}", now=0.01 * n)
    gc.ack("rejected", now=0.02)  # not journaled, but behind held acks: waits, keeps order
    assert sent == ["chunk-0"] and not fsyncs
    assert gc.due(0.02, idle=False)  # three held: the batch is full
    gc.commit()
    assert sent == ["chunk-0", "u0", "u1", "rejected"]
    assert len(fsyncs) == 1  # one fsync for the batch
    assert [r["update_id"] for r in journal.records()] == ["u0", "u1"]


def test_due_when_idle_or_after_max_wait(journal):
    sent, gc = recorder(journal)
    assert not gc.due(0.0, idle=True)  # nothing held
    journal.append({"update_id": "u"}, EMPTY_BODY)
    gc.ack("u", now=10.0)
    assert not gc.due(10.01, idle=False)
    assert gc.due(10.01, idle=True)  # no more messages waiting
    assert gc.due(10.06, idle=False)  # held for max_wait
    gc.commit()
    assert sent == ["u"] and not gc.held
    gc.commit()  # nothing to do: no fsync, no ack
    assert sent == ["u"]


def test_records_come_back_with_their_body_decoded_and_a_torn_tail_is_dropped(journal, tmp_path):
    import cbor2

    big = {"update_id": "big", "tensors": {"w": {"data": os.urandom(70_000)}}, "samples": 3}
    small = {"update_id": "small", "metrics": {"bytes_in": 5}}
    for body in (small, big):
        journal.append({"update_id": body["update_id"], "round": 1, "body": "ignored: raw_body is stored"},
                       cbor2.dumps(body))
    journal.sync()
    assert [r["body"] for r in journal.records()] == [small, big]
    assert [(r["update_id"], r["round"]) for r in journal.records()] == [("small", 1), ("big", 1)]
    journal.append({"update_id": "torn"}, cbor2.dumps({"x": os.urandom(1000)}))
    with open(tmp_path / "journal.cbor", "r+b") as f:  # the crash came mid-write
        f.truncate(f.seek(0, os.SEEK_END) - 10)
    assert [r["update_id"] for r in JournalFile(tmp_path / "journal.cbor").records()] == ["small", "big"]


def test_a_journal_written_by_an_earlier_version_still_replays(tmp_path):
    import cbor2

    old = {"update_id": "u0", "round": 2, "body": {"samples": 4}}  # one map per record, as before
    (tmp_path / "journal.cbor").write_bytes(cbor2.dumps(old))
    journal = JournalFile(tmp_path / "journal.cbor")
    journal.append({"update_id": "u1", "round": 2}, cbor2.dumps({"samples": 5}))
    assert [(r["update_id"], r["body"]) for r in journal.records()] == [("u0", {"samples": 4}), ("u1", {"samples": 5})]
    journal.close()
