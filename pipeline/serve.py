"""Flow ``rlfn-serve`` (deployment ``rlfn-serve/rollout``): roll the stack's served endpoint
(``scripts/stack/serve.py``) to a version of the registered model, with a canary.

prefect.yaml's trigger runs it on the Prefect event ``mlflow.model_version_alias.created`` for
the alias ``champion`` (emitted by the stack's webhook receiver, ``scripts/stack/webhooks.py``,
from MLflow's registry webhook), with the event's model name and version. The rollout:

1. nothing when that version already serves, or when ``champion`` has moved on since (a later
   event rolls to that one);
2. starts the version's ``mlflow models serve`` instances beside the serving ones and waits for
   their health (``stack.serve.launch``);
3. the **canary**: the ``canary_set`` (default Set5, its HR folder from params.yaml's
   ``evaluate.sets``, LR made by the project's bicubic as ``evaluate`` makes it) sent through
   HTTP to the new instance, as base64 PNG, scored as ``evaluate`` scores it: its mean Y-PSNR
   must equal, to 4 decimals (within 0.00005 dB), its recorded figure ``psnr_y.<set>`` (tag
   ``rlfn.figure.psnr_y.Set5``, written by the ``promote`` stage);
4. passed: nginx's upstream switched with a graceful reload, the old workers drained, the old
   instances stopped (``stack.serve.switch``); failed: the new instances stopped, the old
   version still serving, and why recorded on the version (tags ``rlfn.serve.canary`` =
   ``failed``, ``rlfn.serve.canary_reason``), in the Prefect artifact ``serve-canary`` and in
   ``status``'s ``serve`` row; the flow run then fails.

It runs on the stack's host (its worker has ``RLFN_STACK_DIR``), in the project (params.yaml).
"""

from __future__ import annotations

import base64
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from prefect import flow, get_run_logger

from pipeline import tags as T

CANARY_DECIMALS = 4
# "equal to 4 decimals": within half a unit of the 4th decimal. Not round(a, 4) == round(b, 4):
# `evaluate`'s exact backend (openvino) and the served eager model differ by ~5e-6 dB on Set5,
# which lands the two on either side of a rounding boundary about one model in twenty.
CANARY_TOLERANCE_DB = 0.5 * 10 ** -CANARY_DECIMALS


class CanaryFailed(Exception):
    """The new version did not answer as recorded: the reason, one line."""


