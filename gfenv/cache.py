"""Cached-feature mode: the frozen encoders' features of every grid cell, computed once per image.

With frozen encoders and grid actions a focus step can only ever read one of G x G patches of an image, so the
encoders' work can be done once per image of a fixed split: the glance (its pooled features and spatial map) and the
pooled features of every cell (and every cell's spatial map for ``observation="gfnet"``). A step of the env is then a
gather plus the classifier update, with exactly the values the live encoders would give.

The cache lives in memory (on the env's device) or on disk (``.npy`` files read through memory maps, for splits that
do not fit in memory); a disk cache is reused when the model, the data and the grid are the same. The size is
estimated before any work starts and printed, and a memory cache that would not fit is refused with the numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from gfenv.glimpse import crop, glance
from gfenv.models import encode

CACHE_MODES = ("memory", "disk")


@dataclass
class CachePlan:
    """What a cache of ``images`` images holds, and its size in bytes."""

    images: int
    cells: int
    feature_dim: int
    map_shape: tuple[int, ...]
    with_cell_maps: bool

    def shapes(self) -> dict[str, tuple[int, ...]]:
        n, g, d = self.images, self.cells, self.feature_dim
        shapes = {"labels": (n,), "glance_features": (n, d), "glance_maps": (n, *self.map_shape),
                  "cell_features": (n, g, d)}
        if self.with_cell_maps:
            shapes["cell_maps"] = (n, g, *self.map_shape)
        return shapes

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(s)) * (8 if k == "labels" else 4) for k, s in self.shapes().items())


CACHE_WORDS = ("cache", "cache_dir", "cache_images")
"""The env words of the feature cache: how features are computed, not what the task is."""


def without_cache(env_kwargs: dict) -> dict:
    """``env_kwargs`` with live encoders (no ``CACHE_WORDS``)."""
    return {k: v for k, v in env_kwargs.items() if k not in CACHE_WORDS}


def cover_episodes(env_kwargs: dict, episodes: int) -> dict:
    """``env_kwargs`` for a sequential evaluation of the first ``episodes`` images: a feature cache (if any) holds
    exactly those, whatever the training env cached (its split may be larger than the one evaluated). The cache
    holds grid cells, so an agent with continuous actions runs on live encoders (the same features)."""
    if env_kwargs.get("cache") is None:
        return env_kwargs
    if env_kwargs.get("action", "continuous") == "continuous":
        return without_cache(env_kwargs)
    return {**env_kwargs, "cache_images": int(episodes)}


def available_memory_bytes() -> int | None:
    """Free physical memory on Linux (None where unknown)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _fingerprint(model, source, key: dict) -> str:
    """Identifies a disk cache: the encoders' weights, the data source and the grid."""
    h = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode())
    for module in (model.glance_encoder, model.focus_encoder):
        for name, t in module.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    h.update(repr(type(source)).encode())
    h.update(repr(sorted((k, v) for k, v in vars(source).items() if isinstance(v, (int, float, str, tuple)))).encode())
    return h.hexdigest()[:16]


