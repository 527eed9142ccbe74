"""The demo's report.json and picture: bytes up and down per round, the master's traffic by kind, compression."""

from __future__ import annotations

import json
from pathlib import Path

from fedmq.common.compression_settings import preset
from fedmq.demo import ABOUT_BYTES, DemoOptions, DemoResult, draw_report, write_report


def _row(n: int, accuracy: float) -> dict:
    return {"round": n, "version": n, "accuracy": accuracy, "loss": 1.0 / n, "updates": 2, "seconds": 0.5,
            "bytes_up": 2000, "bytes_down": 90000 if n == 1 else 7000, "update_ids": ["a", "b"],
            "traffic": {"up": {"update": 2000}, "down": {"model" if n == 1 else "delta": 3000, "round": 400}}}


def test_report_has_bytes_per_round_and_by_kind_and_says_what_they_are(tmp_path: Path) -> None:
    result = DemoResult(rows=[_row(2, 0.91), _row(1, 0.5), _row(3, 0.95)], broker={"kind": "mosquitto"},
                        status={"traffic": {"up": {"update": 6000}, "down": {"model": 80000, "delta": 6000}},
                                "downlink": {"keyframes": 0, "deltas": 2, "drift": 0.01}, "rejected": {}})
    report = write_report(tmp_path / "report.json", DemoOptions(slaves=2, rounds=3, compression="topk"), result)
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]
    assert report["rounds"][1]["traffic"] == {"up": {"update": 2000}, "down": {"delta": 3000, "round": 400}}
    assert (report["bytes_up"], report["bytes_down"]) == (6000, 104000)
    assert report["bytes_to_090"] == {"up": 4000, "down": 97000}  # rounds 1 and 2
    assert report["compression"] == "topk" and report["compression_settings"] == preset("topk").to_wire()
    assert report["traffic"]["down"]["model"] == 80000 and report["downlink"]["deltas"] == 2
    assert report["about_bytes"] == ABOUT_BYTES and all(ABOUT_BYTES.values())


def test_nothing_reached_yet_and_the_picture(tmp_path: Path) -> None:
    result = DemoResult(rows=[_row(1, 0.5)], broker={"kind": "embedded"})
    report = write_report(tmp_path / "report.json", DemoOptions(slaves=2, rounds=3), result)
    assert report["bytes_to_090"] is None and report["compression"] == "none" and report["traffic"] == {}
    picture = draw_report(report, tmp_path / "accuracy.png")
    assert picture is not None and picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
