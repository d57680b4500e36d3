"""Procedural tasks where several glimpses and their order matter: pointers to follow from glimpse to glimpse.

On the default cluttered-glyphs task one well-placed patch names the class (a contextual bandit). Here the class is
a combination of values read from several parts of the canvas, and where the next informative part lies is only
written in the texture of the part read before (a *pointer*), invisible at glance resolution. So an agent must read
a part, then go where it points: a policy that chooses all its patches from the glance alone (open loop) has to
guess among look-alike candidates.

- ``pointer`` (128 x 128, one hop): a *key* glyph (a plus, findable at glance) whose texture a in 0..3 names the
  quadrant of the *target* among four look-alike candidates (squares, one per quadrant); the target's texture b
  in 0..2 completes the class 3 a + b (12 classes). The other candidates are decoys with a flat (untextured) fill.
- ``chain`` (224 x 224 by default, a chain of pointers): the key's texture names the quadrant of the level-1 node
  among the four level-1 candidates; that node's texture names the quadrant of the level-2 node, and so on; the
  class is every value read along the chain (the pointers and the last node's value).

All textures have mean 1/2 and period 2 or 4, so they average to the same grey as the decoys' flat fill at glance
resolution. Images are a pure function of (seed, split, index), painted in batches on the source's device with the
glyph tables and noise fields of ``gfenv.data`` (no Python loop over images).
"""

from __future__ import annotations

import functools

import torch

from gfenv.data import GlyphSource, _silhouettes, _textures, hash_uniforms, register_dataset

FLAT = 10  # texture index of the untextured fill (mean 1/2, like every texture) that decoys wear
SQUARE, DISK, TRIANGLE, PLUS, RING = range(5)  # the silhouettes of gfenv.data._silhouettes


@functools.lru_cache(maxsize=8)
def _object_table(glyph_size: int, device: torch.device) -> torch.Tensor:
    """Every object pixel's value before contrast, (11 textures, 5 shapes, 4 phase_y, 4 phase_x, g, g): the ten
    textures of ``gfenv.data._textures`` and a flat fill (index ``FLAT``), lifted to 0.3..1, inside the silhouette."""
    with torch.inference_mode(False), torch.no_grad():
        g = glyph_size
        tex = torch.cat([_textures(g + 4), torch.full((1, g + 4, g + 4), 0.5)])
        tex = tex.unfold(1, g, 1).unfold(2, g, 1)[:, :4, :4]  # (11, 4, 4, g, g) phase-shifted windows
        table = (0.3 + 0.7 * tex)[:, None] * _silhouettes(g)[None, :, None, None]
        return table.contiguous().to(device)


