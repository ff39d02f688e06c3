"""Target credentials, encrypted at rest with Fernet and readable only by the worker.

MultiFernet takes a list of keys: the first encrypts, all decrypt. That is what key
rotation needs: prepend a new key, re-encrypt at leisure, then drop the old one.
"""

from __future__ import annotations

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

log = logging.getLogger(__name__)


class SecretBox:
    def __init__(self, keys: list[str]) -> None:
        if not keys:
            raise ValueError("at least one key is required")
        self._fernet = MultiFernet([Fernet(key.encode()) for key in keys])
        self._decrypted: OrderedDict[bytes, dict[str, str]] = OrderedDict()

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

    def encrypt(self, secrets: Mapping[str, str]) -> bytes:
        return self._fernet.encrypt(json.dumps(dict(secrets)).encode())

    def decrypt(self, ciphertext: bytes) -> dict[str, str]:
        """The secrets sealed in ``ciphertext``, as a dict of the caller's own."""
        # A Fernet token is unique (random IV) and authenticated, so equal bytes mean equal secrets.
        if (known := self._decrypted.get(ciphertext)) is not None:
            self._decrypted.move_to_end(ciphertext)
            return dict(known)
        try:
            secrets = json.loads(self._fernet.decrypt(ciphertext))
        except InvalidToken as exc:
            raise DistributionError(
                "SECRET_KEY_MISMATCH",
                "The target's stored secrets cannot be decrypted with the configured keys.",
                "Give this process the key the secrets were written with (WORDCLAW_SECRET_KEYS), "
                "or register the target again.",
            ) from exc
        self._decrypted[bytes(ciphertext)] = secrets
        if len(self._decrypted) > DECRYPTED_CACHE_SIZE:
            self._decrypted.popitem(last=False)
        return dict(secrets)


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
