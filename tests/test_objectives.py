"""The dense objectives as arms of one training step: NeCo, PaKa, similarity-CE, continued."""

import json

import pytest
import torch
from lightly.loss import PatchKernelAlignmentLoss, VICRegLoss

from neco_loss.geometry import align_pair
from neco_loss.objectives import OBJECTIVES, BuildContext, build_objective
from neco_loss.objectives.paka import PatchKernelAlignment
from neco_loss.objectives.similarity_ce import SimilarityCELoss
from neco_loss.testbed import TESTBED_MODEL_KWARGS, vicregl_loss
from neco_loss.training import Trainer, build_config

from .test_training import TINY, tiny_config

# The testbed architecture (what ``continued`` knows) at a tiny batch and two local crops.
TESTBED_TINY = {
    **TINY,
    "model_kwargs": TESTBED_MODEL_KWARGS,
    "global_size": 64,
    "local_size": 32,
    "image_size": 96,
    "drop_path_rate": 0.0,  # deterministic forwards, to compare losses
    "loss": {"roi_size": 4},  # the testbed's VICRegL grid
}


def maps_and_boxes(seed=0, batch=3, dim=16):
    generator = torch.Generator().manual_seed(seed)
    student = [torch.randn(batch, dim, 6, 6, generator=generator) for _ in range(2)]
    student += [torch.randn(batch, dim, 3, 3, generator=generator) for _ in range(2)]
    teacher = [torch.randn(batch, dim, 6, 6, generator=generator) for _ in range(2)]
    corners = torch.tensor([[0, 0, 60, 60], [10, 10, 80, 80], [5, 5, 30, 30], [40, 40, 70, 70]])
    boxes = corners.float().expand(batch, -1, -1).clone()
    boxes[1, 3] = torch.tensor([85.0, 85.0, 95.0, 95.0])  # overlaps no global crop of image 1
    return student, teacher, boxes


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_every_arm_steps_with_a_finite_loss_and_moves_the_backbone(tmp_path, objective):
    # continued knows the testbed architecture only; the others run on the tinier ViT
    base = TESTBED_TINY if objective == "continued" else TINY
    config = build_config({**base, "objective": objective, "output_dir": str(tmp_path)})
    trainer = Trainer(config, progress=False)
    name = "backbone.vit.blocks.0.attn.qkv.weight"
    before = trainer.student.state_dict()[name].clone()
    views, boxes = next(trainer._batches())
    loss = trainer.criterion(
        *trainer.encode(views)[:2], boxes, crop_sizes=trainer.crop_sizes, compute_stats=True
    )
    assert torch.isfinite(loss)
    loss.backward()
    gradient = trainer.student.backbone.vit.blocks[0].attn.qkv.weight.grad
    assert gradient is not None and float(gradient.abs().sum()) > 0
    result = trainer.fit(stop_at=2)
    assert result.steps == 2 and torch.isfinite(torch.tensor(result.last_loss))
    assert not torch.equal(trainer.student.state_dict()[name], before)
    costs = json.loads((tmp_path / "costs.json").read_text())
    assert costs["seconds_per_step"] > 0 and costs["steps_timed"] == 1
    assert costs["peak_memory_mib"] is None or costs["peak_memory_mib"] >= 0


def test_paka_equals_lightly_on_the_same_aligned_tokens():
    student, teacher, boxes = maps_and_boxes()
    loss = PatchKernelAlignment(roi_size=3)(student, teacher, boxes)
    students, teachers = [], []
    for c in range(2):  # every teacher global view with every other student view
        for v in range(4):
            if v != c:
                a, b, valid = align_pair(teacher[c], student[v], boxes[:, c], boxes[:, v], 3)
                teachers.append(a[valid])
                students.append(b[valid])
    assert sum(len(t) for t in teachers) == 3 * 6 - 2  # image 1's last crop meets no global
    expected = PatchKernelAlignmentLoss()(torch.cat(students), torch.cat(teachers))
    torch.testing.assert_close(loss, expected)


def test_paka_gradient_reaches_the_student_only():
    student, teacher, boxes = maps_and_boxes()
    student = [m.requires_grad_() for m in student]
    teacher = [m.requires_grad_() for m in teacher]
    PatchKernelAlignment(roi_size=3)(student, teacher, boxes).backward()
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in student)
    assert all(m.grad is None for m in teacher)


