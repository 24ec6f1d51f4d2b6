"""`tenant-proxy` (and `python -m proxy`): the command line is proxy/cli/."""

import sys

from .cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
