"""Threads per process from the cores it actually has, so that a busy machine slows our work
down instead of collapsing it.

torch sizes its thread pool to the machine's physical cores, whatever else runs there. Two
such processes on 2 cores (a Prefect worker running two flows, ``degrade``'s worker
processes, tests in parallel, a training job beside an evaluation) put 4 spinning OpenMP
threads on 2 cores: every parallel region waits for a descheduled thread, and work runs
10-100x slower (``bench/busy.py`` measures it). The policy here (``threads: 0`` in params.yaml,
``--threads 0`` on the command line, i.e. "auto"):

1. An explicit count wins: a positive setting, else ``RLFN_THREADS``, else ``OMP_NUM_THREADS``
   (torchrun sets it to 1 for each of its processes), used as given.
2. Else the process's **cores** are the CPUs it may run on (``sched_getaffinity``), capped by
   its cgroup's CPU quota (containers, CI runners), shared by its **siblings**: the processes
   started together to share those cores (``RLFN_PROCESSES``: a Prefect worker's concurrency,
   a process pool; ``LOCAL_WORLD_SIZE`` under torchrun; pytest-xdist's worker count).
3. Where the numbers need not be bit-reproducible (inference, evaluation, bicubic, data
   preparation: ``load_aware=True``), the cores other processes keep busy right now
   (measured over 0.1 s from ``/proc/stat``, less this process's own CPU time) are left to
   them. Training does not look at the load: its thread count must not change between a run
   and its resume (the summation order, hence the weights' bits, follows it).
4. At least one thread.

Waiting OpenMP threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``, set by
``pipeline`` and the ``rlfn`` command before torch loads, unless the environment says
otherwise): a spinning thread burns the core that the thread it waits for needs. With one
thread per process (the main job's training) it changes nothing.

``Governor`` re-applies the load-aware count every few seconds inside long inference loops,
so a job that started on an idle machine gives cores back when another arrives, and takes
them again when it leaves.

``shared_pool(n)`` is the process's one pool of worker threads for the bicubic resize (its
NumPy bands in ``rlfn.bicubic``, its compiled bands in ``rlfn.bicubic_native``).
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ThreadChoice", "available_cores", "sibling_processes", "busy_cores_of_others",
           "choose_threads", "configure_threads", "Governor", "WAIT_POLICY",
           "set_wait_policy_default", "shared_pool"]

WAIT_POLICY = "PASSIVE"


def set_wait_policy_default(environ: dict | None = None) -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` unless set: only effective before torch is imported."""
    env = os.environ if environ is None else environ
    env.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)


def _cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by the cgroup's quota (v2 ``cpu.max``, v1 ``cfs_quota_us``), or None."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def available_cores() -> int:
    """CPUs this process may run on: its affinity mask, capped by its cgroup's quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota - 1e-9)))
    return max(1, n)


def _first_count(env, keys: tuple[str, ...]) -> tuple[int, str] | None:
    """The first of ``keys`` set in ``env`` to a positive integer: (value, key); others
    (unset, empty, not a number, zero) are skipped."""
    for key in keys:
        try:
            n = int(env.get(key, "").strip())
        except ValueError:
            continue
        if n >= 1:
            return n, key
    return None


def sibling_processes(environ: dict | None = None) -> tuple[int, str]:
    """How many processes were started together to share this one's cores, and who says so."""
    env = os.environ if environ is None else environ
    return _first_count(env, ("RLFN_PROCESSES", "LOCAL_WORLD_SIZE",
                              "PYTEST_XDIST_WORKER_COUNT")) or (1, "")


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


def busy_cores_of_others(interval_s: float = 0.1) -> float:
    """Cores kept busy by other processes over ``interval_s`` (this process's own CPU time is
    subtracted). 0.0 where /proc/stat cannot be read."""
    a = _cpu_jiffies()
    if a is None:
        return 0.0
    own0 = time.process_time()
    time.sleep(interval_s)
    own1 = time.process_time()
    b = _cpu_jiffies()
    if b is None or b[1] <= a[1]:
        return 0.0
    ncpu = os.cpu_count() or 1
    busy_cores = (b[0] - a[0]) / (b[1] - a[1]) * ncpu
    wall = interval_s
    return max(0.0, busy_cores - (own1 - own0) / wall)


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str

    def __str__(self) -> str:
        return f"{self.threads} thread{'s' if self.threads != 1 else ''} ({self.reason})"


def choose_threads(setting: int = 0, *, load_aware: bool = True,
                   environ: dict | None = None, busy: float | None = None) -> ThreadChoice:
    """The policy of the module docstring; ``busy`` (cores used by others) is measured when
    not given and ``load_aware``."""
    env = os.environ if environ is None else environ
    if setting and setting > 0:
        return ThreadChoice(int(setting), "as set")
    explicit = _first_count(env, ("RLFN_THREADS", "OMP_NUM_THREADS"))
    if explicit is not None:
        return ThreadChoice(explicit[0], f"{explicit[1]}={explicit[0]}")
    cores = available_cores()
    siblings, who = sibling_processes(env)
    share = max(1, cores // siblings)
    reason = f"{cores} core{'s' if cores != 1 else ''}"
    if siblings > 1:
        reason += f" shared by {siblings} processes ({who})"
    if not load_aware:
        return ThreadChoice(share, reason)
    if busy is None:
        busy = busy_cores_of_others()
    free = cores - int(busy + 0.25)  # a core counts as taken from 75% use
    threads = max(1, min(share, free))
    if threads < share:
        reason += f", {busy:.1f} busy with other processes"
    return ThreadChoice(threads, reason)


def configure_threads(setting: int = 0, *, load_aware: bool = True) -> ThreadChoice:
    """Choose (``choose_threads``) and apply to torch's intra-op pool; returns the choice."""
    import torch

    choice = choose_threads(setting, load_aware=load_aware)
    if torch.get_num_threads() != choice.threads:
        torch.set_num_threads(choice.threads)
    return choice


class Governor:
    """Re-applies the load-aware choice at most every ``interval_s`` seconds when ``tick()``
    is called (between images of a long loop); inactive when the count is explicit."""

    def __init__(self, setting: int = 0, interval_s: float = 5.0, log=None):
        self.setting = setting
        self.interval_s = interval_s
        self.log = log
        self.active = not (setting and setting > 0) and not any(
            os.environ.get(k, "").strip() for k in ("RLFN_THREADS", "OMP_NUM_THREADS"))
        self._last = time.monotonic()
        self.changes = 0

    def tick(self) -> int | None:
        """The new thread count when it changed, else None."""
        if not self.active or time.monotonic() - self._last < self.interval_s:
            return None
        import torch

        # this process is computing: its own use is subtracted, what is left is the others'
        choice = choose_threads(self.setting, load_aware=True, busy=busy_cores_of_others(0.05))
        self._last = time.monotonic()
        if choice.threads == torch.get_num_threads():
            return None
        torch.set_num_threads(choice.threads)
        self.changes += 1
        if self.log is not None:
            self.log(f"threads: now {choice}")
        return choice.threads


_pool: tuple | None = None  # (pid, workers, executor): never reused across a fork


def shared_pool(n: int) -> ThreadPoolExecutor:
    """The process's pool of at least ``n`` worker threads (named ``imresize``), made anew
    when more are asked for or after a fork."""
    global _pool
    if _pool is None or _pool[0] != os.getpid() or _pool[1] < n:
        _pool = (os.getpid(), n, ThreadPoolExecutor(max_workers=n, thread_name_prefix="imresize"))
    return _pool[2]
