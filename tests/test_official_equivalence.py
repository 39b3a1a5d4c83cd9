"""``NeCoLoss`` equals the authors' code in every official ablation configuration.

The expected side is ``tests/official_neco.py``: the official ``knn_loss`` transcribed on plain
tensors with torchvision's ``roi_align``, diffsort's ``DiffSortNet`` and an unclamped log, no
``neco_loss`` function. Both sides draw the same references from equally seeded generators.
Configurations: ``experiments/configs`` of github.com/vpariza/NeCo (cited per case).
"""

from __future__ import annotations

import pytest
import torch

from neco_loss.loss import NeCoLoss
from tests.official_neco import OfficialQueue, official_loss

BATCH, DIM, SEED = 3, 8, 11
# Crops of a 320 x 320 image, (x0, y0, x1, y1): 2 global, 2 local; every local crop meets
# both global crops (the official transform resamples until it does).
CROPS = [
    [0.0, 10.0, 250.0, 260.0],
    [60.0, 40.0, 310.0, 290.0],
    [100.0, 120.0, 170.0, 190.0],
    [150.0, 60.0, 230.0, 140.0],
]


def scene(patch: int, sizes: tuple[int, int], teacher_grad: bool = False, seed: int = 0):
    """Random float64 maps for the crops, with the grids a ViT at ``patch`` gives them."""
    generator = torch.Generator().manual_seed(seed)
    grids = [sizes[0] // patch] * 2 + [sizes[1] // patch] * 2
    boxes = torch.tensor(CROPS, dtype=torch.float64)
    boxes = boxes + torch.rand(BATCH, 4, 1, generator=generator, dtype=torch.float64) * 8
    student = [
        torch.randn(BATCH, DIM, g, g, generator=generator, dtype=torch.float64).requires_grad_()
        for g in grids
    ]
    teacher = [
        torch.randn(BATCH, DIM, g, g, generator=generator, dtype=torch.float64).requires_grad_(
            teacher_grad
        )
        for g in grids[:2]
    ]
    return student, teacher, boxes


def blob_masks(grid: int, seed: int) -> torch.Tensor:
    """``(BATCH, grid, grid)`` bool: a random disc per image, as a thresholded attention is."""
    generator = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    centres = torch.rand(BATCH, 2, 1, 1, generator=generator) * grid
    radius = grid * (0.25 + 0.2 * torch.rand(BATCH, 1, 1, generator=generator))
    return (xs - centres[:, 0]) ** 2 + (ys - centres[:, 1]) ** 2 < radius**2


def both_sides(
    config: dict,
    teacher_grad: bool = False,
    foreground: str | None = None,
    epsilon: float | None = None,
):
    """Loss and gradients of ``NeCoLoss`` (log floor ``epsilon``) and of the official
    transcription on one scene."""
    patch, sizes = config.get("patch", 14), config.get("sizes", (224, 98))
    network, steepness = config.get("network", "bitonic"), config.get("steepness", (100, 100))
    student, teacher, boxes = scene(patch, sizes, teacher_grad)
    crop_sizes = [sizes[0]] * 2 + [sizes[1]] * 2
    options = {"loss_mask": foreground} if foreground else {}
    if config.get("queue"):
        options.update(references="queue", queue_length=150)
    criterion = NeCoLoss(
        network=network,
        steepness=steepness,
        seed=SEED,
        patch_size=patch,
        epsilon=epsilon,
        **options,
    )
    masks = (
        None
        if foreground is None
        else [blob_masks(m.shape[-1], seed=v) for v, m in enumerate(teacher)]
    )
    queue = None
    if config.get("queue"):  # fill the queue, then hand its state to the official side
        for step in range(6):
            warm_student, warm_teacher, _ = scene(patch, sizes, seed=100 + step)
            with torch.no_grad():
                criterion(
                    warm_student, warm_teacher, boxes, crop_sizes=crop_sizes, foreground=masks
                )
        assert criterion.queue.is_full(0) and criterion.queue.is_full(1)
        queue = OfficialQueue(150, criterion.queue.tokens.clone(), [150, 150])
        criterion.generator.manual_seed(SEED)
    ours = criterion(student, teacher, boxes, crop_sizes=crop_sizes, foreground=masks)
    leaves = student + (teacher if teacher_grad else [])
    our_grads = torch.autograd.grad(ours, leaves)
    selected = None
    if masks is not None:
        selected = masks if foreground == "foreground" else [~m for m in masks]
    theirs = official_loss(
        student,
        teacher,
        boxes,
        list(sizes),
        patch,
        torch.Generator().manual_seed(SEED),
        sort_net=network,
        steepness=steepness,
        queue=queue,
        foreground=selected,
    )
    assert torch.isfinite(theirs), "the official loss is not finite here: no comparison"
    their_grads = torch.autograd.grad(theirs, leaves)
    return (ours, our_grads), (theirs, their_grads)


def assert_equal(ours, theirs, tolerance: float = 1e-10) -> None:
    (our_loss, our_grads), (their_loss, their_grads) = ours, theirs
    difference = float((our_loss - their_loss).detach())
    assert abs(difference) <= tolerance * abs(float(their_loss.detach()))
    for our_grad, their_grad in zip(our_grads, their_grads, strict=True):
        scale = float(their_grad.abs().max())
        assert scale > 0
        assert float((our_grad - their_grad).abs().max()) <= tolerance * scale


CONFIGS = {
    # models/small/neco_dinov2r.yml at 224 px (neco_224x224.yml): bitonic, 100/100
    "reference": {},
    # ablations/ablation_steepness_odd_even.yml (and _in100, _voc): odd-even, 100/100
    "odd_even": {"network": "odd_even"},
    # ablations/ablation_steepness_10_100.yml, _100_1000, _10_1000, _1000_1000
    "steepness 10/100": {"steepness": (10, 100)},
    "steepness 100/1000": {"steepness": (100, 1000)},
    "steepness 10/1000": {"steepness": (10, 1000)},
    "steepness 1000/1000": {"steepness": (1000, 1000)},
    # models/small/neco_dino.yml, neco_leopart.yml, neco_timetuning.yml: patch 16, 224 / 98 px
    "patch 16, 98 px": {"patch": 16, "sizes": (224, 98)},
    # models/small/neco_dinov2r.yml: queue_length 8192, is_queue_usable (a short queue here)
    "queue": {"queue": True},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_equals_the_official_loss(name):
    ours, theirs = both_sides(CONFIGS[name])
    assert_equal(ours, theirs)


def test_no_teacher_equals_the_official_second_forward():
    """ablations/ablation_steepness_no_teacher.yml: ``use_teacher: False``, odd-even.

    The "teacher" maps are a second student forward with gradient: its references carry
    gradient into them, as in the official code.
    """
    ours, theirs = both_sides({"network": "odd_even"}, teacher_grad=True)
    assert_equal(ours, theirs)
    assert float(ours[1][-1].abs().max()) > 0  # the references' gradient reaches the teacher


@pytest.mark.parametrize("selection", ["foreground", "background"])
def test_loss_mask_equals_the_official_selection(selection):
    """ablations/ablation_steepness_fg.yml / _bg.yml: ``loss_mask: fg`` / ``bg``, odd-even."""
    ours, theirs = both_sides({"network": "odd_even"}, foreground=selection)
    assert_equal(ours, theirs)


def test_loss_mask_with_a_queue():
    ours, theirs = both_sides({"queue": True}, foreground="foreground")
    assert_equal(ours, theirs)


def test_the_grid_frame_differs_where_the_crop_is_not_a_multiple_of_the_patch():
    """Without crop sizes, 98 px crops at patch 16 are mapped on 6 tokens, not 6.125: the
    difference this suite exists to catch (so the comparison above can fail)."""
    student, teacher, boxes = scene(16, (224, 98))
    exact = NeCoLoss(seed=SEED, patch_size=16)(
        student, teacher, boxes, crop_sizes=[224] * 2 + [98] * 2
    )
    grid = NeCoLoss(seed=SEED)(student, teacher, boxes)
    assert abs(float((exact - grid).detach())) > 1e-6 * abs(float(exact.detach()))
