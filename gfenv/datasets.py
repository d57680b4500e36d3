"""Real image datasets: torchvision datasets read from a local root, any ImageFolder tree, and the cluttered canvas
(RAM's cluttered translated MNIST protocol) that wraps any of them. Importing this module registers them all in
``gfenv.data.DATASETS``.
"""

from __future__ import annotations

import functools
import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gfenv.checkpoint import pickle_globals
from gfenv.data import SPLITS, ImageSource, hash_uniform, register_dataset, validation_carve
from gfenv.utils import check_bool, check_float, check_int, check_text

Size = int | Sequence[int]


def _pair(size: Size, what: str) -> tuple[int, int]:
    """An int or (H, W) as a checked (H, W) tuple, refused naming ``what`` when it is neither."""
    if isinstance(size, (list, tuple)):
        if len(size) != 2:
            raise ValueError(f"{what}={size!r}: must be a positive int or (H, W), two positive ints.")
        return check_int(f"{what}[0]", size[0], 1), check_int(f"{what}[1]", size[1], 1)
    side = check_int(what, size, 1, hint="or (H, W)")
    return side, side


def _split_id(split: str) -> int:
    return SPLITS.index(split) if split in SPLITS else 2


def _require_root(data_root: str | os.PathLike | None, dataset: str, layout: str) -> Path:
    if data_root is None:
        raise FileNotFoundError(f"Dataset {dataset!r} reads a local folder (nothing is downloaded): pass "
                                f"data_root=<folder>; it must hold {layout}.")
    return Path(data_root).expanduser()


# CUDA divides a tensor by a scalar as a product with its reciprocal; multiplying by the reciprocal everywhere gives
# bit-identical pixels on every device
_INV_255 = 1.0 / 255.0


# ----------------------------------------------------------------------------------------------------------------
# In-memory splits (MNIST-like, CIFAR, SVHN, STL-10)


class TensorSource(ImageSource):
    """A split held as one uint8 CPU tensor (N, C, H, W); ``get`` moves the batch to ``device`` and resizes it."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int, split: str = "train",
                 device: torch.device | str = "cpu", image_size: Size | None = None, name: str = ""):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}.")
        if len(images) != len(labels) or len(images) == 0:
            raise ValueError(f"{name or 'dataset'}: need as many labels as images (and at least one), "
                             f"got {len(images)} images and {len(labels)} labels.")
        self.images = images.contiguous()
        self.labels = labels.to(torch.long)
        self.num_classes = int(num_classes)
        self.split = split
        self.name = name
        self.device = torch.device(device)
        c, h, w = self.images.shape[1:]
        self.size = _pair(image_size, "image_size") if image_size is not None else (h, w)
        self.image_shape = (c, *self.size)

    def __len__(self) -> int:
        return len(self.images)

    @torch.no_grad()
    def get(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = indices.to("cpu", torch.long)
        x = self.images[idx].to(self.device, non_blocking=True).float().mul_(_INV_255)
        if x.shape[-2:] != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", antialias=True, align_corners=False).clamp_(0, 1)
        return x, self.labels[idx].to(self.device, non_blocking=True)


@dataclass(frozen=True)
class _Spec:
    """How one torchvision dataset is stored: its class, array layout and how it names splits."""

    name: str  # the class in torchvision.datasets (imported when a dataset is opened)
    layout: str  # "NHW", "NHWC" or "NCHW"
    split_kw: bool  # True: split="train"/"test"; False: train=True/False
    how_to_get: str = ""  # where to find the files offline

    @property
    def cls(self) -> type:
        import torchvision.datasets

        return getattr(torchvision.datasets, self.name)


_TORCHVISION = {
    "mnist": _Spec("MNIST", "NHW", False),
    "fashion_mnist": _Spec("FashionMNIST", "NHW", False,
                           "on Debian/Ubuntu `apt-get install dataset-fashion-mnist` puts the gzipped files in "
                           "/usr/share/datasets/fashion-mnist/; unzip them into <data_root>/FashionMNIST/raw/ (gunzip "
                           "-c FILE.gz > <data_root>/FashionMNIST/raw/FILE)"),
    "cifar10": _Spec("CIFAR10", "NHWC", False),
    "cifar100": _Spec("CIFAR100", "NHWC", False),
    "svhn": _Spec("SVHN", "NCHW", True),
    "stl10": _Spec("STL10", "NCHW", True),
}


def _expected_files(cls: type, root: Path, split: str) -> list[Path]:
    """The files torchvision's ``cls`` checks for before it loads ``split``."""
    if hasattr(cls, "resources"):
        raw = root / cls.__name__ / "raw"
        return [raw / os.path.splitext(os.path.basename(url))[0] for url, _ in cls.resources]
    if hasattr(cls, "split_list"):
        return [root / cls.split_list[split][1]]
    names = [name for name, _ in cls.train_list + cls.test_list]
    if hasattr(cls, "meta"):
        names.append(cls.meta["filename"])
    return [root / cls.base_folder / name for name in names]


