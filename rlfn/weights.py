"""Loading and saving model weights without ever running pickled code.

* Official release files (``.pth``): plain ``state_dict``s, read with
  ``torch.load(..., weights_only=True, map_location="cpu")``; a pickle that carries code is
  refused by PyTorch's restricted unpickler, and we report it as such.
* Our own files: safetensors, with the architecture and provenance in the header metadata.

The architecture (channels, blocks, scale) is recognised from the tensors' shapes, so a user
can pass just the file.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import save_file

from .models import RLFN, RLFNConfig, name_for

__all__ = ["WeightsError", "LoadedModel", "load_state_dict", "infer_config", "load_model",
           "save_model", "read_metadata", "FORMAT"]

FORMAT = "rlfn-pipeline/1"


class WeightsError(ValueError):
    """A weights file that cannot be used; the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    # Accept the wrappers common in SR toolboxes ({"params": sd}, {"state_dict": sd}, ...).
    if isinstance(obj, Mapping):
        for key in ("params_ema", "params", "state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(path, f"not a state dict (found {type(obj).__name__})")
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise WeightsError(path, f"not a state dict: entry {k!r} is a {type(v).__name__}")
        out[k[7:] if k.startswith("module.") else k] = v  # DataParallel/DDP prefix
    return out


def load_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata (empty for ``.pth``) of a weights file, on the CPU."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(path, "no such file")
    if path.is_dir():
        raise WeightsError(path, "is a directory, expected a weights file")
    if path.stat().st_size == 0:
        raise WeightsError(path, "empty file (0 bytes)")
    with open(path, "rb") as fh:
        head = fh.read(16)
    # safetensors: 8-byte little-endian header length, then a JSON header starting with '{'
    if path.suffix == ".safetensors" or (len(head) > 8 and head[8:9] == b"{"):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(path, f"corrupt or truncated safetensors file ({e})") from None
        return _unwrap(tensors, path), meta
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol N": irrelevant, we refuse
            warnings.filterwarnings("ignore", message=".*pickle protocol", category=UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if "Weights only load failed" in str(e) or "Unsupported global" in str(e):
            reason = ("refused: the checkpoint is a pickle that asks to run or import code "
                      "(loaded with weights_only=True, nothing was executed)")
            m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            if m:
                reason += f"; it references {m.group(1)}"
            raise WeightsError(path, reason) from None
        raise WeightsError(path, f"not a PyTorch checkpoint ({first})") from None
    except (RuntimeError, EOFError, OSError, ValueError, IndexError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(path, f"not a readable PyTorch checkpoint ({first})") from None
    return _unwrap(obj, path), {}


def _shape(sd: Mapping[str, torch.Tensor], key: str, path: Path) -> tuple[int, ...]:
    if key not in sd:
        raise WeightsError(path, f"not an RLFN state dict: missing {key!r}")
    return tuple(sd[key].shape)


def infer_config(sd: Mapping[str, torch.Tensor], path: str | Path = "<state dict>") -> RLFNConfig:
    """Recognise an RLFN's channels, blocks and scale from its tensors' shapes."""
    path = Path(path)
    feat, in_ch = _shape(sd, "conv_1.weight", path)[:2]
    mid = _shape(sd, "block_1.c1_r.weight", path)[0]
    esa = _shape(sd, "block_1.esa.conv1.weight", path)[0]
    blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"block_(\d+)\.", k))})
    if blocks != list(range(1, len(blocks) + 1)):
        raise WeightsError(path, f"not an RLFN state dict: block numbers {blocks} are not 1..N")
    up = _shape(sd, "upsampler.0.weight", path)[0]
    out_ch = in_ch
    scale = math.isqrt(up // out_ch) if up % out_ch == 0 else 0
    if scale < 1 or scale * scale * out_ch != up:
        raise WeightsError(path, f"not an RLFN state dict: upsampler has {up} channels, "
                                 f"not {out_ch} x scale^2")
    return RLFNConfig(scale=scale, feature_channels=feat, mid_channels=mid, esa_channels=esa,
                      num_blocks=len(blocks), in_channels=in_ch, out_channels=out_ch)


class LoadedModel:
    """A model ready for inference, with where it came from."""

    def __init__(self, model: RLFN, path: Path, name: str, metadata: dict[str, str]):
        self.model = model
        self.path = path
        self.name = name
        self.metadata = metadata

    @property
    def scale(self) -> int:
        return self.model.scale

    @property
    def config(self) -> RLFNConfig:
        return self.model.config

    def __repr__(self) -> str:
        return f"LoadedModel({self.name}, x{self.scale}, {self.path})"


def load_model(path: str | Path, scale: int | None = None, device: str | torch.device = "cpu",
               ) -> LoadedModel:
    """Build the right RLFN for a weights file (official ``.pth`` or our safetensors) and load it.

    ``scale``, when given, must agree with the file; otherwise a ``WeightsError`` says so.
    """
    path = Path(path)
    sd, meta = load_state_dict(path)
    config = infer_config(sd, path)
    if scale is not None and int(scale) != config.scale:
        raise WeightsError(path, f"is a x{config.scale} model, but --scale {scale} was asked for")
    model = RLFN(config)
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {tuple(v.shape)})"
             for k, v in expected.items() if k in sd and sd[k].shape != v.shape]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if keys:
            problems.append(f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}")
    if problems:
        raise WeightsError(path, "not an RLFN state dict: " + "; ".join(problems))
    model.load_state_dict(sd, strict=True)
    model.eval().to(device)
    name = meta.get("model") or name_for(config)
    return LoadedModel(model, path, name, meta)


def save_model(model: RLFN, path: str | Path, provenance: Mapping[str, Any] | None = None) -> Path:
    """Save weights as safetensors with the architecture and provenance in the metadata.

    Written to a temporary name and renamed, so a crash never leaves a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = model.config
    meta = {
        "format": FORMAT,
        "model": name_for(config),
        "scale": str(config.scale),
        "config": json.dumps(config.to_dict(), sort_keys=True),
        "pixel_range": "255",
        "provenance": json.dumps(dict(provenance or {}), sort_keys=True, default=str),
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of one of our safetensors files, JSON fields decoded."""
    _, meta = load_state_dict(path)
    out: dict[str, Any] = dict(meta)
    for key in ("config", "provenance"):
        if key in out:
            out[key] = json.loads(out[key])
    return out
