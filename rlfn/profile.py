"""Profiling a model: parameters, CPU/GPU runtime over a folder of LR images, peak memory.

Runtime follows the NTIRE Efficient-SR practice: warm-up runs first, then each image timed
on its own (``perf_counter`` on CPU, CUDA events on GPU); median, mean and spread reported,
with the thread count. The model runs through an inference engine (``rlfn.backends``), so every
backend is timed the same way. Peak memory: the GPU's max allocated, or on CPU the process's
peak resident set during the timed runs alone (Linux resets the high-water mark through
``/proc/self/clear_refs``; elsewhere the process's lifetime peak is reported and says so).
NTIRE parameter/FLOP/activation counts are in ``rlfn.complexity``.
"""

from __future__ import annotations

import copy
import os
import resource
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .engine import Engine, as_engine
from .io import list_images, read_image
from .machine import cpu_model
from .upscale import to_tensor

__all__ = ["timing_machine", "count_params", "time_inference", "peak_rss_mb", "profile_runtime", "profile_report",
           "traffic_bytes", "copy_bandwidth_gbs", "peak_bandwidth", "PEAK_GBS"]

# Peak DRAM bandwidth (GB/s, 1e9 bytes) of GPUs by a substring of
# ``torch.cuda.get_device_name``: the denominator of the roofline fraction.
PEAK_GBS = {"H200": 4800.0, "H100 PCIe": 2000.0, "H100": 3350.0, "B200": 8000.0,
            "A100-SXM4-80GB": 2039.0, "A100": 1555.0, "L40S": 864.0, "L4": 300.0,
            "A10G": 600.0, "RTX 4090": 1008.0, "V100": 900.0, "T4": 320.0}

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def timing_machine() -> dict:
    """What a CPU runtime depends on besides the model and backend: the CPU's model name, the
    threads this process computes with and an instruction-set cap (oneDNN's
    ``ONEDNN_MAX_CPU_ISA``). Two timings compare only when these are equal."""
    return {"cpu": cpu_model(), "threads": torch.get_num_threads(),
            "isa_cap": os.environ.get("ONEDNN_MAX_CPU_ISA") or None}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux >= 4.0); False if we cannot."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _hwm_mb() -> float | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _timed(engine: Engine, x: torch.Tensor, clock: Callable[[], float] | None = None) -> float:
    if clock is not None:  # a caller's clock (seconds), on any device
        t0 = clock()
        engine(x)
        engine.synchronize()
        return (clock() - t0) * 1000.0
    if engine.device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        engine(x)
        end.record()
        torch.cuda.synchronize(engine.device)
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    engine(x)
    return (time.perf_counter() - t0) * 1000.0


def time_inference(model: nn.Module | Engine, images: list[np.ndarray], warmup: int = 2,
                   device: str | torch.device | None = None,
                   reference: nn.Module | Engine | None = None,
                   clock: Callable[[], float] | None = None) -> dict:
    """Per-image runtimes of ``model`` (a module, run eagerly, or an ``Engine``) in ms.

    Inputs are put on the device first (not timed). ``warmup`` runs come first: they absorb
    one-off costs (oneDNN primitive creation, compilation, CUDA graph capture); note that a
    backend that specialises per input shape pays again for each new shape.

    With a ``reference`` model, each image is also run through it right after (in alternating
    order), and ``relative`` is the median of the per-image time ratios model / reference: a
    figure that means the same on a fast or a slow machine, and under load, since both models
    see the same machine at the same moment (``reference_median_ms`` is its own median).

    ``clock`` (seconds, e.g. ``time.process_time``) replaces the default timers
    (``perf_counter`` on the CPU, CUDA events on a GPU).
    """
    engine = as_engine(model, device)
    device = engine.device
    ref = as_engine(reference, device) if reference is not None else None
    tensors = [to_tensor(im, device) for im in images]
    for i in range(max(1, warmup)):
        for e in (engine, ref) if ref is not None else (engine,):
            e(tensors[i % len(tensors)])
            e.synchronize()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_reset = device.type == "cpu" and _reset_peak_rss()
    times, ref_times = [], []
    for i, x in enumerate(tensors):
        if ref is None:
            times.append(_timed(engine, x, clock))
        elif i % 2 == 0:
            times.append(_timed(engine, x, clock))
            ref_times.append(_timed(ref, x, clock))
        else:
            ref_times.append(_timed(ref, x, clock))
            times.append(_timed(engine, x, clock))
    out = {"median_ms": statistics.median(times), "mean_ms": statistics.fmean(times),
           "stdev_ms": statistics.stdev(times) if len(times) > 1 else 0.0,
           "min_ms": min(times), "max_ms": max(times), "images": len(times),
           "times_ms": times, "threads": torch.get_num_threads(), "device": str(device),
           "backend": engine.name}
    if ref is not None:
        out.update(relative=statistics.median(t / r for t, r in zip(times, ref_times)),
                   reference_median_ms=statistics.median(ref_times),
                   reference_times_ms=ref_times)
    if device.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        hwm = _hwm_mb() if rss_reset else None
        out["peak_rss_mb"] = hwm if hwm is not None else peak_rss_mb()
        out["peak_rss_scope"] = "timed runs" if hwm is not None else "process lifetime"
    return out


