"""The ``rlfn`` command: argument parsing and reporting only; the work is in the library.

Exit codes (the library's error contract, ``rlfn.errors``): 0 all good; 1 bad data (some
input failed: each failure printed as one ``error:`` line naming the file and the reason; the
good inputs are still processed); 2 bad usage or configuration (an unknown option value, a
backend or device that cannot run here, a refused training config), one ``error:`` line
before any work. ``rlfn manifest`` records rejected files in the manifest and exits 1 only
when nothing usable is left.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

from .threads import Governor, configure_threads, set_wait_policy_default

set_wait_policy_default()  # waiting OpenMP threads sleep: before torch loads (rlfn.threads)

import torch  # noqa: E402

from .device import parse_device  # noqa: E402
from .errors import DataError, RLFNError, UsageError  # noqa: E402
from .io import atomic_write  # noqa: E402
from .backends import backend_names  # noqa: E402
from .log import get_logger  # noqa: E402
from .log import setup as setup_logging  # noqa: E402
from .progress import progress  # noqa: E402

__all__ = ["main", "build_parser"]

log = get_logger("cli")


def _err(msg: str) -> None:
    log.error(msg)


def _note(msg: str) -> None:
    log.warning(msg)


def _device(name: str) -> torch.device:
    return parse_device(name, f"--device {name}")


def _scale(text: str) -> int:
    try:
        s = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"scale must be 2, 3 or 4, got {text!r}") from None
    if s not in (2, 3, 4):
        raise argparse.ArgumentTypeError(f"scale must be 2, 3 or 4, got {s}")
    return s


def _check_backend(backend: str, device: torch.device) -> None:
    from .backends import check_backend

    check_backend(backend, device, where=f"--backend {backend}")


def _load(model: str, scale: int):
    """Load ``model`` on the CPU, checked against ``scale`` (a ``WeightsError`` names it)."""
    from .weights import load_model

    return load_model(model, scale=scale, device="cpu")


def _calibration(given: str | None, int8: bool, option: str = "--backend int8") -> Path | None:
    """The int8 calibration source: ``--calibration``, else ``$RLFN_INT8_CALIBRATION``; checked
    (given, present, not an evaluation set) before any work. ``None`` when int8 is not run
    (``--calibration`` is then refused: it would do nothing)."""
    from .backends.int8 import CALIBRATION_ENV, CALIBRATION_KINDS, calibration_source

    if not int8:
        if given is not None:
            raise UsageError("--calibration", f"is an {option} option")
        return None
    source = given if given is not None else os.environ.get(CALIBRATION_ENV) or None
    if source is None:
        raise UsageError("--calibration", f"not given, and {CALIBRATION_ENV} is not set: int8 "
                                          f"is calibrated on training data ({CALIBRATION_KINDS})")
    return calibration_source(source)


def _engine(model: str, scale: int, device: torch.device, backend: str, loaded=None,
            calibration: str | None = None):
    """``model`` (or the already ``loaded`` one) in an inference engine; errors first."""
    from .backends import make_engine
    from .engine import BackendError

    _check_backend(backend, device)
    calib = _calibration(calibration, backend == "int8")
    loaded = loaded or _load(model, scale)
    try:
        return make_engine(loaded.model, backend, device, calibration=calib), loaded
    except BackendError as e:
        raise UsageError(f"--backend {backend}", e.reason) from None


def _load_upscaler(model: str, scale: int, device: torch.device, tile: int | None,
                   overlap: int, backend: str = "eager", calibration: str | None = None):
    from .upscale import BicubicUpscaler, ModelUpscaler

    if model == "bicubic":
        if backend != "eager":
            raise UsageError(f"--backend {backend}", "bicubic has no backends (it is not a "
                                                     "model)")
        _calibration(calibration, False)
        return BicubicUpscaler(scale), "bicubic"
    engine, loaded = _engine(model, scale, device, backend, calibration=calibration)
    if tile not in (None, 0, "auto") and not engine.supports_grid:
        raise UsageError(f"--backend {backend}", f"cannot run tiled (--tile {tile}): ESA's "
                         "whole-image grid needs PyTorch; use eager, channels_last or bf16, or "
                         "--tile 0")
    return ModelUpscaler(engine, tile=tile, overlap=overlap), loaded.name


# --------------------------------------------------------------------------- downscale
def cmd_downscale(args) -> int:
    from .bicubic import downscale
    from .io import ImageError, list_images, read_image, write_png

    errors: list = []
    in_dir = Path(args.in_dir)
    if not in_dir.is_dir():
        raise DataError(in_dir, "not a directory")
    files = list_images([in_dir], errors)
    out_dir = Path(args.out_dir)
    written = 0
    for f in progress(files, desc=f"downscale x{args.scale}", unit="img", enabled=not args.quiet):
        try:
            hr, info = read_image(f, min_size=args.scale)
            for n in info.notes:
                _note(f"{f}: {n}")
            write_png(out_dir / (f.stem + ".png"), downscale(hr, args.scale))
            written += 1
        except ImageError as e:
            errors.append(e)
            _err(str(e))
    print(f"{written} images written to {out_dir}, {len(errors)} failed")
    return 1 if errors or not files else 0


# --------------------------------------------------------------------------- evaluate
def cmd_evaluate(args) -> int:
    from .evaluate import evaluate_folder

    upscaler, name = _load_upscaler(args.model, args.scale, _device(args.device), args.tile,
                                    args.overlap, args.backend, args.calibration)
    report = evaluate_folder(upscaler, args.hr, args.lr, progress=not args.quiet)
    for n in report.notes:
        _note(n)
    for e in report.errors:
        _err(e)
    width = max([len(s.name) for s in report.images] + [8])
    print(f"{'image':<{width}}  {'PSNR-Y':>8}  {'SSIM-Y':>7}")
    for s in report.images:
        print(f"{s.name:<{width}}  {s.psnr_y:8.4f}  {s.ssim_y:7.5f}")
    m = report.mean
    print(f"{'mean':<{width}}  {m['psnr_y']:8.4f}  {m['ssim_y']:7.5f}   "
          f"({len(report.images)} images, {name}, x{args.scale})")
    if args.json:
        out = {"model": str(args.model), "model_name": name, "scale": args.scale,
               "backend": args.backend, "device": args.device, "hr": str(args.hr), "lr": None if args.lr is None else str(args.lr),
               **report.to_dict()}
        atomic_write(args.json, json.dumps(out, indent=2) + "\n")
    return 1 if report.errors or not report.images else 0


# --------------------------------------------------------------------------- upscale
def cmd_upscale(args) -> int:
    from .io import ImageError, list_images, write_png
    from .upscale import upscale_files

    batch = getattr(args, "batch", 1)
    if batch < 1:
        raise UsageError(f"--batch {batch}", "must be >= 1 (images or tiles per forward pass)")
    upscaler, _ = _load_upscaler(args.model, args.scale, _device(args.device), args.tile,
                                 args.overlap, args.backend, args.calibration)
    errors: list = []
    files = list_images(args.inputs, errors)
    for e in errors:
        _err(str(e))
    out_dir = Path(args.out)
    seen: dict[Path, Path] = {}
    written = 0
    results = upscale_files(upscaler, files, tile=args.tile, overlap=args.overlap, batch=batch)
    # a long folder: the thread count follows the machine's load (rlfn.threads)
    governor = Governor(log=log.info)
    for f, res in progress(zip(files, results), total=len(files), desc=f"upscale x{args.scale}",
                           unit="img", enabled=not args.quiet):
        governor.tick()
        try:
            target = out_dir / (f.stem + ".png")
            if target in seen:
                raise ImageError(f, f"would overwrite {target}, already written from {seen[target]}")
            if res.error is not None:
                raise res.error
            for n in res.notes:
                _note(f"{f}: {n}")
            write_png(target, res.sr)
            seen[target] = f
            written += 1
        except ImageError as e:
            errors.append(e)
            _err(str(e))
    print(f"{written} upscaled into {out_dir}, {len(errors)} failed")
    return 1 if errors or not written else 0


# --------------------------------------------------------------------------- manifest
def cmd_manifest(args) -> int:
    """Build or update the manifest. Rejected files are reported (``error:`` lines) and kept
    in the manifest; the exit code is 1 only when no usable image is left."""
    from .data.manifest import build_manifest
    from .data.sources import Source, resolve

    sources = []
    for item in args.sources:
        p = Path(item)
        if not p.exists():
            raise DataError(p, "no such file or directory")
        kind = "folder" if p.is_dir() else "archive"  # archives are recognised by content
        sources.append(Source(kind=kind, path=p, split=args.split,
                              name=p.resolve().name or None))
    resolved = resolve(sources, args.cache, progress=not args.quiet)
    summary = build_manifest(resolved, args.out, min_size=args.min_size,
                             progress=not args.quiet, workers=args.workers)
    for r in summary.rejected:
        _err(f"{r['path']}: {r['reason']}")
    for line in summary.lines():
        print(line)
    return 0 if summary.usable else 1


# --------------------------------------------------------------------------- train
def cmd_train(args) -> int:
    """One training stage; rerunning the same command resumes (or does nothing when done).
    ``--config`` is a stage config or a params file (``train:`` + ``train_stages``: ``--stage
    K`` is then the pipeline's stage K, the same merged values); see ``rlfn.train.config``."""
    from .train.config import load_config
    from .train.launch import launch

    cfg = load_config(args.config, args.set, stage=args.stage)
    if args.init is not None and not Path(args.init).exists():
        raise UsageError(f"--init {args.init}", "no such file")
    try:
        res = launch(cfg, args.out, init=args.init, nproc=args.nproc_per_node,
                     progress=not args.quiet)
    except FloatingPointError as e:  # a diverged loss
        raise DataError(args.out, str(e)) from None
    except ValueError as e:  # data problems: no usable images, patch too large, ...
        if isinstance(e, RLFNError):
            raise
        raise DataError(args.config, str(e)) from None
    rank = int(os.environ.get("RANK", "0") or 0)  # a rank of torchrun's (several hosts)
    if rank and res.hosts:  # its out_dir holds no weights: rank 0's host has them
        first = res.hosts[0]
        where = f"rank 0's out_dir on {first.get('hostname')} ({first.get('address')})"
        print(f"rank {rank}: stage {cfg.stage}, {res.iterations} iterations"
              f"{' already trained; nothing to do' if res.already_complete else ' trained'}; "
              f"the weights are in {where}")
    elif res.already_complete:
        print(f"{res.weights}: already trained ({res.iterations} iterations); nothing to do")
    else:
        psnr = "" if res.final_psnr is None else f", validation Y-PSNR {res.final_psnr:.3f} dB"
        print(f"stage {cfg.stage}: {res.iterations} iterations in {res.seconds / 60:.1f} min"
              f"{psnr} -> {res.weights}")
    return 0


# --------------------------------------------------------------------------- profile
# The folder `rlfn profile` times when --input-dir is not given (a user contract; nothing is
# looked up in the working directory or beside the package).
PROFILE_INPUT_ENV = "RLFN_PROFILE_INPUT_DIR"


def _profile_dir(given: str | None) -> Path:
    """``--input-dir``, else ``$RLFN_PROFILE_INPUT_DIR``; a folder, checked before any work."""
    if given is None:
        given = os.environ.get(PROFILE_INPUT_ENV) or None
        if given is None:
            raise UsageError("--input-dir", f"not given, and {PROFILE_INPUT_ENV} is not set: "
                                            f"name the folder of LR images to time")
        where = f"{PROFILE_INPUT_ENV}={given}"
    else:
        where = f"--input-dir {given}"
    if not Path(given).is_dir():
        raise UsageError(where, "not a directory")
    return Path(given)


def cmd_profile(args) -> int:
    """NTIRE-style counts on a 256x256 LR input, runtime over a folder, peak memory."""
    from .profile import profile_report

    device = _device(args.device)
    _check_backend(args.backend, device)
    input_dir = _profile_dir(args.input_dir)
    engine, loaded = _engine(args.model, args.scale, device, args.backend,
                             calibration=args.calibration)
    try:
        report = profile_report(loaded.model, engine, input_dir, args.max_images, args.warmup)
    except ValueError as e:
        if isinstance(e, RLFNError):
            raise
        raise DataError(input_dir, str(e)) from None
    out = {"model": str(args.model), "model_name": loaded.name, "scale": args.scale,
           **report}
    rt, mem = report["runtime"], report["memory"]
    print(f"{loaded.name} x{args.scale} ({args.backend}, {device}):")
    print(f"  params      {report['params'] / 1e6:.3f} M")
    print(f"  FLOPs       {report['flops'] / 1e9:.2f} G   (256x256 LR input, NTIRE counting)")
    print(f"  activations {report['activations'] / 1e6:.2f} M")
    print(f"  runtime     {rt['median']:.1f} ms median, {rt['mean']:.1f} +- "
          f"{rt['stdev']:.1f} ms mean ({rt['images']} images, {rt['threads']} threads)")
    if "peak_gpu_allocated" in mem:
        print(f"  peak GPU    {mem['peak_gpu_allocated']:.0f} MB allocated")
    else:
        print(f"  peak RSS    {mem['peak_rss']:.0f} MB ({mem['peak_rss_scope']})")
    if args.json:
        atomic_write(args.json, json.dumps(out, indent=2) + "\n")
    return 0


# --------------------------------------------------------------------------- export
def cmd_export(args) -> int:
    """ONNX file with dynamic N/H/W; checked against PyTorch in ONNX Runtime unless told not."""
    from .backends import check_backend
    from .backends.export import OPSET, export_onnx

    out = Path(args.out)
    if args.int8:
        return _export_int8(args, out)
    _calibration(args.calibration, False, "--int8")
    if out.suffix.lower() != ".onnx":
        raise UsageError(f"-o {out}", "the output file must end in .onnx")
    if out.is_dir():
        raise UsageError(f"-o {out}", "is a directory")
    try:
        check_backend("onnxruntime" if not args.no_check else "eager", "cpu")
        if importlib.util.find_spec("onnx") is None:
            raise ImportError("No module named 'onnx'")
    except (ImportError, ValueError) as e:
        raise UsageError("export", f"needs the [infer] extra (onnx, onnxscript, onnxruntime): "
                                   f"{e}") from None
    loaded = _load(args.model, args.scale)
    export_onnx(loaded.model, out, opset=args.opset or OPSET, model_name=loaded.name,
                check=not args.no_check)
    size = out.stat().st_size / 1e6
    print(f"{loaded.name} x{args.scale} -> {out} ({size:.2f} MB, opset {args.opset or OPSET}, "
          f"input 'lr' (N, 3, H, W) float32 0-255, dynamic N/H/W"
          f"{'' if args.no_check else ', checked against PyTorch'})")
    return 0


def _export_int8(args, out: Path) -> int:
    """The int8 OpenVINO IR (``rlfn.backends.int8``): MODEL.xml + MODEL.bin."""
    if out.suffix.lower() != ".xml":
        raise UsageError(f"-o {out}", "--int8 writes an OpenVINO IR: the output file must end "
                                      "in .xml (the weights go beside it, .bin)")
    if out.is_dir():
        raise UsageError(f"-o {out}", "is a directory")
    if args.opset is not None:
        raise UsageError("--opset", "is an ONNX option; --int8 writes an OpenVINO IR")
    from .backends.int8 import check_int8, export_int8, missing_packages

    missing = missing_packages()
    if missing:
        raise UsageError("export --int8", f"needs the Python package(s) {', '.join(missing)} "
                                          f"(pip install 'rlfn-pipeline[infer]')")
    calib = _calibration(args.calibration, True)
    loaded = _load(args.model, args.scale)
    export_int8(loaded.model, out, calib)
    note = "" if args.no_check else (f"; checked: mean |int8 - fp32| "
                                     f"{check_int8(loaded.model, out, calib):.2f} grey levels")
    size = (out.stat().st_size + out.with_suffix(".bin").stat().st_size) / 1e6
    print(f"{loaded.name} x{args.scale} -> {out} + {out.with_suffix('.bin').name} ({size:.2f} "
          f"MB, OpenVINO IR, int8 body convs, calibrated on {calib}; input 'lr' (N, 3, H, W) "
          f"float32 0-255, dynamic N/H/W{note})")
    return 0


# --------------------------------------------------------------------------- lineage
def cmd_lineage(args) -> int:
    """A registered version's lineage: figures, run, commit, params hash, repro, and each
    recorded data hash checked against this workspace (present / differs / missing).

    The report is the orchestration layer's (``pipeline.lineage``: MLflow, params.yaml's
    tracking store): this function is the library's one entry into ``pipeline``, imported
    only when the command runs (tests/test_layering.py allows exactly this import)."""
    try:
        from pipeline.lineage import format_report, lineage_report
    except ModuleNotFoundError as e:
        if e.name != "pipeline":
            raise
        raise UsageError("lineage", "needs the project's pipeline package, not importable "
                                    "here: (re)install the project with its [pipeline] extra "
                                    "(pip install -e '.[pipeline]')") from None

    rep = lineage_report(args.model, root=args.root, tracking_uri=args.tracking_uri)
    if args.json:
        print(json.dumps(rep, indent=2, sort_keys=True))
    else:
        for line in format_report(rep):
            print(line)
    if args.check and any(d["workspace"] != "present" for d in rep["data"].values()):
        return 1
    return 0


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _tile(text: str):
    if text == "auto":
        return "auto"
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("--tile takes a number of LR pixels, 0 or 'auto'") from None
    if v < 0:
        raise argparse.ArgumentTypeError("--tile must be >= 0")
    return v


def _calibration_option(parser: argparse.ArgumentParser, option: str = "--backend int8"):
    from .backends.int8 import CALIBRATION_ENV, CALIBRATION_KINDS

    parser.add_argument("--calibration", default=None, metavar="PATH",
                        help=f"{option} calibration data: {CALIBRATION_KINDS} (required with "
                             f"{option} unless {CALIBRATION_ENV} names it)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlfn", description="RLFN super-resolution: "
                                "MATLAB-exact bicubic, evaluation and inference.")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress (bars or lines)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("downscale", help="HR folder -> MATLAB-exact bicubic LR PNGs")
    d.add_argument("--scale", type=_scale, required=True)
    d.add_argument("in_dir", metavar="IN_DIR")
    d.add_argument("out_dir", metavar="OUT_DIR")
    d.set_defaults(func=cmd_downscale)

    e = sub.add_parser("evaluate", help="Y-PSNR / Y-SSIM of a model on an HR folder")
    e.add_argument("--model", required=True,
                   help="weights file (official .pth or our .safetensors), or 'bicubic'")
    e.add_argument("--scale", type=_scale, required=True)
    e.add_argument("--hr", required=True, metavar="HR_DIR")
    e.add_argument("--lr", metavar="LR_DIR", help="LR images with the HR's file names "
                   "(default: made from the HR by MATLAB-exact bicubic)")
    e.add_argument("--json", metavar="OUT.json", help="write the scores as JSON")
    e.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    e.add_argument("--tile", type=int, default=None, help="tile size in LR pixels")
    e.add_argument("--overlap", type=int, default=64)
    e.add_argument("--backend", default="eager", choices=None, metavar="NAME",
                   help=f"inference backend: {', '.join(backend_names())} (default eager)")
    _calibration_option(e)
    e.set_defaults(func=cmd_evaluate)

    u = sub.add_parser("upscale", help="super-resolve image files or folders")
    u.add_argument("--model", required=True, help="weights file, or 'bicubic'")
    u.add_argument("--scale", type=_scale, required=True)
    u.add_argument("inputs", nargs="+", metavar="INPUT")
    u.add_argument("-o", "--out", required=True, metavar="OUT_DIR")
    u.add_argument("--tile", type=_tile, default="auto",
                   help="tile size in LR pixels; 0 = never tile; auto (default) tiles images "
                        "over 1 MP by 512")
    u.add_argument("--overlap", type=int, default=64, help="tile overlap in LR pixels")
    u.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    u.add_argument("--backend", default="eager", metavar="NAME",
                   help=f"inference backend: {', '.join(backend_names())} (default eager)")
    u.add_argument("--batch", type=int, default=1, metavar="N",
                   help="run up to N same-size images (or same-size tiles) per forward pass "
                        "(default 1: one at a time); outputs are the same files")
    _calibration_option(u)
    u.set_defaults(func=cmd_upscale)

    m = sub.add_parser("manifest", help="build or update the validated Parquet manifest of "
                       "image folders / archives (exit 1 only when nothing usable is left)")
    m.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="a folder of images (walked recursively) or a zip / tar(.gz) archive")
    m.add_argument("-o", "--out", required=True, metavar="MANIFEST.parquet",
                   help="the manifest; its summary goes beside it (NAME.summary.json)")
    m.add_argument("--min-size", type=_positive, default=1, metavar="N",
                   help="reject images smaller than N pixels on either side (the HR crop)")
    m.add_argument("--split", metavar="NAME", help="split of these sources (train, valid, ...)")
    m.add_argument("--cache", default=".cache/rlfn", metavar="DIR",
                   help="where archives are unpacked (default .cache/rlfn)")
    m.add_argument("--workers", type=_positive, default=2, metavar="N",
                   help="decoding processes when many files are new (default 2)")
    m.set_defaults(func=cmd_manifest)

    t = sub.add_parser("train", help="train one stage (resumes when rerun with the same --out)")
    t.add_argument("--config", required=True, metavar="FILE",
                   help="a stage config (its keys at the top level, e.g. the pipeline's "
                        "models/stage<K>/config.yaml) or a params file (train: + "
                        "train_stages, e.g. params.yaml)")
    t.add_argument("--stage", type=int, default=None, help="with a params file: its "
                   "train_stages key K, trained exactly as the pipeline's train_stage@K "
                   "(required when it has several); with a stage config: must be its stage")
    t.add_argument("--init", metavar="WEIGHTS", help="warm start: the previous stage's "
                   "model.safetensors (fresh optimizer and schedule)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    t.add_argument("--nproc-per-node", type=_positive, default=1, metavar="N",
                   help="train on N local processes (DDP, each with 1/N of every batch; "
                        "rlfn.train.launch); default 1: this process")
    t.add_argument("--out", required=True, metavar="DIR")
    t.set_defaults(func=cmd_train)

    pr = sub.add_parser("profile", help="params / FLOPs / activations (NTIRE counting), "
                        "runtime and peak memory")
    pr.add_argument("--model", required=True, help="weights file")
    pr.add_argument("--scale", type=_scale, required=True)
    pr.add_argument("--input-dir", default=None, metavar="DIR",
                    help=f"the folder of LR images to time (required unless "
                         f"{PROFILE_INPUT_ENV} names it; the challenge timed the 100 DIV2K "
                         f"test LR images)")
    pr.add_argument("--max-images", type=int, default=0, help="time only the first N (0: all)")
    pr.add_argument("--warmup", type=int, default=2)
    pr.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    pr.add_argument("--backend", default="eager", help=f"one of: {', '.join(backend_names())}")
    pr.add_argument("--threads", type=int, default=0,
                    help="CPU threads (0: auto, the cores this process has that other "
                         "processes are not using; see rlfn.threads)")
    pr.add_argument("--json", metavar="OUT.json")
    _calibration_option(pr)
    pr.set_defaults(func=cmd_profile)

    x = sub.add_parser("export", help="export a model to ONNX (dynamic height/width), or "
                       "with --int8 its int8 OpenVINO IR")
    x.add_argument("--model", required=True, help="weights file")
    x.add_argument("--scale", type=_scale, required=True)
    x.add_argument("-o", "--out", required=True, metavar="MODEL.onnx|MODEL.xml")
    x.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")
    x.add_argument("--int8", action="store_true",
                   help="write the int8 model of the 'int8' backend (OpenVINO IR, MODEL.xml + "
                        "MODEL.bin; NNCF static quantization, cached by the weights' sha256)")
    _calibration_option(x, "--int8")
    x.add_argument("--no-check", action="store_true",
                   help="skip the check of the written file against PyTorch")
    x.set_defaults(func=cmd_export)

    ln = sub.add_parser("lineage", help="a registered model's metrics, run, commit and data "
                        "hashes, and whether this workspace holds that data")
    ln.add_argument("model", metavar="MODEL", help="models:/NAME@ALIAS, models:/NAME/VERSION "
                    "or NAME/VERSION")
    ln.add_argument("--tracking-uri", default=None, metavar="URI",
                    help="default: MLFLOW_TRACKING_URI, else the pipeline's SQLite store "
                         "(params.yaml's mlflow.db under --root)")
    ln.add_argument("--root", default=".", metavar="DIR",
                    help="the workspace whose files are compared (default: .)")
    ln.add_argument("--json", action="store_true", help="print the report as JSON")
    ln.add_argument("--check", action="store_true",
                    help="exit 1 unless the workspace holds every recorded data item")
    ln.set_defaults(func=cmd_lineage)
    return p


# the commands that compute with torch: their thread count comes from rlfn.threads
_COMPUTES = {cmd_downscale, cmd_evaluate, cmd_upscale, cmd_train, cmd_profile, cmd_export}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        if args.func in _COMPUTES:
            # training: never load-aware (a resume must run on as many threads as the run)
            choice = configure_threads(getattr(args, "threads", 0) or 0,
                                       load_aware=args.func is not cmd_train)
            log.debug(f"torch: {choice}")
        return int(args.func(args))
    except RLFNError as e:
        _err(str(e))
        return e.exit_code
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
