"""Foreground masks from CLS attention, as the reference code's ``process_attentions``."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.transforms import GaussianBlur

from neco_loss.foreground import foreground_masks
from neco_loss.models import recording_cls_attention


def official_process_attentions(attentions: torch.Tensor, spatial_res: int) -> torch.Tensor:
    """github.com/vpariza/NeCo ``experiments/utils.py::process_attentions``, threshold 0.6,
    blur_sigma 0.6; skimage's ``label`` (full connectivity) replaced by scipy's with a 3x3
    structure, the same 8-connectivity on one slice."""
    attentions = GaussianBlur(7, sigma=(0.6))(attentions)
    attentions = attentions.reshape(attentions.size(0), 1, spatial_res**2)
    val, idx = torch.sort(attentions)
    val /= torch.sum(val, dim=-1, keepdim=True)
    cumval = torch.cumsum(val, dim=-1)
    th_attn = cumval > (1 - 0.6)
    idx2 = torch.argsort(idx)
    th_attn[:, 0] = torch.gather(th_attn[:, 0], dim=1, index=idx2[:, 0])
    th_attn = th_attn.reshape(attentions.size(0), 1, spatial_res, spatial_res).float()
    for j, th_att in enumerate(th_attn):
        labelled, _ = scipy.ndimage.label(th_att[0].numpy(), structure=np.ones((3, 3)))
        for k in range(1, np.max(labelled) + 1):
            mask = labelled == k
            if np.sum(mask) <= 2:
                th_attn[j, 0][torch.from_numpy(mask)] = 0
    return th_attn


@settings(max_examples=60, deadline=None)
@given(
    grid=st.integers(4, 12),
    heads=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    peaked=st.booleans(),
)
def test_equals_the_official_processing(grid, heads, seed, peaked):
    generator = torch.Generator().manual_seed(seed)
    attention = torch.rand(3, heads, grid, grid, generator=generator)
    if peaked:  # a few strong patches, the rest faint: small isolated components appear
        attention = attention**8
    attention = attention / attention.sum(dim=(2, 3), keepdim=True)
    averaged = sum(attention[:, i] / heads for i in range(heads)).reshape(3, 1, grid, grid)
    expected = official_process_attentions(averaged, grid)[:, 0].bool()
    torch.testing.assert_close(foreground_masks(attention), expected)


def test_small_components_are_dropped():
    attention = torch.full((1, 8, 8), 1e-3)
    attention[0, 1:5, 1:5] = 1.0  # a 16-patch blob holds the mass
    masks = foreground_masks(attention)
    assert masks[0, 2:4, 2:4].all() and not masks[0, 6:, 6:].any()


def test_errors():
    with pytest.raises(ValueError, match=r"attention must be \(B, heads, h, w\)"):
        foreground_masks(torch.rand(2, 3, 3))
    with pytest.raises(ValueError, match="mass must be in"):
        foreground_masks(torch.rand(2, 6, 6), mass=0.0)
    with pytest.raises(TypeError, match="attention"):
        foreground_masks(torch.ones(2, 6, 6, dtype=torch.long))


def test_recording_equals_timms_attention_matrix():
    vit = timm.create_model(
        "vit_small_patch14_reg4_dinov2",
        img_size=56,
        embed_dim=48,
        depth=2,
        num_heads=3,
        dynamic_img_size=True,
        num_classes=0,
    ).eval()
    images = torch.randn(2, 3, 56, 56)
    with recording_cls_attention(vit) as records:
        vit.forward_features(images)
    assert len(records) == 1 and records[0].shape == (2, 3, 16)
    last = vit.blocks[-1].attn
    last.fused_attn = False  # timm then forms the softmax matrix; catch it at attn_drop
    captured = {}
    last.attn_drop.register_forward_hook(lambda _m, _i, out: captured.setdefault("attn", out))
    vit.forward_features(images)
    prefix = vit.num_prefix_tokens  # CLS + 4 registers
    torch.testing.assert_close(records[0], captured["attn"][:, :, 0, prefix:])
    with pytest.raises(TypeError, match="must be a ViT of a supported family"):
        with recording_cls_attention(torch.nn.Linear(2, 2)):
            pass
