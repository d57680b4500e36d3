"""Glance and focus crops against plain slicing, GFNet's location mapping, grid corners, bad patch sizes."""

from __future__ import annotations

import math

import pytest
import torch

from gfenv.glimpse import check_patch_size, crop, focus, glance, grid_corners, location_to_corner


@pytest.mark.parametrize("h,w,p", [(128, 128, 32), (60, 90, 17), (40, 33, 33)])
def test_focus_matches_slicing(h, w, p):
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(16, 3, h, w, generator=gen)
    loc = torch.rand(16, 2, generator=gen)
    patches = focus(images, loc, p)
    for i in range(16):
        y = math.floor(loc[i, 0].item() * (h - p))
        x = math.floor(loc[i, 1].item() * (w - p))
        assert torch.equal(patches[i], images[i, :, y:y + p, x:x + p])


def test_location_mapping_is_gfnet_floor_with_separate_h_w():
    loc = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.5, 0.25], [-0.3, 1.7]])
    corners = location_to_corner(loc, 100, 60, 20)
    assert corners.tolist() == [[0, 0], [80, 40], [40, 10], [0, 40]]  # out-of-range locations are clipped


def test_grid_corners_evenly_spaced_and_crops_match():
    corners = grid_corners(7, 128, 128, 32)
    assert corners.shape == (49, 2)
    assert sorted(set(corners[:, 0].tolist())) == [0, 16, 32, 48, 64, 80, 96]
    assert corners[8].tolist() == [16, 16]  # cell (1, 1) = 1 * 7 + 1
    images = torch.rand(49, 1, 128, 128)
    patches = crop(images, corners, 32)
    for k in (0, 8, 48):
        y, x = corners[k].tolist()
        assert torch.equal(patches[k], images[k, :, y:y + 32, x:x + 32])


def test_glance_resizes_and_removes_fine_texture():
    stripes = (torch.arange(128) % 2).float().expand(1, 1, 128, 128).clone()
    g = glance(stripes, 32)
    assert g.shape == (1, 1, 32, 32)
    assert torch.allclose(g, torch.full_like(g, 0.5), atol=0.05)  # anti-aliased: 1-px stripes become grey
    assert torch.equal(glance(stripes, 32, "area"), torch.full((1, 1, 32, 32), 0.5))


def test_patch_larger_than_image_is_refused():
    with pytest.raises(ValueError, match="larger than the image"):
        check_patch_size(64, 60, 100)


@pytest.mark.parametrize("mode", ["area", "bilinear", "bicubic"])
@pytest.mark.parametrize("shape,size", [((64, 1, 128, 128), 32), ((3, 2, 50, 70), 32), ((2, 3, 20, 24), 32)])
def test_glance_equals_torch_resize_kernels(mode, shape, size):
    """The matrix-product glance gives what the shipped encoders were trained on: adaptive average pooling ("area")
    or F.interpolate with anti-aliasing, to float rounding, down- and upsampling, non-square images included."""
    import torch.nn.functional as F

    from gfenv.data import make_source

    if shape[0] == 64:
        images, _ = make_source("glyphs", "test").get(torch.arange(64))
    else:
        images = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    if mode == "area":
        expected = F.adaptive_avg_pool2d(images, size)
    else:
        expected = F.interpolate(images, size=(size, size), mode=mode, antialias=True, align_corners=False)
    g = glance(images, size, mode)
    assert g.shape == expected.shape and g.dtype == images.dtype
    torch.testing.assert_close(g, expected, atol=1e-6, rtol=0)
    double = glance(images.double(), size, mode)  # float64 stays float64, not rounded through float32
    assert double.dtype == torch.float64
    torch.testing.assert_close(double, expected.double(), atol=1e-6, rtol=0)


def test_crop_of_a_view_or_channels_last_batch_matches_slicing():
    base = torch.rand(6, 3, 40, 50, generator=torch.Generator().manual_seed(1))
    corners = torch.tensor([[0, 0], [7, 17], [5, 9]])
    for images in (base[2:5], base.contiguous(memory_format=torch.channels_last)[1:4], base[:3, 1:]):
        patches = crop(images, corners, 33)
        for i in range(3):
            y, x = corners[i].tolist()
            assert torch.equal(patches[i], images[i, :, y:y + 33, x:x + 33])
    # a corner past the last patch position is clipped: the patch stays inside the image
    assert torch.equal(crop(base[:1], torch.tensor([[9, 30]]), 33)[0], base[0, :, 7:40, 17:50])


def test_glance_weights_made_under_inference_mode_still_serve_autograd():
    """The resize weights are cached: if an evaluation under torch.inference_mode() builds them first, a later glance
    of an input that requires grad (e.g. a saliency study) must still backpropagate."""
    with torch.inference_mode():
        glance(torch.rand(1, 1, 52, 52), 13, "bilinear")
    x = torch.rand(2, 1, 52, 52, requires_grad=True)
    glance(x, 13, "bilinear").sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
