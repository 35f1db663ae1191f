"""One training stage under torchrun across test hosts (issue 23 item 4, last bullet): what
tests/test_torchrun_hosts.py and bench/torchrun_hosts.py share.

Each host (tests/hosts.py: a network namespace, a Unix user, a home of its own) gets its own
copy of the project (``install_project``), its own copy of the training images and its own
config naming them; nothing is shared but the bridge. ``torchrun_argv`` is the command each
host runs (one rank per host, c10d rendezvous on the first host's address, gloo over eth0);
``one_host_argv`` the same stage with two ranks on one host (``rlfn train --nproc-per-node 2``,
rlfn.train.launch)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import yaml
from PIL import Image

from hosts import Host, _kill, _procs_of
from imagefiles import rgb

# the tiny stage of tests/test_train.py's DDP test (fp32, one thread, no loader workers)
TINY = dict(model="rlfn_ntire", scale=4, patch_size=64, batch_size=4, lr=1e-3, log_every=5,
            checkpoint_every=3, val_every=1000, num_workers=0, threads=1, seed=3,
            epoch_iterations=7, amp="off", iterations=6)
RDZV_PORT = 29400  # in the first host's own namespace: nothing else listens there


def chown(h: Host, path: Path) -> None:
    subprocess.run(["chown", "-R", f"{h.user}:{h.user}", str(path)], check=True, timeout=60)


def make_images(h: Host, seed0: int = 0, n: int = 5) -> Path:
    """The host's own copy of the training images (the same pixels on every host unless
    ``seed0`` differs): ``~/data/hr``."""
    d = h.home / "data" / "hr"
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rgb(96 + 8 * i, 88, seed=seed0 + i)).save(d / f"img{i}.png")
    chown(h, h.home / "data")
    return d


def write_config(h: Host, hr: Path, name: str = "train.yaml", **kw) -> Path:
    """A stage config on host ``h`` naming its own images."""
    p = h.home / name
    p.write_text(yaml.safe_dump({**TINY, "hr_dir": str(hr), **kw}))
    chown(h, p)
    return p


def host_env(**extra: str) -> dict[str, str]:
    """What each rank's environment adds: one thread (as torchrun gives several local ranks)
    and gloo on the host's bridge interface."""
    return {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "eth0", **extra}


def torchrun_argv(h: Host, clone: Path, first: Host, cfg: Path, out: Path, run_id: str,
                  nnodes: int = 2) -> list[str]:
    """torchrun on host ``h``: one rank of an ``nnodes``-host run whose c10d rendezvous is on
    ``first``'s address. A test host's hostname resolves nowhere, so what torchrun would
    find from it is given: ``--local-addr`` (the address the other hosts reach this one at:
    rank 0's is the ranks' ``MASTER_ADDR``) and ``is_host`` (which host serves the
    rendezvous store: otherwise torchrun resolves its hostname to tell)."""
    return [str(clone / ".venv" / "bin" / "python"), "-m", "torch.distributed.run",
            "--nnodes", str(nnodes), "--nproc-per-node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{first.addr}:{RDZV_PORT}",
            "--rdzv-id", run_id,
            "--rdzv-conf", f"join_timeout=180,is_host={int(h.addr == first.addr)}",
            "--local-addr", h.addr, "--max-restarts", "0",
            "-m", "rlfn", "-q", "train", "--config", str(cfg), "--out", str(out)]


def one_host_argv(clone: Path, cfg: Path, out: Path, nproc: int = 2) -> list[str]:
    return [str(clone / ".venv" / "bin" / "python"), "-m", "rlfn", "-q", "train",
            "--nproc-per-node", str(nproc), "--config", str(cfg), "--out", str(out)]


def stop(h: Host, p: subprocess.Popen) -> None:
    """Stop a command started by ``h.popen``: SIGTERM to its process group (torchrun's agent
    then stops its ranks, which run in sessions of their own), then SIGKILL to every process
    of the host's user still there (a rank left waiting in a collective)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        p.wait(timeout=30)
    _kill(_procs_of({h.uid}, set()))
    p.wait(timeout=30)


def standalone_argv(clone: Path, cfg: Path, out: Path, nproc: int = 2) -> list[str]:
    """torchrun on one host (``--standalone``: its rendezvous on loopback, ``--local-addr``
    127.0.0.1 as a test host's hostname resolves nowhere), ``nproc`` ranks."""
    return [str(clone / ".venv" / "bin" / "python"), "-m", "torch.distributed.run",
            "--standalone", "--nproc-per-node", str(nproc), "--local-addr", "127.0.0.1",
            "-m", "rlfn", "-q", "train", "--config", str(cfg), "--out", str(out)]


def run_hosts(runs: list[tuple[Host, list[str], Path, dict]], timeout: float = 600
              ) -> list[tuple[int, str]]:
    """Start each ``(host, argv, cwd, env)`` at once and wait for all: (exit code, output)
    of each. Those not done within ``timeout`` (all together) are stopped (``stop``; their
    code then negative, the output ending with a line that says so)."""
    procs = [(h, h.popen(argv, cwd=cwd, **env)) for h, argv, cwd, env in runs]
    outs: dict[int, list[str]] = {}
    readers = []
    for i, (_, p) in enumerate(procs):  # read as they go: a full pipe would stall a rank
        outs[i] = []
        t = threading.Thread(target=lambda f=p.stdout, o=outs[i]: o.extend(f), daemon=True)
        t.start()
        readers.append(t)
    deadline = time.monotonic() + timeout
    done = []
    for i, (h, p) in enumerate(procs):
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
            late = ""
        except subprocess.TimeoutExpired:
            stop(h, p)
            late = f"\n[stopped after {timeout:g} s]"
        readers[i].join(timeout=30)
        done.append((p.returncode, "".join(outs[i]) + late))
    return done


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def result(out: Path) -> dict:
    return json.loads((out / "result.json").read_text())


def tx_bytes(h: Host) -> int:
    """Bytes this host has sent on its bridge interface so far."""
    r = h.root(["cat", "/sys/class/net/eth0/statistics/tx_bytes"])
    return int(r.stdout.strip())