class _ObjectCanvas(GlyphSource):
    """A canvas of noise with glyph-like objects painted on it: GlyphSource's noise fields and painter, a table
    with the flat fill added, and no clutter fragments. Subclasses draw the objects and the labels."""

    finite_by_construction = True

    def __init__(self, split: str, device, canvas: int, glyph_size: int, noise: float, train_size: int,
                 test_size: int, seed: int):
        super().__init__(split=split, device=device, canvas=canvas, glyph_size=glyph_size, fragments=0,
                         fragment_size=glyph_size, noise=noise, train_size=train_size, test_size=test_size, seed=seed)
        self._glyph_table = _object_table(glyph_size, self.device)

    def _canvas(self, key: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The noise background of each image from 4 uniforms u (B, 4): (image (B, H*W), field start, scale)."""
        b, n = key.shape[0], self.canvas
        nb = self.noise_bank.shape[0]
        bank = (u[:, 0] * nb).long().clamp_(max=nb - 1)
        dy, dx = (u[:, 1] * n).long(), (u[:, 2] * n).long()
        negative = (u[:, 3] >= 0.5).long()
        start = bank * (4 * n * n) + dy * (2 * n) + dx
        image = self._clamped_windows.index_select(0, start + negative * (nb * 4 * n * n)).view(b, n * n)
        scale = (self.noise * (1.0 - 2.0 * negative.float()))[:, None]
        return image, start, scale

    def _compose(self, image: torch.Tensor, start: torch.Tensor, scale: torch.Tensor, top: torch.Tensor,
                 left: torch.Tensor, texture: torch.Tensor, shape: torch.Tensor, phase: torch.Tensor,
                 contrast: torch.Tensor) -> torch.Tensor:
        """Paint k objects per image ((B, k) arguments, phase (B, k, 2)) by max-blend; returns (B, 1, H, W)."""
        zero = torch.zeros_like(top)
        pos, fields, value = self._paint(top, left, self.glyph_size, texture, shape, zero, zero, phase, contrast,
                                         start)
        composed = torch.take(self._tiled_fields, fields).mul_(scale).add_(value).clamp_(0.0, 1.0)
        # objects never overlap, and a paint is >= 0, so the composed pixel is the max-blend of GlyphSource (noise
        # under a paint of 0 is the clamped noise already there): a plain scatter writes it
        image.scatter_(1, pos, composed)
        return image.view(-1, 1, self.canvas, self.canvas)

    def labels(self, indices: torch.Tensor) -> torch.Tensor:
        return self.get(indices)[1]


def _index(u: torch.Tensor, count: int) -> torch.Tensor:
    """Uniforms in [0, 1) as integers 0..count-1."""
    return (u * count).long().clamp_(max=count - 1)


class ChainSource(_ObjectCanvas):
    """A chain of pointers on a ``tiles`` x ``tiles`` tiling of ``tile``-px tiles (see the module docstring). With
    P = ``tile`` and a grid of ``tiles`` cells a side, every grid cell is exactly one tile: a focus patch shows one
    object whole, always at the same place in the patch whatever the quadrant (no hint of where it was taken).

    The four h x h blocks of tiles in the corners (h = (tiles - 1) / 2) are the quadrants (0 top-left, 1 top-right,
    2 bottom-left, 3 bottom-right); the middle row and column form a cross. The key (a plus) lies on a random tile of
    the cross. Each of the ``levels`` levels has four candidates, one per quadrant, on random distinct tiles of that
    quadrant's block; a level's candidates share a silhouette (level 1 squares, level 2 disks, level 3 triangles,
    level 4 rings). The key's texture c_0 in 0..3 names the quadrant of the level-1 node, whose texture c_1 names
    the quadrant of the level-2 node, ...; the last node's texture is a value v in 0..``values``-1. The other
    candidates (decoys) wear the flat fill. Label: the digits (c_0, ..., c_{levels-1}, v) in mixed radix
    (4 ** levels * values classes). Pointer textures alternate between textures 0..3 and 4..7 from level to level
    (the key 0..3); the values take the six textures the level before did not use. Objects are ``glyph_size``-px
    glyphs anywhere inside their tile, with contrast in [``min_contrast``, 1].
    """

    def __init__(self, split: str = "train", device="cpu", tiles: int = 7, tile: int = 32, glyph_size: int = 28,
                 levels: int = 2, values: int = 2, noise: float = 0.1, min_contrast: float = 0.7,
                 train_size: int = 50_000, test_size: int = 10_000, seed: int = 0):
        if tiles < 5 or tiles % 2 == 0:
            raise ValueError(f"tiles={tiles}: an odd number >= 5 (corner blocks around a middle cross).")
        half = (tiles - 1) // 2
        if not 1 <= levels <= min(4, half * half):
            raise ValueError(f"levels={levels}: 1 to {min(4, half * half)} levels (each quadrant's block of "
                             f"{half * half} tiles holds one candidate per level; 4 silhouettes).")
        if not 1 <= values <= 6:
            raise ValueError(f"values={values}: the last node's value is one of 6 textures (1 to 6 values).")
        if glyph_size > tile:
            raise ValueError(f"glyph_size={glyph_size} must fit in a tile of {tile} px.")
        super().__init__(split, device, tiles * tile, glyph_size, noise, train_size, test_size, seed)
        self.tiles, self.tile, self.levels, self.values = tiles, tile, levels, values
        self.min_contrast = min_contrast
        self.num_classes = 4 ** levels * values
        dev, mid = self.device, half
        # tiles (row, col) of the cross and of each quadrant's block, in a fixed order
        self._cross = torch.tensor([(mid, c) for c in range(tiles)] + [(r, mid) for r in range(tiles) if r != mid],
                                   device=dev)
        blocks = [[(r + (half + 1) * (q // 2), c + (half + 1) * (q % 2)) for r in range(half) for c in range(half)]
                  for q in range(4)]
        self._blocks = torch.tensor(blocks, device=dev)  # (4, h * h, 2)
        # texture of each shown digit: the key's c_0 from 0..3, c_k from 4..7 or 0..3 by turns, the value from the
        # six textures the level before it did not use
        pointer_base = [4 * (d % 2) for d in range(levels)]
        value_textures = [t for t in range(10) if not pointer_base[-1] <= t < pointer_base[-1] + 4]
        value_textures = value_textures[4:] + value_textures[:4] if pointer_base[-1] == 0 else value_textures
        self._pointer_base = torch.tensor(pointer_base, device=dev)
        self._value_textures = torch.tensor(value_textures[:values], device=dev)
        shapes = [PLUS] + [s for s in (SQUARE, DISK, TRIANGLE, RING)[:levels] for _ in range(4)]
        self._shapes = torch.tensor(shapes, device=dev)

    def get(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = self._keys(indices)
        b, t, g, lv = key.shape[0], self.tile, self.glyph_size, self.levels
        per_block = self._blocks.shape[1]
        k = 1 + 4 * lv  # objects per image: the key, then level by level the quadrants 0..3
        lab, pos, look, bg = hash_uniforms(key, ((1, lv + 1), (2, 1 + 4 * per_block + 2 * k), (3, 3 * k), (4, 4)))
        digits = _index(lab[:, :lv], 4)  # (B, levels): c_0 .. c_{levels-1}
        value = _index(lab[:, lv], self.values)
        labels = value
        for d in range(lv):
            labels = labels + digits[:, d] * (self.values * 4 ** (lv - 1 - d))
        image, start, scale = self._canvas(key, bg)
        key_tile = self._cross[_index(pos[:, 0], len(self._cross))]  # (B, 2)
        # a random order of each block's tiles; level k's candidate takes the k-th
        order = pos[:, 1:1 + 4 * per_block].view(b, 4, per_block).argsort(2)[:, :, :lv]  # (B, 4, levels)
        cand = torch.gather(self._blocks.expand(b, 4, per_block, 2), 2, order[..., None].expand(b, 4, lv, 2))
        tiles = torch.cat([key_tile[:, None], cand.transpose(1, 2).reshape(b, 4 * lv, 2)], 1)  # (B, k, 2)
        off = 1 + 4 * per_block
        yx = tiles * t + (pos[:, off:off + 2 * k].view(b, k, 2) * (t - g + 1)).long()
        # textures: the key shows c_0; level k's node (in quadrant c_{k-1}) shows c_k, the last level's the value
        node_texture = torch.cat([digits[:, 1:] + self._pointer_base[1:], self._value_textures[value][:, None]], 1)
        texture = torch.full((b, lv, 4), FLAT, dtype=torch.long, device=self.device)
        texture = texture.scatter(2, digits[:, :, None], node_texture[:, :, None])
        texture = torch.cat([digits[:, :1] + self._pointer_base[0], texture.reshape(b, 4 * lv)], 1)
        phase = (look[:, :2 * k].view(b, k, 2) * 4).long()
        contrast = self.min_contrast + (1.0 - self.min_contrast) * look[:, 2 * k:3 * k]
        image = self._compose(image, start, scale, yx[..., 0], yx[..., 1], texture, self._shapes.expand(b, k), phase,
                              contrast)
        return image, labels


@register_dataset("chain")
def chain(split: str = "train", device="cpu", **kwargs) -> ChainSource:
    """Two pointer hops on 224 x 224 (7 x 7 tiles of 32 px): key -> level-1 node -> level-2 node (a value in 0..1);
    32 classes (see ``ChainSource``)."""
    return ChainSource(split=split, device=device, **kwargs)


@register_dataset("pointer")
def pointer(split: str = "train", device="cpu", **kwargs) -> ChainSource:
    """One pointer hop on 160 x 160 (5 x 5 tiles of 32 px): the key names the target's quadrant, the target's texture
    one of 3 values; 12 classes. Noisier than the chain (noise 0.3, contrast from 0.3), so that reading a texture
    takes the encoder some learning (``ChainSource`` with ``tiles=5, levels=1, values=3, noise=0.3,
    min_contrast=0.3``)."""
    return ChainSource(split=split, device=device,
                       **{"tiles": 5, "levels": 1, "values": 3, "noise": 0.3, "min_contrast": 0.3, **kwargs})
