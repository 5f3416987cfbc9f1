"""`python -m jaxckpt inspect|plan|zoo ...` (see `jaxckpt.cli`)."""

import sys

from jaxckpt.cli import main

if __name__ == "__main__":
    sys.exit(main())
