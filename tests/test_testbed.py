"""The shipped testbed backbone: loads offline, checksum, dense semantics on a fixed split; its
pretraining runs and writes the same format."""

import json

import pytest
import torch

from neco_loss import assets, testbed
from neco_loss.app.testbed_backbone import PretrainSettings, pretrain_testbed
from neco_loss.data import SyntheticScenes
from neco_loss.evaluation import in_context_miou
from neco_loss.evaluation.datasets import Normalized
from neco_loss.training import build_config
from neco_loss.training.assembly import build_backbone

# In-context mIoU on the fixed split below (memory: 64 train images, queries: 32 val images,
# dataset seed 7). Measured on this project's CPU: shipped backbone 0.3118, random
# initialisation 0.2176 (+0.094); the floors leave room for other machines' rounding.
SHIPPED_FLOOR = 0.29
MARGIN_OVER_RANDOM = 0.07


def fixed_split_miou(backbone):
    train = Normalized(SyntheticScenes("train", 96, 64, seed=7))
    val = Normalized(SyntheticScenes("val", 96, 32, seed=7))
    with torch.no_grad():
        return in_context_miou(backbone.eval(), train, val, SyntheticScenes.num_classes).miou


def test_the_shipped_file_matches_its_checksum_and_size():
    name, digest = assets.SHIPPED["testbed"]
    path = assets.FOLDER / name
    assert assets.file_sha256(path) == digest
    assert path.stat().st_size < 5 * 2**20
    state = torch.load(path, weights_only=True)
    assert {tensor.dtype for tensor in state.values()} == {torch.float16}


def test_shipped_backbone_has_dense_semantics():
    """Far above a randomly initialised ViT of the same architecture on the same split."""
    shipped = fixed_split_miou(testbed.testbed_backbone())
    torch.manual_seed(0)
    random = fixed_split_miou(testbed.testbed_vit())
    assert shipped >= SHIPPED_FLOOR, shipped
    assert shipped - random >= MARGIN_OVER_RANDOM, (shipped, random)


def test_configs_name_the_shipped_weights():
    """``weights: testbed`` (the demo's and tiny_cpu.yaml's) starts from the shipped file."""
    from neco_loss.app.demo import DEMO_CONFIG

    assert DEMO_CONFIG["weights"] == "testbed"
    backbone = build_backbone(build_config(DEMO_CONFIG))
    expected = testbed.testbed_backbone().vit.state_dict()
    for key, value in backbone.vit.state_dict().items():
        assert torch.equal(value, expected[key].to(value.dtype)), key


def test_a_damaged_or_missing_file_is_refused(tmp_path, monkeypatch):
    damaged = tmp_path / "testbed_vit.pt"
    damaged.write_bytes((assets.FOLDER / assets.SHIPPED["testbed"][0]).read_bytes()[:-10])
    monkeypatch.setattr(assets, "FOLDER", tmp_path)
    with pytest.raises(ValueError, match="damaged or was replaced"):
        testbed.testbed_backbone()
    damaged.unlink()
    with pytest.raises(ValueError, match="SHA-256 missing"):
        testbed.testbed_backbone()
    with pytest.raises(ValueError, match="no shipped weights named 'other'"):
        assets.shipped_weights("other")
    with pytest.raises(FileNotFoundError, match="shipped weights: \\['testbed'\\]"):
        build_config({"weights": "testbedd"})


def test_pretraining_writes_loadable_half_weights(tmp_path):
    weights = pretrain_testbed(
        tmp_path, PretrainSettings(steps=2, batch_size=4, train_images=8), progress=False
    )
    state = torch.load(weights, weights_only=True)
    assert {tensor.dtype for tensor in state.values()} == {torch.float16}
    loaded = testbed.testbed_vit(weights)
    assert loaded(torch.randn(1, 3, 96, 96)).shape == (1, 96, 12, 12)
    log = json.loads((tmp_path / "pretrain_log.json").read_text())
    assert log["settings"]["steps"] == 2 and log["sha256"] == assets.file_sha256(weights)
    assert all(torch.isfinite(torch.tensor(log["losses_every_100"])))
