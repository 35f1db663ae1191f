"""Benchmark: one LR image through the real ``mlflow models serve``, as tensor JSON vs as
base64 PNG, in one run.

    .venv/bin/python bench/serving.py [--shared ../shared] [--image PATH] [--repeat 3]

Registers the official RLFN x4 weights (``shared/pretrained/rlfn_x4.pth``, as our safetensors)
in a temporary SQLite registry as ``rlfn-x4@champion``, serves it with
``mlflow models serve -m models:/rlfn-x4@champion --env-manager local`` on 127.0.0.1 and
posts the same image both ways with a plain HTTP client (urllib):

* tensor: ``{"inputs": [[[r, g, b], ...]]}`` -> ``{"predictions": [[[...]]]}``
* PNG: ``{"dataframe_split": {"columns": ["image"], "data": [[base64 PNG]]}}`` ->
  ``{"predictions": [{"image": base64 PNG, "notes": ""}]}``

For each: request and response bytes, and latency (median of ``--repeat``): the HTTP round
trip, and end to end (client encoding + round trip + client decoding to a uint8 array). Also
the model alone in this process (``upscale_array``), and a check that both answers are the
same pixels. The image defaults to DIV2K 0901 from the challenge's test LR (510x339). Client
and server share the machine's cores, as on a single serving host. Writes
``bench/results/serving.json``.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import platform
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the test suite's server launcher, reused

import mlflow  # noqa: E402

from pipeline.mlflow_registry import log_and_register  # noqa: E402
from rlfn.io import decode_image  # noqa: E402
from rlfn.upscale import upscale_array  # noqa: E402
from rlfn.weights import load_model, save_model  # noqa: E402
from servers import mlflow_models_serve  # noqa: E402

NAME = "rlfn-x4"


def post(url: str, body: bytes) -> tuple[bytes, float]:
    req = urllib.request.Request(f"{url}/invocations", data=body,
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        raw = r.read()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {raw[:500]!r}")
    return raw, time.perf_counter() - t0


def tensor_round(url: str, lr: np.ndarray) -> dict:
    t0 = time.perf_counter()
    body = json.dumps({"inputs": lr.tolist()}).encode()
    t_enc = time.perf_counter() - t0
    raw, t_http = post(url, body)
    t1 = time.perf_counter()
    sr = np.asarray(json.loads(raw)["predictions"], dtype=np.uint8)
    t_dec = time.perf_counter() - t1
    return {"request_bytes": len(body), "response_bytes": len(raw), "http_s": t_http,
            "end_to_end_s": t_enc + t_http + t_dec, "encode_s": t_enc, "decode_s": t_dec,
            "sr": sr}


def png_round(url: str, png: bytes) -> dict:
    t0 = time.perf_counter()
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [
        [base64.b64encode(png).decode("ascii")]]}}).encode()
    t_enc = time.perf_counter() - t0
    raw, t_http = post(url, body)
    t1 = time.perf_counter()
    out = base64.b64decode(json.loads(raw)["predictions"][0]["image"])
    sr = np.asarray(Image.open(io.BytesIO(out)).convert("RGB"))
    t_dec = time.perf_counter() - t1
    return {"request_bytes": len(body), "response_bytes": len(raw), "http_s": t_http,
            "end_to_end_s": t_enc + t_http + t_dec, "encode_s": t_enc, "decode_s": t_dec,
            "png_in_bytes": len(png), "png_out_bytes": len(out), "sr": sr}


def summarize(runs: list[dict]) -> dict:
    keys = [k for k in runs[0] if k != "sr"]
    out = {}
    for k in keys:
        vals = [r[k] for r in runs]
        out[k] = statistics.median(vals) if k.endswith("_s") else vals[0]
    out["runs_end_to_end_s"] = [round(r["end_to_end_s"], 3) for r in runs]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--image", default=None,
                    help="LR image (default: shared/data/div2k_test_lr_x4/0901.png, 510x339)")
    ap.add_argument("--weights", default=None,
                    help="official weights (default: shared/pretrained/rlfn_x4.pth)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serving.json"))
    args = ap.parse_args()
    shared = Path(args.shared)
    image = Path(args.image or shared / "data" / "div2k_test_lr_x4" / "0901.png")
    pth = Path(args.weights or shared / "pretrained" / "rlfn_x4.pth")
    png = image.read_bytes()
    lr, _ = decode_image(png, name=str(image))
    print(f"image {image.name}: {lr.shape[1]}x{lr.shape[0]} LR, {len(png):,} bytes PNG")

    with tempfile.TemporaryDirectory(prefix="rlfn-bench-serving-") as tmp:
        tmp = Path(tmp)
        loaded = load_model(pth, scale=4)
        weights = save_model(loaded.model, tmp / f"{pth.stem}.safetensors",
                             provenance={"source": str(pth)})
        uri = f"sqlite:///{tmp}/mlflow.db"
        mlflow.set_tracking_uri(uri)
        exp = mlflow.create_experiment("bench-serving", artifact_location=(tmp / "art").as_uri())
        with mlflow.start_run(experiment_id=exp):
            mv = log_and_register(weights, 4)
        mlflow.MlflowClient().set_registered_model_alias(NAME, "champion", mv.version)

        model = load_model(weights).model
        upscale_array(model, lr[:64, :64])  # warm-up
        t_model = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            ref = upscale_array(model, lr)
            t_model.append(time.perf_counter() - t0)

        with mlflow_models_serve(f"models:/{NAME}@champion", uri, tmp) as url:
            png_round(url, png)  # warm-up: first request pays the lazy imports
            tensor_runs, png_runs = [], []
            for _ in range(args.repeat):
                tensor_runs.append(tensor_round(url, lr))
                png_runs.append(png_round(url, png))

    for r in tensor_runs + png_runs:
        np.testing.assert_array_equal(r["sr"], ref)  # both ways: the model's exact pixels
    tensor, pngr = summarize(tensor_runs), summarize(png_runs)
    result = {
        "image": str(image), "lr_size": [int(lr.shape[1]), int(lr.shape[0])],
        "sr_size": [int(ref.shape[1]), int(ref.shape[0])], "model": loaded.name,
        "weights": str(pth), "repeat": args.repeat, "model_alone_s": statistics.median(t_model),
        "tensor_json": tensor, "base64_png": pngr,
        "ratios": {"request_bytes": tensor["request_bytes"] / pngr["request_bytes"],
                   "response_bytes": tensor["response_bytes"] / pngr["response_bytes"],
                   "end_to_end_s": tensor["end_to_end_s"] / pngr["end_to_end_s"]},
        "identical_pixels": True,
        "machine": {"python": platform.python_version(), "cpu_count": __import__("os").cpu_count(),
                    "mlflow": mlflow.__version__},
    }
    print(f"model alone (in-process upscale_array): {result['model_alone_s']:.2f} s")
    print(f"{'':14}{'request':>14}{'response':>14}{'HTTP s':>9}{'end-to-end s':>14}")
    for label, r in (("tensor JSON", tensor), ("base64 PNG", pngr)):
        print(f"{label:<14}{r['request_bytes']:>14,}{r['response_bytes']:>14,}"
              f"{r['http_s']:>9.2f}{r['end_to_end_s']:>14.2f}")
    q = result["ratios"]
    print(f"tensor / PNG: request {q['request_bytes']:.1f}x, response "
          f"{q['response_bytes']:.1f}x, end to end {q['end_to_end_s']:.1f}x; same pixels")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
