"""Crop boxes to token grids and ROI alignment of two views."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from neco_loss.geometry import (
    align_pair,
    box_to_grid,
    check_boxes,
    crop_extent,
    intersect,
    is_nonempty,
)

PATCH = 14


class TestIntersect:
    def test_overlapping_and_disjoint(self):
        a = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10]])
        b = torch.tensor([[5.0, 2, 20, 8, 1], [10, 0, 20, 10, 0]])
        shared = intersect(a, b)
        torch.testing.assert_close(shared[0], torch.tensor([5.0, 2, 10, 8]))
        assert is_nonempty(shared).tolist() == [True, False]  # touching edges share no area


class TestBoxToGrid:
    def test_hand_computed(self):
        crop = torch.tensor([100.0, 50, 300, 250])  # 200 x 200 px, shown as a 16 x 16 grid
        box = torch.tensor([150.0, 100, 250, 250])
        expected = torch.tensor([4.0, 4, 12, 16])  # (150-100)/200*16 = 4, ...
        torch.testing.assert_close(box_to_grid(box, crop, (16, 16)), expected)

    def test_non_square_grid(self):
        crop = torch.tensor([0.0, 0, 100, 50])
        box = torch.tensor([25.0, 25, 50, 50])
        torch.testing.assert_close(box_to_grid(box, crop, (7, 14)), torch.tensor([3.5, 3.5, 7, 7]))

    def test_flip_mirrors_x_and_swaps_ends(self):
        crop = torch.tensor([100.0, 50, 300, 250, 1])
        box = torch.tensor([150.0, 100, 250, 250])
        torch.testing.assert_close(box_to_grid(box, crop, (16, 16)), torch.tensor([4.0, 4, 12, 16]))
        box = torch.tensor([100.0, 50, 150, 100])  # left quarter -> right quarter
        torch.testing.assert_close(box_to_grid(box, crop, (16, 16)), torch.tensor([12.0, 0, 16, 4]))

    @given(
        st.tuples(st.floats(0, 300), st.floats(0, 300), st.floats(20, 400), st.floats(20, 400)),
        st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.floats(0, 1)),
        st.sampled_from([98, 224, 518]),
        st.booleans(),
    )
    def test_matches_resized_crop_pixels_over_patch_size(self, crop, inner, size, flip):
        """The reference code's convention: box in resized-crop pixels, divided by the patch."""
        x0, y0, width, height = crop
        u0, u1 = sorted(inner[:2])
        v0, v1 = sorted(inner[2:])
        box = torch.tensor(
            [x0 + u0 * width, y0 + v0 * height, x0 + u1 * width, y0 + v1 * height],
            dtype=torch.float64,
        )
        crop_box = torch.tensor([x0, y0, x0 + width, y0 + height, float(flip)], dtype=torch.float64)
        scale_x, scale_y = size / width, size / height
        pixels = [(box[0] - x0) * scale_x, (box[1] - y0) * scale_y]
        pixels += [(box[2] - x0) * scale_x, (box[3] - y0) * scale_y]
        if flip:
            pixels = [size - pixels[2], pixels[1], size - pixels[0], pixels[3]]
        expected = torch.stack(pixels).double() / PATCH
        grid = size // PATCH
        torch.testing.assert_close(
            box_to_grid(box.double(), crop_box, (grid, grid)), expected, rtol=1e-9, atol=1e-9
        )


class TestCropExtent:
    """Boxes in token units for crops that are not a multiple of the patch (hand-computed)."""

    @pytest.mark.parametrize(
        "pixels, patch, box, expected",
        [
            # 98 px crop at patch 14: 7 tokens, the crop spans them exactly
            (98, 14, [14.0, 28.0, 70.0, 98.0], [1.0, 2.0, 5.0, 7.0]),
            # 98 px crop at patch 16: 6 tokens cover 96 px; the crop spans 98 / 16 = 6.125
            (98, 16, [16.0, 32.0, 64.0, 98.0], [1.0, 2.0, 4.0, 6.125]),
            (224, 16, [0.0, 8.0, 112.0, 224.0], [0.0, 0.5, 7.0, 14.0]),
        ],
    )
    def test_reference_frame(self, pixels, patch, box, expected):
        # the crop is the whole 2x-downscaled image: original pixel x maps to crop pixel x / 2
        crop = torch.tensor([0.0, 0.0, 2.0 * pixels, 2.0 * pixels])
        original = torch.tensor(box) * 2
        grid = box_to_grid(original, crop, crop_extent((pixels, pixels), patch))
        torch.testing.assert_close(grid, torch.tensor(expected))

    def test_flip_mirrors_within_the_crop_extent(self):
        crop = torch.tensor([0.0, 0.0, 98.0, 98.0, 1.0])
        grid = box_to_grid(torch.tensor([0.0, 0.0, 16.0, 16.0]), crop, crop_extent((98, 98), 16))
        torch.testing.assert_close(grid, torch.tensor([5.125, 0.0, 6.125, 1.0]))


