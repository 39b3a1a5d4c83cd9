"""neco train on 2 processes (gloo, CPU) equals one process on the global batch."""

import torch

from neco_loss.training import Trainer, build_config
from neco_loss.training.checkpoint import LAST, load_checkpoint
from neco_loss.training.distributed import launch
from tests.test_training import TINY


def test_ddp_step_equals_single_process_on_the_concatenated_batch(tmp_path):
    base = {**TINY, "drop_path_rate": 0.0, "max_steps": 2, "device": "cpu"}
    single = Trainer(
        build_config({**base, "batch_size": 4, "output_dir": str(tmp_path / "one")}), progress=False
    )
    single.fit()
    config = build_config(
        {**base, "batch_size": 2, "devices": 2, "output_dir": str(tmp_path / "two")}
    )
    result = launch(config, progress=False)
    assert result.steps == 2
    state = load_checkpoint(tmp_path / "two" / LAST)
    expected = single.state()
    for part in ("student", "teacher"):
        for key, value in expected[part].items():
            torch.testing.assert_close(state[part][key], value, rtol=1e-4, atol=1e-6, msg=key)
    moved = "backbone.vit.blocks.0.attn.qkv.weight"
    initial = Trainer(
        build_config({**base, "batch_size": 4, "output_dir": str(tmp_path / "x")}), progress=False
    ).state()["student"][moved]
    assert not torch.allclose(state["student"][moved], initial)  # the comparison is not vacuous
    metrics = (tmp_path / "two" / "metrics.csv").read_text().splitlines()
    assert len(metrics) == 1 + 2  # process 0 logs alone
