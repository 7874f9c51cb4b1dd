"""Node identity (Ed25519 key, node id) and the mesh secret derived from the mesh id.

The node id IS the node's 32-byte Ed25519 public key, so anyone holding an id can check a
signature without a lookup. Its text form is lowercase base32 (52 characters); the short
form (first 10 characters) is for humans.

The mesh id is the mesh's shared secret. It is never sent, logged or advertised: what leaves
the process are keys derived from it with HKDF-SHA256.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_FILE = "identity.key"
MIN_MESH_ID_LENGTH = 16
SHORT_ID_LENGTH = 10


class IdentityError(Exception):
    """A key file or mesh id that cannot be used; the message says what to do."""


@dataclass(frozen=True, slots=True, order=True)
class NodeId:
    """A node's Ed25519 public key (32 bytes)."""

    key: bytes
    _text: str = field(default="", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if type(self.key) is not bytes or len(self.key) != 32:
            raise ValueError("a node id is a 32-byte Ed25519 public key")

    def __str__(self) -> str:
        if not self._text:  # computed once, on first use
            text = base64.b32encode(self.key).decode().rstrip("=").lower()
            object.__setattr__(self, "_text", text)
        return self._text

    def __repr__(self) -> str:
        return f"NodeId({self.short})"

    @property
    def short(self) -> str:
        return str(self)[:SHORT_ID_LENGTH]

    @classmethod
    def parse(cls, text: str) -> NodeId:
        """Parse the 52-character text form."""
        cleaned = text.strip().upper()
        try:
            raw = base64.b32decode(cleaned + "=" * (-len(cleaned) % 8))
        except ValueError:
            raise ValueError(f"not a node id: {text!r}") from None
        if len(raw) != 32:
            raise ValueError(f"not a node id: {text!r} (wrong length)")
        return cls(raw)

    def verify(self, signature: bytes, data: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.key).verify(signature, data)
        except (InvalidSignature, ValueError):
            return False
        return True


class NodeIdentity:
    """A node's private key and the id it implies."""

    def __init__(self, private_key: Ed25519PrivateKey):
        self.private_key = private_key
        public = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.node_id = NodeId(public)

    def __repr__(self) -> str:
        return f"NodeIdentity({self.node_id.short})"

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)

    @classmethod
    def generate(cls) -> NodeIdentity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, home: Path) -> NodeIdentity:
        """Load `home/identity.key`, creating it (mode 0600) on first start. IdentityError
        (saying which path and what to do) when the folder or the file cannot be used."""
        try:
            return cls._load_or_create(home)
        except OSError as exc:
            where = exc.filename or home / KEY_FILE
            raise IdentityError(
                f"cannot use {where} for the node key ({exc.strerror or exc}): point "
                "MESH_NODE_HOME at a writable folder, or use --ephemeral"
            ) from None

    @classmethod
    def _load_or_create(cls, home: Path) -> NodeIdentity:
        path = home / KEY_FILE
        if path.exists():
            return cls._load(path)
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        identity = cls.generate()
        pem = identity.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it first: use theirs
            return cls._load(path)
        with os.fdopen(fd, "wb") as out:
            out.write(pem)
        return identity

    @classmethod
    def _load(cls, path: Path) -> NodeIdentity:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise IdentityError(
                f"{path} is readable by other users (mode {mode:o}); "
                f"run `chmod 600 {path}` and start again"
            )
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise IdentityError(
                f"{path} is not a valid node key ({exc}); move it away to create a new "
                "identity, or use --ephemeral"
            ) from None
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key)


def default_home() -> Path:
    """`$MESH_NODE_HOME`, else `~/.mesh-node`."""
    override = os.environ.get("MESH_NODE_HOME")
    return Path(override).expanduser() if override else Path.home() / ".mesh-node"


def new_mesh_id() -> str:
    """A fresh mesh id: 160 random bits in lowercase base32 (32 characters)."""
    return base64.b32encode(secrets.token_bytes(20)).decode().lower()


def looks_generated(mesh_id: str) -> bool:
    """`mesh_id` has the form `new_mesh_id` gives (a person's phrase could be guessed)."""
    return re.fullmatch(r"[a-z2-7]{32}", mesh_id.strip()) is not None


def _hkdf(secret: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=SHA256(), length=length, salt=b"mesh-node/1", info=info).derive(secret)


class MeshSecret:
    """Keys derived from a mesh id. The mesh id itself is not kept."""

    __slots__ = ("discovery_tag", "proof_key")

    def __init__(self, mesh_id: str):
        cleaned = mesh_id.strip()
        if len(cleaned) < MIN_MESH_ID_LENGTH:
            raise IdentityError(
                f"a mesh id must be at least {MIN_MESH_ID_LENGTH} characters (got "
                f"{len(cleaned)}): it is the mesh's secret; make one with `mesh-node new`"
            )
        if any(ch.isspace() or not ch.isprintable() for ch in cleaned):
            raise IdentityError("a mesh id may not contain spaces or control characters")
        secret = cleaned.encode()
        self.proof_key = _hkdf(secret, b"membership proof")
        # advertised in discovery records: lets nodes skip other meshes, reveals nothing
        self.discovery_tag = _hkdf(secret, b"discovery tag", 16).hex()

    def __repr__(self) -> str:
        return f"MeshSecret(tag={self.discovery_tag[:8]}...)"

    def prove(self, data: bytes) -> bytes:
        return hmac.new(self.proof_key, data, hashlib.sha256).digest()

    def check(self, data: bytes, proof: bytes) -> bool:
        return hmac.compare_digest(self.prove(data), proof)
