"""The engine protocol: what every inference backend is, and the eager one (the baseline).

An engine takes a float32 ``(N, 3, H, W)`` batch in [0, 255] on its device and returns the
float32 SR batch there; ``upscale``, ``evaluate`` and ``profile`` all run through one. This
module is all that training (its validation) and ``rlfn.upscale`` need: the other backends,
their registry and ``make_engine`` are in ``rlfn.backends``, which training never imports.

Each backend is an ``Engine`` subclass carrying its ``BackendInfo`` (name, devices, required
packages, whether it is exact, a description), defined and registered once in its module of
``rlfn.backends``. "Exact" is what the backend promises (fp32 arithmetic, only summation order
changes); the tests and ``bench/inference.py`` measure every backend's Set5 x4 PSNR against
eager fp32: within ``EXACT_DB`` it is called exact, anything lossier is reported with its
loss (``psnr_label``).

Errors come before any work, as one-line ``BackendError``s: an unknown backend, a backend
whose package is not installed, a GPU asked for where none exists, a backend that does not
run on the device asked for, hardware without what the backend needs.

Batches: an engine takes N > 1 images (or tiles) of one size at once (``rlfn.upscale``'s
batched mode). On the CPU, PyTorch picks a conv algorithm by input size and a single small
input (<= 20480 elements, e.g. ESA's pooled map) takes a different one than a batch, so the
engines that run the module eagerly (eager, channels_last, bf16) run such convs, and the ESA
blocks (whose vectorised sigmoid rounds its tail differently), sample by sample inside a
batch: every sample's output is then bit-identical to running it alone (``per_sample_convs``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError

__all__ = ["BackendError", "BackendInfo", "Engine", "as_engine", "psnr_label", "EXACT_DB",
           "per_sample_convs"]

# Within this PSNR difference from eager fp32 (Set5 x4) a backend is called exact.
EXACT_DB = 0.01


class BackendError(ConfigError):
    """A backend that cannot run here: unknown, not installed, wrong device, no GPU. Raised
    as ``BackendError(reason)`` (the caller knows the option or key) or with a ``where``."""


@dataclass(frozen=True)
class BackendInfo:
    name: str
    devices: tuple[str, ...]
    requires: tuple[str, ...]  # importable modules (pip packages in the [infer] extra)
    exact: bool  # fp32 arithmetic: promised within EXACT_DB of eager
    description: str


def psnr_label(delta_db: float) -> str:
    """``exact`` within ``EXACT_DB`` of eager fp32, else the measured loss."""
    return "exact" if abs(delta_db) <= EXACT_DB else f"lossy ({delta_db:+.3f} dB)"


class Engine:
    """A model ready to run: ``engine(x)`` with ``x`` float32 (N, 3, H, W) in [0, 255] on
    ``engine.device``; returns float32 (N, 3, H*s, W*s) on the same device."""

    # The eager backend: the PyTorch module as it is, fp32. Each backend's engine class
    # carries its own description (``info``); ``rlfn.backends`` registers it.
    info = BackendInfo("eager", ("cpu", "cuda"), (), True, "PyTorch eager, fp32 (the baseline)")
    name = info.name
    supports_grid = True  # can take ESAGrid (tiles that match the untiled output)
    # cuDNN autotuning per input shape (the first image of each size pays for the search);
    # off for the eager baseline, which runs PyTorch's defaults.
    cudnn_benchmark = False
    # Runs ``self.model`` eagerly: on the CPU a batch gets each sample's own conv algorithm
    # (see the module docstring), so batched outputs equal unbatched ones bit for bit.
    per_sample_exact = True

    def __init__(self, model: nn.Module, device: torch.device):
        self.model = model
        self.device = device
        self.scale = int(model.scale)
        self.min_input_size = int(getattr(model, "min_input_size", 1))

    def __call__(self, x: torch.Tensor, grid=None) -> torch.Tensor:
        if grid is not None and not self.supports_grid:
            raise BackendError(f"backend {self.name!r} cannot run tiles with an ESA grid")
        with torch.inference_mode():
            if self.device.type != "cuda":
                if x.size(0) > 1 and self.per_sample_exact:
                    with per_sample_convs(self.model):
                        return self._run(x, grid)
                return self._run(x, grid)
            with torch.backends.cudnn.flags(enabled=True, benchmark=self.cudnn_benchmark,
                                            deterministic=False,
                                            allow_tf32=torch.backends.cudnn.allow_tf32):
                return self._run(x, grid)

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        cls.name = cls.info.name  # one name per backend: its description's

    @classmethod
    def check_hardware(cls, device: torch.device) -> None:
        """Raise a ``BackendError`` where this machine cannot run the backend (after the
        registry's checks of name, device and packages); nothing by default."""

    @classmethod
    def build(cls, model: nn.Module, device: torch.device, **options) -> "Engine":
        """The engine for ``model`` (fp32, eval, on ``device``); ``options`` (e.g. int8's
        ``calibration``) are for the backends that take them, ignored by the others."""
        return cls(model, device)

    def _run(self, x: torch.Tensor, grid) -> torch.Tensor:
        return self.model(x) if grid is None else self.model(x, grid=grid)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __repr__(self) -> str:
        return f"<Engine {self.name} on {self.device}>"


def _conv_backend(conv: nn.Conv2d, x: torch.Tensor):
    return torch._C._select_conv_backend(  # the algorithm PyTorch will run for this input
        x, conv.weight, conv.bias, list(conv.stride), list(conv.padding), list(conv.dilation),
        False, [0, 0], conv.groups, None)


def _needs_split(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Would one sample of ``x`` alone run a different conv algorithm than the batch?"""
    try:
        return _conv_backend(conv, x) != _conv_backend(conv, x[:1])
    except Exception:  # private API changed, or padding="same": PyTorch's own rule
        return x[:1].numel() <= 20480


def _attention_modules() -> tuple[type, ...]:
    from .models.rfdb import RFDNESA
    from .models.rlfn import ESA

    return ESA, RFDNESA


@contextlib.contextmanager
def per_sample_convs(model: nn.Module):
    """While active, a batch through ``model`` (CPU) computes each sample as it would alone:

    * each ``nn.Conv2d`` whose batch would run another conv algorithm than one sample of it
      (small inputs: PyTorch's size rule, see the module docstring) runs sample by sample;
    * ESA blocks (RLFN's, RFDN's) run sample by sample: their sigmoid is vectorised over the
      whole tensor with a scalar tail (and split across threads) that differs from the
      vectorised result in the last bit, at places that move with the batch size.

    The other layers (the body's convs, LeakyReLU, adds, PixelShuffle) give each sample the
    same bits in a batch. Batched outputs then equal the unbatched ones bit for bit."""
    attention = _attention_modules()
    mods = [m for m in model.modules() if isinstance(m, (nn.Conv2d, *attention))
            and "forward" not in m.__dict__]

    def split_conv(conv: nn.Conv2d):
        run = conv.forward

        def forward(x: torch.Tensor) -> torch.Tensor:
            if x.dim() == 4 and x.size(0) > 1 and _needs_split(conv, x):
                return torch.cat([run(x[i:i + 1]) for i in range(x.size(0))])
            return run(x)
        return forward

    def split_all(mod: nn.Module):
        run = mod.forward

        def forward(x: torch.Tensor, grid=None) -> torch.Tensor:
            if x.size(0) == 1:
                return run(x) if grid is None else run(x, grid)
            grids = grid if isinstance(grid, (list, tuple)) else [grid] * x.size(0)
            return torch.cat([run(x[i:i + 1]) if g is None else run(x[i:i + 1], g)
                              for i, g in enumerate(grids)])
        return forward

    for m in mods:
        m.forward = split_all(m) if isinstance(m, attention) else split_conv(m)
    try:
        yield
    finally:
        for m in mods:
            del m.forward


def as_engine(model, device: str | torch.device | None = None) -> Engine:
    """An ``Engine`` as it is, or a module wrapped in the eager one."""
    if isinstance(model, Engine):
        return model
    if device is None:
        device = next(model.parameters()).device
    return Engine(model, torch.device(device))  # as it is: no copy, no mode change
