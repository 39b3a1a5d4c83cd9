"""Images whose pixels encode their own coordinates, to check that crop boxes locate views."""

import torch
from PIL import Image


def coordinate_image(height: int, width: int) -> torch.Tensor:
    """(3, H, W): channel 0 = x / W, channel 1 = y / H of each pixel centre."""
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    return torch.stack([xs / width, ys / height, torch.zeros_like(xs)])


def ramp_image(width: int = 160, height: int = 120) -> Image.Image:
    """``coordinate_image`` as an 8-bit PIL image."""
    pixels = coordinate_image(height, width).permute(1, 2, 0)
    return Image.fromarray((pixels * 255).round().byte().numpy())


def assert_view_shows_box(
    view: torch.Tensor, box: list[float], height: int, width: int, border: int, pixels: float
) -> None:
    """A ``(3, s, s)`` view of a coordinate image shows the ``(x0, y0, x1, y1, flip)`` box.

    ``border`` outermost view pixels are skipped (resampling blurs them); values must agree
    within ``pixels`` original-image pixels.
    """
    x0, y0, x1, y1, flipped = box
    size = view.shape[-1]
    centres = (torch.arange(size) + 0.5) / size
    xs = (x0 + centres * (x1 - x0)) / width
    xs = xs.flip(0) if flipped else xs
    ys = (y0 + centres * (y1 - y0)) / height
    inner = slice(border, size - border)
    assert (view[0, inner, inner] - xs[inner]).abs().max() < pixels / width
    assert (view[1, inner, inner] - ys[inner, None]).abs().max() < pixels / height
