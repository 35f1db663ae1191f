"""Profiling a model: parameters, CPU/GPU runtime over a folder of LR images, peak memory.

Runtime follows the NTIRE Efficient-SR practice: warm-up runs first, then each image timed
on its own (``perf_counter`` on CPU, CUDA events on GPU); median, mean and spread reported,
with the thread count. (FLOPs/activations counting and the inference backends are the
profiling issue's.)
"""

from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .io import list_images, read_image
from .upscale import to_tensor

__all__ = ["count_params", "time_inference", "peak_rss_mb", "profile_runtime"]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@torch.inference_mode()
def time_inference(model: nn.Module, images: list[np.ndarray], warmup: int = 2,
                   device: str | torch.device = "cpu") -> dict:
    device = torch.device(device)
    model = model.to(device).eval()
    tensors = [to_tensor(im, device) for im in images]
    for x in tensors[: max(1, warmup)]:
        model(x)
    times = []
    for x in tensors:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(x)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - t0) * 1000.0)
    return {"median_ms": statistics.median(times), "mean_ms": statistics.fmean(times),
            "stdev_ms": statistics.stdev(times) if len(times) > 1 else 0.0,
            "min_ms": min(times), "max_ms": max(times), "images": len(times),
            "threads": torch.get_num_threads(), "device": str(device)}


def profile_runtime(model: nn.Module, input_dir: str | Path, max_images: int = 0,
                    warmup: int = 2, device: str = "cpu") -> dict:
    """Runtime over the LR images of ``input_dir`` (first ``max_images``, sorted by name)."""
    files = list_images([input_dir])
    if max_images:
        files = files[:max_images]
    if not files:
        raise ValueError(f"{input_dir}: no images to time")
    images = [read_image(f)[0] for f in files]
    out = time_inference(model, images, warmup, device)
    out.update(params=count_params(model), peak_rss_mb=peak_rss_mb(),
               input_hw=[list(im.shape[:2]) for im in images[:1]][0])
    if torch.device(device).type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out
