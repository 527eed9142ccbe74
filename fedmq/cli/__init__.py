"""The `fedmq` command line: one click group, one module per sub-command family."""

from __future__ import annotations

import click

from fedmq import __version__

from .broker import broker
from .decode import decode
from .demo import demo
from .keys import keys
from .monitor import monitor
from .run import master, slave


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fedmq")
def main() -> None:
    """Federated training of PyTorch models over MQTT, with signed CBOR messages."""


main.add_command(keys)
main.add_command(decode)
main.add_command(master)
main.add_command(slave)
main.add_command(demo)
main.add_command(monitor)
main.add_command(broker)
