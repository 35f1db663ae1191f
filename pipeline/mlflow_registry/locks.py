"""The promotion's critical section (read champion -> compare -> move alias): an ``flock`` for
a local store, a lease kept as a registered-model tag for any other registry. The protocol is
described in the package documentation (``pipeline.mlflow_registry``)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import mlflow
from mlflow import MlflowClient

from pipeline.tags import LEASE
from rlfn import failpoints

__all__ = ["LeaseLost", "LEASE_TAG", "LEASE_TTL_S", "LEASE_SETTLE_S", "LEASE_GUARD_S"]

LEASE_TAG = LEASE
LEASE_TTL_S = 60.0
LEASE_SETTLE_S = 0.5
LEASE_GUARD_S = 5.0


class LeaseLost(RuntimeError):
    """The registry lease was taken over (or nearly expired) before the alias could move."""


def _local_lock_path(uri: str) -> Path | None:
    """The lock file for a local store, or None when the registry is not local."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        raw = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
        raw = raw.split("?", 1)[0]
        if not raw or raw == ":memory:":
            return None
        return Path(raw).resolve().with_name(Path(raw).name + ".promote.lock")
    if parsed.scheme == "file" or (parsed.scheme == "" and uri):
        raw = parsed.path if parsed.scheme == "file" else uri
        p = Path(raw).resolve()
        return p.with_name(p.name + ".promote.lock")
    return None


class _FileLock:
    """An exclusive ``flock`` on ``path``, polled until ``timeout`` s (then TimeoutError saying
    ``holder`` holds it); also the stack's serving rollout lock (scripts/stack/serve.py)."""

    kind = "file"

    def __init__(self, path: Path, timeout: float, holder: str = "another promotion"):
        self.path, self.timeout, self.fd, self.holder = path, timeout, None, holder

    def __enter__(self) -> "_FileLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise TimeoutError(f"could not lock {self.path} within {self.timeout:g} s "
                                       f"({self.holder} holds it)") from None
                time.sleep(0.02 + random.random() * 0.03)
        self.fd = fd
        with contextlib.suppress(OSError):  # who holds it, for a human looking at the file
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{socket.gethostname()}:{os.getpid()} {time.time():.3f}\n".encode(), 0)
        return self

    def check(self) -> None:
        pass  # an flock cannot be lost while the descriptor is open

    def __exit__(self, *exc) -> None:
        import fcntl

        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class _Lease:
    kind = "lease"

    def __init__(self, client: MlflowClient, name: str, timeout: float,
                 ttl: float | None = None, settle: float | None = None):
        self.client, self.name, self.timeout = client, name, timeout
        self.ttl = LEASE_TTL_S if ttl is None else ttl
        self.settle = LEASE_SETTLE_S if settle is None else settle
        self.token = uuid.uuid4().hex
        self.expires = 0.0

    def _read(self) -> dict | None:
        raw = (self.client.get_registered_model(self.name).tags or {}).get(LEASE_TAG)
        if not raw:
            return None
        try:
            lease = json.loads(raw)
            return {"token": str(lease["token"]), "expires": float(lease["expires"]),
                    "owner": str(lease.get("owner", "?"))}
        except (ValueError, KeyError, TypeError):
            return {"token": "?", "expires": 0.0, "owner": "unparsable"}  # treat as stale

    def __enter__(self) -> "_Lease":
        from mlflow.exceptions import MlflowException

        deadline = time.monotonic() + self.timeout
        delay = 0.05
        holder = None
        error: Exception | None = None
        while True:
            holder = self._read()
            now = time.time()
            if holder is None or holder["expires"] < now:
                expires = now + self.ttl
                try:
                    self.client.set_registered_model_tag(self.name, LEASE_TAG, json.dumps(
                        {"token": self.token, "expires": round(expires, 3),
                         "owner": f"{socket.gethostname()}:{os.getpid()}"}))
                except MlflowException as e:
                    # Two writers at once: a server may answer one with an integrity error
                    # (its tag upsert is not atomic). The other writer goes ahead; we back off.
                    error = e
                else:
                    time.sleep(self.settle)
                    holder = self._read()
                    if holder is not None and holder["token"] == self.token:
                        self.expires = expires
                        return self
            if holder is not None and holder["token"] != self.token:
                failpoints.hit("promote.lease_busy")  # tests: another holds it (else a no-op)
            if time.monotonic() + delay > deadline:
                owner = holder["owner"] if holder else "nobody; last write failed"
                raise TimeoutError(f"could not take the promotion lease of {self.name!r} within "
                                   f"{self.timeout:g} s (held by {owner})") from error
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 2.0)

    def check(self) -> None:
        holder = self._read()
        if holder is None or holder["token"] != self.token:
            raise LeaseLost(f"promotion lease of {self.name!r} was taken over "
                            f"(now {holder['owner'] if holder else 'free'}); alias not moved")
        if time.time() > self.expires - LEASE_GUARD_S:
            raise LeaseLost(f"promotion lease of {self.name!r} is about to expire; alias not "
                            "moved")

    def __exit__(self, *exc) -> None:
        with contextlib.suppress(Exception):  # best effort: an unreleased lease expires anyway
            holder = self._read()
            if holder is not None and holder["token"] == self.token:
                self.client.delete_registered_model_tag(self.name, LEASE_TAG)


def _lock(client: MlflowClient, name: str, mode: str, timeout: float):
    """The lock for ``mode``: ``auto`` (file lock for a local store, lease otherwise),
    ``file`` or ``lease``."""
    uri = mlflow.get_registry_uri()
    path = _local_lock_path(uri)
    if mode == "auto":
        mode = "file" if path is not None else "lease"
    if mode == "file":
        if path is None:
            raise ValueError(f"registry {uri!r} is not a local store: no file lock possible")
        return _FileLock(path, timeout)
    if mode == "lease":
        return _Lease(client, name, timeout)
    raise ValueError(f"lock must be 'auto', 'file' or 'lease', got {mode!r}")
