"""Weights files load strictly into every family, and a misfit says what and why in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from neco_loss.app.cli import main
from neco_loss.models import DenseViT
from neco_loss.training.assembly import build_backbone
from neco_loss.training.config import build_config
from neco_loss.weights import load_state_dict, load_weights
from tests.test_backbone_families import DINOV3, DINOV3_KWARGS
from tests.test_backbones import HubDinov2, dinov3_folder, hf_folder
from tests.test_training import TINY

DINOV2_REG = "vit_small_patch14_reg4_dinov2"
SMALL = TINY["model_kwargs"]  # depth 1


def saved(module: torch.nn.Module, path: Path) -> Path:
    torch.save(module.state_dict(), path)
    return path


def timm_pair(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    """A depth-1 model and the weights of a depth-2 one."""
    deeper = DenseViT(DINOV2_REG, **{**SMALL, "depth": 2}).vit
    return DenseViT(DINOV2_REG, **SMALL).vit, saved(deeper, tmp_path / "deep.pt")


def dinov3_pair(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    deeper = DenseViT(DINOV3, **DINOV3_KWARGS).vit  # depth 2
    return DenseViT(DINOV3, **{**DINOV3_KWARGS, "depth": 1}).vit, saved(deeper, tmp_path / "d.pt")


def transformers_pair(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    transformers = pytest.importorskip("transformers", reason="needs neco-loss[hf]")
    deeper = DenseViT(str(dinov3_folder(tmp_path))).vit  # 2 layers
    config = transformers.DINOv3ViTConfig.from_pretrained(tmp_path / "dinov3")
    config.num_hidden_layers = 1
    return transformers.DINOv3ViTModel(config), saved(deeper, tmp_path / "hf.pt")


def hub_pair(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    deeper = HubDinov2()  # 2 blocks
    shallow = HubDinov2()
    shallow.vit.blocks = shallow.vit.blocks[:1]
    shallow.blocks = shallow.vit.blocks
    return shallow, saved(deeper, tmp_path / "hub.pt")


@pytest.mark.parametrize("pair", [timm_pair, dinov3_pair, transformers_pair, hub_pair])
def test_a_deeper_file_is_refused_in_every_family_and_loads_partially_on_request(pair, tmp_path):
    model, path = pair(tmp_path)
    with pytest.raises(
        ValueError, match="unexpected .* Likely: the file has 2 blocks, the model 1"
    ):
        load_weights(model, path)
    with pytest.raises(ValueError, match=r"set partial_weights: true \(--partial-weights true\)"):
        load_weights(model, path)
    with pytest.warns(UserWarning, match="partial_weights: loaded .* left as built: .*unexpected"):
        load_weights(model, path, partial=True)
    file = torch.load(path, weights_only=True)
    for name, value in model.state_dict().items():  # everything the model has came from it
        torch.testing.assert_close(value, file[name].to(value.dtype))


def test_registers_into_a_model_without_them_names_the_model_to_use(tmp_path):
    path = saved(DenseViT(DINOV2_REG, **SMALL).vit, tmp_path / "reg.pt")
    plain = DenseViT("vit_small_patch14_dinov2", **SMALL).vit
    with pytest.raises(ValueError) as error:
        load_weights(plain, path)
    message = str(error.value)
    assert "1 unexpected (e.g. ['reg_token'])" in message and "\n" not in message
    assert "the file has 4 register tokens, the model has none: use a model with 4 " in message
    assert "vit_small_patch14_reg4_dinov2" in message
    path = saved(plain, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="the file has no register tokens, the model has 4"):
        load_weights(DenseViT(DINOV2_REG, **SMALL).vit, path)


def test_transformers_registers_misfit_is_explained(tmp_path):
    transformers = pytest.importorskip("transformers", reason="needs neco-loss[hf]")
    registers = transformers.AutoModel.from_pretrained(hf_folder(tmp_path, registers=4))
    without = transformers.AutoModel.from_pretrained(hf_folder(tmp_path, registers=0))
    with pytest.raises(ValueError, match="the file has 4 register tokens, the model has none"):
        load_weights(without, saved(registers, tmp_path / "hf_reg.pt"))


def test_the_testbed_into_a_full_vit_small_says_which_model_it_fits():
    with pytest.raises(ValueError) as error:
        DenseViT(DINOV2_REG, checkpoint="testbed")
    message = str(error.value)
    assert "of another shape (e.g. ['cls_token (1, 1, 96) in the file, (1, 1, 384)" in message
    assert "the file has 4 blocks, the model 12" in message
    assert "another position grid (img_size / patch_size in model_kwargs)" in message
    assert "the testbed weights fit the model of examples/recipes/tiny_cpu.yaml" in message


def test_a_training_checkpoint_points_at_the_backbone_beside_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    state = {"student": {"w": torch.ones(1)}, "teacher": {}, "optimizer": {}, "step": 3}
    torch.save(state, run / "checkpoint_last.pt")
    with pytest.raises(ValueError, match=f"give {run / 'backbone.pt'}, the student backbone"):
        load_state_dict(run / "checkpoint_last.pt")


def test_a_run_with_weights_that_do_not_fit_stops_in_one_line_and_partial_loads(tmp_path):
    deep = DenseViT(DINOV2_REG, **{**SMALL, "depth": 2}).vit
    weights = saved(deep, tmp_path / "deep.pt")
    common = ["--quiet", "--max-steps", "1", "--weights", str(weights)]
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(str({**TINY, "output_dir": str(tmp_path / "run")}).replace("'", '"'))
    with pytest.raises(SystemExit) as stopped:
        main(["train", str(recipe), *common])
    line = stopped.value.code  # the CLI's one "error: ..." line
    assert isinstance(line, str) and "\n" not in line, line
    assert line.startswith("error: ") and "Likely: the file has 2 blocks, the model 1" in line
    config = build_config(
        {**TINY, "weights": str(weights), "output_dir": str(tmp_path / "partial")},
        ["--partial-weights", "true"],
    )
    assert config.partial_weights is True
    with pytest.warns(UserWarning, match="partial_weights: loaded"):
        backbone = build_backbone(config)  # what neco train builds
    torch.testing.assert_close(backbone.vit.blocks[0].mlp.fc1.weight, deep.blocks[0].mlp.fc1.weight)


def test_weights_nested_under_a_prefix_are_named(tmp_path):
    model = DenseViT(DINOV2_REG, **SMALL).vit
    nested = {f"backbone.{key}": value for key, value in model.state_dict().items()}
    torch.save(nested, tmp_path / "nested.pt")
    with pytest.raises(ValueError, match="nests the model's weights under 'backbone.'"):
        load_weights(model, tmp_path / "nested.pt")


def official_dinov2_layout(timm_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm DINOv2-registers state dict written back in the facebookresearch/dinov2 layout
    (the NeCo authors' release format): register_tokens, the CLS position inside pos_embed, a
    mask_token and the authors' projection head."""
    state = {
        k: v for k, v in timm_state.items() if k not in ("reg_token", "cls_token", "pos_embed")
    }
    cls_position = torch.randn_like(timm_state["cls_token"])
    state["register_tokens"] = timm_state["reg_token"]
    state["pos_embed"] = torch.cat([cls_position, timm_state["pos_embed"]], dim=1)
    state["cls_token"] = timm_state["cls_token"] - cls_position
    state["mask_token"] = torch.zeros(1, timm_state["cls_token"].shape[-1])
    state["projection_head.weight"] = torch.randn(8, timm_state["cls_token"].shape[-1])
    return state


@pytest.mark.parametrize("training_checkpoint", [False, True])
def test_the_neco_authors_checkpoints_load_into_timm(tmp_path, training_checkpoint):
    source = DenseViT(DINOV2_REG, **SMALL).eval()
    official = official_dinov2_layout(source.vit.state_dict())
    if training_checkpoint:  # their Lightning checkpoint: student under model., teacher beside
        official = {
            "state_dict": {
                **{f"model.{k}": v for k, v in official.items()},
                **{f"teacher.{k}": v for k, v in official.items()},
            }
        }
    torch.save(official, tmp_path / "neco_on_dinov2r_vit14_model.ckpt")
    loaded = DenseViT(
        DINOV2_REG, checkpoint=tmp_path / "neco_on_dinov2r_vit14_model.ckpt", **SMALL
    ).eval()
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(images), source(images))
