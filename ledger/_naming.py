"""Actor names to ledger file paths.

Any string is a valid actor name. The file name keeps a readable slug of the name (letters,
digits, ``-``, ``_`` and ``.`` only, never a leading dot, at most 40 characters) and adds the
SHA-256 of the exact name, so the path can never leave ``data_dir`` and two names never share a
file. Each ledger also stores its actor name and refuses to open under a different one.
"""

from __future__ import annotations

import functools
import hashlib
import re
from pathlib import PurePosixPath

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_SLUG_MAX = 40


def check_actor_id(actor_id: str) -> None:
    """Validate an actor name (cached: it is checked on every ledger operation).

    Raises:
        TypeError: if ``actor_id`` is not a string.
        ValueError: if ``actor_id`` is empty, holds a NUL character or a lone surrogate.
    """
    ledger_relpath(actor_id)


def ledger_relpath(actor_id: str) -> PurePosixPath:
    """Return the ledger file path for ``actor_id``, relative to the data directory.

    Cached for the most recent 16,384 names: it is asked on every ledger operation and by
    every ``host.get(name)``, and a SHA-256 and a slug cost far more than a lookup.

    Raises:
        TypeError: if ``actor_id`` is not a string.
        ValueError: if ``actor_id`` is empty, holds a NUL character or a lone surrogate.
    """
    if not isinstance(actor_id, str):  # before the cache, which would hash any value
        raise TypeError(f"actor name must be a str, not {type(actor_id).__name__}")
    return _relpath(actor_id)


@functools.lru_cache(maxsize=16384)
def _relpath(actor_id: str) -> PurePosixPath:
    if not actor_id:
        raise ValueError("actor name must not be empty")
    if "\x00" in actor_id:
        raise ValueError("actor name must not contain NUL characters")
    try:
        encoded = actor_id.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("actor name must be valid Unicode (no lone surrogates)") from None
    digest = hashlib.sha256(encoded).hexdigest()
    slug = _UNSAFE.sub("_", actor_id)[:_SLUG_MAX].lstrip(".") or "actor"
    return PurePosixPath("actors", digest[:2], f"{slug}-{digest[:32]}.db")
