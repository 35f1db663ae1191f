"""Model registry: log an RLFN as an MLflow pyfunc, register it, and promote it only if better.

Public API
----------
* ``RLFNPyfunc``: the ``mlflow.pyfunc.PythonModel``. Input: a uint8 ``(H, W, 3)`` RGB image
  (or an ``(N, H, W, 3)`` batch of equal sizes when calling ``predict`` directly; the logged
  signature admits single images only, since MLflow enforces the tensor rank). Output: the
  super-resolved uint8 image(s), exactly ``rlfn.upscale.upscale_array``'s output. Params
  (optional): ``tile`` (LR pixels; -1 = auto: 512 above 1 MP as the CLI does, 0 = never) and
  ``overlap`` (64).
* ``log_and_register(weights, scale, *, registered_name=None, tags=None, figures=None)``:
  inside the active run, logs the safetensors file (artifact ``weights/``) and the pyfunc
  (artifact ``model``), registers it under ``registered_name or f"rlfn-x{scale}"`` and returns
  the ``ModelVersion``. The pyfunc carries its own code (``code/pipeline``, ``code/rlfn``)
  and an explicit pip requirement list, so it loads anywhere those packages are installed.
* ``promote(registered_name, version, *, gate_metric="mean_psnr_y", margin=0.0,
  runtime_budget_ms=None, higher_is_better=True)``: the promotion decision (a dict), which
  moves the ``champion`` alias only if the candidate is better.
* ``champion(registered_name)``: the champion ``ModelVersion`` or ``None``.

Tags on a model version
-----------------------
* ``rlfn.figure.<name>`` (e.g. ``rlfn.figure.mean_psnr_y``, ``rlfn.figure.runtime_ms_cpu``):
  the figures passed to ``log_and_register``, as ``repr(float)``. Promotion reads a
  champion's figures from these tags alone.
* ``rlfn.scale``, ``rlfn.model`` (architecture name), ``rlfn.weights_sha256``,
  ``rlfn.run_id``, plus the caller's ``tags``.
* Written by ``promote`` on the candidate: ``rlfn.promotion.decision`` (``promoted`` or
  ``rejected``), ``rlfn.promotion.reason``, ``rlfn.promotion.compared_to`` (the champion's
  version, or ``none``), ``rlfn.promotion.gate_metric``, ``rlfn.promotion.margin``,
  ``rlfn.promotion.runtime_budget_ms`` (``none`` when unset), ``rlfn.promotion.decided_at``
  (UTC, ISO 8601).

Promotion rules
---------------
The alias moves to the candidate only when (a) there is no champion yet, or the candidate's
gate figure beats the champion's by MORE than ``margin`` (strictly: equal is not better;
"beats" is "lower" with ``higher_is_better=False``), and (b) with a ``runtime_budget_ms``,
the candidate's ``runtime_ms_cpu`` figure exists and is ``<= runtime_budget_ms``. A candidate
without a finite gate figure is refused (it could never be compared later); a champion
without one is not replaced automatically (nothing shows the candidate is better; move the
alias by hand). A candidate that already is the champion is "not promoted" (nothing moves).
Any exception (unknown version, unreadable registry, lock timeout, lost lease) propagates
*before* the alias is touched, so a failed run never unsets or downgrades the champion.

Lock protocol (read champion -> compare -> move alias is one critical section)
------------------------------------------------------------------------------
Two promotions racing each other must not both win, so the section is serialised, and the
champion is (re-)read only inside it:

* Local registry (``sqlite:///PATH`` or a ``file:``/plain-path store): an exclusive
  ``fcntl.flock`` on ``PATH.promote.lock`` (next to the database / store directory), polled
  without blocking until ``lock_timeout_s`` (then ``TimeoutError``). The OS drops the lock
  when its holder dies, so a crashed promotion never leaves a stale lock. (POSIX local file
  systems; not for a database on NFS shared between hosts.)
* Any other registry (``http(s)://`` tracking server, databases, ...): a lease kept as the
  registered-model tag ``rlfn.promotion.lease`` = JSON ``{"token", "expires", "owner"}``
  (``expires``: the writer's wall clock + ``LEASE_TTL_S``). To acquire: read the tag; if it
  is absent or expired, write a fresh unique token, wait ``LEASE_SETTLE_S``, read it back, and
  hold the lease only if the token is still ours (of several writers the last one wins; the
  others see a foreign token; a write the server refuses, as MLflow's non-atomic tag upsert
  may when two arrive at once, counts as lost). Otherwise retry with jittered exponential backoff until
  ``lock_timeout_s`` (then ``TimeoutError``, nothing changed). Just before moving the alias the
  holder reads the tag again and aborts (``LeaseLost``) unless the token is still its own and
  not within ``LEASE_GUARD_S`` of expiry. Release: delete the tag if it still holds our token;
  a lease that is never released (crash) expires after ``LEASE_TTL_S`` and is overwritten.
  Assumptions: a registry has no compare-and-set, so this is a lease, not a proof: it holds
  while one request's round trip (read -> write) is well under ``LEASE_SETTLE_S`` and the
  clients' clocks agree to well within ``LEASE_TTL_S``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import random
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

__all__ = ["RLFNPyfunc", "log_and_register", "promote", "champion", "figures_of",
           "figure_tags", "LeaseLost", "CHAMPION_ALIAS", "FIGURE_PREFIX", "PROMOTION_PREFIX",
           "LEASE_TAG", "MIN_INPUT_SIZE", "example_image"]

CHAMPION_ALIAS = "champion"
FIGURE_PREFIX = "rlfn.figure."
PROMOTION_PREFIX = "rlfn.promotion."
LEASE_TAG = "rlfn.promotion.lease"
RUNTIME_FIGURE = "runtime_ms_cpu"
MIN_INPUT_SIZE = 15  # rlfn.models.rlfn.RLFN.min_input_size: ESA's stride-2 conv + 7x7 pool
AUTO_TILE_PIXELS = 1024 * 1024  # as `rlfn upscale --tile auto`
MODEL_ARTIFACT = "model"

LEASE_TTL_S = 60.0
LEASE_SETTLE_S = 0.5
LEASE_GUARD_S = 5.0
LOCK_TIMEOUT_S = 120.0


# --------------------------------------------------------------------------------------------
# The pyfunc


class RLFNPyfunc(mlflow.pyfunc.PythonModel):
    """uint8 ``(H, W, 3)`` (or ``(N, H, W, 3)``) LR image(s) -> uint8 SR image(s)."""

    def __init__(self) -> None:
        self._loaded = None

    def load_context(self, context) -> None:
        from rlfn.weights import load_model

        self._loaded = load_model(context.artifacts["weights"], device="cpu")

    @property
    def scale(self) -> int:
        return int(self._require().scale)

    def _require(self):
        if self._loaded is None:
            raise RuntimeError("RLFNPyfunc: no weights loaded (load_context was not called)")
        return self._loaded

    def predict(self, context, model_input: np.ndarray, params: dict[str, Any] | None = None
                ) -> np.ndarray:
        from rlfn.upscale import upscale_array

        model = self._require().model
        arr = _as_images(model_input)
        params = {k: v for k, v in (params or {}).items() if v is not None}
        tile = int(params.get("tile", -1))
        overlap = int(params.get("overlap", 64))
        if overlap < 0:
            raise ValueError(f"overlap must be >= 0, got {overlap}")
        h, w = arr.shape[-3:-1]
        if tile < 0:  # auto
            tile_px = 512 if h * w > AUTO_TILE_PIXELS else None
        else:
            tile_px = tile or None
        if arr.ndim == 3:
            return upscale_array(model, arr, tile=tile_px, overlap=overlap)
        return np.stack([upscale_array(model, im, tile=tile_px, overlap=overlap) for im in arr])


def _as_images(x: Any) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise ValueError("expected a numpy uint8 array of shape (H, W, 3) or (N, H, W, 3), got "
                         f"{type(x).__name__}")
    if x.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image (pixel range 0-255), got dtype {x.dtype}")
    if x.ndim not in (3, 4) or x.shape[-1] != 3:
        raise ValueError("expected an RGB image of shape (H, W, 3) or a batch (N, H, W, 3), got "
                         f"shape {tuple(x.shape)}")
    if x.ndim == 4 and x.shape[0] == 0:
        raise ValueError("empty batch (N = 0)")
    h, w = x.shape[-3:-1]
    if h < MIN_INPUT_SIZE or w < MIN_INPUT_SIZE:
        raise ValueError(f"image of {h}x{w} pixels is too small: RLFN needs at least "
                         f"{MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}")
    return np.ascontiguousarray(x)


def example_image(size: int = 24) -> np.ndarray:
    """A small, deterministic, photo-like uint8 RGB image (gradients, a disc, edges, noise)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / max(size - 1, 1)
    r = 40 + 170 * xx
    g = 60 + 140 * yy
    b = 120 + 60 * np.sin(6.0 * xx + 3.0 * yy)
    disc = (xx - 0.6) ** 2 + (yy - 0.4) ** 2 < 0.06
    r[disc], g[disc], b[disc] = 220, 180, 60
    stripes = (np.floor(xx * size / 3) % 2 == 0) & (yy > 0.75)
    r[stripes] *= 0.5
    noise = np.random.default_rng(0).normal(0, 4, (size, size, 3))
    img = np.stack([r, g, b], axis=-1) + noise
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    # Unnamed tensors: the model gets a plain ndarray (a named one would arrive as a dict).
    img = TensorSpec(np.dtype(np.uint8), (-1, -1, 3))
    return ModelSignature(
        inputs=Schema([img]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, 3))]),
        params=ParamSchema([ParamSpec("tile", "long", -1), ParamSpec("overlap", "long", 64)]),
    )


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = [f"mlflow=={mlflow.__version__}"]
    for pkg in ("torch", "numpy", "safetensors", "cloudpickle"):
        try:
            reqs.append(f"{pkg}=={version(pkg).split('+')[0]}")  # torch's "+cpu" local tag
        except PackageNotFoundError:
            reqs.append(pkg)
    return reqs


