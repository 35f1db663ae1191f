"""The registered pyfunc over HTTP: the real ``mlflow models serve -m models:/rlfn-x4@champion``
(``--env-manager local``) on 127.0.0.1, a registry in a temporary SQLite store holding the
official RLFN (NTIRE) x4 weights as its champion, and a plain HTTP client (urllib). No mocks.

Checked: base64 PNG/JPEG in, base64 PNG out, equal (pixels; bytes at the answer's PNG
level) to ``rlfn upscale``'s file; grayscale, 16-bit and RGBA inputs converted as the CLI converts them; bad payloads
answered with HTTP 400 and a message; the tensor JSON input still served; the logged model is
models-from-code (no pickle in it)."""

from __future__ import annotations

import base64
import io
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import mlflow  # noqa: E402
from PIL import Image  # noqa: E402

import imagefiles  # noqa: E402
from pipeline.mlflow_registry.pyfunc import RESPONSE_PNG_LEVEL  # noqa: E402
from rlfn.cli import main as rlfn_main  # noqa: E402
from rlfn.io import encode_png, read_image  # noqa: E402
from rlfn.upscale import upscale_array  # noqa: E402
from rlfn.weights import load_model, save_model  # noqa: E402
from servers import mlflow_models_serve, restore_tracking_uri  # noqa: E402

NAME = "rlfn-x4"
BUTTERFLY = "Set5/x4/LR/img_003.png"  # Set5: baby, bird, butterfly, head, woman


@pytest.fixture(scope="module", autouse=True)
def _restore_tracking_uri():
    yield from restore_tracking_uri()


@pytest.fixture(scope="module")
def weights(pretrained, tmp_path_factory) -> Path:
    """The official challenge weights as our safetensors (what the pipeline registers)."""
    loaded = load_model(pretrained / "rlfn_ntire_x4.pth", scale=4)
    return save_model(loaded.model, tmp_path_factory.mktemp("w") / "rlfn_ntire_x4.safetensors",
                      provenance={"source": "shared/pretrained/rlfn_ntire_x4.pth"})


@pytest.fixture(scope="module")
def registry(weights, tmp_path_factory) -> dict:
    from pipeline.mlflow_registry import log_and_register

    d = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{d}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("serving", artifact_location=(d / "art").as_uri())
    with mlflow.start_run(experiment_id=exp):
        mv = log_and_register(weights, 4, figures={"mean_psnr_y": 32.1})
    mlflow.MlflowClient().set_registered_model_alias(NAME, "champion", mv.version)
    return {"uri": uri, "dir": d, "version": mv}


@pytest.fixture(scope="module")
def server(registry, tmp_path_factory) -> str:
    work = tmp_path_factory.mktemp("serve")  # not the checkout: the model runs its own code
    with mlflow_models_serve(f"models:/{NAME}@champion", registry["uri"], work) as url:
        yield url


