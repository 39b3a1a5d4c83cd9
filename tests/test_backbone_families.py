"""The backbone registry: every family recognised, its CLS attention the model's own, DINOv3
(timm, RoPE) and ViTs without a CLS token. Random weights; nothing is downloaded."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import apply_rot_embed_cat

from neco_loss import backbones
from neco_loss.models import DenseViT, recording_cls_attention
from neco_loss.testbed import TESTBED_MODEL_KWARGS
from neco_loss.training.config import build_config
from neco_loss.training.trainer import Trainer
from tests.test_training import TINY

TESTBED_RUN = {"weights": "testbed", "model_kwargs": TESTBED_MODEL_KWARGS}

# A DINOv3 (timm Eva: RoPE, 4 registers, patch 16) small enough for a CPU test.
DINOV3 = "vit_small_patch16_dinov3"
DINOV3_KWARGS = {"img_size": 32, "embed_dim": 64, "depth": 2, "num_heads": 2}


def small_dinov3() -> torch.nn.Module:
    torch.manual_seed(0)
    vit = timm.create_model(DINOV3, dynamic_img_size=True, num_classes=0, **DINOV3_KWARGS)
    with torch.no_grad():  # sharper attention than at init, so that errors would show
        for block in vit.blocks:
            block.attn.qkv.weight.mul_(3.0)
    return vit.eval()


def attention_by_hand(vit: torch.nn.Module, images: torch.Tensor, rope: bool) -> torch.Tensor:
    """The last block's CLS attention over all tokens ``(B, heads, T)``, from its input and
    the rotary embedding it receives, as ``EvaAttention`` computes it (``rope=False``: as a
    recomputation that forgets the RoPE would)."""
    attention = vit.blocks[-1].attn
    seen = {}
    handle = attention.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.update(x=args[0], rope=kwargs["rope"]), with_kwargs=True
    )
    with torch.no_grad():
        vit.forward_features(images)
        handle.remove()
        tokens = seen["x"]
        batch, count, _ = tokens.shape
        qkv = attention.qkv(tokens).reshape(batch, count, 3, attention.num_heads, -1)
        query, key = qkv.permute(2, 0, 3, 1, 4)[:2]
        if rope:
            prefix, half = attention.num_prefix_tokens, attention.rotate_half  # DINOv3: half
            query, key = (
                torch.cat(
                    [
                        part[:, :, :prefix],
                        apply_rot_embed_cat(part[:, :, prefix:], seen["rope"], half=half),
                    ],
                    dim=2,
                )
                for part in (query, key)
            )
        weights = (query * attention.scale @ key.transpose(-2, -1)).softmax(dim=-1)
    return weights[:, :, 0]


def test_timm_dinov3_records_its_own_attention_with_rope():
    vit = small_dinov3()
    images = torch.randn(2, 3, 48, 64)
    assert backbones.family(vit) == "timm-rope" and backbones.prefix_tokens(vit) == 5
    plain = vit.forward_features(images)
    with recording_cls_attention(vit) as records:
        recorded_run = vit.forward_features(images)
    torch.testing.assert_close(recorded_run, plain)  # recording does not change the model
    assert vit.blocks[-1].attn.fused_attn == timm.layers.use_fused_attn()  # restored
    expected = attention_by_hand(vit, images, rope=True)[:, :, 5:]
    assert records[0].shape == (2, 2, 3 * 4)
    torch.testing.assert_close(records[0], expected)
    # What the recording read before the registry: the same matrix without the RoPE.
    forgetful = attention_by_hand(vit, images, rope=False)[:, :, 5:]
    assert (forgetful - expected).abs().max() > 1e-3


def test_timm_dinov3_student_and_teacher_see_one_position_encoding():
    """Train mode (student) and eval mode (teacher) give the same rotary embedding for one
    crop, hence the same tokens without drop-path."""
    vit = small_dinov3()
    images = torch.randn(2, 3, 48, 48)
    teacher = vit.forward_features(images)
    student = vit.train().forward_features(images)
    torch.testing.assert_close(student, teacher)


def test_a_timm_dinov3_trains_with_a_foreground_mask(tmp_path):
    config = build_config(
        {
            **TINY,
            "model": DINOV3,
            "model_kwargs": DINOV3_KWARGS,
            "image_size": 96,
            "global_size": 64,  # 4 x 4 patches of 16: the foreground's blur needs >= 4
            "local_size": 32,
            "loss": {"roi_size": 2, "loss_mask": "foreground"},
            "max_steps": 2,
            "output_dir": str(tmp_path),
        }
    )
    result = Trainer(config, progress=False).fit()
    assert result.steps == 2 and torch.isfinite(torch.tensor(result.last_loss))


def no_cls_vit() -> DenseViT:
    return DenseViT(
        "vit_small_patch14_reg4_dinov2",
        class_token=False,
        global_pool="avg",
        **TINY["model_kwargs"],
    )


def test_a_vit_without_cls_token_gives_patch_maps_and_no_attention():
    backbone = no_cls_vit()
    assert not backbones.has_cls_token(backbone.vit)
    assert backbone.num_prefix_tokens == 4  # the registers only
    maps = backbone(torch.randn(2, 3, 32, 40))
    assert maps.shape == (2, 32, 4, 5)
    tokens = backbone.vit.forward_features(torch.randn(1, 3, 32, 40))
    assert tokens.shape[1] == 4 + 4 * 5
    with pytest.raises(ValueError, match="has no CLS token: use loss_mask: all"):
        with recording_cls_attention(backbone.vit):
            pass


def test_a_vit_without_cls_token_trains_and_refuses_a_loss_mask_before_any_step(tmp_path):
    kwargs = {**TINY["model_kwargs"], "class_token": False, "global_pool": "avg"}
    base = {**TINY, "model_kwargs": kwargs, "max_steps": 1}
    plain = build_config({**base, "output_dir": str(tmp_path / "all")})
    assert Trainer(plain, progress=False).fit().steps == 1
    masked = build_config(
        {
            **base,
            "loss": {"roi_size": 2, "loss_mask": "background"},
            "output_dir": str(tmp_path / "masked"),
        }
    )
    with pytest.raises(ValueError, match=r"timm model .* has no CLS token: use loss_mask: all"):
        Trainer(masked, progress=False)
    assert not (tmp_path / "masked" / "checkpoint_last.pt").exists()


def test_an_unknown_module_is_refused_listing_every_family():
    with pytest.raises(TypeError, match="is Linear. Supported: timm-rope: ") as error:
        DenseViT(torch.nn.Linear(2, 2))
    for name in backbones.FAMILIES:
        assert f"{name}: " in str(error.value)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("resnet50", "'resnet50' is not a ViT of a supported family. Supported: timm-rope"),
        ("vit_small_patch16_dinov4", "did you mean 'vit_small_patch16_dinov3'"),
    ],
)
def test_an_unsupported_timm_name_is_refused_before_any_download(name, message, monkeypatch):
    """With pretrained weights asked for and the hub offline, the refusal comes first."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=message):
        backbones.build(name, pretrained=True)


def test_a_transformers_folder_of_another_type_is_refused_before_loading(tmp_path):
    transformers = pytest.importorskip("transformers", reason="needs neco-loss[hf]")
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    folder = tmp_path / "vit"
    transformers.ViTModel(config).save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"not read")
    with pytest.raises(ValueError, match="is a transformers 'vit' model; the supported types"):
        DenseViT(str(folder))


def test_random_weights_warn_once_and_a_trained_start_does_not(recwarn):
    from neco_loss.training.assembly import build_backbone

    base = {**TINY, "output_dir": "unused"}
    build_backbone(build_config(base))
    random = [w for w in recwarn if "starts from random weights" in str(w.message)]
    assert len(random) == 1
    recwarn.clear()
    build_backbone(build_config({**base, **TESTBED_RUN}))
    assert not [w for w in recwarn if "random weights" in str(w.message)]