def _stage_code(dest: Path) -> list[str]:
    """Copy ``pipeline/registry.py`` (as package ``pipeline``) and the ``rlfn`` library into
    ``dest`` for ``code_paths``: the pickled ``RLFNPyfunc`` refers to
    ``pipeline.registry.RLFNPyfunc``, which must import wherever the model is loaded."""
    import rlfn

    pkg = dest / "pipeline"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""Just the registry module, shipped with a logged '
                                     'RLFN pyfunc."""\n')
    shutil.copy2(Path(__file__), pkg / "registry.py")
    lib = dest / "rlfn"
    shutil.copytree(Path(rlfn.__file__).parent, lib,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return [str(pkg), str(lib)]


# --------------------------------------------------------------------------------------------
# Figures and tags


def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"figure {name!r} must be a number, got a bool")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"figure {name!r} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"figure {name!r} must be finite, got {v}")
    return v


def figure_tags(figures: Mapping[str, Any] | None) -> dict[str, str]:
    """``{"mean_psnr_y": 30.1}`` -> ``{"rlfn.figure.mean_psnr_y": "30.1"}`` (finite numbers)."""
    return {f"{FIGURE_PREFIX}{k}": repr(_finite(k, v)) for k, v in (figures or {}).items()}


def figures_of(mv: ModelVersion) -> dict[str, float]:
    """The ``rlfn.figure.*`` tags of a model version, as floats (unparsable ones skipped)."""
    out: dict[str, float] = {}
    for k, v in (mv.tags or {}).items():
        if k.startswith(FIGURE_PREFIX):
            try:
                out[k[len(FIGURE_PREFIX):]] = float(v)
            except (TypeError, ValueError):
                pass
    return out


