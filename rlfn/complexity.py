"""Parameters, FLOPs and activations counted as the NTIRE 2022 Efficient SR challenge counts
them (its ``utils/model_summary.py``), on a 256x256 LR input by default.

The challenge's conventions, reproduced here:

* FLOPs are multiply-accumulates of every ``Conv2d`` (output elements x kernel area x input
  channels per group, bias not counted), plus one per output element of each activation
  *module* (the official RLFB's ``nn.LeakyReLU``). Functional ops of the official code
  (``F.max_pool2d``, ``F.interpolate``) and ``nn.Sigmoid`` are not counted.
* Activations are the elements of every ``Conv2d`` output.

Our RLFB calls ``F.leaky_relu`` (same numbers, no module), so those calls are counted through
a ``TorchFunctionMode`` during the counting pass. For the official challenge weights this
gives the published 0.317 M params, 19.70 G FLOPs and 80.05 M activations
(``tests/test_complexity.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["count_complexity"]

_ACTIVATION_MODULES = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.ReLU6)
_ACTIVATION_FUNCTIONS = {F.relu, F.leaky_relu, F.elu, F.relu6, F.prelu, torch.relu}


class _CountActivations(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _ACTIVATION_FUNCTIONS and isinstance(out, torch.Tensor):
            self.elements += out.numel()
        return out


@torch.no_grad()
def count_complexity(model: nn.Module, lr_hw: tuple[int, int] = (256, 256),
                     in_channels: int = 3) -> dict:
    """``{"params", "flops", "activations", "conv_layers", "input"}`` (raw counts) for one
    ``(1, in_channels, *lr_hw)`` input on the CPU."""
    counts = {"conv_flops": 0, "act_module_flops": 0, "activations": 0, "conv_layers": 0}

    def conv_hook(mod: nn.Conv2d, inp, out):
        k = mod.kernel_size[0] * mod.kernel_size[1]
        counts["conv_flops"] += out.numel() * k * (mod.in_channels // mod.groups)
        counts["activations"] += out.numel()
        counts["conv_layers"] += 1

    def act_hook(mod, inp, out):
        counts["act_module_flops"] += out.numel()

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, _ACTIVATION_MODULES):
            hooks.append(m.register_forward_hook(act_hook))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with _CountActivations() as fn_counter:
            model(torch.zeros(1, in_channels, *lr_hw, device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    flops = counts["conv_flops"] + counts["act_module_flops"] + fn_counter.elements
    return {"params": sum(p.numel() for p in model.parameters()), "flops": flops,
            "activations": counts["activations"], "conv_layers": counts["conv_layers"],
            "input": [1, in_channels, *lr_hw]}
