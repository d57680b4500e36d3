"""Where images come from: the embedded "cluttered glyphs" task and a registry of image sources.

An image source is a fixed, indexable split: ``source.get(indices)`` returns a batch of images (B, C, H, W) in
[0, 1] and labels (B,) on the source's device, as new tensors the caller may keep (the env holds the batch as its
images until the next reset), not a buffer the source reuses. The env draws indices with a ``torch.Generator`` on
that device.
Real datasets (torchvision, ImageFolder) and the cluttered canvas live in ``gfenv.datasets`` and register here.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from collections.abc import Callable

import torch

from gfenv.utils import check_choice, check_float, check_int

DATASETS: dict[str, Callable[..., ImageSource]] = {}
SPLITS = ("train", "test", "val")
"""``val`` is carved from the train images (held out of ``train``): model selection uses it, so ``test`` is touched
by the final evaluation only."""
DEFAULT_VAL_SIZE = 5000


def validation_carve(count: int, split: str, val_size: int | None = None) -> torch.Tensor:
    """The indices, among a dataset's ``count`` train images, of ``split`` ``train`` or ``val``: the last
    ``val_size`` (default min(5000, count // 10)) of one fixed shuffle go to ``val``, the rest (in order) to
    ``train``. The same on every machine and device."""
    size = min(DEFAULT_VAL_SIZE, count // 10) if val_size is None else int(val_size)
    if not 0 <= size < count:
        raise ValueError(f"val_size={size} must leave train images: choose 0 <= val_size < {count}.")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(0))
    held = order[count - size:]
    if split == "val":
        return held.sort().values
    keep = torch.ones(count, dtype=torch.bool)
    keep[held] = False
    return keep.nonzero().squeeze(1)
BUILTIN_DATASET_MODULES = ("gfenv.datasets", "gfenv.procedural")
"""Modules whose import registers more datasets; loaded the first time a source is made by name."""


def register_dataset(name: str) -> Callable:
    """Decorator: register an image source builder ``fn(split, device, **settings)`` under ``name``; a name taken by
    another builder is refused."""

    def deco(fn: Callable[..., ImageSource]) -> Callable[..., ImageSource]:
        if DATASETS.get(name, fn) is not fn:
            raise ValueError(f"A dataset named {name!r} is already registered ({DATASETS[name]!r}).")
        DATASETS[name] = fn
        return fn

    return deco


def load_builtin_datasets() -> dict[str, Callable[..., ImageSource]]:
    """``DATASETS`` with the built-in modules' datasets registered (imported on first use: they pull in torchvision)."""
    for module in BUILTIN_DATASET_MODULES:
        importlib.import_module(module)
    return DATASETS


class ImageSource:
    """A fixed split of labelled images, read in batches on ``device``."""

    num_classes: int
    image_shape: tuple[int, int, int]  # (C, H, W)
    device: torch.device
    finite_by_construction: bool = False
    """True when ``get`` cannot return NaN or inf (e.g. clamped procedural images): the env skips its check."""

    def __len__(self) -> int:
        raise NotImplementedError

    def get(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


def make_source(dataset: str = "glyphs", split: str = "train", device: str | torch.device = "cpu",
                **kwargs) -> ImageSource:
    """Build an image source by dataset name (see ``DATASETS``); ``kwargs`` are the dataset's own settings."""
    load_builtin_datasets()
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose one of {SPLITS}.")
    if dataset not in DATASETS:
        raise ValueError(f"Unknown dataset {dataset!r}. Valid datasets: {', '.join(sorted(DATASETS))}.")
    check_dataset_words(dataset, kwargs)
    return DATASETS[dataset](split=split, device=torch.device(device), **kwargs)


def check_dataset_words(dataset: str, words: dict) -> None:
    """Refuse settings that dataset ``dataset``'s builder does not take, naming them and listing the ones it does."""
    params = inspect.signature(DATASETS[dataset]).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(words) - set(params))
    if unknown:
        valid = sorted(k for k in params if k not in ("self", "split", "device"))
        given = ", ".join(f"{k}={words[k]!r}" for k in unknown)
        raise ValueError(f"Dataset {dataset!r} does not take {given}: its settings are {', '.join(valid)}, and the "
                         f"env's own arguments are listed in help(gfenv.GlanceFocusVectorEnv).")


# ----------------------------------------------------------------------------------------------------------------
# Counter-based random numbers: each image is a pure function of (seed, split, index), batched on any device.

_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixing hash (lowbias32) on int64 tensors; identical on every device."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def hash_uniform(key: torch.Tensor, stream: int, count: int) -> torch.Tensor:
    """Uniform floats in [0, 1): (B, count) numbers for keys (B,) and a stream id."""
    return hash_uniforms(key, ((stream, count),))[0]


def hash_uniforms(key: torch.Tensor, streams: tuple[tuple[int, int], ...]) -> tuple[torch.Tensor, ...]:
    """``hash_uniform(key, stream, count)`` for each (stream, count) of ``streams``, computed together (one set of
    tensor ops for all the streams' columns): the same numbers, bit for bit."""
    stream_of_column, ctr = _columns(streams, key.device)
    x = _hash32(_hash32(key[:, None] * 0x9E3779B1 + stream_of_column * 0x85EBCA77) + ctr * 0xC2B2AE3D)
    x = _hash32(x + key[:, None])
    u = (x.to(torch.float64) + 0.5).div_(2.0**32).to(torch.float32)
    return u.split([count for _, count in streams], 1)


@functools.lru_cache(maxsize=64)
def _columns(streams: tuple[tuple[int, int], ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each column's stream id and counter, made once on the device (no host->device copy in a step)."""
    ids = torch.cat([torch.full((count,), stream, dtype=torch.int64, device=device) for stream, count in streams])
    ctr = torch.cat([torch.arange(count, dtype=torch.int64, device=device) for _, count in streams])
    return ids, ctr


def hash_normal(key: torch.Tensor, stream: int, count: int) -> torch.Tensor:
    """Standard normal floats (B, count) by Box-Muller on two uniform streams."""
    u1 = hash_uniform(key, stream, count)
    u2 = hash_uniform(key, stream + 1, count)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)


# ----------------------------------------------------------------------------------------------------------------
# Cluttered glyphs


def _textures(size: int) -> torch.Tensor:
    """Ten binary textures with period 2 or 4 and mean 1/2: invisible after 4x anti-aliased downsampling."""
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    pats = [
        y % 2 == 0,
        x % 2 == 0,
        (y + x) % 2 == 0,
        (y // 2 + x // 2) % 2 == 0,
        (y + x) % 4 < 2,
        (y - x) % 4 < 2,
        y % 4 < 2,
        x % 4 < 2,
        (y % 2 == 0) ^ (x % 4 < 2),
        (x % 2 == 0) ^ (y % 4 < 2),
    ]
    return torch.stack(pats).float()  # (10, size, size)


def _silhouettes(size: int) -> torch.Tensor:
    """Five coarse shapes (square, disk, triangle, plus, ring): what the glance can still see."""
    u, v = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    c = (size - 1) / 2
    r = size / 2
    d2 = (u - c) ** 2 + (v - c) ** 2
    shapes = [
        torch.ones(size, size, dtype=torch.bool),
        d2 <= r * r,
        (v - c).abs() <= (u + 1) / 2,
        ((u - c).abs() <= size / 6) | ((v - c).abs() <= size / 6),
        (d2 <= r * r) & (d2 >= (0.55 * r) ** 2),
    ]
    return torch.stack(shapes).float()  # (5, size, size)


@functools.lru_cache(maxsize=8)
def _glyph_tables(canvas: int, glyph_size: int, noise: float, seed: int, device: torch.device) -> tuple:
    """The read-only tables a glyph source draws from, built once per setting and shared by every source (train and
    test splits, the many single envs of a DummyVecEnv): about 14 MB for the default 128 x 128 canvas."""
    with torch.inference_mode(False), torch.no_grad():
        # textures are tiled with a phase offset of up to 3 px, so make them 4 px larger than the glyph
        textures = _textures(glyph_size + 4).to(device)
        silhouettes = _silhouettes(glyph_size).to(device)
        # every glyph pixel's value before contrast, per (class, shape, phase_y, phase_x, row, col): the texture
        # (phase-shifted, lifted to 0.3..1) inside the silhouette, 0 outside; (10, 5, 4, 4, g, g)
        tex = textures.unfold(1, glyph_size, 1).unfold(2, glyph_size, 1)[:, :4, :4]  # (10, 4, 4, g, g)
        glyph_table = ((0.3 + 0.7 * tex)[:, None] * silhouettes[None, :, None, None]).contiguous()
        gen = torch.Generator().manual_seed(seed)
        noise_bank = torch.randn(16, canvas, canvas, generator=gen).to(device)  # (16, H, W)
        # what an unpainted pixel shows, clamp(s * field) for s = +noise and -noise: 32 fields computed once.
        # A wrapped-around window of a field is a plain strided window of the field tiled 2 x 2: the view
        # windows[k] is the H x W window (row stride 2W) that starts at flat offset k of the tiled fields
        tiled_fields = noise_bank.repeat(1, 2, 2).reshape(-1)  # (16 * 2H * 2W,): the painted pixels' noise
        scale = noise * torch.tensor([1.0, -1.0], device=device)
        clamped = (noise_bank * scale[:, None, None, None]).clamp_(0.0, 1.0).reshape(-1, canvas, canvas)
        tiled = torch.cat([clamped.repeat(1, 2, 2).reshape(-1), clamped.new_zeros(2 * canvas * canvas)])
        starts = tiled.numel() - 2 * canvas * canvas
        clamped_windows = tiled.as_strided((starts, canvas, canvas), (1, 2 * canvas, 1))
    return textures, silhouettes, glyph_table, noise_bank, tiled_fields, clamped_windows


class GlyphSource(ImageSource):
    """Cluttered glyphs, the embedded default task.

    Class k is a glyph of ``glyph_size`` pixels whose *texture* (one of ten 1-2 px patterns) names the class and
    whose *silhouette* (one of five shapes, k // 2) is a coarse hint. At glance resolution the texture averages to
    grey, so the glance can only tell the silhouette (at most 50 % accuracy) and where the glyph is; a focus patch
    on the glyph reads the texture. Clutter: fragments of other glyphs (with their textures), noise, random
    contrast. Images are a pure function of (seed, split, index): deterministic on any device.
    """

    num_classes = 10
    finite_by_construction = True  # finite paints and noise, clamped to [0, 1]

    def __init__(self, split: str = "train", device: torch.device | str = "cpu", canvas: int = 128,
                 glyph_size: int = 16, fragments: int = 8, fragment_size: int = 8, noise: float = 0.1,
                 train_size: int = 50_000, test_size: int = 10_000, val_size: int = DEFAULT_VAL_SIZE, seed: int = 0):
        check_choice("split", split, SPLITS)
        canvas, glyph_size = check_int("canvas", canvas, 1), check_int("glyph_size", glyph_size, 1)
        fragments, fragment_size = check_int("fragments", fragments, 0), check_int("fragment_size", fragment_size, 1)
        noise = check_float("noise", noise, 0.0)
        sizes = {name: check_int(name, value, 0) for name, value in
                 (("train_size", train_size), ("test_size", test_size), ("val_size", val_size))}
        seed = check_int("seed", seed, 0)
        if sizes[f"{split}_size"] < 1:
            raise ValueError(f"{split}_size=0: split {split!r} has no images; give {split}_size >= 1.")
        if glyph_size > canvas or fragment_size > glyph_size:
            raise ValueError(f"Need fragment_size <= glyph_size <= canvas, got {fragment_size}, {glyph_size}, "
                             f"{canvas}.")
        self.device = torch.device(device)
        self.split = split
        self.canvas = canvas
        self.glyph_size = glyph_size
        self.fragments = fragments
        self.fragment_size = fragment_size
        self.noise = noise
        self.size = sizes[f"{split}_size"]
        self.seed = seed
        self.image_shape = (1, canvas, canvas)
        # validation images continue the train stream past the train images: held out of train, same distribution
        self._split_id = SPLITS.index(split) if split != "val" else 0
        self._offset = sizes["train_size"] if split == "val" else 0
        (self.textures, self.silhouettes, self._glyph_table, self.noise_bank, self._tiled_fields,
         self._clamped_windows) = _glyph_tables(canvas, glyph_size, float(noise), seed, self.device)

    def __len__(self) -> int:
        return self.size

    def _keys(self, indices: torch.Tensor) -> torch.Tensor:
        return ((indices.to(self.device, torch.int64) + self._offset) * 4 + self._split_id
                + (self.seed & 0xFFFF) * 7919 * 4)

    def labels(self, indices: torch.Tensor) -> torch.Tensor:
        return self._labels(hash_uniform(self._keys(indices), 1, 1))

    def _labels(self, u: torch.Tensor) -> torch.Tensor:
        """The classes drawn by stream 1's number ``u`` (B, 1)."""
        return (u[:, 0] * self.num_classes).long().clamp_(max=self.num_classes - 1)

    def _paint(self, top: torch.Tensor, left: torch.Tensor, size: int, cls: torch.Tensor, shape: torch.Tensor,
               off_y: torch.Tensor, off_x: torch.Tensor, phase: torch.Tensor, contrast: torch.Tensor,
               origin: torch.Tensor):
        """What k size x size windows (offset off_y/off_x inside a glyph of class cls) at (top, left) draw: their
        pixels' flat indices in the canvas, in the tiled noise fields (``origin`` (B,): where the image's noise
        window starts there) and their values, (B, k * size * size) each. Arguments are (B, k) (phase (B, k, 2))."""
        b, n, s = top.shape[0], self.canvas, self.glyph_size
        shapes, phases = self._glyph_table.shape[1:3]
        r = torch.arange(size, device=self.device)
        # one read of the glyph table per pixel: table[cls, shape, phase_y, phase_x, off_y + u, off_x + v]
        cell = ((cls * shapes + shape) * phases + phase[..., 0]) * phases + phase[..., 1]
        start = cell * (s * s) + off_y * s + off_x
        value = contrast[..., None, None] * torch.take(self._glyph_table, start[..., None, None] + (r[:, None] * s + r))
        flat = (top * n + left)[..., None, None] + (r[:, None] * n + r)
        fields = (origin[:, None] + top * (2 * n) + left)[..., None, None] + (r[:, None] * (2 * n) + r)
        return flat.reshape(b, -1), fields.reshape(b, -1), value.reshape(b, -1)

    @torch.no_grad()
    def get(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = self._keys(indices)
        b, n, g, f = key.shape[0], self.canvas, self.glyph_size, self.fragment_size
        label_u, p, q = hash_uniforms(key, ((1, 1), (2, 9), (4, 9 * self.fragments)))
        labels = self._labels(label_u)
        # noise: a shifted window of one of a few fixed noise fields, scaled by +-noise, so every image's noise is
        # its own: noise[y, x] = s * field[(y + dy) % n, (x + dx) % n]
        nb = self.noise_bank.shape[0]
        bank = (p[:, 5] * nb).long().clamp_(max=nb - 1)
        dy, dx = (p[:, 6] * n).long(), (p[:, 7] * n).long()
        negative = (p[:, 8] >= 0.5).long()  # the sign s = +1 where p8 < 0.5
        start = bank * (4 * n * n) + dy * (2 * n) + dx  # the window's start in the tiled fields
        # an unpainted pixel is clamp(s * field): a window of the precomputed clamped fields, one strided copy
        image = self._clamped_windows.index_select(0, start + negative * (nb * 4 * n * n)).view(b, n * n)
        scale = (self.noise * (1.0 - 2.0 * negative.float()))[:, None]
        zero = torch.zeros(b, 1, dtype=torch.long, device=self.device)
        q = q.reshape(b, self.fragments, 9)
        paints = (
            self._paint((p[:, :1] * (n - g + 1)).long(), (p[:, 1:2] * (n - g + 1)).long(), g, labels[:, None],
                        labels[:, None] // 2, zero, zero, (p[:, None, 2:4] * 4).long(), 0.5 + 0.5 * p[:, 4:5], start),
            self._paint((q[..., 0] * (n - f + 1)).long(), (q[..., 1] * (n - f + 1)).long(), f,
                        (q[..., 2] * 10).long().clamp_(max=9), (q[..., 3] * 5).long().clamp_(max=4),
                        (q[..., 4] * (g - f + 1)).long(), (q[..., 5] * (g - f + 1)).long(),
                        (q[..., 6:8] * 4).long(), 0.5 + 0.5 * q[..., 8], start),
        )
        # a painted pixel is clamp(s * field + the max of the paints over it) (max-blend over a black canvas), which
        # is the max over the paints of clamp(s * field + paint): rounding and clamping never change an order. So
        # each paint's pixel is composed alone and the max of them replaces the noise: paints are >= 0, so that max
        # is also >= the noise clamp(s * field) already there, and a max with it (include_self) changes nothing
        for pos, fields, value in paints:
            composed = torch.take(self._tiled_fields, fields).mul_(scale).add_(value).clamp_(0.0, 1.0)
            image.scatter_reduce_(1, pos, composed, reduce="amax")
        return image.view(b, 1, n, n), labels  # (B, 1, H, W), (B,)


register_dataset("glyphs")(GlyphSource)