def profile_runtime(model: nn.Module | Engine, input_dir: str | Path, max_images: int = 0,
                    warmup: int = 2, device: str | torch.device | None = None,
                    reference: nn.Module | Engine | None = None,
                    clock: Callable[[], float] | None = None) -> dict:
    """Runtime over the LR images of ``input_dir`` (first ``max_images``, sorted by name) of a
    module (run eagerly) or an engine (``rlfn.backends.make_engine``); with a ``reference``,
    also the runtime relative to it; ``clock`` as in ``time_inference``."""
    files = list_images([input_dir])
    if max_images:
        files = files[:max_images]
    if not files:
        raise ValueError(f"{input_dir}: no images to time")
    engine = as_engine(model, device)
    images = [read_image(f)[0] for f in files]
    out = time_inference(engine, images, warmup, reference=reference, clock=clock)
    out.update(params=count_params(engine.model), peak_rss_mb_process=peak_rss_mb(),
               input_hw=list(images[0].shape[:2]), input_dir=str(input_dir))
    out.setdefault("peak_rss_mb", out["peak_rss_mb_process"])
    return out


def profile_report(model: nn.Module, engine: Engine, input_dir: str | Path, max_images: int = 0,
                   warmup: int = 2, reference: Engine | None = None,
                   reference_name: str | None = None) -> dict:
    """The one profile result (``rlfn profile --json``, the pipeline's profile stage):
    NTIRE counts of ``model`` (on the CPU, before a backend converts it) and the runtime and
    peak memory of ``engine`` over ``input_dir``::

        {"backend", "exact", "device", "params", "flops", "activations", "counts_input",
         "runtime": {"unit": "ms", "median", "mean", "stdev", "min", "max", "images",
                     "warmup", "threads", "timer", "input_dir", "input_hw"},
         "memory": {"unit": "MB", "peak_rss", "peak_rss_scope", "peak_rss_process"}
                   or {"unit": "MB", "peak_gpu_allocated"}}

    With a ``reference`` engine (timed image by image alongside, see ``time_inference``) the
    runtime also has ``relative`` (median of model / reference time ratios),
    ``reference_median`` and ``reference`` (``reference_name``).
    """
    from .complexity import count_complexity

    counts = count_complexity(model)
    rt = profile_runtime(engine, input_dir, max_images, warmup, reference=reference)
    mem: dict = {"unit": "MB"}
    if "peak_gpu_mb" in rt:
        mem["peak_gpu_allocated"] = rt["peak_gpu_mb"]
    else:
        mem.update(peak_rss=rt["peak_rss_mb"], peak_rss_scope=rt["peak_rss_scope"],
                   peak_rss_process=rt["peak_rss_mb_process"])
    dev = engine.device
    return {"backend": engine.name, "exact": engine.info.exact, "device": str(dev),
            **({"gpu": torch.cuda.get_device_name(dev)} if dev.type == "cuda" else {}),
            "params": counts["params"], "flops": counts["flops"],
            "activations": counts["activations"], "counts_input": counts["input"],
            "runtime": {"unit": "ms", "median": rt["median_ms"], "mean": rt["mean_ms"],
                        "stdev": rt["stdev_ms"], "min": rt["min_ms"], "max": rt["max_ms"],
                        "images": rt["images"], "warmup": warmup, "threads": rt["threads"],
                        "timer": "cuda.Event" if dev.type == "cuda" else "perf_counter",
                        "input_dir": str(input_dir), "input_hw": rt["input_hw"],
                        **({"relative": rt["relative"], "reference": reference_name,
                            "reference_median": rt["reference_median_ms"]}
                           if "relative" in rt else {})},
            "memory": mem}


