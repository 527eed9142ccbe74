"""Issue the broker's small X.509 PKI: a CA, the broker's server certificate, client certificates.

For `fedmq broker config`: a private CA that only this broker's clients trust, so no
public CA is needed. Keys are ECDSA P-256, which every TLS stack that runs Mosquitto
or paho speaks. Certificates carry the extensions strict verifiers (OpenSSL's
X509_V_FLAG_X509_STRICT, Python 3.13's default) insist on: basic constraints, key
usage, subject and authority key identifiers.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmq.common.errors import ConfigError

CA_DAYS = 3650
LEAF_DAYS = 825  # the longest leaf validity Apple's TLS stack accepts
DEFAULT_HOSTS = ("localhost", "127.0.0.1")
# Issued an hour in the past: a device whose clock is a little behind still accepts it.
_BACKDATE = dt.timedelta(hours=1)


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey  # ours are EC P-256; a CA given with --ca may be RSA

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())


def new_ca(name: str = "fedmq CA", days: int = CA_DAYS) -> Issued:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host or any(c.isspace() or c in "/:@" for c in host):
        raise ConfigError(f"host {host!r} is neither an IP address nor a DNS name")
    return x509.DNSName(host)


def _leaf(ca: Issued, common_name: str, usage: x509.ObjectIdentifier,
          san: Sequence[x509.GeneralName] = (), days: int = LEAF_DAYS) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(san)), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def issue_server(ca: Issued, hosts: Sequence[str]) -> Issued:
    """The broker's certificate, valid for every host name and IP address clients dial.

    Clients check the name they connect to against the subjectAltName list only
    (the CN is ignored), so every name and address must be in it.
    """
    if not hosts:
        raise ConfigError("the server certificate needs at least one host name or IP address")
    return _leaf(ca, hosts[0], ExtendedKeyUsageOID.SERVER_AUTH, [_san(h) for h in hosts])


def issue_client(ca: Issued, account: str) -> Issued:
    """A client certificate whose CN is the broker account name (`use_identity_as_username`)."""
    return _leaf(ca, account, ExtendedKeyUsageOID.CLIENT_AUTH)


def server_hosts(cert: x509.Certificate) -> list[str]:
    """The host names and IP addresses a server certificate is valid for, as given."""
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(name.value) for name in names if isinstance(name, (x509.DNSName, x509.IPAddress))]


def signed_by(cert: x509.Certificate, ca: Issued) -> bool:
    """Whether `cert` was issued by `ca` (same issuer name, valid signature)."""
    try:
        cert.verify_directly_issued_by(ca.cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def load(cert_path: Path, key_path: Path) -> Issued:
    """A certificate and key pair from PEM files; a ConfigError if unreadable or not a pair."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except OSError as exc:
        raise ConfigError(f"cannot read {exc.filename}: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{cert_path} / {key_path}: not a PEM certificate and unencrypted key ({exc})") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise ConfigError(f"{key_path}: only EC and RSA keys are supported")
    if key.public_key() != cert.public_key():
        raise ConfigError(f"{key_path} is not the private key of {cert_path}")
    return Issued(cert, key)
