"""Validation during training (rank 0): Y-PSNR over ``val_hr_dir`` (its first
``val_max_images`` images, LR made by MATLAB-exact bicubic), a bicubic | SR | HR crop of the
first image in ``crops/iter_XXXXXXX.png``, and the best weights so far in
``best.safetensors``."""

from __future__ import annotations

import numpy as np

from ..evaluate import evaluate_folder
from ..io import write_png
from ..upscale import BicubicUpscaler, ModelUpscaler
from ..weights import save_model
from .data import TrainDataError
from .setup import PreparedRun, RunContext

__all__ = ["Validator", "side_by_side"]


def side_by_side(lr: np.ndarray, sr: np.ndarray, hr: np.ndarray, scale: int,
                 size: int = 96) -> np.ndarray:
    """bicubic | SR | HR, the same HR-sized crop from the image centre, 4 px gaps."""
    bic = BicubicUpscaler(scale)(lr)
    h, w = hr.shape[:2]
    s = min(size, h, w)
    y, x = (h - s) // 2, (w - s) // 2
    crops = [im[y:y + s, x:x + s] for im in (bic, sr, hr)]
    gap = np.full((s, 4, 3), 255, np.uint8)
    return np.concatenate([crops[0], gap, crops[1], gap, crops[2]], axis=1)


class Validator:
    """``validator(it)``: the mean validation Y-PSNR after iteration ``it``, or ``None`` where
    this process does not validate (no ``val_hr_dir``, or not rank 0). Updates the run state's
    best score (and ``best.safetensors``); ``last_psnr`` is the latest score."""

    def __init__(self, ctx: RunContext, run: PreparedRun):
        self.ctx, self.run = ctx, run
        self.last_psnr: float | None = None

    @property
    def active(self) -> bool:
        return bool(self.ctx.cfg.val_hr_dir) and self.ctx.is_main

    def __call__(self, it: int) -> float | None:
        ctx, cfg, model, state = self.ctx, self.ctx.cfg, self.run.model, self.run.state
        if not self.active:
            return None
        model.eval()
        shown = {}

        def keep_first(name, lr, sr, hr):
            shown.setdefault("img", (lr, sr, hr))

        rep = evaluate_folder(ModelUpscaler(model, device=ctx.device), cfg.val_hr_dir,
                              on_image=keep_first, limit=cfg.val_max_images or None)
        model.train()
        if not rep.images:
            raise TrainDataError(cfg.val_hr_dir, "no usable validation images (val_hr_dir; "
                                                 f"{'; '.join(rep.errors[:3]) or 'none found'})")
        psnr = self.last_psnr = rep.mean["psnr_y"]
        if "img" in shown:
            write_png(ctx.out_dir / "crops" / f"iter_{it:07d}.png",
                      side_by_side(*shown["img"], cfg.scale))
        if psnr > state.best_psnr:
            state.best_psnr, state.best_iteration = psnr, it
            save_model(model, ctx.out_dir / "best.safetensors",
                       {**ctx.provenance, "iteration": it, "val_psnr_y": psnr})
        return psnr
