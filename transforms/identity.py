"""Keyed identities: every replacement identifier derived from one secret key.

Every pseudonym is ``HMAC-SHA256(key, encode(namespace, value))`` where ``value`` has its
surrounding whitespace and NUL padding stripped, and ``encode`` length-prefixes both parts so
that no (namespace, value) pair can collide with another. Consequences:

- the same key and value give the same result on every worker, rerun and later batch, with no
  shared state; a different key gives an unrelated result;
- the key is the only secret: whoever holds it can recompute (but not invert) the mapping, so
  keep it out of logs and outputs. ``key_id`` names a key without revealing it.

Formats (fixed; changing them changes every output):

- UID: ``2.25.<decimal of the first 128 bits of the HMAC>`` (PS3.5 B.2 UUID-derived root), at
  most 44 characters, no leading zeros.
- PatientID: ``ANON-`` + 16 characters of RFC 4648 base32 (``A-Z2-7``, 80 bits), 21 characters.
- PatientName: ``ANON^`` + 16 base32 characters (a valid PN: family name ``ANON``, given name
  the token).
- token: lower-case hex, 16 characters by default.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import struct
from typing import Any

from transforms.errors import RequestError

ENV_VAR = "DICOM_DEID_KEY"
MIN_KEY_BYTES = 16
RANDOM_KEY_BYTES = 32

# Namespaces of the maps the engine uses (Orthanc keeps the same four maps, behaviour §4.2).
# Every non-hierarchy UID (FrameOfReferenceUID, ReferencedSOPInstanceUID, ...) shares the
# instance namespace, so a reference equals the new UID of the object it points at.
PATIENT = "patient"
STUDY = "study"
SERIES = "series"
INSTANCE = "instance"

_UID_ROOT = "2.25."
_PATIENT_ID_PREFIX = "ANON-"
_PATIENT_NAME_PREFIX = "ANON^"
_PSEUDONYM_CHARS = 16
_KEY_ID_LABEL = b"dicom-deid key id v1"
_KEY_ID_HEX = 12
# Bound the per-key cache: study and series UIDs repeat from file to file, SOP Instance UIDs
# mostly do not. 65,536 entries are ~18 MiB per process (1 << 20 grew each worker by ~280 MiB
# over a long run, measured 27 November 2026); a cleared cache costs one HMAC per UID again.
_CACHE_LIMIT = 1 << 16
#: The largest key file accepted (a key needs 16 bytes; 32 random bytes are recommended).
MAX_KEY_FILE_BYTES = 1 << 20
# Orthanc strips "spaces" (Toolbox::StripSpaces); DICOM pads UIDs with NUL and strings with space.
_PADDING = " \t\r\n\v\f\x00"
_PADDING_BYTES = _PADDING.encode("ascii")


class InvalidKey(RequestError):
    """The de-identification key cannot be used. The message never contains the key."""


def _encode(namespace: str, value: bytes) -> bytes:
    ns = namespace.encode("utf-8")
    return struct.pack(">I", len(ns)) + ns + struct.pack(">I", len(value)) + value


def _strip(value: str | bytes) -> bytes:
    if isinstance(value, bytes):
        return value.strip(_PADDING_BYTES)
    if isinstance(value, str):
        return value.strip(_PADDING).encode("utf-8", "surrogatepass")
    raise TypeError(f"identity values must be str or bytes, not {type(value).__name__}")


class Key:
    """A secret key and the pseudonyms derived from it.

    Build one with ``from_bytes``, ``from_file``, ``from_env``, ``random`` or ``load``. ``repr``
    and ``str`` show only ``key_id``. Pickling carries the key itself (Beam ships the key to
    its workers), so never write a pickled Key anywhere durable.
    """

    __slots__ = ("_secret", "_reproducible", "_source", "_key_id", "_cache")

    def __init__(self, secret: bytes, *, reproducible: bool = True, source: str = "bytes") -> None:
        if not isinstance(secret, (bytes, bytearray)):
            raise InvalidKey(f"key: expected bytes, got {type(secret).__name__}")
        if len(secret) < MIN_KEY_BYTES:
            raise InvalidKey(
                f"key from {source}: {len(secret)} bytes, at least {MIN_KEY_BYTES} are required "
                f"(e.g. `head -c 32 /dev/urandom > key` or `openssl rand -hex 32 > key`)"
            )
        self._secret = bytes(secret)
        self._reproducible = reproducible
        self._source = source
        self._key_id = hmac.new(self._secret, _KEY_ID_LABEL, hashlib.sha256).hexdigest()[:_KEY_ID_HEX]
        self._cache: dict[tuple[str, str, bytes], str] = {}

    # ----------------------------------------------------------------- construction

    @classmethod
    def from_bytes(cls, secret: bytes) -> Key:
        """Key from raw bytes (at least 16)."""
        return cls(secret, source="bytes")

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Key:
        """Key from the bytes of a file; one trailing newline (``\\n`` or ``\\r\\n``) is ignored.

        Raises:
            InvalidKey: the file cannot be read, is empty or holds fewer than 16 bytes.
        """
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_KEY_FILE_BYTES + 1)  # bounded: /dev/zero is not a key
        except OSError as exc:
            raise InvalidKey(f"--key-file {str(path)!r}: cannot read ({exc.strerror or type(exc).__name__})") from None
        return cls.from_file_bytes(data, name=str(path))

    @classmethod
    def from_file_bytes(cls, data: bytes, *, name: str) -> Key:
        """Key from the content of a key file read elsewhere (e.g. through Beam's filesystems
        for ``gs://``), with the same rules as ``from_file``; ``name`` appears in errors."""
        if len(data) > MAX_KEY_FILE_BYTES:
            raise InvalidKey(f"--key-file {name!r}: larger than {MAX_KEY_FILE_BYTES // (1 << 20)} MiB: not a key file")
        if data.endswith(b"\r\n"):
            data = data[:-2]
        elif data.endswith(b"\n"):
            data = data[:-1]
        if not data:
            raise InvalidKey(f"--key-file {name!r}: the key file is empty")
        return cls(data, source=f"--key-file {name!r}")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Key:
        """Key from the ``DICOM_DEID_KEY`` environment variable (its bytes as the process got
        them: the UTF-8 of a text value, the raw bytes of ``$(head -c 32 /dev/urandom)``), with
        the key file's rule: one trailing newline (``\\n`` or ``\\r\\n``) is ignored, so a key
        file and the same file's content in the variable (a Kubernetes secret made with
        ``--from-file`` keeps the newline) give the same key.

        Raises:
            InvalidKey: the variable is unset, empty or shorter than 16 bytes.
        """
        env = os.environ if environ is None else environ
        value = env.get(ENV_VAR)
        if value is None:
            raise InvalidKey(f"{ENV_VAR} is not set")
        if not value:
            raise InvalidKey(f"{ENV_VAR} is set but empty")
        # os.environ holds undecodable bytes as lone surrogates (PEP 383): give them back.
        data = value.encode("utf-8", "surrogateescape")
        data = data[:-2] if data.endswith(b"\r\n") else data[:-1] if data.endswith(b"\n") else data
        if not data:
            raise InvalidKey(f"{ENV_VAR} is set but empty")
        return cls(data, source=ENV_VAR)

    @classmethod
    def random(cls) -> Key:
        """A fresh random key: pseudonyms of this run cannot be reproduced later."""
        return cls(secrets.token_bytes(RANDOM_KEY_BYTES), reproducible=False, source="random")

    @classmethod
    def load(cls, key_file: str | os.PathLike[str] | None = None, environ: dict[str, str] | None = None) -> Key:
        """The run's key: ``key_file`` if given, else ``DICOM_DEID_KEY`` if set, else random.

        A set-but-empty ``DICOM_DEID_KEY`` is refused rather than silently replaced by a random key.
        """
        if key_file is not None:
            return cls.from_file(key_file)
        env = os.environ if environ is None else environ
        if ENV_VAR in env:
            return cls.from_env(env)
        return cls.random()

    # ----------------------------------------------------------------- properties

    @property
    def key_id(self) -> str:
        """12 hex characters naming the key (an HMAC of a fixed label; reveals nothing of it)."""
        return self._key_id

    @property
    def reproducible(self) -> bool:
        """False for a random key: its pseudonyms cannot be recomputed after the run."""
        return self._reproducible

    @property
    def source(self) -> str:
        """Where the key came from: ``random``, ``DICOM_DEID_KEY``, ``--key-file '<path>'``, ``bytes``."""
        return self._source

    # ----------------------------------------------------------------- derivations

    def digest(self, namespace: str, value: str | bytes) -> bytes:
        """The 32-byte HMAC-SHA256 of (namespace, stripped value); the root of every pseudonym."""
        return hmac.new(self._secret, _encode(namespace, _strip(value)), hashlib.sha256).digest()

    def uid(self, namespace: str, value: str | bytes) -> str:
        """``2.25.<decimal of 128 bits>`` for ``value`` (surrounding spaces/NULs ignored)."""
        stripped = _strip(value)
        cache_key = ("uid", namespace, stripped)
        cached = self._cache.get(cache_key)
        if cached is not None:
            return cached
        mac = hmac.new(self._secret, _encode(namespace, stripped), hashlib.sha256).digest()
        result = _UID_ROOT + str(int.from_bytes(mac[:16], "big"))
        self._remember(cache_key, result)
        return result

    def patient_id(self, value: str | bytes) -> str:
        """``ANON-`` + 16 base32 characters, from the PatientID ``value``."""
        return _PATIENT_ID_PREFIX + self._base32(PATIENT + ".id", value)

    def patient_name(self, value: str | bytes) -> str:
        """``ANON^`` + 16 base32 characters, from the PatientName ``value``.

        Derived from the name, so two patients who share a name share its pseudonym; pass the
        PatientID instead when that matters.
        """
        return _PATIENT_NAME_PREFIX + self._base32(PATIENT + ".name", value)

    def token(self, namespace: str, value: str | bytes, length: int = 16) -> str:
        """Lower-case hex pseudonym of ``length`` characters (8 to 64) for any other value."""
        if not 8 <= length <= 64:
            raise ValueError(f"token length must be 8..64 hex characters, not {length}")
        return self.digest(namespace, value).hex()[:length]

    def _base32(self, namespace: str, value: str | bytes) -> str:
        stripped = _strip(value)
        cache_key = ("b32", namespace, stripped)
        cached = self._cache.get(cache_key)
        if cached is not None:
            return cached
        mac = hmac.new(self._secret, _encode(namespace, stripped), hashlib.sha256).digest()
        result = base64.b32encode(mac[:10]).decode("ascii")  # 80 bits -> exactly 16 chars
        self._remember(cache_key, result)
        return result

    def _remember(self, cache_key: tuple[str, str, bytes], result: str) -> None:
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[cache_key] = result

    # ----------------------------------------------------------------- dunder

    def __repr__(self) -> str:
        return f"Key(key_id={self._key_id!r}, reproducible={self._reproducible})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Key):
            return NotImplemented
        return hmac.compare_digest(self._secret, other._secret)

    def __hash__(self) -> int:
        return hash(self._key_id)

    def __getstate__(self) -> dict[str, Any]:
        # The cache is rebuilt on the worker; only the key and its provenance travel.
        return {"secret": self._secret, "reproducible": self._reproducible, "source": self._source}

    def __setstate__(self, state: dict[str, Any]) -> None:
        Key.__init__(self, state["secret"], reproducible=state["reproducible"], source=state["source"])
