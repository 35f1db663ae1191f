"""Evaluate an upscaler (a model, or bicubic) on an HR folder: Y-PSNR / Y-SSIM per image."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
from .progress import progress as progress_bar

from .bicubic import downscale, modcrop
from .io import ImageError, list_images, read_image
from .metrics import psnr_y, ssim_y

__all__ = ["Upscaler", "ImageScore", "EvalReport", "evaluate_folder"]


class Upscaler(Protocol):
    scale: int
    min_input_size: int

    def __call__(self, lr: np.ndarray) -> np.ndarray: ...


@dataclass
class ImageScore:
    name: str
    psnr_y: float
    ssim_y: float


@dataclass
class EvalReport:
    """Per-image scores, plus the files that failed (``errors``) and conversions (``notes``)."""

    scale: int
    images: list[ImageScore] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def mean(self) -> dict[str, float]:
        if not self.images:
            return {"psnr_y": float("nan"), "ssim_y": float("nan")}
        return {"psnr_y": float(np.mean([s.psnr_y for s in self.images])),
                "ssim_y": float(np.mean([s.ssim_y for s in self.images]))}

    def to_dict(self) -> dict:
        return {"scale": self.scale, "mean": self.mean,
                "images": [vars(s).copy() for s in self.images],
                "errors": list(self.errors), "notes": list(self.notes)}


def evaluate_folder(upscaler: Upscaler, hr_dir: str | Path, lr_dir: str | Path | None = None,
                    progress: bool = False, desc: str | None = None,
                    on_image: Callable[[str, np.ndarray, np.ndarray, np.ndarray], None] | None = None,
                    limit: int | None = None) -> EvalReport:
    """Score ``upscaler`` on every image of ``hr_dir``.

    LR images come from ``lr_dir`` (same file names) or, without it, from the HR by the
    project's MATLAB-exact bicubic. HR is mod-cropped to the scale. The border of ``scale``
    pixels is cropped before PSNR/SSIM on Y. A bad file is reported in ``errors`` and the
    others are still scored. ``on_image(name, lr, sr, hr)`` sees every scored image.
    ``limit`` scores only the first images (sorted by name).
    """
    scale = upscaler.scale
    report = EvalReport(scale=scale)
    errs: list[ImageError] = []
    files = list_images([hr_dir], errs)[:limit]
    report.errors.extend(str(e) for e in errs)
    if not files and not errs:
        report.errors.append(f"{hr_dir}: no images found")
    for hr_path in progress_bar(files, desc=desc or f"evaluate x{scale}", unit="img",
                                enabled=progress, leave=False):
        try:
            hr, info = read_image(hr_path)
            report.notes.extend(f"{hr_path}: {n}" for n in info.notes)
            hr = modcrop(hr, scale)
            if lr_dir is not None:
                lr_path = Path(lr_dir) / hr_path.name
                lr, linfo = read_image(lr_path)
                report.notes.extend(f"{lr_path}: {n}" for n in linfo.notes)
                if lr.shape[0] * scale != hr.shape[0] or lr.shape[1] * scale != hr.shape[1]:
                    raise ImageError(lr_path, f"LR is {lr.shape[1]}x{lr.shape[0]}, but the HR "
                                              f"{hr_path.name} mod-cropped to x{scale} is "
                                              f"{hr.shape[1]}x{hr.shape[0]}")
            else:
                lr_path = hr_path
                lr = downscale(hr, scale)
            if min(lr.shape[:2]) < upscaler.min_input_size:
                raise ImageError(lr_path, f"LR image is {lr.shape[1]}x{lr.shape[0]} pixels; the "
                                          f"model needs at least {upscaler.min_input_size}x"
                                          f"{upscaler.min_input_size}")
            if min(hr.shape[:2]) - 2 * scale < 11:
                raise ImageError(hr_path, f"image is {hr.shape[1]}x{hr.shape[0]} pixels, too "
                                          f"small to score (SSIM needs 11x11 after the "
                                          f"{scale}-pixel border crop)")
            sr = upscaler(lr)
            report.images.append(ImageScore(hr_path.name, psnr_y(sr, hr, scale),
                                            ssim_y(sr, hr, scale)))
            if on_image is not None:
                on_image(hr_path.name, lr, sr, hr)
        except ImageError as e:
            report.errors.append(str(e))
    return report