def traffic_bytes(model: nn.Module, height: int, width: int, dtype_bytes: int = 4,
                  batch: int = 1) -> dict:
    """The memory traffic one forward of ``model`` on a ``batch x 3 x height x width`` input
    cannot avoid, in bytes, counted from the model itself (forward hooks on a copy of it on
    the ``meta`` device: shapes only), at ``dtype_bytes`` per element:

    * ``input``: the input read once;
    * ``weights``: every parameter read once;
    * ``activations``: each parametrised layer's output (the convs) written once and read
      once by what consumes it, except the last one's;
    * ``output``: the last parametrised layer's output written once (PixelShuffle is a
      re-indexing of it, fused into its store).

    Pointwise work (bias, LeakyReLU, residual adds, the sigmoid gate), pooling and
    interpolation are taken as fused into the layers around them: this is a lower bound, the
    traffic of an ideal fused implementation. ``total`` is their sum; divide by the time
    of a forward for the achieved bandwidth, and by the peak for the roofline fraction.
    """
    outs: list[int] = []
    meta = copy.deepcopy(model).to("meta").float()  # shapes only: no memory, no arithmetic
    for m in meta.modules():
        if not list(m.children()) and any(True for _ in m.parameters(recurse=False)):
            m.register_forward_hook(lambda mod, inp, out: outs.append(out.numel()))
    with torch.inference_mode():
        meta(torch.zeros(batch, 3, height, width, device="meta"))
    if not outs:
        raise ValueError("traffic_bytes: the model has no parametrised layer")
    b = int(dtype_bytes)
    res = {"input": batch * 3 * height * width * b,
           "weights": count_params(model) * b,
           "activations": 2 * sum(outs[:-1]) * b,
           "output": outs[-1] * b,
           "layers": len(outs), "dtype_bytes": b, "batch": batch,
           "input_hw": [height, width]}
    res["total"] = res["input"] + res["weights"] + res["activations"] + res["output"]
    return res


def copy_bandwidth_gbs(device: str | torch.device = "cpu", mbytes: int = 256,
                       repeats: int = 5) -> float:
    """A STREAM-like copy bandwidth: the best of ``repeats`` copies of a ``mbytes`` MB
    float32 tensor, counting the bytes read and written (GB/s, 1e9 bytes)."""
    device = torch.device(device)
    n = mbytes * 2**20 // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats + 1):  # the first copy faults the pages in
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n * 4 / best / 1e9


def peak_bandwidth(device: str | torch.device, given: float | None = None,
                   cpu_mbytes: int = 256) -> tuple[float, str]:
    """The memory-bandwidth roofline's peak (GB/s) and where it comes from: ``given``, else a
    GPU's datasheet figure (``PEAK_GBS``), else a copy measured now (``copy_bandwidth_gbs``)."""
    device = torch.device(device)
    if given:
        return float(given), "--peak-gbs"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, gbs in PEAK_GBS.items():
            if key in name:
                return gbs, f"datasheet ({key})"
        return copy_bandwidth_gbs(device, 1024), "measured copy (unknown GPU)"
    return (copy_bandwidth_gbs("cpu", cpu_mbytes),
            f"measured copy (STREAM-like, {cpu_mbytes} MB)")
