"""Progress reporting (``rlfn.progress``): plain lines in a log, a tqdm bar on a terminal.

End to end, a short training run is a subprocess whose stderr is a pipe (a log: bounded
plain lines, no carriage return) or a pseudo-terminal (a tqdm bar). The line rules (every N
seconds or N percent, the final line, the formats) run on a fake clock, and where the lines
go (a handler, the stderr fallback, Prefect's log handler) is checked on the loggers. Nothing
here asserts on wall-clock time."""

from __future__ import annotations

import logging
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from servers import clean_env
import rlfn.progress as progress_mod
from rlfn.progress import progress

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
LINE = re.compile(r"^stage 1 train: (\d+)/(\d+) \((\d+)%\) ")


@pytest.fixture(autouse=True)
def _no_forced_mode(monkeypatch):
    monkeypatch.delenv(progress_mod.ENV_MODE, raising=False)
    monkeypatch.delenv(progress_mod.ENV_EVERY, raising=False)


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A standalone config: rlfn_ntire on four images of data/sample/train, tiny patches,
    validation on two Set5 images."""
    d = tmp_path_factory.mktemp("progress")
    hr = d / "hr"
    hr.mkdir()
    for f in sorted((SAMPLE / "train").glob("*.png"))[:4]:
        shutil.copy(f, hr / f.name)
    cfg = dict(model="rlfn_ntire", scale=4, patch_size=64, batch_size=2, lr=1e-3, log_every=5,
               checkpoint_every=1000, val_every=100, val_max_images=2,
               val_hr_dir=str(SAMPLE / "Set5"), num_workers=0, threads=1, seed=3,
               epoch_iterations=7, amp="off", hr_dir=str(hr))
    (d / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return d


def _train_cmd(d: Path, out: Path, iterations: int) -> list[str]:
    return [sys.executable, "-m", "rlfn", "train", "--config", str(d / "cfg.yaml"),
            "--out", str(out), "--set", f"iterations={iterations}"]


@pytest.mark.timeout(600)
def test_a_log_gets_a_few_plain_lines(tiny_run):
    # every_s out of reach: the lines come from the 10 % marks alone, so their number does
    # not depend on the speed of the machine
    r = subprocess.run(_train_cmd(tiny_run, tiny_run / "lines", 200), cwd=ROOT,
                       env=clean_env(RLFN_PROGRESS_EVERY="100000"), capture_output=True,
                       text=True, timeout=580)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "\r" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if LINE.match(ln)]
    assert 1 <= len(lines) <= 15, r.stderr
    for ln in lines:
        assert re.search(r" \d[\d.]* (it/s|s/it)", ln), ln
        assert re.search(r", loss \d[\d.e+-]*(,|$)", ln), ln
        assert re.search(r", lr \d\.\de-\d\d", ln), ln
    counts = [int(LINE.match(ln).group(1)) for ln in lines]
    assert counts == sorted(counts) and counts[-1] == 200
    last = lines[-1]
    assert "(100%)" in last and "elapsed" in last and re.search(r", psnr \d+\.\d\d", last)
    assert all("eta" in ln for ln in lines[:-1])
    # the patch store's packing is reported the same way
    assert any(ln.startswith("packing ") and "(100%)" in ln for ln in r.stderr.splitlines())


@pytest.mark.timeout(600)
def test_quiet_prints_no_progress_and_the_same_weights(tiny_run):
    """``-q``: no progress at all, even where lines are forced; and the weights are those of
    the run above, byte for byte (reporting touches no RNG and no tensor)."""
    cmd = _train_cmd(tiny_run, tiny_run / "quiet", 200)
    r = subprocess.run([*cmd[:3], "-q", *cmd[3:]], cwd=ROOT, env=clean_env(RLFN_PROGRESS="lines"),
                       capture_output=True, text=True, timeout=580)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "train:" not in r.stderr and "packing" not in r.stderr and "%" not in r.stderr
    lines_run = tiny_run / "lines" / "model.safetensors"
    if not lines_run.exists():
        pytest.skip("needs test_a_log_gets_a_few_plain_lines's run (same module)")
    assert (tiny_run / "quiet" / "model.safetensors").read_bytes() == lines_run.read_bytes()


def _run_on_a_terminal(cmd: list[str], timeout: float) -> tuple[int, bytes]:
    """Run ``cmd`` with its stderr on a pseudo-terminal (left unsized, as ``script`` without a
    terminal leaves it: the bar must still show); all it wrote there."""
    master, slave = pty.openpty()
    try:
        p = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=slave)
    finally:
        os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if p.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
        if p.poll() is None:
            p.kill()
        rc = p.wait()
    return rc, bytes(out)


@pytest.mark.timeout(600)
def test_a_terminal_gets_a_tqdm_bar(tiny_run):
    rc, out = _run_on_a_terminal(_train_cmd(tiny_run, tiny_run / "bars", 20), timeout=580)
    text = out.decode(errors="replace")
    assert rc == 0, text[-3000:]
    assert "\r" in text and "stage 1 train:" in text
    assert re.search(r"20/20 \[[^\]]*(it/s|s/it)", text), text[-2000:]  # tqdm's own stats
    assert not any(LINE.match(ln) for ln in re.split(r"[\r\n]+", text))  # no plain lines


# --------------------------------------------------------------------------- line rules
class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def captured(monkeypatch) -> list[str]:
    """The lines emitted (whatever the logging set-up)."""
    got: list[str] = []
    monkeypatch.setattr(progress_mod, "_emit", got.append)
    return got


def test_lines_every_pct_and_a_final_line(captured):
    clock = Clock()
    bar = progress(total=2000, desc="stage 3 train", every_s=10, every_pct=10, clock=clock)
    for i in range(2000):
        clock.t += 0.001  # fast: only the 10 % marks
        if i % 50 == 0:
            bar.set_postfix(loss="10.1234", lr="5.0e-04", psnr="30.71")
        bar.update(1)
    bar.close()
    assert len(captured) == 10
    assert captured[0].startswith("stage 3 train: 200/2000 (10%) ")
    assert ", eta " in captured[0] and captured[0].endswith("loss 10.1234, lr 5.0e-04, psnr 30.71")
    assert captured[-1].startswith("stage 3 train: 2000/2000 (100%) ")
    assert "elapsed" in captured[-1] and "eta" not in captured[-1]


def test_lines_every_s_when_slow(captured):
    clock = Clock()
    bar = progress(total=1000, desc="slow", unit="img", every_s=10, every_pct=50, clock=clock)
    for _ in range(95):
        clock.t += 1.0  # 1 s per item: a line each 10 s
        bar.update(1)
    bar.close()  # stopped at 9 %: the final line says where
    assert len(captured) == 10
    assert captured[0] == "slow: 10/1000 (1%) 1 img/s, eta 16m30s"
    assert captured[-1] == "slow: 95/1000 (9%) 1 img/s, elapsed 1m35s"
    clock.t = 0.0
    captured.clear()
    bar = progress(total=10, desc="slower", every_s=1000, clock=clock)
    for _ in range(2):
        clock.t += 30
        bar.update(1)
    assert captured == ["slower: 1/10 (10%) 30 s/it, eta 4m30s",
                        "slower: 2/10 (20%) 30 s/it, eta 4m00s"]


def test_resume_bytes_and_unknown_totals(captured):
    clock = Clock()
    with progress(total=3 * 2**20, initial=2**20, unit="B", unit_scale=True, unit_divisor=1024,
                  desc="x.zip", every_s=1000, every_pct=50, clock=clock) as bar:
        for _ in range(32):
            clock.t += 0.5
            bar.update(2**16)
    # the rate counts what this run did (from the resumed offset)
    assert captured == ["x.zip: 1.50MB/3.00MB (50%) 128kB/s, eta 12s",
                        "x.zip: 3.00MB/3.00MB (100%) 128kB/s, elapsed 16s"]
    captured.clear()
    clock.t = 0.0
    for _ in progress(iter(range(5)), desc="manifest", unit="file", every_s=2, clock=clock):
        clock.t += 1
    assert captured == ["manifest: 2 file, 1 file/s", "manifest: 4 file, 1 file/s",
                        "manifest: 5 file, 1 file/s, elapsed 5s"]


def test_iteration_passes_items_through_and_closes(captured):
    got = list(progress(range(7), desc="n", every_s=1000))
    assert got == list(range(7)) and captured[-1].startswith("n: 7/7 (100%)")
    captured.clear()
    assert list(progress([], desc="empty")) == [] and captured == []  # nothing happened


def test_disabled_and_off_print_nothing(monkeypatch, captured, capsys):
    monkeypatch.setenv(progress_mod.ENV_MODE, "lines")
    assert list(progress(range(3), desc="a", enabled=False)) == [0, 1, 2]
    monkeypatch.setenv(progress_mod.ENV_MODE, "off")
    with progress(total=3, desc="b") as bar:
        bar.update(3)
        bar.set_postfix(loss="1")
    assert captured == [] and capsys.readouterr().err == ""


def test_mode_follows_the_terminal_unless_forced(monkeypatch):
    class Stream:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

    monkeypatch.setattr(sys, "stderr", Stream(False))
    assert progress_mod.progress_mode() == "lines"
    monkeypatch.setattr(sys, "stderr", Stream(True))
    assert progress_mod.progress_mode() == "bars"
    monkeypatch.setenv(progress_mod.ENV_MODE, "lines")
    assert progress_mod.progress_mode() == "lines"
    monkeypatch.setenv(progress_mod.ENV_MODE, "auto")
    assert progress_mod.progress_mode() == "bars"


def test_env_sets_the_seconds(monkeypatch, captured):
    monkeypatch.setenv(progress_mod.ENV_EVERY, "0")
    clock = Clock()
    bar = progress(total=1000, desc="e", every_s=1000, clock=clock)
    for _ in range(3):
        clock.t += 0.1
        bar.update(1)
    assert len(captured) == 3


# --------------------------------------------------------------------------- where lines go
@pytest.fixture
def bare_rlfn_logger(monkeypatch) -> logging.Logger:
    """The ``rlfn`` logger with no handler of its own, not propagating, no level (restored
    afterwards)."""
    log = logging.getLogger("rlfn")
    monkeypatch.setattr(log, "handlers", [])
    monkeypatch.setattr(log, "propagate", False)
    monkeypatch.setattr(log, "level", logging.NOTSET)
    monkeypatch.setenv(progress_mod.ENV_MODE, "lines")
    return log


def test_without_any_handler_lines_go_to_stderr():
    """A bare ``python -c`` (no ``rlfn.log.setup()``, no logging configured: Python's
    last-resort handler would drop INFO): the lines are written to stderr directly. (In
    process, pytest's capture handlers are on every logger, so this runs in a subprocess.)"""
    code = ("from rlfn.progress import progress\n"
            "for _ in progress(range(2), desc='bare', every_s=1000, every_pct=100): pass\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean_env(), timeout=120,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(r"bare: 2/2 \(100%\) \S+ (it/s|s/it), elapsed \d+s\n", r.stderr), r.stderr


def test_with_handlers_lines_are_info_records(bare_rlfn_logger, capsys):
    got: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = got.append  # type: ignore[method-assign]
    bare_rlfn_logger.addHandler(handler)
    bare_rlfn_logger.setLevel(logging.WARNING)  # the lines do not depend on it
    for _ in progress(range(2), desc="logged", every_s=1000, every_pct=100):
        pass
    assert [(r.name, r.levelno) for r in got] == [("rlfn.progress", logging.INFO)]
    assert got[0].getMessage().startswith("logged: 2/2 (100%) ")
    assert capsys.readouterr().err == ""  # no second copy on stderr


PREFECT_CHECK = """
import logging, sys
import pipeline  # sets PREFECT_LOGGING_EXTRA_LOGGERS=rlfn, as every stage does
from rlfn.log import setup
setup()  # pipeline.entry.main does this first
from prefect.logging.configuration import setup_logging
from prefect.logging.handlers import APILogHandler
setup_logging()
api = [h for h in logging.getLogger("rlfn").handlers if isinstance(h, APILogHandler)]
assert len(api) == 1, logging.getLogger("rlfn").handlers
api[0].emit = lambda record: print("API", record.name, record.levelname, record.getMessage())
from rlfn.progress import progress
for _ in progress(range(3), desc="in a flow", every_s=1000, every_pct=50):
    pass
"""


@pytest.mark.timeout(300)
def test_inside_prefect_lines_reach_the_flow_run_log():
    """In a stage, the ``rlfn`` logger has the plain stderr handler (``setup()``) and
    Prefect's API handler (extra logger): a progress line goes to both."""
    pytest.importorskip("prefect")
    r = subprocess.run([sys.executable, "-c", PREFECT_CHECK], cwd=ROOT,
                       env=clean_env(RLFN_PROGRESS="lines"), capture_output=True, text=True,
                       timeout=280)
    assert r.returncode == 0, r.stderr[-3000:]
    api = [ln for ln in r.stdout.splitlines() if ln.startswith("API rlfn.progress INFO ")]
    assert len(api) == 2 and "in a flow: 3/3 (100%)" in api[-1], r.stdout
    plain = [ln for ln in r.stderr.splitlines() if ln.startswith("in a flow: ")]
    assert len(plain) == 2 and "\r" not in r.stderr, r.stderr
