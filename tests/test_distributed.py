"""References gathered across processes equal one process on the concatenated batch."""

import pytest
import torch
import torch.multiprocessing as mp

from neco_loss import NeCoLoss
from tests.distributed_worker import scenario, worker

WORLD = 2


@pytest.mark.parametrize("gather", ["torch", "lightly"])
@pytest.mark.parametrize(
    "options",
    [
        {},  # per_image, the reference strategy
        {"references": "fraction", "reference_fraction": 0.5, "network": "bitonic_padded"},
        {"reference_images": "intra"},
        {"references": "queue", "queue_length": 40},  # full after the first push: used at once
    ],
)
def test_two_processes_equal_one(tmp_path, options, gather):
    mp.spawn(
        worker,
        args=(WORLD, str(tmp_path / "init"), str(tmp_path), options, gather),
        nprocs=WORLD,
        join=True,
    )
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in range(WORLD)]

    student, teacher, boxes = scenario()
    student = [m.clone().requires_grad_() for m in student]
    single = NeCoLoss(roi_size=2, seed=0, **options)(student, teacher, boxes)
    single.backward()

    # Equal image counts per process: the single loss is the mean of the processes' losses,
    # and its gradient the processes' gradients divided by the number of processes (DDP).
    torch.testing.assert_close(torch.stack([r["loss"] for r in results]).mean(), single)
    share = len(boxes) // WORLD
    for rank, result in enumerate(results):
        for grad, full in zip(result["grads"], student, strict=True):
            expected = full.grad[rank * share : (rank + 1) * share] * WORLD
            torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)


def test_without_a_process_group_gather_is_local():
    from neco_loss.references import all_gather

    student, teacher, boxes = scenario()
    local = NeCoLoss(roi_size=2, seed=0)(student, teacher, boxes)
    gathered = NeCoLoss(roi_size=2, seed=0, gather=all_gather)(student, teacher, boxes)
    torch.testing.assert_close(gathered, local)
