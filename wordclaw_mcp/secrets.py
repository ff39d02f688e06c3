"""Target credentials, encrypted at rest with Fernet and readable only by the worker.

MultiFernet takes a list of keys: the first encrypts, all decrypt. That is what key
rotation needs: prepend a new key, re-encrypt (``wordclaw keys rotate``), then drop the old one.

Each ciphertext is bound to the row it belongs to: the token carries the row's binding
(``target:<id>``, ``session:<id>``) beside the secrets, and decrypting checks it. Fernet has no
associated data, and the binding inside the authenticated token does the same work: a
ciphertext copied to another row does not decrypt there. Tokens written before binding existed
hold the bare secrets; they still decrypt, and ``wordclaw keys rotate`` binds them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from .config import Settings
from .errors import DistributionError

KEY_FILE = "secret.key"
# Decrypted secrets kept per ciphertext. A worker decrypts the same few targets' secrets for
# every job, and Fernet's check and decryption were a twentieth of its time per delivery.
DECRYPTED_CACHE_SIZE = 1024

# The sealed document: {BINDING: "target:<id>", SECRETS: {...}}.
BINDING = "boundTo"
SECRETS = "secrets"


def target_binding(target_id: object) -> str:
    return f"target:{target_id}"


def session_binding(target_id: object) -> str:
    return f"session:{target_id}"


log = logging.getLogger(__name__)


class SecretBox:
    def __init__(self, keys: list[str]) -> None:
        if not keys:
            raise ValueError("at least one key is required")
        self._fernet = MultiFernet([Fernet(key.encode()) for key in keys])
        self._fingerprint_key = hashlib.sha256(b"wordclaw fingerprint\n" + keys[0].encode()).digest()
        self._decrypted: OrderedDict[tuple[bytes, str], dict[str, str]] = OrderedDict()

    @classmethod
    def from_settings(cls, settings: Settings) -> SecretBox:
        if settings.secret_keys:
            return cls(list(settings.secret_keys))
        if not settings.embedded:
            log.warning(
                "WORDCLAW_SECRET_KEYS is not set: target secrets are encrypted with the key in %s, "
                "which only this host has. Workers on other hosts cannot decrypt them; set the same "
                "WORDCLAW_SECRET_KEYS for every process.",
                settings.home / KEY_FILE,
            )
        return cls([_local_key(settings.home)])

    def encrypt(self, secrets: Mapping[str, str], *, bound_to: str) -> bytes:
        """``secrets`` sealed under the first key, readable only for the row ``bound_to`` names."""
        return self._fernet.encrypt(json.dumps({BINDING: bound_to, SECRETS: dict(secrets)}).encode())

    def decrypt(self, ciphertext: bytes, *, bound_to: str) -> dict[str, str]:
        """The secrets sealed in ``ciphertext`` for the row ``bound_to``, as a dict of the caller's own."""
        # A Fernet token is unique (random IV) and authenticated, so equal bytes mean equal secrets.
        key = (bytes(ciphertext), bound_to)
        if (known := self._decrypted.get(key)) is not None:
            self._decrypted.move_to_end(key)
            return dict(known)
        sealed = self._open(ciphertext)
        if BINDING in sealed and sealed[BINDING] != bound_to:
            raise DistributionError(
                "SECRET_ROW_MISMATCH",
                f"The stored secrets of {bound_to} were sealed for another row, so they are not used.",
                "Someone copied a ciphertext between rows: find out who can write to the database, then "
                "register the target again with its secrets.",
            )
        secrets = sealed[SECRETS] if BINDING in sealed else sealed
        self._decrypted[key] = secrets
        if len(self._decrypted) > DECRYPTED_CACHE_SIZE:
            self._decrypted.popitem(last=False)
        return dict(secrets)

    def fingerprint(self, secrets: Mapping[str, str], *, bound_to: str) -> str:
        """A short tag that changes when the secrets change and reveals nothing about them.

        An HMAC under a key derived from the encrypting key, so that no one without the keys can
        test guesses (a weak SMTP password) against it; ``wordclaw keys rotate`` recomputes it.
        """
        digest = hmac.new(
            self._fingerprint_key, f"{bound_to}\n{json.dumps(dict(secrets), sort_keys=True)}".encode(), "sha256"
        )
        return "hmac-sha256:" + digest.hexdigest()[:12]

    def reseal(self, ciphertext: bytes, *, bound_to: str) -> bytes:
        """``ciphertext`` sealed again under the first key and bound to its row (``wordclaw keys rotate``)."""
        return self.encrypt(self.decrypt(ciphertext, bound_to=bound_to), bound_to=bound_to)

    def _open(self, ciphertext: bytes) -> dict:
        try:
            return json.loads(self._fernet.decrypt(ciphertext))
        except InvalidToken as exc:
            raise DistributionError(
                "SECRET_KEY_MISMATCH",
                "The target's stored secrets cannot be decrypted with the configured keys.",
                "Give this process the key the secrets were written with (WORDCLAW_SECRET_KEYS), "
                "or register the target again.",
            ) from exc


def _local_key(home: Path) -> str:
    """A per-installation key for single-host use, created once with owner-only permissions."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / KEY_FILE
    if not path.exists():
        draft = home / f".{KEY_FILE}.{os.getpid()}"
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(Fernet.generate_key().decode())
        try:
            # link() publishes a complete file or fails if another process won: never a torn read.
            os.link(draft, path)
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    return path.read_text().strip()
