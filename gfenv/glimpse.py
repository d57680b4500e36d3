"""Glance and focus: the two ways GFNet looks at an image.

A glance is the whole image resized to P x P; a focus glimpse is a P x P crop at full resolution. Both work on a
batch at once on the images' device, with no Python loop over samples and no device->host synchronisation.
"""

from __future__ import annotations

import functools

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
    """The whole image resized to ``size`` x ``size`` with anti-aliasing, so fine detail really vanishes.

    "bilinear" and "bicubic" give ``F.interpolate(..., antialias=True)``'s result, "area" ``F.adaptive_avg_pool2d``'s
    (to float rounding), as two matrix products with the same weights (``resize_weights``): several times faster on
    a CPU than those kernels."""
    if mode not in GLANCE_MODES:
        raise ValueError(f"Unknown glance mode {mode!r}; choose one of {GLANCE_MODES}.")
    if images.shape[-2:] == (size, size):
        return images
    h, w = images.shape[-2:]
    x = images if images.dtype == torch.float64 else images.float()
    rows, cols = (resize_weights(n, size, mode, images.device).to(x.dtype) for n in (h, w))
    with torch.autocast(images.device.type, enabled=False):  # float32 (or 64) weights and sums, as the kernels'
        return (rows.T @ (x @ cols)).to(images.dtype)


@functools.lru_cache(maxsize=32)
def resize_weights(size_in: int, size_out: int, mode: str, device: torch.device) -> torch.Tensor:
    """(size_in, size_out): column j holds the weights of the inputs of output j when a line of ``size_in`` pixels
    is resized to ``size_out`` by ``F.interpolate`` (``antialias=True, align_corners=False``) or, for "area", by
    ``F.adaptive_avg_pool1d``; read off by resizing the identity. Both resizes are linear and separable, so an
    image's resize is ``rows.T @ image @ cols``."""
    with torch.inference_mode(False), torch.no_grad():  # a plain tensor, usable with autograd, whoever asks first
        eye = torch.eye(size_in, device=device)
        if mode == "area":
            return F.adaptive_avg_pool1d(eye[:, None, :], size_out).reshape(size_in, size_out)
        out = F.interpolate(eye.reshape(size_in, 1, 1, size_in), size=(1, size_out), mode=mode, antialias=True,
                            align_corners=False)
        return out.reshape(size_in, size_out)


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
    """P x P crops of ``images`` (B, C, H, W) with top-left ``corners`` (B, 2) = (row, col), clipped to the image.

    One gather from the view of every P x P window of each image (no index tensor per pixel)."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.contiguous()
    windows = x.as_strided((b, h - p + 1, w - p + 1, c, p, p), (c * h * w, w, 1, h * w, w, 1))
    rows, cols = corners[:, 0].clamp(0, h - p), corners[:, 1].clamp(0, w - p)
    return windows[torch.arange(b, device=images.device), rows, cols]  # (B, C, P, P)


def focus(images: torch.Tensor, location: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Focus patches at continuous locations in [0, 1]^2 (GFNet's convention)."""
    h, w = images.shape[-2:]
    return crop(images, location_to_corner(location, h, w, patch_size), patch_size)