def test_similarity_ce_of_identical_maps_is_the_teacher_entropy():
    student, _, boxes = maps_and_boxes()
    maps, boxes = [student[0], student[0]], boxes[:, [0, 0]]  # two views of the same crop
    criterion = SimilarityCELoss(roi_size=3, seed=0, temperature=0.5)
    loss = criterion(maps, maps, boxes, compute_stats=True)
    # CE(p, p) = H(p): with the student equal to the teacher, the loss is the teacher entropy
    assert criterion.last_stats is not None
    torch.testing.assert_close(
        float(loss), criterion.last_stats.teacher_entropy, rtol=1e-5, atol=1e-6
    )
    assert criterion.last_stats.rank_agreement == pytest.approx(1.0)


def test_similarity_ce_by_hand_for_one_pair():
    """One global teacher view and one student view: the softmax CE over the references."""
    generator = torch.Generator().manual_seed(1)
    student = [torch.randn(1, 8, 4, 4, generator=generator) for _ in range(2)]
    teacher = [torch.randn(1, 8, 4, 4, generator=generator)]
    boxes = torch.tensor([[[0.0, 0, 40, 40], [10, 10, 50, 50]]])
    criterion = SimilarityCELoss(roi_size=2, references="count", num_references=4, seed=3)
    loss = criterion(student, teacher, boxes)
    a, b, _ = align_pair(teacher[0], student[1], boxes[:, 0], boxes[:, 1], 2)
    # references="count" with R = N draws all 4 aligned teacher tokens of the image, in an
    # order that the softmax CE does not depend on.
    unit = torch.nn.functional.normalize
    references = unit(a[0], dim=-1)
    t_scores, s_scores = unit(a[0], dim=-1) @ references.T, unit(b[0], dim=-1) @ references.T
    target = torch.softmax(t_scores / 0.1, -1)
    expected = -(target * torch.log_softmax(s_scores / 0.1, -1)).sum(-1).mean()
    torch.testing.assert_close(loss, expected)


def test_similarity_ce_refuses_sort_options_and_bad_temperatures():
    with pytest.raises(ValueError, match="sort options.*'similarity_ce' does not sort"):
        SimilarityCELoss(steepness=10)
    for temperature in (0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            SimilarityCELoss(temperature=temperature)


def test_continued_equals_the_testbed_pretraining_loss_on_the_same_batch(tmp_path):
    config = build_config({**TESTBED_TINY, "objective": "continued", "output_dir": str(tmp_path)})
    trainer = Trainer(config, progress=False)
    assert isinstance(trainer.student.head, torch.nn.Identity)  # the backbone's own maps
    expanders = trainer.criterion.expanders
    assert any(
        p is expanders[0][0].weight for g in trainer.optimizer.param_groups for p in g["params"]
    )
    views, boxes = next(trainer._batches())
    torch.manual_seed(0)
    loss = trainer.criterion(
        trainer.encode(views).student,
        trainer.encode(views).teacher,
        boxes,
        crop_sizes=trainer.crop_sizes,
    )
    backbone = trainer.student.backbone
    maps = [*backbone(torch.cat(views[:2])).chunk(2), *backbone(torch.cat(views[2:])).chunk(2)]
    expected = vicregl_loss(
        VICRegLoss(), maps, boxes, [(64, 64)] * 2 + [(32, 32)] * 2, 8, tuple(expanders), 2, 1.0
    )
    torch.testing.assert_close(loss, expected)


def test_continued_is_refused_for_a_backbone_it_does_not_know(tmp_path):
    with pytest.raises(
        ValueError, match="known here only for the testbed backbone.*use objective neco"
    ):
        tiny_config(tmp_path, objective="continued")


def test_objective_names_and_their_loss_keys_are_checked(tmp_path):
    with pytest.raises(ValueError, match=r"objective must be one of \['neco'"):
        tiny_config(tmp_path, objective="pak")
    with pytest.raises(ValueError, match="unknown loss key 'references'.* of objective 'paka'"):
        tiny_config(tmp_path, objective="paka", loss={"references": "count"})
    with pytest.raises(ValueError, match="loss: roi_size must be an int >= 2"):
        tiny_config(tmp_path, objective="paka", loss={"roi_size": 1})
    with pytest.raises(ValueError, match="do not apply to objective 'continued'"):
        build_objective("continued", {"steepness": 3}, BuildContext(8, 16))
