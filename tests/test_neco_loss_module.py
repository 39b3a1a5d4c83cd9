"""``NeCoLoss``: pairing and averaging as the reference code, strategies, stats, errors."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from neco_loss import NeCoLoss, align_pair, neco_loss
from neco_loss.references import per_image_references

DIM = 16


def field_maps(boxes: torch.Tensor, grids: list[int], seed: int = 0) -> list[torch.Tensor]:
    """Patch maps that sample one smooth random feature field of the original image per view.

    Args:
        boxes: ``(B, V, 4 or 5)`` crops in a 256 x 256 image.
        grids: Token grid side of every view.

    Returns:
        ``V`` maps ``(B, DIM, g, g)``: the field at each token's centre (mirrored for flips).
    """
    generator = torch.Generator().manual_seed(seed)
    frequencies = torch.randn(2, 32, generator=generator) / 40
    phases = torch.rand(32, generator=generator) * 2 * math.pi
    projection = torch.randn(32, DIM, generator=generator)
    maps = []
    for view, grid in enumerate(grids):
        centres = (torch.arange(grid) + 0.5) / grid  # (g,)
        crop = boxes[:, view]
        xs = crop[:, 0, None] + centres * (crop[:, 2] - crop[:, 0])[:, None]  # (B, g)
        ys = crop[:, 1, None] + centres * (crop[:, 3] - crop[:, 1])[:, None]
        points = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), dim=-1)
        features = torch.cos(points @ frequencies + phases) @ projection  # (B, g, g, DIM)
        feature_map = features.permute(0, 3, 1, 2)
        if crop.shape[1] == 5:
            flipped = crop[:, 4] == 1
            feature_map = torch.where(
                flipped[:, None, None, None], feature_map.flip(-1), feature_map
            )
        maps.append(feature_map.contiguous())
    return maps


GLOBAL_CROPS = [[0.0, 0, 200, 200], [40, 30, 256, 240]]
LOCAL_CROPS = [[20.0, 20, 100, 100], [120, 100, 200, 190], [60, 150, 130, 230], [10, 90, 90, 160]]


def scene(batch: int = 2, views: int = 6, flip: bool = False):
    """Boxes ``(B, V, 5)`` and consistent student / teacher maps (16x16 global, 7x7 local)."""
    crops = torch.tensor(GLOBAL_CROPS + LOCAL_CROPS[: views - 2])
    flips = torch.zeros(views, 1) if not flip else (torch.arange(views) % 2).float()[:, None]
    boxes = torch.cat([crops, flips], dim=1).expand(batch, -1, -1).clone()
    boxes[:, :, :4] += torch.arange(batch).float()[:, None, None] * 3  # differ per image
    grids = [16, 16] + [7] * (views - 2)
    student = field_maps(boxes, grids, seed=1)
    teacher = [m + 0.01 * torch.randn_like(m) for m in field_maps(boxes[:, :2], grids[:2], 1)]
    return student, teacher, boxes


def random_maps(batch: int = 2, views: int = 6, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    grids = [16, 16] + [7] * (views - 2)
    student = [torch.randn(batch, DIM, g, g, generator=generator) for g in grids]
    teacher = [torch.randn(batch, DIM, g, g, generator=generator) for g in grids[:2]]
    return student, teacher


def nested_average(student_maps, teacher_maps, boxes, seed, **options):
    """The reference code's averaging, mean over c of (sum over v != c) / (V - 1), built from
    this package's pair functions: it checks the module's pairing and averaging only; equality
    with the reference code itself is tests/test_official_equivalence.py."""
    generator = torch.Generator().manual_seed(seed)
    views = len(student_maps)
    total = 0.0
    for c, teacher_map in enumerate(teacher_maps):
        subloss = 0.0
        for v in range(views):
            if v == c:
                continue
            teacher, student, _ = align_pair(teacher_map, student_maps[v], boxes[:, c], boxes[:, v])
            references = per_image_references(teacher, 49, "any", generator)
            subloss = subloss + neco_loss(student, teacher, references, **options)
        total = total + subloss / (views - 1)
    return total / len(teacher_maps)


class TestPairing:
    @pytest.mark.parametrize("views", [2, 3, 6])
    def test_mean_over_pairs_equals_the_nested_average(self, views):
        student, teacher = random_maps(views=views)
        _, _, boxes = scene(views=views)
        loss = NeCoLoss(seed=7)(student, teacher, boxes)
        torch.testing.assert_close(loss, nested_average(student, teacher, boxes, seed=7))

    def test_options_reach_the_loss(self):
        student, teacher = random_maps(views=3)
        _, _, boxes = scene(views=3)
        options = {"steepness": (10.0, 50.0), "direction": "both", "top_k": 7}
        loss = NeCoLoss(seed=1, **options)(student, teacher, boxes)
        expected = nested_average(student, teacher, boxes, seed=1, **options)
        torch.testing.assert_close(loss, expected)

    def test_non_overlapping_pairs_are_left_out(self):
        student, teacher = random_maps(batch=2, views=3)
        _, _, boxes = scene(batch=2, views=3)
        boxes[1, 2] = torch.tensor([250.0, 250, 256, 256, 0])  # image 1's local crop: alone
        criterion = NeCoLoss(seed=2, compute_stats=True)
        loss = criterion(student, teacher, boxes)
        assert criterion.last_stats.valid_pairs == 2 * 2 * 2 - 2
        assert criterion.last_stats.total_pairs == 8
        # Expected: mean over the valid (pair, image) losses.
        generator = torch.Generator().manual_seed(2)
        per_image = []
        for c in range(2):
            for v in (u for u in range(3) if u != c):
                t, s, valid = align_pair(teacher[c], student[v], boxes[:, c], boxes[:, v])
                t, s = t[valid], s[valid]
                references = per_image_references(t, 49, "any", generator)
                per_image += [
                    neco_loss(s[i : i + 1], t[i : i + 1], references[i : i + 1])
                    for i in range(len(s))
                ]
        torch.testing.assert_close(loss, torch.stack(per_image).mean())

    def test_flipped_views(self):
        student, teacher, boxes = scene(flip=True)
        criterion = NeCoLoss(seed=0, compute_stats=True)
        criterion(student, teacher, boxes)
        assert criterion.last_stats.rank_agreement > 0.8
        unflipped = boxes.clone()
        unflipped[:, :, 4] = 0  # wrong flip flags: the views no longer line up
        criterion(student, teacher, unflipped)
        assert criterion.last_stats.rank_agreement < 0.6

    def test_gradients_reach_teacher_maps_through_references_only(self):
        """Teacher maps with a gradient (the reference code's use_teacher: False) get it from
        the references; with student references they get none."""
        student, teacher = random_maps()
        _, _, boxes = scene()
        for feature_map in student + teacher:
            feature_map.requires_grad_()
        NeCoLoss()(student, teacher, boxes).backward()
        assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in student + teacher)
        for feature_map in student + teacher:
            feature_map.grad = None
        NeCoLoss(reference_source="student")(student, teacher, boxes).backward()
        assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in student)
        assert all(m.grad is None for m in teacher)


class TestStats:
    def test_consistent_views_agree_random_views_do_not(self):
        student, teacher, boxes = scene()
        criterion = NeCoLoss(seed=0, compute_stats=True)
        consistent_loss = criterion(student, teacher, boxes)
        consistent = criterion.last_stats
        random_loss = criterion(*random_maps(), boxes)
        unrelated = criterion.last_stats
        assert consistent.rank_agreement > 0.8 and abs(unrelated.rank_agreement) < 0.2
        assert consistent_loss < random_loss
        assert consistent.valid_pairs == consistent.total_pairs == 2 * 2 * 5
        assert consistent.num_references == 49
        assert 0 < consistent.teacher_entropy < math.log(49)
        assert consistent.queue_full is None
        logged = consistent.as_dict()
        assert logged["neco/valid_pair_fraction"] == 1.0 and "neco/queue_full" not in logged

    def test_entropy_falls_with_teacher_steepness(self):
        student, teacher, boxes = scene()
        entropies = []
        for steepness in (1.0, 10.0, 100.0):
            criterion = NeCoLoss(steepness=(100.0, steepness), seed=0, compute_stats=True)
            criterion(student, teacher, boxes)
            entropies.append(criterion.last_stats.teacher_entropy)
        assert entropies[0] > entropies[1] > entropies[2]


class TestStrategies:
    @pytest.mark.parametrize("fraction", [0.01, 0.05, 0.1, 0.5, 1.0])
    @pytest.mark.filterwarnings("ignore:NeCoLoss. R = 1 reference")  # f = 0.01: R = 1
    def test_fraction(self, fraction):
        student, teacher = random_maps(batch=2, views=3)
        _, _, boxes = scene(batch=2, views=3)
        criterion = NeCoLoss(
            references="fraction", reference_fraction=fraction, seed=0, compute_stats=True
        )
        loss = criterion(student, teacher, boxes)
        assert torch.isfinite(loss)
        assert criterion.last_stats.num_references == max(1, round(fraction * 2 * 49))

    def test_a_single_reference_is_named_not_silent(self):
        """R = round(0.01 * 2 * 49) = 1: one reference has no order to agree on."""
        student, teacher = random_maps(batch=2, views=3)
        _, _, boxes = scene(batch=2, views=3)
        criterion = NeCoLoss(references="fraction", reference_fraction=0.01, seed=0)
        with pytest.warns(UserWarning, match="R = 1 reference: .* the loss is 0"):
            loss = criterion(student, teacher, boxes)
        assert loss.item() == 0.0

    def test_fraction_switches_to_padded_bitonic_where_diffsort_layout_fails(self):
        student, teacher = random_maps(batch=2, views=3)
        _, _, boxes = scene(batch=2, views=3)
        criterion = NeCoLoss(references="fraction", reference_fraction=0.45, seed=0)  # R = 44
        with pytest.warns(UserWarning, match="mis-sorts R = 44 references; using"):
            loss = criterion(student, teacher, boxes)
        assert torch.isfinite(loss)

    def test_count_needs_a_sorting_network_for_r(self):
        with pytest.raises(ValueError, match="n=22 is not a sorting network"):
            NeCoLoss(references="count", num_references=22)
        criterion = NeCoLoss(
            references="count", num_references=22, network="bitonic_padded", compute_stats=True
        )
        student, teacher = random_maps()
        _, _, boxes = scene()
        criterion(student, teacher, boxes)
        assert criterion.last_stats.num_references == 22

    @pytest.mark.parametrize("images", ["intra", "inter"])
    @pytest.mark.parametrize("references", ["per_image", "count"])
    def test_image_restrictions(self, references, images):
        student, teacher = random_maps(batch=3)
        _, _, boxes = scene(batch=3)
        count = {"num_references": 16} if references == "count" else {}
        criterion = NeCoLoss(
            references=references, reference_images=images, seed=0, **count, compute_stats=True
        )
        assert torch.isfinite(criterion(student, teacher, boxes))

    def test_intra_per_image_uses_the_images_own_patches(self):
        """With intra references of the teacher, identical student and teacher give CE = H(Q_t)."""
        student, _, boxes = scene()
        teacher = student[:2]
        criterion = NeCoLoss(reference_images="intra", seed=0, compute_stats=True)
        loss = criterion(student, teacher, boxes)
        assert torch.isfinite(loss)

    def test_queue_is_used_once_full(self):
        student, teacher = random_maps(batch=2)
        _, _, boxes = scene(batch=2)
        criterion = NeCoLoss(
            references="queue", queue_length=60, num_references=16, seed=0, compute_stats=True
        )
        criterion(student, teacher, boxes)
        assert criterion.last_stats.queue_full is False
        assert int(criterion.queue.filled[0]) == 20  # 10 tokens per image per step
        criterion(student, teacher, boxes)
        criterion(student, teacher, boxes)
        assert criterion.last_stats.queue_full is True
        assert criterion.last_stats.num_references == 16
        too_many = NeCoLoss(references="queue", queue_length=60)  # 49 per image
        too_many.load_state_dict(criterion.state_dict())
        with pytest.raises(ValueError, match="queue_length 60 is too short for 49 references x 2"):
            too_many(student, teacher, boxes)
        state = criterion.state_dict()
        assert state["queue.tokens"].shape == (2, 60, DIM)
        restored = NeCoLoss(references="queue", queue_length=60, num_references=16)
        restored.load_state_dict(state)
        assert restored.queue.is_full(1)

    def test_student_source(self):
        student, teacher = random_maps()
        _, _, boxes = scene()
        for feature_map in student:
            feature_map.requires_grad_()
        loss = NeCoLoss(reference_source="student", seed=0)(student, teacher, boxes)
        assert torch.isfinite(loss)
        loss.backward()

    def test_seed_makes_draws_reproducible(self):
        student, teacher = random_maps()
        _, _, boxes = scene()
        first = NeCoLoss(seed=4)(student, teacher, boxes)
        assert torch.equal(first, NeCoLoss(seed=4)(student, teacher, boxes))
        assert not torch.equal(first, NeCoLoss(seed=5)(student, teacher, boxes))


class TestPrecision:
    def test_bf16_maps_and_autocast(self):
        student, teacher = random_maps()
        _, _, boxes = scene()
        exact = NeCoLoss(seed=0)(
            [m.bfloat16().float() for m in student], [m.bfloat16().float() for m in teacher], boxes
        )
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = NeCoLoss(seed=0)(
                [m.bfloat16() for m in student], [m.bfloat16() for m in teacher], boxes
            )
        assert half.dtype == torch.float32
        torch.testing.assert_close(half, exact)

    def test_steepness_1000(self):
        student, teacher = random_maps()
        _, _, boxes = scene()
        loss = NeCoLoss(steepness=1000.0, relaxation="logistic")(student, teacher, boxes)
        assert torch.isfinite(loss)


module_cases = st.fixed_dictionaries(
    {
        "batch": st.integers(1, 3),
        "views": st.integers(2, 4),
        "teachers": st.integers(1, 2),
        "roi_size": st.sampled_from([1, 2, 3, 4]),
        "references": st.sampled_from(["per_image", "fraction", "count", "queue"]),
        "images": st.sampled_from(["any", "intra"]),
        "network": st.sampled_from(["bitonic_padded", "odd_even"]),
        "loss": st.sampled_from(["ce", "l1", "l2"]),
        "similarity": st.sampled_from(["cosine", "euclidean"]),
        "scale": st.sampled_from([0.0, 1e-3, 1.0, 1e3]),
        "seed": st.integers(0, 1000),
    }
)


@given(module_cases)
def test_module_never_returns_nan(case):
    generator = torch.Generator().manual_seed(case["seed"])
    batch, views = case["batch"], case["views"]
    grids = [int(g) for g in torch.randint(1, 9, (views,), generator=generator)]
    student = [torch.randn(batch, 4, g, g, generator=generator) * case["scale"] for g in grids]
    teacher = [torch.randn(batch, 4, g, g, generator=generator) for g in grids[: case["teachers"]]]
    corner = torch.rand(batch, views, 2, generator=generator) * 100
    size = torch.rand(batch, views, 2, generator=generator) * 150 + 100
    boxes = torch.cat([corner, corner + size], dim=-1)
    images = "any" if case["references"] == "queue" else case["images"]
    strategy = {
        "fraction": {"reference_fraction": 0.5},
        "count": {"num_references": case["roi_size"] ** 2},
        "queue": {"queue_length": 64},
    }.get(case["references"], {})
    criterion = NeCoLoss(
        roi_size=case["roi_size"],
        references=case["references"],
        reference_images=images,
        network=case["network"],
        loss=case["loss"],
        similarity=case["similarity"],
        seed=case["seed"],
        **strategy,
    )
    for feature_map in student:
        feature_map.requires_grad_()
    loss = criterion(student, teacher, boxes)  # corners < 100, sizes >= 100: all overlap
    loss.backward()
    assert torch.isfinite(loss)
    # A teacher view's own student view is paired only when another teacher view exists.
    assert all(m.grad is None or torch.isfinite(m.grad).all() for m in student)


class TestValidation:
    def setup_method(self):
        self.student, self.teacher = random_maps(views=3)
        _, _, self.boxes = scene(views=3)

    def test_views_and_boxes_disagree(self):
        with pytest.raises(ValueError, match=r"boxes must be \(B, V, 4 or 5\) = \(2, 3, 4 or 5\)"):
            NeCoLoss()(self.student, self.teacher, self.boxes[:, :2])
        with pytest.raises(ValueError, match=r"4 columns \(x0, y0, x1, y1\) or 5"):
            NeCoLoss()(self.student, self.teacher, self.boxes[..., :3])

    def test_empty_boxes(self):
        boxes = self.boxes.clone()
        boxes[0, 1, 2] = boxes[0, 1, 0]
        with pytest.raises(ValueError, match="x1 > x0 and y1 > y0"):
            NeCoLoss()(self.student, self.teacher, boxes)

    def test_no_pair_overlaps(self):
        boxes = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]])
        with pytest.raises(ValueError, match="no crop pair overlaps in any of the 2 images"):
            NeCoLoss()(self.student, self.teacher, boxes.expand(2, -1, -1))

    def test_feature_dims_differ(self):
        teacher = [self.teacher[0], self.teacher[1][:, :8]]
        with pytest.raises(ValueError, match=r"teacher_maps\[1\] must have \(B, D\) = \(2, 16\)"):
            NeCoLoss()(self.student, teacher, self.boxes)

    def test_view_counts(self):
        with pytest.raises(ValueError, match="student_maps must hold >= 2 views"):
            NeCoLoss()(self.student[:1], self.teacher[:1], self.boxes[:, :1])
        with pytest.raises(ValueError, match="teacher_maps must hold 1 to 3 views"):
            NeCoLoss()(self.student, [], self.boxes)
        with pytest.raises(TypeError, match="student_maps must be a list"):
            NeCoLoss()(self.student[0], self.teacher, self.boxes)
        with pytest.raises(ValueError, match=r"student_maps\[2\] must be 4-D"):
            NeCoLoss()(self.student[:2] + [self.student[2][0]], self.teacher, self.boxes)

    def test_constructor_options(self):
        with pytest.raises(ValueError, match="top_k must be <= the number of references R = 49"):
            NeCoLoss(top_k=50)
        with pytest.raises(ValueError, match=r"references must be one of \['per_image', 'fract"):
            NeCoLoss(references="all")
        with pytest.raises(ValueError, match="reference_images must be one of"):
            NeCoLoss(reference_images="both")
        with pytest.raises(ValueError, match="reference_source must be one of"):
            NeCoLoss(reference_source="queue")
        with pytest.raises(ValueError, match="needs reference_fraction in"):
            NeCoLoss(references="fraction")
        with pytest.raises(ValueError, match=r"reference_fraction must be in \(0, 1\]"):
            NeCoLoss(references="fraction", reference_fraction=1.5)
        with pytest.raises(ValueError, match="reference_fraction applies to"):
            NeCoLoss(reference_fraction=0.1)
        with pytest.raises(ValueError, match="references='count' needs num_references"):
            NeCoLoss(references="count")
        with pytest.raises(ValueError, match="num_references applies to"):
            NeCoLoss(num_references=10)
        with pytest.raises(ValueError, match="the queue mixes images"):
            NeCoLoss(references="queue", reference_images="intra")
        with pytest.raises(ValueError, match="roi_size must be an int >= 1"):
            NeCoLoss(roi_size=0)
        with pytest.raises(ValueError, match="relaxation must be one of"):
            NeCoLoss(relaxation="sigmoid")
        with pytest.raises(ValueError, match="loss_mask must be one of"):
            NeCoLoss(loss_mask="fg")
        with pytest.raises(ValueError, match="loss_mask='foreground' draws references as"):
            NeCoLoss(loss_mask="foreground", references="count", num_references=9)
        with pytest.raises(ValueError, match="and a gather"):
            NeCoLoss(loss_mask="background", gather=lambda t: (t,))
        with pytest.raises(ValueError, match="patch_size must be an int >= 1"):
            NeCoLoss(patch_size=0)

    def test_crop_sizes(self):
        with pytest.raises(ValueError, match=r"crop_sizes needs .* NeCoLoss\(patch_size=...\)"):
            NeCoLoss()(self.student, self.teacher, self.boxes, crop_sizes=[224, 224, 98])
        criterion = NeCoLoss(patch_size=14)
        criterion(self.student, self.teacher, self.boxes, crop_sizes=[224, (224, 224), 98])
        with pytest.raises(ValueError, match=r"one size per view \(3\)"):
            criterion(self.student, self.teacher, self.boxes, crop_sizes=[224, 98])
        with pytest.raises(ValueError, match=r"crop_sizes\[2\] must be a positive int"):
            criterion(self.student, self.teacher, self.boxes, crop_sizes=[224, 224, 0])
        message = (
            r"student_maps\[2\] has a 7x7 grid, but a 112x112 px crop at patch_size 14 gives 8x8"
        )
        with pytest.raises(ValueError, match=message):
            criterion(self.student, self.teacher, self.boxes, crop_sizes=[224, 224, 112])

    def test_foreground_masks(self):
        masks = [torch.ones(2, 16, 16, dtype=torch.bool)] * 2
        with pytest.raises(ValueError, match="foreground masks need NeCoLoss"):
            NeCoLoss()(self.student, self.teacher, self.boxes, foreground=masks)
        criterion = NeCoLoss(loss_mask="foreground")
        with pytest.raises(ValueError, match=r"needs foreground=\[\(B, h, w\) bool mask"):
            criterion(self.student, self.teacher, self.boxes)
        with pytest.raises(ValueError, match=r"one mask per teacher view \(2\)"):
            criterion(self.student, self.teacher, self.boxes, foreground=masks[:1])
        with pytest.raises(TypeError, match=r"foreground\[0\] must be a bool tensor"):
            criterion(self.student, self.teacher, self.boxes, foreground=[m.float() for m in masks])
        with pytest.raises(
            ValueError, match=r"foreground\[1\] must be \(B, h, w\) = \(2, 16, 16\)"
        ):
            criterion(
                self.student, self.teacher, self.boxes, foreground=[masks[0], masks[1][:, :8]]
            )

    def test_everything_selected_equals_no_mask(self):
        """With every patch foreground, the masked mean of equal-size pairs is the plain mean."""
        masks = [torch.ones(2, 16, 16, dtype=torch.bool)] * 2
        masked = NeCoLoss(loss_mask="foreground", seed=3)(
            self.student, self.teacher, self.boxes, foreground=masks
        )
        plain = NeCoLoss(seed=3)(self.student, self.teacher, self.boxes)
        torch.testing.assert_close(masked, plain)
        nothing = NeCoLoss(loss_mask="background", seed=3)
        student = [m.clone().requires_grad_() for m in self.student]
        zero = nothing(student, self.teacher, self.boxes, foreground=masks)  # no background
        zero.backward()
        assert float(zero.detach()) == 0.0 and all(float(m.grad.abs().sum()) == 0 for m in student)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu():
    student, teacher = random_maps()
    _, _, boxes = scene()
    cpu = NeCoLoss(seed=0)(student, teacher, boxes)
    on_gpu = [m.cuda() for m in student], [m.cuda() for m in teacher], boxes.cuda()
    gpu = NeCoLoss(seed=0)(*on_gpu)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)


class TestCostPerCall:
    """Diagnostics only when asked; a fixed, small number of host syncs per call."""

    def test_stats_only_when_asked(self):
        student, teacher, boxes = scene()
        criterion = NeCoLoss(seed=0)
        loss = criterion(student, teacher, boxes)
        assert criterion.last_stats is None
        asked = criterion(student, teacher, boxes, compute_stats=True)
        assert criterion.last_stats is not None and criterion.last_stats.valid_pairs == 20
        assert criterion.last_stats.loss == pytest.approx(float(asked))
        assert torch.isfinite(loss)
        kept = criterion.last_stats
        criterion(student, teacher, boxes)  # not asked: the last computed stats stay
        assert criterion.last_stats is kept
        always = NeCoLoss(seed=0, compute_stats=True)
        always(student, teacher, boxes)
        assert always.last_stats is not None
        always(student, teacher, boxes, compute_stats=False)
        assert always.last_stats.loss == pytest.approx(float(asked), rel=0.2)

    @pytest.mark.parametrize(
        "options",
        [{}, {"references": "queue", "queue_length": 200, "num_references": 16}],
    )
    def test_host_syncs_do_not_grow_with_views(self, options):
        from neco_loss.host_syncs import count_host_syncs, host_syncs

        syncs, scans = [], []
        for views in (3, 6):
            student, teacher, boxes = scene(views=views)
            boxes[1, -1] = torch.tensor([250.0, 250, 256, 256, 0])  # a pair that is left out
            student = [m.requires_grad_() for m in student]
            criterion = NeCoLoss(seed=0, **options)
            for _ in range(5):  # the queue fills
                criterion(student, teacher, boxes)
            with count_host_syncs() as counts:
                criterion(student, teacher, boxes).backward()
            syncs.append(host_syncs(counts))
            scans.append(counts["isfinite"])
        assert syncs[0] == syncs[1] <= 3, syncs  # finite maps, box checks, overlaps
        assert scans == [3 + 2 + 1, 6 + 2 + 1]  # each map and the boxes scanned once