def _stack():
    """The stack's own modules (``scripts/stack``, beside this package): what ``serve`` runs."""
    scripts = str(Path(__file__).resolve().parents[1] / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    import stack.core
    import stack.serve
    import stack.services

    ctx = stack.services.context(stack.core.load_secrets())
    return stack.serve, ctx


class HttpUpscaler:
    """An ``rlfn.evaluate.Upscaler`` that is a served model: LR -> base64 PNG -> POST
    ``<url>/invocations`` -> the answer's PNG. ``versions`` collects the X-Model-Version
    headers seen (None when absent)."""

    def __init__(self, url: str, scale: int, timeout: float = 300):
        from pipeline.mlflow_registry import MIN_INPUT_SIZE

        self.url, self.scale, self.timeout = url.rstrip("/"), scale, timeout
        self.min_input_size = MIN_INPUT_SIZE
        self.versions: list[str | None] = []

    def __call__(self, lr: np.ndarray) -> np.ndarray:
        from rlfn.io import decode_image, encode_png

        body = json.dumps({"dataframe_records": [
            {"image": base64.b64encode(encode_png(lr)).decode("ascii")}]}).encode()
        req = urllib.request.Request(f"{self.url}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                self.versions.append(r.headers.get("X-Model-Version"))
                answer = json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise CanaryFailed(f"{self.url}/invocations: HTTP {e.code}: "
                               f"{e.read()[:300].decode(errors='replace')}") from None
        except (OSError, ValueError) as e:
            raise CanaryFailed(f"{self.url}/invocations: {type(e).__name__}: {e}") from None
        png = base64.b64decode(answer["predictions"][0]["image"])
        sr, _ = decode_image(png, name=f"{self.url} answer")
        return sr


def canary(url: str, version, hr_dir: str, set_name: str) -> str:
    """``set_name`` (HR in ``hr_dir``) through ``url``; the line that says it matched the
    version's recorded figure, else CanaryFailed with why."""
    from pipeline.mlflow_registry import figures_of
    from rlfn.evaluate import evaluate_folder

    figure = T.SET_PSNR_FIGURE.format(set_name)
    recorded = figures_of(version).get(figure)
    if recorded is None:
        raise CanaryFailed(f"v{version.version} records no {set_name} PSNR (tag "
                           f"{T.FIGURE_PREFIX}{figure}): nothing to check its answers against")
    scale = int((version.tags or {}).get(T.V_SCALE) or 0)
    if scale < 2:
        raise CanaryFailed(f"v{version.version} has no scale (tag {T.V_SCALE})")
    report = evaluate_folder(HttpUpscaler(url, scale), hr_dir)
    if report.errors:
        raise CanaryFailed(f"{set_name} through {url}: " + "; ".join(report.errors)[:500])
    measured = report.mean["psnr_y"]
    said = (f"{set_name} ({len(report.images)} images) through HTTP: mean PSNR-Y "
            f"{measured:.{CANARY_DECIMALS}f} dB, recorded {recorded:.{CANARY_DECIMALS}f} dB")
    if abs(measured - recorded) >= CANARY_TOLERANCE_DB:
        raise CanaryFailed(f"{said}: they differ (the served model is not what was evaluated)")
    return f"{said}: equal to {CANARY_DECIMALS} decimals"


def _record(name: str, version: str, passed: bool, reason: str, timings: dict) -> None:
    """The canary's outcome on the version (tags) and as the Prefect artifact."""
    import mlflow
    from prefect.artifacts import create_markdown_artifact

    client = mlflow.MlflowClient()
    client.set_model_version_tag(name, version, T.V_SERVE_REASON, reason[:5000])
    client.set_model_version_tag(name, version, T.V_SERVE_CANARY,  # last: the verdict is in
                                 "passed" if passed else "failed")
    rows = "".join(f"| {k} | {v} |\n" for k, v in timings.items())
    create_markdown_artifact(
        key="serve-canary", description=f"rollout of {name} v{version}",
        markdown=f"# Rollout of {name} v{version}: canary {'passed' if passed else 'FAILED'}\n\n"
                 f"{reason}\n\n| step | value |\n| --- | --- |\n{rows}")


@flow(name="rlfn-serve", flow_run_name="rollout {name} v{version}")
def rollout(version: str, name: str | None = None, alias: str = "champion",
            canary_set: str = "Set5") -> dict:
    """Roll the served endpoint to ``name`` (default: params.yaml's registered model)
    ``version`` (module docstring). Returns what happened."""
    import mlflow

    from pipeline.settings import load_settings

    log = get_run_logger()
    s = load_settings()
    name = name or s.registered_model
    version = str(version)
    if canary_set not in s.evaluate.sets:
        raise ValueError(f"canary_set {canary_set!r}: not one of params.yaml's evaluate.sets "
                         f"({', '.join(s.evaluate.sets)})")
    serve, ctx = _stack()
    client = mlflow.MlflowClient()
    t0 = time.monotonic()
    with serve.rollout_lock():
        current = client.get_model_version_by_alias(name, alias).version
        serving = serve.state().get("version")
        if str(current) != version:
            log.info(f"{name}@{alias} is v{current} now, not v{version}: nothing to do")
            return {"rolled": False, "why": f"{alias} moved on to v{current}"}
        if str(serving) == version:
            log.info(f"{name} v{version} already serves at {serve.url(ctx)}")
            return {"rolled": False, "why": "already serving"}
        mv = client.get_model_version(name, version)
        launched = serve.launch(ctx, name, version)
        timings = {"instances up (s)": round(time.monotonic() - t0, 2)}
        log.info(f"{name} v{version}: {len(launched.urls)} instance(s) up at "
                 f"{', '.join(launched.urls)} ({timings['instances up (s)']} s)")
        try:
            said = canary(launched.urls[0], mv, s.evaluate.sets[canary_set], canary_set)
        except CanaryFailed as e:
            serve.discard(launched)
            reason = f"canary failed: {e}; v{serving or 'none'} still serving"
            serve.refuse(name, version, f"canary failed (tag {T.V_SERVE_REASON})")
            timings["canary (s)"] = round(time.monotonic() - t0, 2)
            _record(name, version, False, reason, timings)
            log.error(f"{name} v{version}: {reason}")
            raise CanaryFailed(reason) from None
        timings["canary (s)"] = round(time.monotonic() - t0, 2)
        log.info(f"{name} v{version}: {said}")
        done = serve.switch(ctx, launched)
        timings.update({"switched (s)": round(timings["canary (s)"] + done["switched_s"], 2),
                        "old drained and stopped (s)": round(time.monotonic() - t0, 2),
                        "previous version": done["previous"] or "none"})
        _record(name, version, True, said, timings)
        log.info(f"{serve.url(ctx)} serves {name} v{version} (was v{done['previous'] or 'none'})"
                 f": {timings}")
        return {"rolled": True, "version": version, "previous": done["previous"],
                "timings": timings}
