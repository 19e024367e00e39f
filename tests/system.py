"""System software some test tiers need (Chromium), found or skipped with a clear message.

On a developer's machine a tier whose software is missing is skipped, saying what to install.
CI sets ``DURABLE_TRIGGERS_REQUIRE_SYSTEM=1`` (``.ci/run`` installs the software first): a
missing piece then fails the test instead, so those tiers always run there.
"""

from __future__ import annotations

import os
import shutil

import pytest

REQUIRED = os.environ.get("DURABLE_TRIGGERS_REQUIRE_SYSTEM") == "1"


def need(program: str, install: str) -> str:
    """The path of ``program``, or skip (fail under CI) saying how to install it."""
    found = shutil.which(program)
    if found is None:
        message = f"{program} is not installed ({install})"
        if REQUIRED:
            pytest.fail(message + "; DURABLE_TRIGGERS_REQUIRE_SYSTEM=1 requires it")
        pytest.skip(message)
    return found


def chromium() -> str:
    """Debian's Chromium, for the browser tests."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return need("chromium", "apt-get install chromium")