# --------------------------------------------------------------------------------------------
# Logging and registering


def log_and_register(weights: str | Path, scale: int, *, registered_name: str | None = None,
                     tags: Mapping[str, Any] | None = None,
                     figures: Mapping[str, float] | None = None) -> ModelVersion:
    """Log ``weights`` (our safetensors) as an MLflow pyfunc in the active run and register it.

    Checks first (nothing is logged when these fail): an active run exists, the file is an RLFN
    of the given ``scale``, the figures are finite numbers. ``figures`` become the version's
    ``rlfn.figure.*`` tags (what ``promote`` compares); ``tags`` are added as given.
    """
    from rlfn.io import sha256_file
    from rlfn.weights import load_model

    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("log_and_register needs an active MLflow run (mlflow.start_run() or "
                           "pipeline._common.stage_run())")
    weights = Path(weights)
    loaded = load_model(weights, scale=int(scale))  # WeightsError names the file and reason
    name = registered_name or f"rlfn-x{int(scale)}"
    version_tags = {
        "rlfn.scale": str(int(scale)),
        "rlfn.model": loaded.name,
        "rlfn.weights_sha256": sha256_file(weights),
        "rlfn.run_id": run.info.run_id,
        **figure_tags(figures),
        **{str(k): str(v) for k, v in (tags or {}).items()},
    }
    mlflow.log_artifact(str(weights), artifact_path="weights")
    with tempfile.TemporaryDirectory(prefix="rlfn-pyfunc-") as tmp:
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=RLFNPyfunc(),
            artifacts={"weights": str(weights)},
            signature=_signature(),
            input_example=example_image(),
            pip_requirements=_requirements(),
            code_paths=_stage_code(Path(tmp)),
        )
    return mlflow.register_model(info.model_uri, name, tags=version_tags)