def _post(url: str, payload: dict) -> tuple[int, dict, int, int]:
    """POST JSON to /invocations: (status, parsed answer, request bytes, response bytes)."""
    body = json.dumps(payload).encode()
    req = urllib.request.Request(f"{url}/invocations", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            raw = r.read()
            return r.status, json.loads(raw), len(body), len(raw)
    except urllib.error.HTTPError as e:
        raw = e.read()
        return e.code, json.loads(raw), len(body), len(raw)


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def _cli_upscale(weights: Path, files: list[Path], out: Path) -> dict[str, bytes]:
    """``rlfn upscale`` (the CLI's own entry point) on ``files``: name -> PNG bytes."""
    assert rlfn_main(["-q", "upscale", "--model", str(weights), "--scale", "4",
                      *map(str, files), "-o", str(out)]) == 0
    return {f.stem: (out / f"{f.stem}.png").read_bytes() for f in files}


def test_logged_model_is_models_from_code(registry):
    """Loading the model unpickles nothing: no pickle among its files, MLmodel names the
    model's code file and the weights are safetensors."""
    local = Path(mlflow.artifacts.download_artifacts(
        f"models:/{NAME}/{registry['version'].version}", tracking_uri=registry["uri"]))
    files = [p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()]
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pth", ".pt"))], files
    mlmodel = (local / "MLmodel").read_text()
    assert "loader_module: mlflow.pyfunc.loaders.code_model" in mlmodel
    assert "model_code_path:" in mlmodel and (local / "model_code.py").is_file()
    assert "artifacts/rlfn_ntire_x4.safetensors" in mlmodel


def test_butterfly_png_in_png_out_equals_rlfn_upscale(server, weights, benchmarks, tmp_path):
    lr = benchmarks / BUTTERFLY
    status, answer, _, _ = _post(server, {"dataframe_split": {"columns": ["image"],
                                                              "data": [[_b64(lr)]]}})
    assert status == 200, answer
    (row,) = answer["predictions"]
    png = base64.b64decode(row["image"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and row["notes"] == ""
    expected = _cli_upscale(weights, [lr], tmp_path / "cli")["img_003"]
    got = np.asarray(Image.open(io.BytesIO(png)))
    assert got.shape == (256, 256, 3)  # 64x64 LR, 4x
    np.testing.assert_array_equal(got, np.asarray(Image.open(io.BytesIO(expected))))
    # the CLI's pixels, encoded as the server answers (zlib level 1, not the file's 6)
    assert png == encode_png(np.asarray(Image.open(io.BytesIO(expected))), RESPONSE_PNG_LEVEL)


def test_conversions_as_the_cli_does(server, weights, tmp_path):
    """Grayscale, 16-bit gray, 16-bit RGB, RGBA and JPEG in one request (one row each): each
    answer equals ``rlfn upscale``'s output for the same file, and says what was converted."""
    src = tmp_path / "in"
    src.mkdir()
    files = [imagefiles.make(k, src / f"{k}.png", h=24, w=20)
             for k in ("gray", "gray16", "png16", "rgba")]
    jpg = src / "photo.jpg"
    Image.fromarray(imagefiles.rgb(20, 24)).save(jpg, quality=90)
    files.append(jpg)
    status, answer, _, _ = _post(server, {"dataframe_records": [{"image": _b64(f)}
                                                                for f in files]})
    assert status == 200, answer
    expected = _cli_upscale(weights, files, tmp_path / "cli")
    assert len(answer["predictions"]) == len(files)
    for f, row in zip(files, answer["predictions"]):
        png = base64.b64decode(row["image"])
        cli_pixels = np.asarray(Image.open(io.BytesIO(expected[f.stem])))
        assert png == encode_png(cli_pixels, RESPONSE_PNG_LEVEL), f.name  # at the answer's level
        _, info = read_image(f)
        assert row["notes"] == "; ".join(info.notes), f.name
    notes = [row["notes"] for row in answer["predictions"]]
    assert "grayscale converted to RGB" in notes[0]
    assert "16-bit" in notes[1] and "16-bit" in notes[2]
    assert "alpha channel dropped" in notes[3]
    assert notes[4] == ""


def _bad(tmp_path: Path, kind: str) -> str:
    return _b64(imagefiles.make(kind, tmp_path / f"{kind}.png"))


@pytest.mark.parametrize("case, message", [
    ("not-base64", "not valid base64"),
    ("text", "not an image"),
    ("truncated", "truncated or corrupt"),
    ("tiny", "smaller than the minimum 15x15"),
    ("bomb", "decompression bomb"),
    ("no-image-column", "expected a column 'image'"),
    ("float-tensor", "expected a uint8 image"),
])
def test_bad_payloads_get_a_4xx_with_a_message(server, tmp_path, case, message):
    if case == "not-base64":
        payload = {"dataframe_records": [{"image": "this is not base64 !!"}]}
    elif case == "no-image-column":
        payload = {"dataframe_records": [{"picture": _bad(tmp_path, "good")}]}
    elif case == "float-tensor":
        payload = {"inputs": (imagefiles.rgb(16, 16) / 255.0).tolist()}
    else:
        payload = {"dataframe_split": {"columns": ["image"], "data": [[_bad(tmp_path, case)]]}}
    status, answer, _, _ = _post(server, payload)
    assert 400 <= status < 500, (status, answer)
    assert answer.get("error_code") == "INVALID_PARAMETER_VALUE", answer
    assert message in answer["message"], answer["message"][-2000:]


def test_tensor_json_still_served(server, weights):
    img = imagefiles.rgb(16, 18)
    status, answer, _, _ = _post(server, {"inputs": img.tolist()})
    assert status == 200, answer
    got = np.asarray(answer["predictions"], dtype=np.uint8)
    np.testing.assert_array_equal(got, upscale_array(load_model(weights).model, img))
