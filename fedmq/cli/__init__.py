"""The `fedmq` command line: one click group, one module per sub-command family.

Importing this package must stay cheap: `fedmq --help`, a config error or `fedmq
status` never load torch (about 2 CPU seconds and 290 MB); the modules here import
what needs torch inside the commands that use it.
"""

from __future__ import annotations

import click

from fedmq import __version__

from .broker import broker
from .decode import decode
from .demo import demo
from .keys import keys
from .monitor import monitor
from .relay import relay
from .run import master, slave
from .status import status
from .worker import worker


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
main.add_command(status)
main.add_command(worker)
main.add_command(relay)
