"""`fedmq demo`: run the reference workload end to end and print a summary."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import click

from fedmq.common.compression_settings import PRESETS

from .errors import user_errors
from .options import HOST_PORT


@click.command()
@click.option("--slaves", type=click.IntRange(1, 64), default=8, show_default=True, help="Slave processes.")
@click.option("--rounds", type=click.IntRange(1, 1000), default=30, show_default=True)
@click.option("--broker", type=HOST_PORT, metavar="HOST:PORT", help="Use this broker instead of starting one.")
@click.option("--broker-kind", type=click.Choice(["auto", "mosquitto", "embedded"]), default="auto",
              show_default=True, help="Broker to start: auto = Mosquitto if installed, else embedded (amqtt).")
@click.option("--report", "report", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-report"),
              show_default=True, help="Directory for report.json, accuracy.png, keys, configs, logs and state.")
@click.option("--update", type=click.Choice(["delta", "gradient", "student"]), default="delta", show_default=True,
              help="What slaves send back; student: distil two students (same and half width) from a fixed teacher.")
@click.option("--strategy", type=click.Choice(["fedavg", "fedavgm", "fedadam", "fedyogi"]), default="fedavg",
              show_default=True)
@click.option("--compression", type=click.Choice(list(PRESETS)), default="none", show_default=True,
              help="The job's [compression] preset: int8 = int8 updates and model deltas; topk = top 1 % of each "
                   "update and sparse model deltas (docs/PROTOCOL.md 8.1).")
@user_errors
def demo(slaves: int, rounds: int, broker: tuple[str, int] | None, broker_kind: str, report: Path, update: str,
         strategy: str, compression: str) -> None:
    """Federated training of the reference workload (sklearn digits, MLP) with real processes.

    Starts a broker (Mosquitto if installed, else the embedded one), one master and
    SLAVES slave processes that each hold a private non-IID shard, and trains ROUNDS
    rounds of FedAvg. It prints the mosquitto_sub command that shows the traffic live;
    REPORT/report.json is rewritten after every round, and REPORT/accuracy.png drawn
    at the end (with the [plot] extra). Bytes up are the updates as the slaves sent
    them, bytes down what the slaves received; report.json also has the master's
    count by message kind.
    """
    from fedmq.demo import PICTURE, REPORT, DemoOptions, draw_report, run_demo  # torch: only when running

    opts = DemoOptions(slaves=slaves, rounds=rounds, report=report, broker=broker, broker_kind=broker_kind,
                       update=update, strategy=strategy, compression=compression)
    if update == "student" and compression != "none":
        raise click.UsageError("--update student takes --compression none: a model with parts is published part "
                               "by part (no model deltas), and a student's weights travel whole")
    click.echo(f"fedmq demo: {slaves} slaves, {rounds} rounds, compression {compression}, "
               f"report in {report}/ (logs in {report}/logs/)")
    if update == "student":
        click.echo("training the teacher first (in-process FedAvg on the same shards, 30 rounds) ...")

    with contextlib.ExitStack() as stack:
        bars = []

        def started(info: dict[str, Any]) -> None:  # the broker is up; training starts next
            click.echo(f"broker: {info['kind']} on {info['host']}:{info['port']}")
            click.echo(f"watch it live: {info['watch']}")
            bars.append(stack.enter_context(click.progressbar(
                length=rounds, label="training", show_pos=True,
                item_show_func=lambda r: f"acc {r['accuracy']:.3f}" if r else "")))

        result = run_demo(opts, on_row=lambda row: bars[0].update(1, row), on_start=started)
    data = json.loads((report / REPORT).read_text())
    click.echo(f"{'round':>5} {'version':>7} {'accuracy':>9} {'bytes_up':>10} {'bytes_down':>11} {'seconds':>8}")
    for r in data["rounds"]:
        click.echo(f"{r['round']:>5} {r['version']:>7} {r['accuracy']:>9.4f} {r['bytes_up']:>10} "
                   f"{r['bytes_down']:>11} {r['seconds']:>8.3f}")
    final = data["final_accuracy"]
    click.echo(f"final accuracy {final if final is None else round(final, 4)}; "
               f"seconds to 0.90: {data['seconds_to_090']}; wall time {data['wall_seconds']} s")
    if data.get("teacher_accuracy") is not None:  # --update student: each student beside the teacher
        parts = data["rounds"][-1].get("part_accuracy", {}) if data["rounds"] else {}
        click.echo(f"teacher accuracy {data['teacher_accuracy']:.4f} (pretrained in-process, fixed); students: "
                   + ", ".join(f"{p.removeprefix('students.')} {a:.4f}" for p, a in parts.items() if p != "teacher"))
    to_090 = data["bytes_to_090"]
    click.echo(f"bytes up {data['bytes_up']:,} (updates), down {data['bytes_down']:,} (received by the slaves)"
               + (f"; to 0.90: {to_090['up']:,} up, {to_090['down']:,} down" if to_090 else ""))
    for direction, what in (("up", "received"), ("down", "published, one copy each")):
        kinds = data["traffic"].get(direction, {})
        if kinds:
            by_size = sorted(kinds.items(), key=lambda kv: -kv[1])
            click.echo(f"master {what}: " + ", ".join(f"{k} {n:,}" for k, n in by_size))
    picture = draw_report(data, report / PICTURE) if data["rounds"] else None
    click.echo(f"picture: {picture}" if picture else "no picture: pip install 'fedmq[plot]' for matplotlib")
    if result.master_exit != 0 or len(data["rounds"]) < rounds:
        click.echo(f"fedmq: error: the job did not complete (master exit {result.master_exit}); "
                   f"see {report}/logs/", err=True)
        raise SystemExit(1)