def _missing_message(spec: _Spec, root: Path, expected: list[Path], missing: list[Path]) -> str:
    label = spec.cls.__name__
    where = (f"data_root={root} does not exist" if not root.exists()
             else f"data_root={root} lacks {', '.join(map(str, missing))}")
    how = f" To get them: {spec.how_to_get}." if spec.how_to_get else ""
    return (f"{label} data not found: {where}. {label} expects {', '.join(map(str, expected))} (torchvision's "
            f"layout).{how} Or pass download=True to let torchvision fetch them.")


@functools.cache
def _unverified(cls: type) -> type:
    """``cls`` with its md5 checksums dropped, so that only the files' presence is checked."""
    attrs: dict[str, object] = {}
    for attr in ("train_list", "test_list"):
        if hasattr(cls, attr):
            attrs[attr] = [[name, None] for name, _ in getattr(cls, attr)]
    if hasattr(cls, "meta"):
        attrs["meta"] = {**cls.meta, "md5": None}
    if hasattr(cls, "split_list"):
        attrs["split_list"] = {k: [url, name, None] for k, (url, name, _) in cls.split_list.items()}
    return type(cls.__name__, (cls,), attrs) if attrs else cls


def _open_torchvision(spec: _Spec, label: str, root: Path, split: str, download: bool, verify: bool):
    expected = _expected_files(spec.cls, root, split)
    missing = [p for p in expected if not p.is_file()]
    if missing and not download:
        raise FileNotFoundError(_missing_message(spec, root, expected, missing))
    if spec.name == "SVHN":
        try:
            import scipy.io  # noqa: F401
        except ImportError as e:
            raise ImportError("SVHN's .mat files are read with scipy: pip install scipy.") from e
    cls = spec.cls if verify else _unverified(spec.cls)
    split_arg = {"split": split} if spec.split_kw else {"train": split == "train"}
    if not missing:
        _check_files(spec, root, split)
    try:
        return cls(str(root), download=download, **split_arg)
    except RuntimeError as e:
        if "not found" not in str(e).lower():
            raise _unreadable(label, root, expected, e) from e
        missing = [p for p in expected if not p.is_file()]
        if missing:
            raise FileNotFoundError(_missing_message(spec, root, expected, missing)) from e
        raise ValueError(f"{label} files under {root} fail torchvision's md5 check (corrupt or not the official "
                         f"release): re-download them (download=True after deleting them), or pass verify=False "
                         f"to skip the check.") from e
    except (ImportError, FileNotFoundError):
        raise
    except Exception as e:  # whatever a damaged file makes torchvision (or scipy, numpy) raise
        raise _unreadable(label, root, expected, e) from e