class FeatureCache:
    """Encoder outputs of the first ``images`` images of a source: labels (N,), glance features (N, D) and maps
    (N, D, h, w), cell features (N, G*G, D) and, optionally, cell maps (N, G*G, D, h, w)."""

    def __init__(self, tensors: dict[str, torch.Tensor], device: torch.device, path: Path | None = None):
        self.tensors, self.device, self.path = tensors, torch.device(device), path
        self.images = int(tensors["labels"].shape[0])
        self.on_device = all(t.device == self.device for t in tensors.values())

    def __len__(self) -> int:
        return self.images

    def take(self, name: str, *index: torch.Tensor) -> torch.Tensor:
        """``tensors[name][index]`` on the env's device (disk caches gather on the host, then copy). Two indices
        (images, cells) become one row gather over the flattened (image, cell) rows."""
        t, rows = self.tensors[name], index[0]
        if len(index) == 2:
            rows = index[0] * t.shape[1] + index[1]
            t = t.flatten(0, 1)
        elif len(index) != 1:
            raise ValueError(f"take({name!r}, ...) takes image indices and, optionally, cell indices.")
        if self.on_device:
            return t.index_select(0, rows)
        return t.index_select(0, rows.cpu()).to(self.device, non_blocking=True)

    @classmethod
    @torch.no_grad()
    def build(cls, model, source, corners: torch.Tensor, patch_size: int, images: int | None = None,
              mode: str = "memory", cache_dir: str | Path | None = None, with_cell_maps: bool = False,
              chunk: int = 64, progress: bool = True) -> FeatureCache:
        if mode not in CACHE_MODES:
            raise ValueError(f"Unknown cache mode {mode!r}; choose one of {CACHE_MODES} (or cache=None for live).")
        total = len(source)
        images = total if images is None else int(images)
        if not 1 <= images <= total:
            raise ValueError(f"cache_images={images} is outside 1..{total} (the split has {total} images).")
        device = corners.device
        c = source.image_shape[0]
        probe = torch.zeros(1, c, patch_size, patch_size, device=device)
        feats, fmap = encode(model.glance_encoder, probe)
        plan = CachePlan(images, corners.shape[0], feats.shape[1], tuple(fmap.shape[1:]), with_cell_maps)
        where = "in memory" if mode == "memory" else f"on disk in {cache_dir}"
        _say(f"gfenv feature cache: {images} images x {plan.cells} cells "
             f"({'with' if with_cell_maps else 'without'} cell maps) = {plan.nbytes / 2**20:.1f} MiB {where}; "
             f"{images * (plan.cells + 1)} encoder passes", progress)
        path = None
        if mode == "memory":
            free = available_memory_bytes() if device.type == "cpu" else None
            if free is not None and plan.nbytes > 0.8 * free:
                raise MemoryError(
                    f"The feature cache needs {plan.nbytes / 2**30:.2f} GiB but only {free / 2**30:.2f} GiB of memory "
                    f"is free: use cache='disk' with cache_dir=PATH, fewer images (cache_images=N), or "
                    f"observation='dict' (cell maps are only needed for observation='gfnet').")
            out = {k: torch.empty(s, dtype=torch.long if k == "labels" else torch.float32, device=device)
                   for k, s in plan.shapes().items()}
        else:
            if cache_dir is None:
                raise ValueError("cache='disk' needs cache_dir=PATH, the folder that holds the cache files.")
            # format 3: glances by matrix products (gfenv.glimpse.glance), equal to format 2 to float rounding only
            key = {"format": 3, "images": images, "patch": patch_size, "corners": corners.tolist(),
                   "maps": with_cell_maps, "glance_mode": model.config.glance_mode, "classes": source.num_classes,
                   "shape": list(source.image_shape)}
            path = Path(cache_dir) / f"features-{_fingerprint(model, source, key)}"
            done = path / "complete.json"
            if done.exists():
                _say(f"gfenv feature cache: reusing {path}", progress)
                return cls(_load(path, plan), device, path)
            # built in a folder of this process, renamed to `path` once complete: runs that start together (e.g.
            # `JOBS=2 bash benchmarks/suite.sh`) each build their own, the first rename wins, and a killed build
            # leaves no half-written cache under the name that is reused
            building = path.parent / f"{path.name}.building-{os.getpid()}"
            building.mkdir(parents=True, exist_ok=True)
            arrays = {k: np.lib.format.open_memmap(building / f"{k}.npy", mode="w+",
                                                   dtype=np.int64 if k == "labels" else np.float32, shape=s)
                      for k, s in plan.shapes().items()}
            out = {k: torch.from_numpy(a) for k, a in arrays.items()}
        cells = corners.shape[0]
        for start in tqdm(range(0, images, chunk), desc="feature cache", unit="chunk",
                          disable=None if progress else True):
            idx = torch.arange(start, min(start + chunk, images), device=device)
            imgs, labels = source.get(idx)
            g_feats, g_map = encode(model.glance_encoder, glance(imgs, patch_size, model.config.glance_mode))
            rep = imgs.repeat_interleave(cells, 0)
            c_feats, c_map = encode(model.focus_encoder, crop(rep, corners.repeat(len(idx), 1), patch_size))
            rows = slice(start, start + len(idx))
            values = {"labels": labels, "glance_features": g_feats, "glance_maps": g_map,
                      "cell_features": c_feats.reshape(len(idx), cells, -1)}
            if with_cell_maps:
                values["cell_maps"] = c_map.reshape(len(idx), cells, *c_map.shape[1:])
            for k, v in values.items():
                out[k][rows] = v.to(out[k].device, out[k].dtype)
        if path is not None:
            for a in arrays.values():
                a.flush()
            (building / "complete.json").write_text(json.dumps({"images": images, "bytes": plan.nbytes}) + "\n")
            if path.exists() and not (path / "complete.json").exists():
                shutil.rmtree(path)  # a half-written cache of an earlier version, which built in place
            try:
                building.rename(path)
            except OSError:  # another run finished the same cache first: use its files, drop ours
                shutil.rmtree(building)
                return cls(_load(path, plan), device, path)
        return cls(out, device, path)


def _load(path: Path, plan: CachePlan) -> dict[str, torch.Tensor]:
    """The arrays of a complete disk cache, memory-mapped."""
    return {k: torch.from_numpy(np.load(path / f"{k}.npy", mmap_mode="r+")) for k in plan.shapes()}


def _say(message: str, progress: bool) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)
