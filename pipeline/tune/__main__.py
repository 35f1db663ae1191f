"""``python -m pipeline.tune``: see ``pipeline.tune`` (``--help``)."""

import sys

from pipeline.tune.cli import main

if __name__ == "__main__":
    sys.exit(main())