def _unreadable(label: str, root: Path, expected: list[Path], err: Exception) -> ValueError:
    return ValueError(f"{label} files under {root} cannot be read ({type(err).__name__}: {err}): one of "
                      f"{', '.join(p.name for p in expected)} is corrupt or truncated; replace it with the official "
                      f"file.")


REPLACE_HINT = "replace it with the official file (re-extract the dataset's archive)"
IDX_DIMS = {"images": 3, "labels": 1}
SAFE_PICKLE_NAMES = frozenset(f"{module}.{name}" for module in ("numpy.core.multiarray", "numpy._core.multiarray")
                              for name in ("_reconstruct", "scalar")) | frozenset(
    {"numpy.ndarray", "numpy.dtype", "numpy.core.numeric._frombuffer", "numpy._core.numeric._frombuffer",
     "_codecs.encode"})
"""What a CIFAR batch (a pickle of numpy arrays, lists and strings) may import: numpy's array rebuilding only."""


def _check_files(spec: _Spec, root: Path, split: str) -> None:
    """Check the files torchvision is about to read for ``split``, naming the file and what is wrong with it: MNIST's
    idx files (size, magic number, item counts), CIFAR's pickled batches (whole, and building numpy arrays only:
    a batch that would import anything else is refused unread) and STL-10's binaries (sizes and counts)."""
    if spec.name in ("MNIST", "FashionMNIST"):
        raw = root / spec.name / "raw"
        prefix = "train" if split == "train" else "t10k"
        counts = {kind: _check_idx(raw / f"{prefix}-{kind}-idx{dims}-ubyte", kind, dims)
                  for kind, dims in IDX_DIMS.items()}
        if counts["images"] != counts["labels"]:
            raise ValueError(f"{raw / f'{prefix}-images-idx3-ubyte'} holds {counts['images']} images but "
                             f"{raw / f'{prefix}-labels-idx1-ubyte'} holds {counts['labels']} labels: the two files "
                             f"are from different releases or one is damaged; {REPLACE_HINT}.")
    elif spec.name in ("CIFAR10", "CIFAR100"):
        for path in _expected_files(spec.cls, root, split):
            _check_pickle(path)
    elif spec.name == "STL10":
        folder = root / spec.cls.base_folder
        images, labels = folder / f"{split}_X.bin", folder / f"{split}_y.bin"
        item = 3 * 96 * 96
        n = _check_size(images, item, "images of 3 x 96 x 96 bytes")
        if labels.is_file() and _check_size(labels, 1, "labels of 1 byte") != n:
            raise ValueError(f"{images} holds {n} images but {labels} holds {labels.stat().st_size} labels; "
                             f"{REPLACE_HINT}.")


def _check_size(path: Path, item: int, what: str) -> int:
    size = path.stat().st_size
    if size == 0 or size % item:
        problem = "is empty (0 bytes)" if size == 0 else f"holds {size} bytes, not a whole number of {what}"
        raise ValueError(f"Dataset file {path} {problem}: it is truncated or not the official file; {REPLACE_HINT}.")
    return size // item


def _check_idx(path: Path, kind: str, dims: int) -> int:
    """The item count of an idx file of unsigned bytes (``dims`` dimensions), after checking its magic number and
    that its size is what its header announces."""
    size = path.stat().st_size
    header = 4 + 4 * dims
    if size < header:
        problem = "is empty (0 bytes)" if size == 0 else f"holds {size} bytes, less than an idx header ({header})"
        raise ValueError(f"Dataset file {path} {problem}: it is truncated or not the official file; {REPLACE_HINT}.")
    with path.open("rb") as f:
        head = f.read(header)
    magic, expected = int.from_bytes(head[:4], "big"), 0x0800 | dims
    if magic != expected:
        gz = " (it starts like a gzip file: gunzip it first)" if head[:2] == b"\x1f\x8b" else ""
        raise ValueError(f"Dataset file {path} has magic number 0x{magic:08x}, not 0x{expected:08x} (idx{dims} of "
                         f"unsigned bytes: the {kind} file){gz}; {REPLACE_HINT}.")
    shape = struct.unpack(f">{dims}I", head[4:])
    need = header + math.prod(shape)
    if size != need:
        described = f"{shape[0]} {kind}" + (f" of {shape[1]} x {shape[2]}" if dims == 3 else "")
        state = "truncated" if size < need else "longer than its header says"
        raise ValueError(f"Dataset file {path} is {state}: its header announces {described} ({need} bytes), the "
                         f"file holds {size} bytes; {REPLACE_HINT}.")
    if shape[0] == 0:
        raise ValueError(f"Dataset file {path} holds no {kind} (its header says 0); {REPLACE_HINT}.")
    return shape[0]


