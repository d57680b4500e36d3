"""The embedded cluttered-glyphs source: how an image is composed, and that an image depends on its index only."""

from __future__ import annotations

import pytest
import torch

from gfenv.data import GlyphSource, hash_uniform


@pytest.mark.parametrize("kwargs", [{}, {"canvas": 96, "glyph_size": 12, "fragments": 3, "fragment_size": 6},
                                    {"noise": 0.0}])
def test_image_is_clamped_noise_plus_the_max_blend_of_its_paints(kwargs):
    """The source draws only the painted pixels and reads the rest from precomputed clamped noise; the image must be
    exactly the plain composition: clamp(s * noise window + max-blend of the glyph and fragments on black)."""
    src = GlyphSource("test", **kwargs)
    idx = torch.arange(0, 600, 7)
    images, labels = src.get(idx)
    b, n, g, f = len(idx), src.canvas, src.glyph_size, src.fragment_size
    key = src._keys(idx)
    p = hash_uniform(key, 2, 9)
    q = hash_uniform(key, 4, 9 * src.fragments).reshape(b, src.fragments, 9)
    canvas = torch.zeros(b, n, n)
    for i in range(b):  # paint by paint, by slicing: the glyph, then the fragments (windows of other glyphs)
        paints = [(p[i, 0] * (n - g + 1), p[i, 1] * (n - g + 1), g, labels[i], labels[i] // 2, 0, 0, p[i, 2] * 4,
                   p[i, 3] * 4, 0.5 + 0.5 * p[i, 4])]
        paints += [(r[0] * (n - f + 1), r[1] * (n - f + 1), f, min(int(r[2] * 10), 9), min(int(r[3] * 5), 4),
                    r[4] * (g - f + 1), r[5] * (g - f + 1), r[6] * 4, r[7] * 4, 0.5 + 0.5 * r[8]) for r in q[i]]
        for top, left, size, cls, shape, oy, ox, py, px, contrast in paints:
            top, left, cls, shape, oy, ox, py, px = (int(v) for v in (top, left, cls, shape, oy, ox, py, px))
            tex = src.textures[cls, oy + py:oy + py + size, ox + px:ox + px + size]
            mask = src.silhouettes[shape, oy:oy + size, ox:ox + size]
            window = canvas[i, top:top + size, left:left + size]
            window.copy_(torch.maximum(window, contrast * (0.3 + 0.7 * tex) * mask))
    bank = (p[:, 5] * 16).long().clamp(max=15)
    sign = torch.where(p[:, 8] < 0.5, 1.0, -1.0)
    noise = torch.stack([src.noise_bank[k].roll((-int(y), -int(x)), (0, 1))
                         for k, y, x in zip(bank, (p[:, 6] * n).long(), (p[:, 7] * n).long(), strict=True)])
    expected = (noise * (src.noise * sign)[:, None, None] + canvas).clamp(0, 1)
    assert torch.equal(images[:, 0], expected)
    assert (canvas.flatten(1) > 0).any(1).all()  # every image has a glyph painted


def test_an_image_depends_on_its_index_only():
    src = GlyphSource("train")
    batch, _ = src.get(torch.tensor([5, 123, 40_000, 5]))
    alone, _ = src.get(torch.tensor([123]))
    assert torch.equal(batch[1], alone[0]) and torch.equal(batch[0], batch[3])
    other, _ = GlyphSource("test").get(torch.tensor([123]))
    assert not torch.equal(other[0], alone[0])  # the splits are different images


def test_sources_of_one_setting_share_their_tables():
    """Many single envs (a DummyVecEnv) each build a source: the ~14 MB of noise and glyph tables exist once."""
    a, b, c = GlyphSource("train"), GlyphSource("test"), GlyphSource("train", noise=0.2)
    assert a._clamped_windows.data_ptr() == b._clamped_windows.data_ptr()
    assert a._glyph_table.data_ptr() == b._glyph_table.data_ptr()
    assert c._clamped_windows.data_ptr() != a._clamped_windows.data_ptr()  # another noise level: its own tables
