"""Reference strategies: counts, image restrictions, reproducibility, the FIFO queue."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from neco_loss.references import (
    ReferenceQueue,
    fraction_count,
    per_image_references,
    shared_references,
)


def labelled_pool(batch: int, patches: int) -> torch.Tensor:
    """``(B, N, 2)`` patches whose features are (image index, patch index)."""
    image = torch.arange(batch).repeat_interleave(patches)
    patch = torch.arange(patches).repeat(batch)
    return torch.stack([image, patch], dim=1).float().view(batch, patches, 2)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class TestPerImage:
    def test_any_splits_a_shuffle_of_the_batch(self):
        """Reference code: every patch of the batch is a reference of exactly one image."""
        pool = labelled_pool(4, 49)
        references = per_image_references(pool, 49, "any", generator())
        assert references.shape == (4, 49, 2)
        assert torch.equal(references.flatten(0, 1).unique(dim=0), pool.flatten(0, 1))
        assert len(references[0, :, 0].unique()) > 1  # mixed images

    @given(st.integers(1, 4), st.integers(1, 10), st.data())
    def test_intra_uses_own_patches_only(self, batch, patches, data):
        count = data.draw(st.integers(1, patches))
        references = per_image_references(labelled_pool(batch, patches), count, "intra")
        assert references.shape == (batch, count, 2)
        assert (references[..., 0] == torch.arange(batch)[:, None]).all()
        for image in references:  # without replacement
            assert len(image[:, 1].unique()) == count

    @given(st.integers(2, 4), st.integers(1, 10), st.data())
    def test_inter_uses_other_images_only(self, batch, patches, data):
        count = data.draw(st.integers(1, (batch - 1) * patches))
        references = per_image_references(labelled_pool(batch, patches), count, "inter")
        assert references.shape == (batch, count, 2)
        assert (references[..., 0] != torch.arange(batch)[:, None]).all()
        for image in references:
            assert len(image.unique(dim=0)) == count

    def test_reproducible_with_a_generator(self):
        pool = torch.randn(3, 49, 8)
        for images in ("any", "intra", "inter"):
            first = per_image_references(pool, 49, images, generator(5))
            again = per_image_references(pool, 49, images, generator(5))
            other = per_image_references(pool, 49, images, generator(6))
            assert torch.equal(first, again) and not torch.equal(first, other)

    def test_references_carry_the_pools_gradient(self):
        pool = torch.randn(2, 9, 4, requires_grad=True)
        per_image_references(pool, 9).sum().backward()
        torch.testing.assert_close(pool.grad, torch.ones_like(pool))  # each patch drawn once
        assert not per_image_references(pool.detach(), 9).requires_grad

    def test_keep_draws_from_the_kept_patches_only(self):
        pool = torch.arange(18.0).view(2, 9, 1)
        keep = torch.zeros(2, 9, dtype=torch.bool)
        keep[0, 2], keep[1, 7] = True, True
        drawn = per_image_references(pool, 9, keep=keep, generator=torch.Generator())
        assert drawn.shape == (2, 9, 1)
        assert set(drawn.flatten().tolist()) == {2.0, 16.0}
        with pytest.raises(ValueError, match="keep applies to images='any'"):
            per_image_references(pool, 9, "intra", keep=keep)

    def test_keep_everything_draws_as_without(self):
        pool = torch.randn(3, 9, 4)
        keep = torch.ones(3, 9, dtype=torch.bool)
        with_keep = per_image_references(
            pool, 9, keep=keep, generator=torch.Generator().manual_seed(1)
        )
        without = per_image_references(pool, 9, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(with_keep, without)

    @pytest.mark.parametrize(
        "count, images", [(10, "any"), (10, "intra"), (19, "inter"), (1, "inter")]
    )
    def test_too_few_candidates(self, count, images):
        batch = 1 if count == 1 else 2
        with pytest.raises(ValueError, match=f"cannot draw {count} references per image"):
            per_image_references(torch.randn(batch, 9, 4), count, images)


class TestShared:
    @pytest.mark.parametrize("fraction", [0.01, 0.05, 0.1, 0.5, 1.0])
    def test_fraction_of_the_batch(self, fraction):
        pool = labelled_pool(4, 49)
        count = fraction_count(fraction, 4, 49)
        assert count == max(1, round(fraction * 4 * 49))
        references = shared_references(pool, count, generator())
        assert references.shape == (count, 2)
        assert len(references.unique(dim=0)) == count

    def test_fraction_of_the_allowed_patches(self):
        assert fraction_count(0.5, 4, 10, "intra") == 5
        assert fraction_count(0.5, 4, 10, "inter") == 15
        assert fraction_count(0.001, 4, 10) == 1

    def test_too_many(self):
        with pytest.raises(ValueError, match="cannot draw 19 references from 18 patches"):
            shared_references(torch.randn(2, 9, 4), 19)


class TestQueue:
    def test_fifo_order_and_fill_counter(self):
        queue = ReferenceQueue(length=30)
        assert not queue.is_full(0)
        for step in range(4):
            queue.push(0, torch.full((2, 16, 3), float(step)), views=2, generator=generator())
            assert int(queue.filled[0]) == min(30, 20 * (step + 1))  # 10 per image
        # newest first: 20 tokens of step 3, then 10 of step 2
        assert queue.tokens[0, :20, 0].eq(3).all() and queue.tokens[0, 20:, 0].eq(2).all()
        assert queue.is_full(0) and not queue.is_full(1)

    def test_push_takes_distinct_random_tokens(self):
        queue = ReferenceQueue(length=12)
        tokens = labelled_pool(1, 40)
        queue.push(0, tokens, views=1, generator=generator())
        assert len(queue.tokens[0, :10].unique(dim=0)) == 10 and int(queue.filled[0]) == 10
        assert queue.tokens[0, 10:].eq(0).all()

    def test_sample_is_disjoint_across_images(self):
        queue = ReferenceQueue(length=100)
        for _ in range(5):
            queue.push(0, torch.randn(2, 49, 4), views=1)
        sample = queue.sample(0, batch=2, count=49, generator=generator())
        assert sample.shape == (2, 49, 4)
        assert len(sample.flatten(0, 1).unique(dim=0)) == 98

    def test_state_dict_round_trip(self):
        queue = ReferenceQueue(length=20)
        queue.push(0, torch.randn(2, 5, 3), views=1)
        restored = ReferenceQueue(length=20)
        restored.load_state_dict(queue.state_dict())
        assert torch.equal(restored.tokens, queue.tokens)
        assert torch.equal(restored.filled, queue.filled)

    def test_errors(self):
        with pytest.raises(ValueError, match="queue_length must be an int >= 1"):
            ReferenceQueue(length=0)
        queue = ReferenceQueue(length=10)
        with pytest.raises(ValueError, match="is not full yet"):
            queue.sample(0, 1, 5)
        queue.push(0, torch.randn(1, 10, 3), views=1)
        with pytest.raises(ValueError, match="queue_length 10 is too short"):
            queue.sample(0, 2, 6)
        with pytest.raises(
            ValueError, match="dimension 3 but was given view 0 of 1 with dimension 4"
        ):
            queue.push(0, torch.randn(1, 10, 4), views=1)
