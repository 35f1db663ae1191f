"""Loading and saving model weights without ever running pickled code.

* Official release files (``.pth``): plain ``state_dict``s, read with
  ``torch.load(..., weights_only=True, map_location="cpu")``; a pickle that carries code is
  refused by PyTorch's restricted unpickler, and we report it as such.
* Our own files: safetensors, with the architecture and provenance in the header metadata.

Any registered architecture (RLFN, RFDN, EDSR; see ``rlfn.models.registry``) is saved with
its architecture name, registry model name, scale and config in the metadata, and rebuilt from
it. A file without that metadata (the official RLFN ``.pth`` files, EDSR-PyTorch's baseline
``.pt`` files, our checkpoints read without their metadata) is recognised from its tensors'
names and shapes (``infer_config``), so a user can pass just the file.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import struct
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import save as save_bytes

from torch import nn

from .errors import DataError
from .io import atomic_write
from .models import (ARCHITECTURES, EDSRConfig, RFDNConfig, RLFNConfig, arch_name,
                     build_from_config, name_for)

__all__ = ["WeightsError", "LoadedModel", "load_state_dict", "infer_config", "load_model",
           "save_model", "read_metadata", "FORMAT"]

FORMAT = "rlfn-pipeline/1"


class WeightsError(DataError, ValueError):
    """A weights file that cannot be used: ``WeightsError(path, reason)``."""


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


def _shape(sd: Mapping[str, torch.Tensor], key: str, path: Path,
           arch: str = "RLFN") -> tuple[int, ...]:
    if key not in sd:
        raise WeightsError(path, f"not an {arch} state dict: missing {key!r}")
    return tuple(sd[key].shape)


def _numbered(sd: Mapping[str, torch.Tensor], pattern: str, path: Path, arch: str) -> int:
    """How many ``pattern``-numbered modules (1..N or 0..N-1, no gaps) the state dict has."""
    found = sorted({int(m.group(1)) for k in sd if (m := re.match(pattern, k))})
    first = 0 if found and found[0] == 0 else 1
    if not found or found != list(range(first, first + len(found))):
        raise WeightsError(path, f"not an {arch} state dict: module numbers {found} have gaps")
    return len(found)


def _scale_from(up_channels: int, out_ch: int, path: Path, arch: str) -> int:
    scale = math.isqrt(up_channels // out_ch) if up_channels % out_ch == 0 else 0
    if scale < 1 or scale * scale * out_ch != up_channels:
        raise WeightsError(path, f"not an {arch} state dict: upsampler has {up_channels} "
                                 f"channels, not {out_ch} x scale^2")
    return scale


def _infer_rlfn(sd: Mapping[str, torch.Tensor], path: Path) -> RLFNConfig:
    feat, in_ch = _shape(sd, "conv_1.weight", path)[:2]
    mid = _shape(sd, "block_1.c1_r.weight", path)[0]
    esa = _shape(sd, "block_1.esa.conv1.weight", path)[0]
    blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"block_(\d+)\.", k))})
    if blocks != list(range(1, len(blocks) + 1)):
        raise WeightsError(path, f"not an RLFN state dict: block numbers {blocks} are not 1..N")
    up = _shape(sd, "upsampler.0.weight", path)[0]
    out_ch = in_ch
    scale = _scale_from(up, out_ch, path, "RLFN")
    return RLFNConfig(scale=scale, feature_channels=feat, mid_channels=mid, esa_channels=esa,
                      num_blocks=len(blocks), in_channels=in_ch, out_channels=out_ch)


def _infer_rfdn(sd: Mapping[str, torch.Tensor], path: Path) -> RFDNConfig:
    feat, in_ch = _shape(sd, "conv_1.weight", path, "RFDN")[:2]
    esa = _shape(sd, "block_1.esa.conv1.weight", path, "RFDN")[0]
    blocks = _numbered(sd, r"block_(\d+)\.", path, "RFDN")
    up = _shape(sd, "upsampler.0.weight", path, "RFDN")[0]
    return RFDNConfig(scale=_scale_from(up, in_ch, path, "RFDN"), feature_channels=feat,
                      num_blocks=blocks, distillation="block_1.c1_d.weight" in sd,
                      esa_channels=esa, in_channels=in_ch, out_channels=in_ch)


def _infer_edsr(sd: Mapping[str, torch.Tensor], path: Path) -> EDSRConfig:
    feat, in_ch = _shape(sd, "head.0.weight", path, "EDSR")[:2]
    blocks = _numbered(sd, r"body\.(\d+)\.body\.", path, "EDSR")
    out_ch = _shape(sd, "tail.1.weight", path, "EDSR")[0]
    ups = sorted(int(m.group(1)) for k in sd if (m := re.fullmatch(r"tail\.0\.(\d+)\.weight", k)))
    first = _shape(sd, "tail.0.0.weight", path, "EDSR")[0]
    if ups != list(range(0, 2 * len(ups), 2)):  # conv, PixelShuffle, conv, ...
        raise WeightsError(path, f"not an EDSR state dict: upsampler convs at {ups}")
    if first == 9 * feat and len(ups) == 1:
        scale = 3
    elif first == 4 * feat:
        scale = 2 ** len(ups)
    else:
        raise WeightsError(path, f"not an EDSR state dict: upsampler conv has {first} "
                                 f"channels, not {feat} x 4 or x 9")
    return EDSRConfig(scale=scale, feature_channels=feat, num_blocks=blocks,
                      in_channels=in_ch, out_channels=out_ch)


def infer_config(sd: Mapping[str, torch.Tensor], path: str | Path = "<state dict>"):
    """Recognise the architecture (RLFN, RFDN or EDSR), channels, blocks and scale of a
    state dict from its tensors' names and shapes; returns that architecture's config."""
    path = Path(path)
    if "conv_fuse.weight" in sd:
        return _infer_rfdn(sd, path)
    if "head.0.weight" in sd and "tail.1.weight" in sd:
        return _infer_edsr(sd, path)
    return _infer_rlfn(sd, path)


def _config_from_metadata(meta: Mapping[str, str], path: Path):
    """The config recorded in our metadata, or None for a file without it (or written before
    the metadata named the architecture, when every file was an RLFN: inferred instead)."""
    arch = meta.get("arch")
    if meta.get("format") != FORMAT or not arch:
        return None
    if arch not in ARCHITECTURES:
        raise WeightsError(path, f"unknown architecture {arch!r} in the metadata; known: "
                                 f"{', '.join(ARCHITECTURES)}")
    _, config_cls = ARCHITECTURES[arch]
    try:
        return config_cls(**json.loads(meta["config"]))
    except (KeyError, TypeError, ValueError) as e:
        raise WeightsError(path, f"unreadable {arch} config in the metadata ({e})") from None


class LoadedModel:
    """A model ready for inference, with where it came from."""

    def __init__(self, model: nn.Module, path: Path, name: str, metadata: dict[str, str]):
        self.model = model
        self.path = path
        self.name = name
        self.metadata = metadata

    @property
    def scale(self) -> int:
        return self.model.scale

    @property
    def config(self):
        """The model's config (``RLFNConfig``, ``RFDNConfig`` or ``EDSRConfig``)."""
        return self.model.config

    def __repr__(self) -> str:
        return f"LoadedModel({self.name}, x{self.scale}, {self.path})"


