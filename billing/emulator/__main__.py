"""`python -m billing.emulator`; `main` is also the `billing-stripe-emulator` console script."""

from __future__ import annotations

import sys

from billing.emulator.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
