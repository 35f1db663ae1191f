"""Where a model runs: device names and what the hardware supports, decided in one place.

* ``parse_device(name, key)``: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> ``torch.device``;
  a CUDA device on a machine without one, or a name torch does not know, is a
  :class:`~rlfn.errors.ConfigError` naming ``key`` (the option or setting it came from).
* ``bf16_native(device)``: whether bf16 runs natively (CUDA with bf16 support; a CPU with
  AVX512-BF16/AMX), the condition for the bf16 backends.
* ``bf16_trains_faster(device)``: whether bf16 autocast trains faster than fp32 there (CUDA
  with bf16; a CPU whose AMX oneDNN may use; an AMD CPU with AVX512-BF16): training's
  ``amp: auto``.
"""

from __future__ import annotations

import os

import torch

from .errors import ConfigError
from .machine import cpu_vendor

__all__ = ["parse_device", "bf16_native", "bf16_trains_faster", "cpu_has_bf16", "cpu_amx_usable",
           "DEVICE_CHOICES"]

# oneDNN's cap on the instruction set it dispatches to (its own variables; the older name too)
ISA_CAP_ENV = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def parse_device(name: str | torch.device, key: str = "device") -> torch.device:
    if isinstance(name, torch.device):
        name = str(name)
    name = str(name).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise ConfigError(key, f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(key, f"{name}: no CUDA GPU is available on this machine")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(key, f"{name}: {e}") from None
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(key, f"{name}: this machine has {torch.cuda.device_count()} GPU(s)")
    return dev


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: oneDNN runs bf16 natively (else it is emulated, slower than fp32)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def bf16_native(device: str | torch.device) -> bool:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and bool(torch.cuda.is_bf16_supported())
    return dev.type == "cpu" and cpu_has_bf16()


def _cap() -> str:
    """oneDNN's instruction-set cap from the environment, upper case (``""``: none)."""
    return next((os.environ[k] for k in ISA_CAP_ENV if os.environ.get(k)), "").upper()


def cpu_amx_usable() -> bool:
    """AMX tiles on this CPU, and oneDNN allowed to use them: no ``ONEDNN_MAX_CPU_ISA`` cap, or
    ``ALL``/``DEFAULT``, or an AMX level (``AVX512_CORE_AMX``, ...)."""
    cap = _cap()
    if cap and cap not in ("ALL", "DEFAULT") and "AMX" not in cap:
        return False
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


def _cap_allows_bf16() -> bool:
    """No cap, or one at AVX512_CORE_BF16 or above (oneDNN's levels: the bf16, fp16, AVX10 and
    AMX ones, ``ALL``/``DEFAULT``); a cap such as ``AVX512_CORE`` or ``AVX2`` is below it."""
    cap = _cap()
    return not cap or cap in ("ALL", "DEFAULT") or any(
        k in cap for k in ("BF16", "FP16", "AMX", "AVX10"))


# bf16 autocast over channels_last fp32, per training step of the pipeline's rank
# (bench/train_step.py --model rlfn --batch 2 --patch 128, 1 thread). The same oneDNN kernels
# (jit avx512_core_bf16) give opposite answers on two CPUs without usable AMX, so the choice
# follows what was measured, by vendor, not the instruction set alone:
#   Intel Xeon with AMX 1.79x; the same Xeon capped to AVX512_CORE_BF16 0.63x (fp32 wins);
#   AMD EPYC with AVX512-BF16 (no AMX) 1.62x (2026-12-05).
BF16_FASTER_WITHOUT_AMX = ("AuthenticAMD",)


def bf16_trains_faster(device: str | torch.device) -> bool:
    """Where bf16 autocast trains faster than fp32 (training's ``amp: auto``): CUDA with bf16;
    a CPU whose AMX oneDNN may use; a CPU with AVX512-BF16 and no AMX only where that was
    measured faster (``BF16_FASTER_WITHOUT_AMX``: AMD's), and oneDNN not capped below bf16.
    An Intel CPU capped below AMX trains fp32."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return bf16_native(dev)
    if dev.type != "cpu" or not cpu_has_bf16():
        return False
    return cpu_amx_usable() or (cpu_vendor() in BF16_FASTER_WITHOUT_AMX and _cap_allows_bf16())
