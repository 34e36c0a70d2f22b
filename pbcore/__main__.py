"""``python -m pbcore``: the ``pbcore`` command (see :mod:`pbcore.cli`)."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
