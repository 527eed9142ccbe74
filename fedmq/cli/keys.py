"""`fedmq keys`: create and inspect Ed25519 identities."""

from __future__ import annotations

from pathlib import Path

import click

from fedmq.common.keys import Identity, key_id, load_identity, load_public_key, write_identity
from fedmq.common.topics import check_id

from .errors import user_errors


@click.group()
def keys() -> None:
    """Create and inspect Ed25519 key pairs (NAME.key + NAME.pub)."""


@keys.command()
@click.argument("name")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
              show_default=True, help="Where to write NAME.key (mode 0600) and NAME.pub.")
@click.option("--force", is_flag=True, help="Overwrite an existing key pair.")
@user_errors
def generate(name: str, directory: Path, force: bool) -> None:
    """Generate a key pair for NAME (a slave id, or the master's name)."""
    check_id(name, "key name")
    identity = Identity.generate(name)
    key_path, pub_path = write_identity(identity, directory, overwrite=force)
    click.echo(f"{key_path}\n{pub_path}\nkid {identity.kid.hex()}")


@keys.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@user_errors
def show(file: Path) -> None:
    """Print the key id (COSE kid, hex) of a .pub or .key file."""
    if b"PRIVATE KEY" in file.read_bytes()[:64]:
        public = load_identity(file).public_key
    else:
        public = load_public_key(file)
    click.echo(key_id(public).hex())
