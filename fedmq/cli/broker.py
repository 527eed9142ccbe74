"""`fedmq broker`: set up the Mosquitto broker of a job."""

from __future__ import annotations

from pathlib import Path

import click

from fedmq.brokerdir import FORCE, NEW, UPDATE, write_broker_dir
from fedmq.common.topics import DEFAULT_PREFIX
from fedmq.mosquitto_files import CLIENT_AUTH, DEFAULT_MONITOR, BrokerLayout, JobAccounts, RelayBridge, render_bridge

from .errors import user_errors
from .options import HOST_PORT


@click.group()
def broker() -> None:
    """Set up the Mosquitto broker of a job."""


def _slave_list(_ctx: click.Context, _param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(s.strip() for item in value for s in item.split(",") if s.strip())


@broker.command("config")
@click.option("--job", required=True, help="Job id.")
@click.option("--slaves", required=True, multiple=True, callback=_slave_list, metavar="S1,S2,...",
              help="Every slave id of the job (comma-separated; may be repeated).")
@click.option("--prefix", default=DEFAULT_PREFIX, show_default=True, help="Topic prefix of the job.")
@click.option("--host", "hosts", multiple=True, metavar="NAME",
              help="A host name or IP address clients reach the broker by (repeatable; goes into the "
                   "server certificate). Default: localhost and 127.0.0.1; with --update: keep the certificate's.")
@click.option("--workers", multiple=True, callback=_slave_list, metavar="W1,W2,...",
              help="Aggregator workers of a sharded job ([shard] workers; comma-separated; may be repeated).")
@click.option("--monitor", "monitors", multiple=True, metavar="NAME",
              help=f"A read-only monitor account (repeatable; default {DEFAULT_MONITOR}).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory to write to.")
@click.option("--force", is_flag=True, help="Replace an existing configuration: new CA, new passwords for all.")
@click.option("--update", is_flag=True,
              help="Rewrite an existing configuration for a changed slave list, keeping its CA and the "
                   "passwords and certificates of the accounts that remain.")
@click.option("--ca", "ca_dir", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Issue certificates from the CA in this directory (ca.crt, ca.key) instead of a new one.")
@click.option("--client-auth", type=click.Choice(CLIENT_AUTH), default="password", show_default=True,
              help="How clients prove their account on the TLS listener.")
@click.option("--etc", default=BrokerLayout.etc, show_default=True,
              help="Where the broker host keeps mosquitto.conf, fedmq.passwd, fedmq.acl and certs/.")
@click.option("--data-dir", default=BrokerLayout.data_dir, show_default=True,
              help="The broker's persistence directory.")
@click.option("--tls-port", type=int, default=BrokerLayout.tls_port, show_default=True)
@click.option("--listen", metavar="ADDRESS", help="Address of the TLS listener (default: all interfaces).")
@click.option("--local-port", type=int, default=BrokerLayout.local_port, show_default=True,
              help="Port of the plain listener on 127.0.0.1.")
@click.option("--log-dest", default=BrokerLayout.log_dest, show_default=True,
              help='Mosquitto log_dest: syslog, stderr, stdout, "file PATH", ...')
@user_errors
def config(job: str, slaves: tuple[str, ...], workers: tuple[str, ...], prefix: str, hosts: tuple[str, ...],
           monitors: tuple[str, ...],
           out: Path, force: bool, update: bool, ca_dir: Path | None, client_auth: str, etc: str,
           data_dir: str, tls_port: int, listen: str | None, local_port: int, log_dest: str) -> None:
    """Write a job's broker configuration into OUT: mosquitto.conf, ACL, password file,
    one password and certificate per account, a CA and the broker's certificate.

    Accounts: the master (fedmq-master-JOB), one per slave (SLAVE@JOB), one per
    aggregator worker (fedmq-worker-W@JOB) and the monitors. Each account name is also the MQTT client id the broker gives it.
    Passwords are written to OUT/passwords/ACCOUNT and never printed.
    OUT/README.txt says how to install everything.
    """
    if force and update:
        raise click.UsageError("--force and --update exclude each other")
    if not slaves:
        raise click.BadParameter("give at least one slave id", param_hint="--slaves")
    accounts = JobAccounts(job, slaves, monitors or (DEFAULT_MONITOR,), prefix, workers)
    layout = BrokerLayout(etc=etc, data_dir=data_dir, tls_port=tls_port, listen=listen,
                          local_port=local_port, log_dest=log_dest, client_auth=client_auth)
    mode = FORCE if force else UPDATE if update else NEW
    outcome = write_broker_dir(out, accounts, layout, hosts=hosts or None, mode=mode, ca_dir=ca_dir)
    for path in outcome.written:
        click.echo(f"wrote   {path}")
    for path in outcome.removed:
        click.echo(f"removed {path}")
    if outcome.kept:
        click.echo(f"kept {len(outcome.kept)} existing secret and certificate files")
    click.echo(f"next: {out / 'README.txt'} says how to install them")


@broker.command("bridge")
@click.option("--job", required=True, help="The upstream (central) job id.")
@click.option("--relay", required=True, help="The relay's id in that job (its slave id there).")
@click.option("--remote", required=True, type=HOST_PORT, metavar="HOST:PORT",
              help="The central broker's TLS listener, as the site broker reaches it.")
@click.option("--prefix", default=DEFAULT_PREFIX, show_default=True, help="Topic prefix of the upstream job.")
@click.option("--ca", "cafile", metavar="PATH",
              help="The central broker's CA certificate, as a path on the site broker's host "
                   "(default: the system's CAs).")
@click.option("--cert", "certfile", metavar="PATH", help="A client certificate for the central broker (with --key).")
@click.option("--key", "keyfile", metavar="PATH", help="Its key.")
@click.option("--password-file", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="The relay account's password on the central broker, embedded in the output "
                   "(which is then written with mode 0600).")
@click.option("--plain", is_flag=True, help="No TLS: only for brokers on one machine (tests).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write here instead of standard output.")
@user_errors
def bridge(job: str, relay: str, remote: tuple[str, int], prefix: str, cafile: str | None, certfile: str | None,
           keyfile: str | None, password_file: Path | None, plain: bool, out: Path | None) -> None:
    """Write the Mosquitto bridge a site broker needs for a relay of an upstream job.

    The stanza goes into the site broker's mosquitto.conf; the bridge logs in to the
    central broker as the relay's own account (RELAY@JOB) and carries exactly its
    topics (docs/OPERATIONS.md section 13)."""
    password = password_file.read_text().strip() if password_file else None
    text = render_bridge(RelayBridge(job, relay, remote, prefix, tls=not plain, cafile=cafile, certfile=certfile,
                                     keyfile=keyfile, password=password))
    if out is None:
        click.echo(text, nl=False)
        return
    out.write_text(text)
    out.chmod(0o600 if password is not None else 0o644)
    click.echo(f"wrote   {out}")
