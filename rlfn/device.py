"""Where a model runs: device names and what the hardware supports, decided in one place.

* ``parse_device(name, key)``: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> ``torch.device``;
  a CUDA device on a machine without one, or a name torch does not know, is a
  :class:`~rlfn.errors.ConfigError` naming ``key`` (the option or setting it came from).
* ``bf16_native(device)``: whether bf16 runs natively (CUDA with bf16 support; a CPU with
  AVX512-BF16/AMX), the condition for bf16 autocast in training and the bf16 backends.
"""

from __future__ import annotations

import torch

from .errors import ConfigError

__all__ = ["parse_device", "bf16_native", "cpu_has_bf16", "DEVICE_CHOICES"]

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