# --------------------------------------------------------------------------------------------
# Champion and promotion


def _client() -> MlflowClient:
    return MlflowClient(tracking_uri=mlflow.get_tracking_uri(),
                        registry_uri=mlflow.get_registry_uri())


def _champion(client: MlflowClient, name: str, alias: str = CHAMPION_ALIAS
              ) -> ModelVersion | None:
    # Read the alias table of the registered model rather than classifying "not found" errors:
    # a failed read must raise, never look like "no champion" (that would promote anything).
    rm = client.get_registered_model(name)
    version = (rm.aliases or {}).get(alias)
    if version is None:
        return None
    return client.get_model_version(name, str(version))


def champion(registered_name: str, alias: str = CHAMPION_ALIAS) -> ModelVersion | None:
    """The version the ``champion`` alias points at; ``None`` if there is none (or no such
    registered model)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    client = _client()
    try:
        client.get_registered_model(registered_name)
    except MlflowException as e:
        if e.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return None
        raise
    return _champion(client, registered_name, alias)


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
    kind = "file"

    def __init__(self, path: Path, timeout: float):
        self.path, self.timeout, self.fd = path, timeout, None

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
                                       "(another promotion holds it)") from None
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


def _decide(cand: ModelVersion, champ: ModelVersion | None, gate_metric: str, margin: float,
            runtime_budget_ms: float | None, higher_is_better: bool) -> tuple[bool, str]:
    cf = figures_of(cand)
    v = cand.version
    gate = cf.get(gate_metric)
    if gate is None or not math.isfinite(gate):
        return False, f"candidate v{v} has no finite {gate_metric} figure to compare"
    if runtime_budget_ms is not None:
        rt = cf.get(RUNTIME_FIGURE)
        if rt is None or not math.isfinite(rt):
            return False, (f"candidate v{v} has no {RUNTIME_FIGURE} figure, and a runtime "
                           f"budget of {runtime_budget_ms:g} ms is set")
        if rt > runtime_budget_ms:
            return False, (f"candidate v{v} is over the runtime budget: {RUNTIME_FIGURE} "
                           f"{rt:g} > {runtime_budget_ms:g} ms")
    if champ is None:
        return True, f"no champion yet; candidate v{v} ({gate_metric} {gate:g}) becomes champion"
    if str(champ.version) == str(v):
        return False, f"candidate v{v} already is the champion"
    held = figures_of(champ).get(gate_metric)
    if held is None or not math.isfinite(held):
        return False, (f"champion v{champ.version} has no {gate_metric} figure, so nothing shows "
                       f"v{v} is better; move the alias by hand if it is")
    gain = gate - held if higher_is_better else held - gate
    better = "higher" if higher_is_better else "lower"
    if gain > margin:
        return True, (f"candidate v{v} beats champion v{champ.version} on {gate_metric}: "
                      f"{gate:g} vs {held:g} ({better} is better, by {gain:g} > margin "
                      f"{margin:g})")
    return False, (f"candidate v{v} does not beat champion v{champ.version} on {gate_metric} by "
                   f"more than {margin:g}: {gate:g} vs {held:g} ({better} is better)")


def promote(registered_name: str, version: int | str, *, gate_metric: str = "mean_psnr_y",
            margin: float = 0.0, runtime_budget_ms: float | None = None,
            higher_is_better: bool = True, alias: str = CHAMPION_ALIAS, lock: str = "auto",
            lock_timeout_s: float = LOCK_TIMEOUT_S) -> dict[str, Any]:
    """Move ``alias`` (``champion``) to ``version`` only if it is better; return the decision.

    The decision: ``promoted``, ``reason``, ``registered_model``, ``alias``,
    ``candidate_version``, ``champion_version`` (the champion compared against, or None),
    ``candidate_figures``, ``champion_figures``, ``gate_metric``, ``margin``,
    ``higher_is_better``, ``runtime_budget_ms``, ``lock`` and ``decided_at``. It is also
    written as ``rlfn.promotion.*`` tags on the candidate. ``lock``: ``auto`` (file lock for a
    local store, lease otherwise), ``file`` or ``lease``. Errors raise before the alias moves.
    """
    margin = float(margin)
    if not math.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be a finite number >= 0, got {margin}")
    if runtime_budget_ms is not None:
        runtime_budget_ms = float(runtime_budget_ms)
        if not (runtime_budget_ms > 0 and math.isfinite(runtime_budget_ms)):
            raise ValueError(f"runtime_budget_ms must be a positive number, got "
                             f"{runtime_budget_ms}")
    version = str(int(version))
    client = _client()
    client.get_model_version(registered_name, version)  # fail fast on an unknown candidate

    with _lock(client, registered_name, lock, lock_timeout_s) as held:
        cand = client.get_model_version(registered_name, version)
        champ = _champion(client, registered_name, alias)  # re-read inside the lock
        promoted, reason = _decide(cand, champ, gate_metric, margin, runtime_budget_ms,
                                   higher_is_better)
        decision: dict[str, Any] = {
            "promoted": promoted,
            "reason": reason,
            "registered_model": registered_name,
            "alias": alias,
            "candidate_version": int(cand.version),
            "champion_version": int(champ.version) if champ is not None else None,
            "candidate_figures": figures_of(cand),
            "champion_figures": figures_of(champ) if champ is not None else {},
            "gate_metric": gate_metric,
            "margin": margin,
            "higher_is_better": bool(higher_is_better),
            "runtime_budget_ms": runtime_budget_ms,
            "lock": held.kind,
            "decided_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        if promoted:
            held.check()
            client.set_registered_model_alias(registered_name, alias, version)
        prefix = PROMOTION_PREFIX
        for key, value in {
            "decision": "promoted" if promoted else "rejected",
            "reason": reason,
            "compared_to": str(decision["champion_version"]) if champ is not None else "none",
            "gate_metric": gate_metric,
            "margin": repr(margin),
            "runtime_budget_ms": "none" if runtime_budget_ms is None else repr(runtime_budget_ms),
            "decided_at": decision["decided_at"],
        }.items():
            client.set_model_version_tag(registered_name, version, prefix + key, value)
    return decision


# --------------------------------------------------------------------------------------------
# Reading versions back


def version_weights(registered_name: str, dest: str | Path) -> list[dict[str, Any]]:
    """Every version of ``registered_name`` with its weights file downloaded under ``dest``:
    ``[{"version", "sha256", "path", "stage", "aliases"}]``, oldest first. A version whose
    weights cannot be fetched is reported with ``"error"`` instead of ``"path"``; no such
    registered model gives ``[]``."""
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        versions = client.search_model_versions(f"name = '{registered_name}'")
    except MlflowException:
        return []
    try:
        aliases = client.get_registered_model(registered_name).aliases or {}
    except MlflowException:
        aliases = {}
    by_version: dict[str, list[str]] = {}
    for alias, v in aliases.items():
        by_version.setdefault(str(v), []).append(alias)
    out = []
    for mv in sorted(versions, key=lambda m: int(m.version)):
        tags = mv.tags or {}
        row = {"version": int(mv.version), "sha256": tags.get("rlfn.weights_sha256"),
               "stage": tags.get("rlfn.stage"), "aliases": by_version.get(str(mv.version), [])}
        try:
            target = Path(dest) / f"v{mv.version}"
            row["path"] = str(Path(mlflow.artifacts.download_artifacts(
                run_id=mv.run_id, artifact_path="weights/model.safetensors",
                dst_path=str(target))))
        except (MlflowException, OSError) as e:
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        out.append(row)
    return out
