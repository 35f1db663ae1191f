"""NTIRE-style counts against the challenge's published figures for the official weights."""

from __future__ import annotations

import pytest

from rlfn.complexity import count_complexity
from rlfn.models import build_model
from rlfn.weights import load_model


def test_challenge_model_matches_published_counts(pretrained):
    c = count_complexity(load_model(pretrained / "rlfn_ntire_x4.pth").model)
    # README of bytedance/RLFN: 0.317 M params, 19.70 G FLOPs, 80.05 M activations
    assert round(c["params"] / 1e6, 3) == 0.317
    assert round(c["flops"] / 1e9, 2) == 19.70
    assert round(c["activations"] / 1e6, 2) == 80.05


def test_counts_scale_with_input_and_leave_the_model_alone():
    m = build_model("rlfn_s", 2).train()
    small = count_complexity(m, (64, 64))
    big = count_complexity(m, (128, 128))
    assert m.training and not any(sub._forward_hooks for sub in m.modules())
    assert big["activations"] == pytest.approx(4 * small["activations"], rel=0.02)
    assert big["flops"] == pytest.approx(4 * small["flops"], rel=0.02)
    assert small["params"] == big["params"] == sum(p.numel() for p in m.parameters())
