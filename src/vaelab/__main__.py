"""`python -m vaelab ...`, the same as the `vaelab` command (torchrun starts it as `-m vaelab`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