def coordinate_map(crop: torch.Tensor, grid: int) -> torch.Tensor:
    """``(1, 2, grid, grid)`` features = original-image (x, y) of each token's centre."""
    x0, y0, x1, y1 = crop[:4].tolist()
    centres = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    xs = x0 + centres * (x1 - x0)
    ys = y0 + centres * (y1 - y0)
    feature = torch.stack(torch.meshgrid(xs, ys, indexing="xy"))  # (2, h, w)
    if len(crop) == 5 and crop[4] == 1:
        feature = feature.flip(-1)
    return feature[None]


crops = st.tuples(
    st.floats(0, 200), st.floats(0, 200), st.floats(60, 300), st.floats(60, 300), st.booleans()
).map(lambda c: torch.tensor([c[0], c[1], c[0] + c[2], c[1] + c[3], float(c[4])]).double())


class TestAlignPair:
    def test_output_shapes_for_16_and_7_grids(self):
        map_a, map_b = torch.randn(3, 32, 16, 16), torch.randn(3, 32, 7, 7)
        boxes_a = torch.tensor([[0.0, 0, 200, 200]]).expand(3, 4)
        boxes_b = torch.tensor([[50.0, 50, 120, 120]]).expand(3, 4)
        aligned_a, aligned_b, valid = align_pair(map_a, map_b, boxes_a, boxes_b)
        assert aligned_a.shape == aligned_b.shape == (3, 49, 32)
        assert valid.all()
        aligned_a, _, _ = align_pair(map_a, map_b, boxes_a, boxes_b, roi_size=3)
        assert aligned_a.shape == (3, 9, 32)

    def test_identical_crops_give_identical_features(self):
        feature_map = torch.randn(2, 8, 16, 16)
        boxes = torch.tensor([[10.0, 20, 150, 160], [0, 0, 50, 80]])
        aligned_a, aligned_b, _ = align_pair(feature_map, feature_map, boxes, boxes)
        assert torch.equal(aligned_a, aligned_b)

    def test_flipped_view_equals_unflipped(self):
        feature_map = torch.randn(2, 8, 16, 16, dtype=torch.float64)
        boxes = torch.tensor([[10.0, 20, 150, 160, 0], [0, 0, 50, 80, 0]], dtype=torch.float64)
        flipped_boxes = boxes.clone()
        flipped_boxes[:, 4] = 1
        other = torch.tensor([[40.0, 0, 200, 100], [20, 30, 60, 90]], dtype=torch.float64)
        plain, _, _ = align_pair(feature_map, feature_map, boxes, other)
        mirrored, _, _ = align_pair(feature_map.flip(-1), feature_map, flipped_boxes, other)
        torch.testing.assert_close(mirrored, plain, rtol=0, atol=1e-12)

    def test_whole_view_of_a_map_is_the_map(self):
        feature_map = torch.randn(1, 4, 7, 7)
        boxes = torch.tensor([[0.0, 0, 98, 98]])
        aligned, _, _ = align_pair(feature_map, feature_map, boxes, boxes)
        torch.testing.assert_close(aligned, feature_map.flatten(2).transpose(1, 2))

    @given(crops, crops, st.sampled_from([7, 16]), st.sampled_from([7, 16]))
    def test_aligned_tokens_show_the_same_place(self, crop_a, crop_b, grid_a, grid_b):
        """On maps whose features are image coordinates, both views agree on every token."""
        shared = intersect(crop_a, crop_b)
        aligned_a, aligned_b, valid = align_pair(
            coordinate_map(crop_a, grid_a),
            coordinate_map(crop_b, grid_b),
            crop_a[None],
            crop_b[None],
        )
        assert bool(valid[0]) == bool(is_nonempty(shared))
        if not valid[0]:
            return
        # Bilinear sampling reproduces a linear field except within half a token of a crop's
        # border, where roi_align clamps to the outermost token centre: each view may be off by
        # half of its own token, in opposite directions.
        half_a = max(crop_a[2] - crop_a[0], crop_a[3] - crop_a[1]) / grid_a / 2
        half_b = max(crop_b[2] - crop_b[0], crop_b[3] - crop_b[1]) / grid_b / 2
        assert (aligned_a - aligned_b).abs().max() <= half_a + half_b + 1e-9
        token = 2 * max(half_a, half_b)
        for aligned in (aligned_a[0], aligned_b[0]):
            assert (aligned[:, 0] >= shared[0] - token / 2).all()
            assert (aligned[:, 0] <= shared[2] + token / 2).all()
        xs = aligned_a[0, :, 0].view(7, 7)
        assert (xs[:, 1:] >= xs[:, :-1]).all()  # left to right in the image, flipped or not

    def test_non_overlapping_pairs_are_reported(self):
        map_a, map_b = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 7, 7)
        boxes_a = torch.tensor([[0.0, 0, 100, 100], [0, 0, 100, 100]])
        boxes_b = torch.tensor([[150.0, 0, 200, 50], [50, 50, 120, 120]])
        aligned_a, aligned_b, valid = align_pair(map_a, map_b, boxes_a, boxes_b)
        assert valid.tolist() == [False, True]
        assert torch.isfinite(aligned_a).all() and torch.isfinite(aligned_b).all()

    def test_half_maps_are_aligned_in_float32(self):
        feature_map = torch.randn(1, 4, 16, 16)
        boxes = torch.tensor([[0.0, 0, 100, 100]])
        aligned, _, _ = align_pair(feature_map.bfloat16(), feature_map.bfloat16(), boxes, boxes)
        assert aligned.dtype == torch.float32

    def test_gradient_reaches_both_maps(self):
        map_a = torch.randn(1, 4, 16, 16, requires_grad=True)
        map_b = torch.randn(1, 4, 7, 7, requires_grad=True)
        boxes = torch.tensor([[0.0, 0, 100, 100]])
        aligned_a, aligned_b, _ = align_pair(map_a, map_b, boxes, boxes + 20)
        (aligned_a.sum() + aligned_b.sum()).backward()
        assert map_a.grad.abs().sum() > 0 and map_b.grad.abs().sum() > 0