def _check_pickle(path: Path) -> None:
    """A CIFAR batch: a whole pickle that imports numpy's array rebuilding only (read without unpickling)."""
    if path.stat().st_size == 0:
        raise ValueError(f"Dataset file {path} is empty (0 bytes); {REPLACE_HINT}.")
    try:
        names = pickle_globals(path.read_bytes())
    except ValueError as err:
        raise ValueError(f"Dataset file {path} is corrupt or truncated: {err}; {REPLACE_HINT}.") from None
    unsafe = sorted(set(names) - SAFE_PICKLE_NAMES)
    if unsafe:
        raise ValueError(f"Dataset file {path} is a pickle that imports {', '.join(unsafe)}: a CIFAR batch holds only "
                         f"numpy arrays, lists and strings, and loading this one would run code from it; it was "
                         f"refused unread. {REPLACE_HINT[0].upper() + REPLACE_HINT[1:]}.")


def _to_nchw(data: object, layout: str) -> torch.Tensor:
    x = torch.as_tensor(np.ascontiguousarray(np.asarray(data)))
    if layout == "NHW":
        return x.unsqueeze(1)
    if layout == "NHWC":
        return x.permute(0, 3, 1, 2)
    return x


def torchvision_source(name: str, split: str = "train", device: torch.device | str = "cpu",
                       data_root: str | os.PathLike | None = None, download: bool = False, verify: bool = True,
                       image_size: Size | None = None, canvas: Size | None = None, fragments: int = 4,
                       fragment_size: int = 8, seed: int = 0, val_size: int | None = None) -> ImageSource:
    """A torchvision dataset (one of ``_TORCHVISION``) read once from ``data_root`` into a ``TensorSource``.

    ``verify=False`` skips torchvision's md5 checks (only the files' presence is checked); ``canvas`` wraps the source
    in a ``ClutteredCanvasSource`` with ``fragments``, ``fragment_size`` and ``seed``. Split ``val`` is
    ``val_size`` images carved from the train files (``gfenv.data.validation_carve``), which split ``train`` leaves
    out.
    """
    download, verify = check_bool("download", download), check_bool("verify", verify)
    fragments, fragment_size = check_int("fragments", fragments, 0), check_int("fragment_size", fragment_size, 1)
    seed, val_size = check_int("seed", seed, 0), check_int("val_size", val_size, 0, none=True)
    check_text("data_root", data_root, none=True, path=True)
    spec = _TORCHVISION[name]
    label = spec.cls.__name__
    path = _require_root(data_root, name, f"{label}/ in torchvision's layout"
                         + (f" ({spec.how_to_get})" if spec.how_to_get else ""))
    ds = _open_torchvision(spec, label, path, "test" if split == "test" else "train", download, verify)
    images = _to_nchw(ds.data, spec.layout)
    labels = torch.as_tensor(np.asarray(ds.targets if hasattr(ds, "targets") else ds.labels), dtype=torch.long)
    if split != "test":
        keep = validation_carve(len(labels), split, val_size)
        images, labels = images[keep], labels[keep]
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"{label} {split} split has unlabelled images (label < 0); use a labelled split.")
    num_classes = max(len(getattr(ds, "classes", None) or ()), int(labels.max()) + 1 if labels.numel() else 0)
    source: ImageSource = TensorSource(images, labels, num_classes, split, device, image_size, name)
    if canvas is not None:
        source = ClutteredCanvasSource(source, canvas, fragments, fragment_size, seed)
    return source


