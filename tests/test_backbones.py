"""Any ViT in, the same format out: timm, HuggingFace transformers DINOv2, torch.hub DINOv2.

Transformers models are randomly initialised from small configs and saved to local folders, as
a user's offline ``save_pretrained`` folder; nothing is downloaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from torch import nn

from neco_loss import backbones
from neco_loss.app.cli import main
from neco_loss.backbone_families import HF_FOLDER
from neco_loss.models import DenseViT, recording_cls_attention
from tests.test_training import TINY

transformers = pytest.importorskip("transformers", reason="needs neco-loss[hf]")

ROOT = Path(__file__).parents[1]
SMALL = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}


def hf_folder(tmp_path: Path, registers: int) -> Path:
    """A randomly initialised DINOv2 (patch 8) saved as a user's save_pretrained folder."""
    if registers:
        config = transformers.Dinov2WithRegistersConfig(
            **SMALL, patch_size=8, image_size=32, num_register_tokens=registers
        )
        model = transformers.Dinov2WithRegistersModel(config)
    else:
        model = transformers.Dinov2Model(
            transformers.Dinov2Config(**SMALL, patch_size=8, image_size=32)
        )
    folder = tmp_path / f"dinov2_{registers}"
    model.save_pretrained(folder)
    return folder


class HubDinov2(nn.Module):
    """The interface of the official torch.hub DINOv2 modules (facebookresearch/dinov2
    ``DinoVisionTransformer``): ``patch_size``, ``embed_dim``, ``num_register_tokens``,
    ``blocks[i].attn.qkv``, and ``forward_features`` returning the ``x_norm_*`` tokens. Built
    from timm layers: the dinov2 package is not on PyPI."""

    def __init__(self, registers: int = 4) -> None:
        super().__init__()
        self.patch_size, self.embed_dim, self.num_register_tokens = 8, 32, registers
        self.vit = timm.create_model(
            "vit_small_patch14_reg4_dinov2",
            img_size=32,
            patch_size=8,
            embed_dim=32,
            depth=2,
            num_heads=2,
            reg_tokens=registers,
            dynamic_img_size=True,
            num_classes=0,
        )
        self.blocks = self.vit.blocks

    def forward_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = self.vit.forward_features(images)
        return {
            "x_norm_clstoken": tokens[:, 0],
            "x_norm_regtokens": tokens[:, 1 : 1 + self.num_register_tokens],
            "x_norm_patchtokens": tokens[:, 1 + self.num_register_tokens :],
        }


@pytest.mark.parametrize("registers", [0, 4])
def test_transformers_dinov2_patch_maps(tmp_path, registers):
    folder = hf_folder(tmp_path, registers)
    backbone = DenseViT(str(folder)).eval()
    assert backbone.family == "transformers-dinov2" and backbone.patch_size == 8
    assert backbone.num_prefix_tokens == 1 + registers and backbone.embed_dim == 32
    images = torch.randn(2, 3, 40, 48)
    maps = backbone(images)
    assert maps.shape == (2, 32, 5, 6)
    hidden = backbone.vit(pixel_values=images).last_hidden_state[:, 1 + registers :]
    torch.testing.assert_close(maps.flatten(2).transpose(1, 2), hidden)
    same = DenseViT(backbones.HF_PREFIX + str(folder)).eval()  # hf: with a local path
    torch.testing.assert_close(same(images), maps)


@pytest.mark.parametrize("registers", [0, 4])
def test_transformers_cls_attention_equals_the_eager_matrix(tmp_path, registers):
    folder = hf_folder(tmp_path, registers)
    model_class = transformers.AutoModel
    eager = model_class.from_pretrained(folder, attn_implementation="eager").eval()
    images = torch.randn(2, 3, 32, 32)
    with recording_cls_attention(eager) as records:
        out = eager(pixel_values=images, output_attentions=True)
    expected = out.attentions[-1][:, :, 0, 1 + registers :]
    torch.testing.assert_close(records[0], expected)


def test_torch_hub_dinov2_patch_maps_and_attention():
    hub = HubDinov2().eval()
    backbone = DenseViT(hub)
    assert backbone.family == "torch.hub" and backbone.num_prefix_tokens == 5
    images = torch.randn(2, 3, 32, 40)
    maps = backbone(images)
    assert maps.shape == (2, 32, 4, 5)
    expected = hub.forward_features(images)["x_norm_patchtokens"]
    torch.testing.assert_close(maps.flatten(2).transpose(1, 2), expected)
    with recording_cls_attention(hub) as records:
        hub.forward_features(images)
    with recording_cls_attention(hub.vit) as timm_records:  # the same blocks, read as timm
        hub.vit.forward_features(images)
    torch.testing.assert_close(records[0], timm_records[0])


