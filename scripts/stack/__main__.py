"""``python scripts/stack <verb>``, what scripts/stack.sh runs (or ``python -m stack <verb>``
with scripts/ on the path)."""

import sys
from pathlib import Path

if not __package__:  # run as a folder: its own folder is on the path, not the one above it
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from stack.cli import main  # noqa: E402 - after the path is set

sys.exit(main(sys.argv[1:]))
