"""neco train on 2 processes (gloo, CPU) equals one process on the global batch."""

import csv

import torch

from neco_loss.training import Trainer, build_config
from neco_loss.training.distributed import launch
from neco_loss.training.run_folder import LAST, load_checkpoint
from tests.test_training import TINY


def first_loss(run) -> float:
    return float(list(csv.reader((run / "metrics.csv").open()))[1][1])


def test_ddp_step_equals_single_process_on_the_concatenated_batch(tmp_path):
    """Loss and gradients of one DDP step equal those of one process with the global batch.

    The gradients are read from AdamW's first moment after one step (exactly 0.1 x gradient);
    weights are not compared bit for bit because Adam turns rounding-level differences of
    near-zero gradients into +-lr steps.
    """
    base = {**TINY, "drop_path_rate": 0.0, "max_steps": 1, "device": "cpu"}
    single = Trainer(
        build_config({**base, "batch_size": 4, "output_dir": str(tmp_path / "one")}), progress=False
    )
    single.fit()
    config = build_config(
        {**base, "batch_size": 2, "devices": 2, "output_dir": str(tmp_path / "two")}
    )
    result = launch(config, progress=False)
    assert result.steps == 1
    assert abs(first_loss(tmp_path / "two") - first_loss(tmp_path / "one")) < 1e-5
    distributed = load_checkpoint(tmp_path / "two" / LAST)["optimizer"]["state"]
    expected = single.state()["optimizer"]["state"]
    assert distributed.keys() == expected.keys() and len(expected) > 10
    for index, moments in expected.items():
        # A gradient entry is a float32 sum of terms up to the tensor's largest entry, so its
        # rounding is relative to that scale (8 ulps of it), not to the entry itself: entries
        # near zero differ by ~1e-9 absolute (1.8e-4 relative) when only the summation order
        # changes, as between two processes' averaged halves and one process's whole batch.
        scale = float(moments["exp_avg"].abs().max())
        torch.testing.assert_close(
            distributed[index]["exp_avg"],
            moments["exp_avg"],
            rtol=1e-4,
            atol=max(1e-9, 1e-6 * scale),
            msg=f"parameter {index}",
        )
    gradient_norm = sum(float(m["exp_avg"].abs().sum()) for m in expected.values())
    assert gradient_norm > 0  # the comparison is not vacuous
    metrics = (tmp_path / "two" / "metrics.csv").read_text().splitlines()
    assert len(metrics) == 1 + 1  # process 0 logs alone