class TestValidation:
    def test_box_columns(self):
        with pytest.raises(ValueError, match=r"4 columns \(x0, y0, x1, y1\) or 5"):
            check_boxes(torch.zeros(2, 3))

    def test_empty_boxes(self):
        with pytest.raises(ValueError, match=r"x1 > x0 and y1 > y0 but 1 boxes do not, e.g. \[5"):
            check_boxes(torch.tensor([[0.0, 0, 1, 1], [5, 0, 5, 1]]))

    def test_flip_values(self):
        with pytest.raises(ValueError, match="flip"):
            check_boxes(torch.tensor([[0.0, 0, 1, 1, 2]]))

    def test_integer_boxes(self):
        with pytest.raises(TypeError, match="boxes must have a floating dtype"):
            check_boxes(torch.tensor([[0, 0, 1, 1]]))

    def test_pair_shapes(self):
        map_a = torch.randn(2, 4, 16, 16)
        boxes = torch.tensor([[0.0, 0, 10, 10]]).expand(2, 4)
        with pytest.raises(ValueError, match=r"agree in \(B, D\)"):
            align_pair(map_a, torch.randn(2, 5, 7, 7), boxes, boxes)
        with pytest.raises(ValueError, match=r"boxes_b must be \(2, 4 or 5\)"):
            align_pair(map_a, map_a, boxes, boxes[:1])
        with pytest.raises(ValueError, match="roi_size must be an int >= 1"):
            align_pair(map_a, map_a, boxes, boxes, roi_size=0)
