"""Ed25519 identities: key files on disk, key ids, and the key ring a receiver trusts.

A participant is a *name* (the master's job name or a slave id) plus an Ed25519 key
pair. Files follow the convention operators already know from SSH: `NAME.key` is the
private key (PKCS#8 PEM, mode 0600, refused if group/others can read it) and
`NAME.pub` the public key (SubjectPublicKeyInfo PEM). A directory of `*.pub` files is
an allowlist: the file's stem is the name that key may speak for.

The key id (COSE `kid`) is the first 16 bytes of SHA-256 over the raw 32-byte public
key: stable, derived (no registry to keep in sync), and short on the wire.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import ConfigError

KID_LENGTH = 16


def raw_public_bytes(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key: Ed25519PublicKey) -> bytes:
    return hashlib.sha256(raw_public_bytes(public_key)).digest()[:KID_LENGTH]


def public_key_from_raw(raw: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(raw)


@dataclass(frozen=True)
class Identity:
    """A named private key: what a sender signs with."""

    name: str
    private_key: Ed25519PrivateKey = field(repr=False)

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    @property
    def kid(self) -> bytes:
        return key_id(self.public_key)

    @classmethod
    def generate(cls, name: str) -> "Identity":
        return cls(name, Ed25519PrivateKey.generate())


def public_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def write_identity(identity: Identity, directory: Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write NAME.key (0600, created that way — never world-readable even briefly) and NAME.pub."""
    directory.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = directory / f"{identity.name}.key", directory / f"{identity.name}.pub"
    if not overwrite and (key_path.exists() or pub_path.exists()):
        raise ConfigError(f"{key_path} or {pub_path} already exists; refusing to overwrite a key")
    pem = identity.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (0 if overwrite else os.O_EXCL)
    fd = os.open(key_path, flags, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.chmod(key_path, 0o600)
    pub_path.write_bytes(public_pem(identity.public_key))
    return key_path, pub_path


def load_identity(path: Path | str, name: str | None = None) -> Identity:
    """Load a private key file; the identity's name defaults to the file's stem."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        pem = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"private key {path} does not exist (create one with: fedmq keys generate NAME --dir DIR)") from None
    except PermissionError:
        raise ConfigError(f"private key {path}: permission denied (it must be readable by the user running fedmq)") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO) and not _is_systemd_credential(path, mode):
        raise ConfigError(
            f"private key {path} is accessible by group/others (mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}"
        )
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is not an unencrypted PKCS#8 PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 key")
    return Identity(name or path.stem, key)


def _is_systemd_credential(path: Path, mode: int) -> bool:
    """A key systemd handed over with LoadCredential= (in $CREDENTIALS_DIRECTORY).

    systemd writes a credential 0400 and lets the service's user read it through a
    POSIX ACL entry; `stat` shows the ACL's mask as group bits (0440) although no
    group can read it. Such a file is private: accept it unless others may read it
    or a group may write it.
    """
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    return (bool(directory) and path.absolute().parent == Path(directory).absolute()
            and not mode & (stat.S_IRWXO | stat.S_IWGRP | stat.S_IXGRP))


def load_public_key(path: Path | str) -> Ed25519PublicKey:
    path = Path(path)
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"public key {path} does not exist") from None
    except PermissionError:
        raise ConfigError(f"public key {path}: permission denied (make it and its directories readable: chmod 0644/0755)") from None
    except ValueError as exc:
        raise ConfigError(f"{path} is not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path} is not an Ed25519 public key")
    return key


@dataclass
class KeyRing:
    """kid -> (name, public key): whom a receiver believes."""

    _by_kid: dict[bytes, tuple[str, Ed25519PublicKey]] = field(default_factory=dict)

    def add(self, name: str, public_key: Ed25519PublicKey) -> bytes:
        kid = key_id(public_key)
        self._by_kid[kid] = (name, public_key)
        return kid

    def lookup(self, kid: bytes) -> tuple[str, Ed25519PublicKey] | None:
        return self._by_kid.get(kid)

    def names(self) -> list[str]:
        return sorted(name for name, _ in self._by_kid.values())

    def __contains__(self, kid: object) -> bool:
        return kid in self._by_kid

    def __len__(self) -> int:
        return len(self._by_kid)

    @classmethod
    def from_dir(cls, directory: Path | str) -> "KeyRing":
        directory = Path(directory)
        if not directory.is_dir():
            raise ConfigError(f"key directory {directory} does not exist")
        ring = cls()
        for pub in sorted(directory.glob("*.pub")):
            ring.add(pub.stem, load_public_key(pub))
        return ring

    @classmethod
    def from_tree(cls, directory: Path | str) -> "KeyRing":
        """Every NAME.pub below `directory`, in subdirectories too: the documented layout
        keeps the master's key beside a folder of slave keys (keys/master.pub,
        keys/slaves/NAME.pub), and a watcher trusts both. Symbolic links to directories
        are not followed (no loops). Two different keys under one NAME are refused: a
        message signed by either would be shown as NAME's."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ConfigError(f"key directory {directory} does not exist")
        ring, seen = cls(), {}
        for parent, dirs, files in os.walk(directory):
            dirs.sort()
            for file in sorted(f for f in files if f.endswith(".pub")):
                path = Path(parent) / file
                key = load_public_key(path)
                name = path.stem
                if name in seen and key_id(key) != key_id(seen[name][1]):
                    raise ConfigError(f"{seen[name][0]} and {path} are different keys for one name {name!r}")
                seen[name] = (path, key)
                ring.add(name, key)
        return ring