for _name in _TORCHVISION:
    register_dataset(_name)(functools.partial(torchvision_source, _name))


@register_dataset("cluttered_mnist")
def cluttered_mnist(split: str = "train", device: torch.device | str = "cpu",
                    data_root: str | os.PathLike | None = None, canvas: Size = 60, fragments: int = 4,
                    fragment_size: int = 8, download: bool = False, verify: bool = True,
                    image_size: Size | None = None, seed: int = 0, val_size: int | None = None) -> ImageSource:
    """RAM's cluttered translated MNIST: 60x60 with 4 fragments of 8x8 (100x100 with 8 fragments is the other)."""
    return torchvision_source("mnist", split, device, data_root=data_root, download=download, verify=verify,
                              image_size=image_size, canvas=canvas, fragments=fragments, fragment_size=fragment_size,
                              seed=seed, val_size=val_size)


# ----------------------------------------------------------------------------------------------------------------
# ImageFolder trees, read lazily


class ImageFolderSource(ImageSource):
    """An ImageFolder tree ``<root>/<split>/<class>/<image>`` read lazily, one file per image in ``get``.

    Split "test" reads ``<root>/test`` or ``<root>/val`` (ImageNet); Tiny-ImageNet's ``val/images`` with
    ``val/val_annotations.txt`` is read too. Class indices come from ``<root>/train`` when present, so both splits
    agree. Each image is converted to RGB, resized so that it covers ``image_size / crop_fraction`` (shorter side for
    square output) and centre-cropped to ``image_size``; ``crop_fraction=0.875`` is the usual ImageNet evaluation.
    """

    def __init__(self, data_root: str | os.PathLike | None = None, split: str = "train",
                 device: torch.device | str = "cpu",
                 image_size: Size = 224, crop_fraction: float = 1.0, test_folder: str | None = None,
                 val_size: int | None = None):
        from torchvision.datasets.folder import find_classes

        check_text("data_root", data_root, none=True, path=True)
        check_text("test_folder", test_folder, none=True)
        self.root = _require_root(data_root, "imagefolder", "<data_root>/<split>/<class>/<image>")
        crop_fraction = check_float("crop_fraction", crop_fraction, high=1.0, above=0.0)
        val_size = check_int("val_size", val_size, 0, none=True)
        self.split = split
        self.device = torch.device(device)
        self.size = _pair(image_size, "image_size")
        self.crop_fraction = float(crop_fraction)
        self.image_shape = (3, *self.size)
        train_dir = self.root / "train"
        self.classes, class_to_idx = find_classes(train_dir) if train_dir.is_dir() else ([], {})
        names = ["train"] if split != "test" else [test_folder] if test_folder else ["test", "val"]
        self.samples = self._find_samples(names, class_to_idx)
        if split != "test":  # split "val": images carved from train/, which split "train" leaves out
            self.samples = [self.samples[i] for i in validation_carve(len(self.samples), split, val_size).tolist()]
        self.targets = torch.tensor([t for _, t in self.samples], dtype=torch.long)
        self.num_classes = len(self.classes)

    def _find_samples(self, names: list[str], class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
        from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

        notes = []
        for name in names:
            folder = self.root / name
            annotations = folder / "val_annotations.txt"
            if annotations.is_file() and (folder / "images").is_dir() and class_to_idx:
                samples = []
                for line in annotations.read_text().splitlines():
                    fields = line.split("\t")
                    if len(fields) >= 2 and fields[1] in class_to_idx:
                        samples.append((str(folder / "images" / fields[0]), class_to_idx[fields[1]]))
                if samples:
                    return samples
            elif folder.is_dir():
                subdirs = {e.name for e in os.scandir(folder) if e.is_dir()}
                if not class_to_idx:
                    self.classes, class_to_idx = find_classes(folder)
                elif not subdirs <= class_to_idx.keys():
                    extra = ", ".join(sorted(subdirs - class_to_idx.keys())[:5])
                    notes.append(f" {folder} was skipped: its folders {extra} are not classes of "
                                 f"{self.root / 'train'}.")
                    continue
                samples = make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
                if samples:
                    return samples
        tried = " or ".join(str(self.root / n / "<class>" / "<image>") for n in names)
        raise FileNotFoundError(f"imagefolder {self.split!r} split not found: expected images at {tried} "
                                f"(extensions {', '.join(IMG_EXTENSIONS)}). Point data_root= at a folder holding "
                                f"train/ and test/ (or val/) with one sub-folder per class." + "".join(notes))

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, path: str) -> torch.Tensor:
        from PIL import Image

        h_out, w_out = self.size
        try:
            with Image.open(path) as img:
                w0, h0 = img.size
                scale = max(h_out / h0, w_out / w0) / self.crop_fraction
                img.draft("RGB", (max(1, round(w0 * scale)), max(1, round(h0 * scale))))
                rgb = img.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"Cannot read image file {path}: {e}. Replace or delete the corrupt file.") from e
        w, h = rgb.size
        scale = max(h_out / h, w_out / w) / self.crop_fraction
        bw, bh = w_out / scale, h_out / scale
        box = ((w - bw) / 2, (h - bh) / 2, (w + bw) / 2, (h + bh) / 2)
        out = rgb.resize((w_out, h_out), Image.Resampling.BILINEAR, box=box)
        return torch.from_numpy(np.array(out, dtype=np.uint8)).permute(2, 0, 1)

    @torch.no_grad()
    def get(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = indices.to("cpu", torch.long)
        batch = torch.empty(len(idx), *self.image_shape, dtype=torch.uint8)
        for k, i in enumerate(idx.tolist()):
            batch[k] = self._load(self.samples[i][0])
        images = batch.to(self.device, non_blocking=True).float().mul_(_INV_255)
        return images, self.targets[idx].to(self.device, non_blocking=True)


@register_dataset("imagefolder")
def imagefolder(split: str = "train", device: torch.device | str = "cpu", data_root: str | os.PathLike | None = None,
                image_size: Size | None = None, crop_fraction: float = 1.0, test_folder: str | None = None,
                canvas: Size | None = None, fragments: int = 4, fragment_size: int = 8, seed: int = 0,
                val_size: int | None = None) -> ImageSource:
    source: ImageSource = ImageFolderSource(data_root, split, device, 224 if image_size is None else image_size,
                                            crop_fraction, test_folder, val_size)
    if canvas is not None:
        source = ClutteredCanvasSource(source, canvas, fragments, fragment_size, seed)
    return source


# ----------------------------------------------------------------------------------------------------------------
# Cluttered canvas


class ClutteredCanvasSource(ImageSource):
    """Each base image at a random place on a zero canvas, plus ``fragments`` random crops of other images.

    The protocol of RAM's cluttered translated MNIST (Mnih et al., 2014): 60x60 with 4 fragments of 8x8, or 100x100
    with 8. The base image keeps its size; fragments are ``fragment_size`` squares cut from other images of the same
    split at random places and max-blended onto the canvas. Positions and fragment sources come from a counter-based
    hash, so the image for index i is a pure function of (seed, split, i), whatever the batch.
    """

    def __init__(self, base: ImageSource, canvas: Size, fragments: int = 4, fragment_size: int = 8, seed: int = 0,
                 split: str | None = None):
        c, h, w = base.image_shape
        self.canvas = _pair(canvas, "canvas")
        if self.canvas[0] < h or self.canvas[1] < w:
            raise ValueError(f"canvas {self.canvas} is smaller than the images {(h, w)}: pass a canvas at least "
                             f"that large, or a smaller image_size.")
        fragments, fragment_size = check_int("fragments", fragments, 0), check_int("fragment_size", fragment_size, 1)
        seed = check_int("seed", seed, 0)
        if fragments and not 1 <= fragment_size <= min(h, w):
            raise ValueError(f"fragment_size must be in [1, {min(h, w)}] for images {(h, w)}, got {fragment_size}.")
        self.base = base
        self.fragments = int(fragments)
        self.fragment_size = int(fragment_size)
        self.seed = int(seed)
        self.split = split if split is not None else getattr(base, "split", "train")
        self.num_classes = base.num_classes
        self.device = base.device
        self.image_shape = (c, *self.canvas)
        self._split_id = _split_id(self.split)
        self._stream = (self.seed & 0x0FFFFFFF) * 4

    def __len__(self) -> int:
        return len(self.base)

    @staticmethod
    def _window(top: torch.Tensor, left: torch.Tensor, h: int, w: int, width: int, channels: int) -> torch.Tensor:
        """Flat indices (B, C, h*w) of the h x w windows at (top, left) in images of row length ``width``."""
        rows = torch.arange(h, device=top.device)
        cols = torch.arange(w, device=top.device)
        flat = (top[:, None, None] + rows[None, :, None]) * width + left[:, None, None] + cols[None, None, :]
        return flat.reshape(len(top), 1, h * w).expand(-1, channels, -1)

    @staticmethod
    def _draw(u: torch.Tensor, n: int) -> torch.Tensor:
        """Integers in [0, n) from uniforms u."""
        return (u * n).long().clamp_(max=n - 1)

    def _keys(self, idx: torch.Tensor) -> torch.Tensor:
        return idx * 3 + self._split_id

    @torch.no_grad()
    def object_corners(self, indices: torch.Tensor) -> torch.Tensor:
        """(N, 2) long: the (top, left) pixel at which item ``indices``' base image (the object, of size
        ``base.image_shape[1:]``) lies on its canvas, as ``get`` places it (privileged information, for reference
        policies and diagnostics; fragments max-blended on top may cover some of it)."""
        idx = indices.to(self.device, torch.int64)
        (_, h, w), (hc, wc) = self.base.image_shape, self.canvas
        p = hash_uniform(self._keys(idx), self._stream, 2)
        return torch.stack([self._draw(p[:, 0], hc - h + 1), self._draw(p[:, 1], wc - w + 1)], 1)

    @torch.no_grad()
    def get(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = indices.to(self.device, torch.int64)
        key = self._keys(idx)
        (c, h, w), (hc, wc) = self.base.image_shape, self.canvas
        b, nf, f, n = len(idx), self.fragments, self.fragment_size, len(self.base)
        images, labels = self.base.get(idx)
        out = torch.zeros(b, c, hc * wc, device=self.device)
        top_left = self.object_corners(idx)
        dst = self._window(top_left[:, 0], top_left[:, 1], h, w, wc, c)
        out.scatter_(2, dst, images.reshape(b, c, h * w).to(out.dtype))
        if nf and b:
            q = hash_uniform(key, self._stream + 1, 5 * nf).reshape(b, nf, 5)
            others = (idx[:, None] + 1 + self._draw(q[..., 0], n - 1)) % n if n > 1 else idx[:, None].expand(b, nf)
            crops, _ = self.base.get(others.reshape(-1))
            crops = crops.reshape(b, nf, c, h * w).to(out.dtype)
            for k in range(nf):
                qk = q[:, k]
                src = self._window(self._draw(qk[:, 1], h - f + 1), self._draw(qk[:, 2], w - f + 1), f, f, w, c)
                dst = self._window(self._draw(qk[:, 3], hc - f + 1), self._draw(qk[:, 4], wc - f + 1), f, f, wc, c)
                out.scatter_reduce_(2, dst, crops[:, k].gather(2, src), reduce="amax")
        return out.view(b, c, hc, wc), labels
