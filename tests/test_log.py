"""rlfn.log: the plain stderr lines of every command (``note:``, ``error:``, info alone), each
on a line of its own even when another library left the last line unfinished."""

from __future__ import annotations

import subprocess
import sys

from prereq import ROOT

UNFINISHED = r"""
import sys
from rlfn.log import get_logger, setup
log = setup()
# what Prefect's APILogHandler does when the server is down: its notice, then the
# exception's text with no newline
sys.stderr.write("--- Error logging to API ---\n")
sys.stderr.write("Server error '500 Internal Server Error' for url 'http://x/api/logs/'")
get_logger("pipeline").error("MLflow tracking server at http://x: gone")
log.warning("a note")
print("info to stdout")
get_logger("pipeline").info("fine")
sys.stderr.flush()
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_an_error_line_starts_a_line_after_another_librarys_unfinished_one():
    r = _run(UNFINISHED)
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == [
        "--- Error logging to API ---",
        "Server error '500 Internal Server Error' for url 'http://x/api/logs/'",
        "error: MLflow tracking server at http://x: gone",
        "note: a note",
        "fine",
    ], r.stderr
    assert r.stdout == "info to stdout\n"


def test_lines_are_unchanged_when_the_last_line_was_finished():
    r = _run("from rlfn.log import get_logger, setup\nlog = setup()\n"
             "import sys\nsys.stderr.write('done\\n')\nlog.error('x')\nlog.error('y')\n"
             "print(sys.stderr.isatty(), sys.stderr.fileno())\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr == "done\nerror: x\nerror: y\n"  # no blank line added
    assert r.stdout.split() == ["False", "2"]  # the real stream's attributes, delegated