def load_model(path: str | Path, scale: int | None = None, device: str | torch.device = "cpu",
               ) -> LoadedModel:
    """Build the right model for a weights file (official ``.pth`` or our safetensors: the
    architecture named in its metadata, else recognised from its tensors) and load it.

    ``scale``, when given, must agree with the file; otherwise a ``WeightsError`` says so.
    """
    path = Path(path)
    sd, meta = load_state_dict(path)
    config = _config_from_metadata(meta, path) or infer_config(sd, path)
    if scale is not None and int(scale) != config.scale:
        raise WeightsError(path, f"is a x{config.scale} model, but --scale {scale} was asked for")
    arch = arch_name(config)
    try:
        model = build_from_config(config)
    except ValueError as e:
        raise WeightsError(path, f"cannot build the {arch} it describes ({e})") from None
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
        raise WeightsError(path, f"not an {arch} state dict: " + "; ".join(problems))
    model.load_state_dict(sd, strict=True)
    model.eval().to(device)
    name = meta.get("model") or name_for(config)
    return LoadedModel(model, path, name, meta)


def save_model(model: nn.Module, path: str | Path,
               provenance: Mapping[str, Any] | None = None) -> Path:
    """Save weights as safetensors with the architecture and provenance in the metadata:
    ``arch`` (``RLFN``, ``RFDN``, ``EDSR``), ``model`` (the registry name, or ``<arch>_custom``),
    ``scale`` and ``config`` (JSON), which ``load_model`` rebuilds the model from.

    Written to a temporary name and renamed, so a crash never leaves a half-written file.
    """
    path = Path(path)
    config = getattr(model, "config", None)
    try:
        arch = arch_name(config)
    except ValueError:
        raise TypeError(f"save_model: a {type(model).__name__} is not a registered "
                        f"architecture ({', '.join(ARCHITECTURES)})") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "arch": arch,
        "model": name_for(config),
        "scale": str(config.scale),
        "config": json.dumps(config.to_dict(), sort_keys=True),
        "pixel_range": "255",
        "provenance": json.dumps(dict(provenance or {}), sort_keys=True, default=str),
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, _sorted_header(save_bytes(tensors, metadata=meta)))
    return path


def _sorted_header(data: bytes) -> bytes:
    """The safetensors bytes with the metadata keys in sorted order. safetensors writes its
    ``__metadata__`` map in hash order, which differs from process to process, so the same
    weights would give files with different bytes (and DVC hashes) run to run."""
    n = struct.unpack("<Q", data[:8])[0]
    raw = data[8:8 + n]
    header = json.loads(raw)
    if "__metadata__" not in header:
        return data
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    body = raw.rstrip(b" ")
    if len(new) != len(body):  # a formatting difference: keep the file as it was written
        return data
    return data[:8] + new + raw[len(body):] + data[8 + n:]


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of one of our safetensors files, JSON fields decoded."""
    _, meta = load_state_dict(path)
    out: dict[str, Any] = dict(meta)
    for key in ("config", "provenance"):
        if key in out:
            out[key] = json.loads(out[key])
    return out
