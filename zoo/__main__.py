"""`python -m zoo ...`: the zoo command line (same as the `zoo` console script; needed for torchrun)."""

import sys

from zoo.cli import main

if __name__ == "__main__":
    sys.exit(main())