def train_two_steps(folder: Path, output: Path) -> None:
    """``neco train`` with ``model: FOLDER`` (offline, no model_kwargs) and a foreground mask."""
    config = {
        **TINY,
        "model": str(folder),
        "model_kwargs": {},
        "max_steps": 2,
        "loss": {"roi_size": 2, "loss_mask": "foreground"},
        "output_dir": str(output),
    }
    path = output.parent / f"{output.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["train", str(path), "--quiet"])


def test_train_a_transformers_folder_and_get_it_back_in_its_own_format(tmp_path, capsys):
    """model: PATH (offline, no model_kwargs); the run holds a save_pretrained folder that
    Dinov2Model.from_pretrained loads, with the trained weights; neco eval reads it."""
    folder = hf_folder(tmp_path, registers=4)
    train_two_steps(folder, tmp_path / "run")
    saved = tmp_path / "run" / HF_FOLDER
    trained = transformers.Dinov2WithRegistersModel.from_pretrained(saved)
    initial = transformers.Dinov2WithRegistersModel.from_pretrained(folder)
    name = "encoder.layer.0.attention.q_proj.weight"
    weights = dict(trained.named_parameters())
    start = dict(initial.named_parameters())
    key = name if name in weights else next(k for k in weights if k.endswith("query.weight"))
    assert not torch.equal(weights[key], start[key])  # trained
    state = torch.load(tmp_path / "run" / "backbone.pt", weights_only=True)
    torch.testing.assert_close(state[key], weights[key])  # the same weights in both files
    sizes = ["--train-images", "4", "--val-images", "3", "--output", str(tmp_path / "eval")]
    main(["eval", "in-context", "--checkpoint", str(tmp_path / "run"), *sizes])
    assert "| run | " in capsys.readouterr().out


def test_an_unreachable_hub_id_is_one_line(tmp_path):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    neco = Path(sys.executable).parent / "neco"
    result = subprocess.run(
        [
            str(neco),
            "train",
            "examples/recipes/tiny_cpu.yaml",
            "--model",
            "hf:facebook/dinov2-small",
            "--model-kwargs",
            "{}",
            "--output-dir",
            str(tmp_path / "run"),
        ],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "dinov2-small" in lines[0], lines


def dinov3_folder(tmp_path: Path) -> Path:
    """A randomly initialised transformers DINOv3 (patch 8, 4 registers, RoPE) as a folder."""
    config = transformers.DINOv3ViTConfig(
        **SMALL, patch_size=8, image_size=32, num_register_tokens=4
    )
    folder = tmp_path / "dinov3"
    transformers.DINOv3ViTModel(config).save_pretrained(folder)
    return folder


def test_transformers_dinov3_maps_attention_and_one_position_encoding(tmp_path):
    folder = dinov3_folder(tmp_path)
    backbone = DenseViT(str(folder)).eval()
    assert backbone.family == "transformers-dinov3" and backbone.num_prefix_tokens == 5
    images = torch.randn(2, 3, 32, 40)
    maps = backbone(images)
    assert maps.shape == (2, 32, 4, 5)
    eager = transformers.DINOv3ViTModel.from_pretrained(folder, attn_implementation="eager")
    out = eager.eval()(pixel_values=images, output_attentions=True)
    torch.testing.assert_close(maps.flatten(2).transpose(1, 2), out.last_hidden_state[:, 5:])
    with recording_cls_attention(backbone.vit) as records:
        backbone(images)
    torch.testing.assert_close(records[0], out.attentions[-1][:, :, 0, 5:])
    assert backbone.vit.config._attn_implementation == "sdpa"  # restored after recording
    # The student (train mode) sees the teacher's (eval mode) position encoding for one crop;
    # an unprepared model rescales its RoPE coordinates at random in train mode.
    torch.testing.assert_close(backbone.train()(images), maps)
    unprepared = transformers.DINOv3ViTModel.from_pretrained(folder).train()
    torch.manual_seed(0)
    assert not torch.allclose(
        unprepared.rope_embeddings(images)[0], eager.rope_embeddings(images)[0]
    )
    assert backbone.vit.config.pos_embed_rescale == 2.0  # what save_pretrained writes is kept


def test_train_a_transformers_dinov3_and_get_it_back_in_its_own_format(tmp_path):
    folder = dinov3_folder(tmp_path)
    train_two_steps(folder, tmp_path / "run")
    trained = transformers.DINOv3ViTModel.from_pretrained(tmp_path / "run" / HF_FOLDER)
    initial = transformers.DINOv3ViTModel.from_pretrained(folder)
    key = "model.layer.0.attention.q_proj.weight"
    assert not torch.equal(trained.state_dict()[key], initial.state_dict()[key])
    assert trained.config.pos_embed_rescale == initial.config.pos_embed_rescale == 2.0
