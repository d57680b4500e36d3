"""Glance and focus: the two ways GFNet looks at an image.

A glance is the whole image resized to P x P; a focus glimpse is a P x P crop at full resolution. Both work on a
batch at once on the images' device, with no Python loop over samples and no device->host synchronisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GLANCE_MODES = ("bilinear", "bicubic", "area")


def check_patch_size(patch_size: int, height: int, width: int) -> None:
    """Refuse a patch that does not fit in the image."""
    if patch_size < 1:
        raise ValueError(f"patch_size must be a positive integer, got {patch_size}.")
    if patch_size > height or patch_size > width:
        raise ValueError(
            f"patch_size={patch_size} is larger than the image ({height}x{width}): a focus patch must fit inside "
            f"the image. Use patch_size <= {min(height, width)} or a larger canvas."
        )


def glance(images: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """The whole image resized to ``size`` x ``size`` with anti-aliasing, so fine detail really vanishes."""
    if mode not in GLANCE_MODES:
        raise ValueError(f"Unknown glance mode {mode!r}; choose one of {GLANCE_MODES}.")
    if images.shape[-2:] == (size, size):
        return images
    if mode == "area":
        h, w = images.shape[-2:]
        if h % size == 0 and w % size == 0:  # whole blocks: the same means, by the faster fixed-window kernel
            return F.avg_pool2d(images, (h // size, w // size))
        return F.adaptive_avg_pool2d(images, size)
    return F.interpolate(images, size=(size, size), mode=mode, antialias=True, align_corners=False)


def location_to_corner(location: torch.Tensor, height: int, width: int, patch_size: int) -> torch.Tensor:
    """GFNet's mapping of a location a = (a_y, a_x) in [0, 1]^2 to the patch's top-left corner.

    corner = (floor(a_y * (H - P)), floor(a_x * (W - P))); values outside [0, 1] are clipped, as GFNet clips its
    sampled actions.
    """
    loc = location.clamp(0.0, 1.0)  # python-number scales: no host->device copy, so no sync on CUDA
    return torch.stack([loc[:, 0] * (height - patch_size), loc[:, 1] * (width - patch_size)], 1).floor().long()


def grid_corners(grid: int, height: int, width: int, patch_size: int, device=None) -> torch.Tensor:
    """Top-left corners of a G x G grid of patches evenly spaced over the image; cell k = i * G + j."""
    ys = torch.linspace(0, height - patch_size, grid, device=device).round().long()
    xs = torch.linspace(0, width - patch_size, grid, device=device).round().long()
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(grid * grid, 2)  # (G*G, 2)


def cell_locations(grid: int, device=None) -> torch.Tensor:
    """The [0, 1]^2 location of each grid cell's corner, in cell order (i * G + j)."""
    t = torch.linspace(0.0, 1.0, grid, device=device)
    return torch.stack(torch.meshgrid(t, t, indexing="ij"), dim=-1).reshape(grid * grid, 2)


def crop(images: torch.Tensor, corners: torch.Tensor, patch_size: int) -> torch.Tensor:
    """P x P crops of ``images`` (B, C, H, W) with top-left ``corners`` (B, 2) = (row, col), by index gather."""
    b, c, h, w = images.shape
    offs = torch.arange(patch_size, device=images.device)
    rows = (corners[:, 0:1] + offs).clamp_(0, h - 1)  # (B, P)
    cols = (corners[:, 1:2] + offs).clamp_(0, w - 1)  # (B, P)
    flat = (rows[:, :, None] * w + cols[:, None, :]).reshape(b, 1, patch_size * patch_size)  # (B, 1, P*P)
    patches = images.reshape(b, c, h * w).gather(2, flat.expand(b, c, -1))
    return patches.reshape(b, c, patch_size, patch_size)  # (B, C, P, P)


def focus(images: torch.Tensor, location: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Focus patches at continuous locations in [0, 1]^2 (GFNet's convention)."""
    h, w = images.shape[-2:]
    return crop(images, location_to_corner(location, h, w, patch_size), patch_size)
