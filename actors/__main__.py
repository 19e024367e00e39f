"""``python -m actors``: the ``actors`` command line, the console script's entry point."""

from __future__ import annotations

import sys

from ._cli import main

if __name__ == "__main__":
    sys.exit(main())
