"""Real-dataset sources on fake data written in torchvision's on-disk formats (no downloads)."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from gfenv.data import DATASETS, make_source
from gfenv.datasets import ClutteredCanvasSource, ImageFolderSource, TensorSource


def _write_idx(path: Path, array: np.ndarray) -> None:
    magic = 0x0800 | array.ndim  # type code 0x08: unsigned byte
    path.write_bytes(struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes())


def _fake_mnist(root: Path, folder: str = "MNIST", n_train: int = 24, n_test: int = 12) -> Path:
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(1, 256, size=(n, 28, 28), dtype=np.uint8)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8))
    return root


def _fake_cifar10(root: Path, per_batch: int = 4, classes: int = 4) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8),
                 "labels": [int(v) for v in rng.integers(0, classes, size=per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(classes)]}))
    return root


def _fake_cifar100(root: Path, n: int = 6, classes: int = 7) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for name in ("train", "test"):
        batch = {"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                 "fine_labels": [int(v) for v in rng.integers(0, classes, size=n)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(classes)]}))
    return root


def _fake_stl10(root: Path, n: int = 3) -> Path:
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for prefix in ("train", "test", "unlabeled"):
        rng.integers(0, 256, size=(n, 3, 96, 96), dtype=np.uint8).tofile(folder / f"{prefix}_X.bin")
        if prefix != "unlabeled":
            np.array([1, 2, 3][:n], dtype=np.uint8).tofile(folder / f"{prefix}_y.bin")
    (folder / "class_names.txt").write_text("\n".join(f"c{i}" for i in range(5)) + "\n")
    return root


COLOURS = {"ant": (255, 0, 0), "bee": (0, 255, 0), "cat": (0, 0, 255)}


def _fake_imagefolder(root: Path, test_name: str = "val") -> Path:
    sizes = [(30, 20), (20, 44)]  # (W, H): non-square, both orientations
    modes = ["RGB", "L", "RGBA", "P"]
    for split in ("train", test_name):
        for c, (cls, colour) in enumerate(COLOURS.items()):
            (root / split / cls).mkdir(parents=True)
            for k, size in enumerate(sizes):
                img = Image.new("RGB", size, colour)
                mode = modes[(c + k) % len(modes)] if cls != "ant" else "RGB"
                img.convert(mode).save(root / split / cls / f"{k}.png")
    return root


# ----------------------------------------------------------------------------------------------------------------
# torchvision formats


@pytest.mark.parametrize(("name", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_like(tmp_path: Path, name: str, folder: str) -> None:
    root = _fake_mnist(tmp_path, folder)
    train = make_source(name, "train", data_root=str(root), val_size=0)
    test = make_source(name, "test", data_root=str(root))
    assert (len(train), len(test)) == (24, 12)
    assert train.image_shape == (1, 28, 28) and train.num_classes == 10
    x, y = train.get(torch.tensor([0, 5, 23]))
    assert x.shape == (3, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.long
    assert 0.0 < x.min() and x.max() <= 1.0
    assert y.tolist() == [0, 5, 3]
    raw = np.frombuffer((root / folder / "raw" / "train-images-idx3-ubyte").read_bytes()[16:], dtype=np.uint8)
    assert torch.equal(x[0, 0], torch.from_numpy(raw[:784].reshape(28, 28).astype(np.float32)) * (1.0 / 255))


def test_image_size_resizes(tmp_path: Path) -> None:
    root = _fake_mnist(tmp_path)
    assert make_source("mnist", "train", data_root=root, image_size=16).get(torch.arange(2))[0].shape == (2, 1, 16, 16)
    src = make_source("mnist", "train", data_root=root, image_size=(12, 20))
    x, _ = src.get(torch.arange(2))
    assert src.image_shape == (1, 12, 20) and x.shape == (2, 1, 12, 20) and 0 <= x.min() and x.max() <= 1


def test_cifar10_classes_from_meta(tmp_path: Path) -> None:
    root = _fake_cifar10(tmp_path)
    train = make_source("cifar10", "train", data_root=root, verify=False, val_size=0)
    test = make_source("cifar10", "test", data_root=root, verify=False)
    assert (len(train), len(test)) == (20, 4)
    assert train.num_classes == 4 and train.image_shape == (3, 32, 32)
    x, y = train.get(torch.arange(20))
    assert x.shape == (20, 3, 32, 32) and 0 <= x.min() and x.max() <= 1
    assert 0 <= y.min() and y.max() < 4
    first = pickle.loads((root / "cifar-10-batches-py" / "data_batch_1").read_bytes())
    assert torch.equal(x[1], torch.from_numpy(first["data"][1].reshape(3, 32, 32)).float() * (1.0 / 255))
    assert y[:4].tolist() == first["labels"]


def test_cifar10_checksum_mismatch_is_explained(tmp_path: Path) -> None:
    root = _fake_cifar10(tmp_path)
    with pytest.raises(ValueError, match="md5.*verify=False"):
        make_source("cifar10", "train", data_root=root)


def test_cifar100(tmp_path: Path) -> None:
    src = make_source("cifar100", "test", data_root=_fake_cifar100(tmp_path), verify=False)
    x, y = src.get(torch.arange(len(src)))
    assert src.num_classes == 7 and x.shape == (6, 3, 32, 32) and y.max() < 7


def test_stl10(tmp_path: Path) -> None:
    src = make_source("stl10", "train", data_root=_fake_stl10(tmp_path), verify=False, image_size=48)
    x, y = src.get(torch.tensor([2, 0]))
    assert src.num_classes == 5 and src.image_shape == (3, 48, 48) and x.shape == (2, 3, 48, 48)
    assert y.tolist() == [2, 0]


# ----------------------------------------------------------------------------------------------------------------
# ImageFolder


def test_imagefolder(tmp_path: Path) -> None:
    root = _fake_imagefolder(tmp_path)
    train = make_source("imagefolder", "train", data_root=root, image_size=16)
    test = make_source("imagefolder", "test", data_root=root, image_size=(8, 12))
    assert train.num_classes == 3 and len(train) == 6 and train.image_shape == (3, 16, 16)
    x, y = train.get(torch.arange(6))
    assert x.shape == (6, 3, 16, 16) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y.tolist() == [0, 0, 1, 1, 2, 2]
    for img, (path, _) in zip(x, train.samples):
        with Image.open(path) as saved:
            colour = torch.tensor(saved.convert("RGB").getpixel((0, 0))).float() * (1.0 / 255)
        assert torch.allclose(img.mean(dim=(1, 2)), colour, atol=0.02)
    assert torch.allclose(x[0].mean(dim=(1, 2)), torch.tensor([1.0, 0.0, 0.0]), atol=0.02)
    xt, yt = test.get(torch.tensor([5, 0]))
    assert xt.shape == (2, 3, 8, 12) and yt.tolist() == [2, 0]
    assert make_source("imagefolder", "train", data_root=root).image_shape == (3, 224, 224)


def test_imagefolder_centre_crop(tmp_path: Path) -> None:
    (tmp_path / "train" / "a").mkdir(parents=True)
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :8] = 255  # a white band outside the centre crop of a wide image
    Image.fromarray(pixels).save(tmp_path / "train" / "a" / "wide.png")
    src = ImageFolderSource(tmp_path, "train", image_size=16)
    assert src.get(torch.tensor([0]))[0].max() < 0.05
    assert ImageFolderSource(tmp_path, "train", image_size=(16, 32)).get(torch.tensor([0]))[0].mean() > 0.15


def test_tiny_imagenet_val_layout(tmp_path: Path) -> None:
    for cls in ("n01", "n02"):
        (tmp_path / "train" / cls / "images").mkdir(parents=True)
        Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "train" / cls / "images" / f"{cls}_0.png")
    (tmp_path / "val" / "images").mkdir(parents=True)
    (tmp_path / "test" / "images").mkdir(parents=True)  # unlabelled: must not be taken as the test split
    Image.new("RGB", (8, 8)).save(tmp_path / "test" / "images" / "test_0.png")
    for k, _cls in enumerate(("n02", "n01", "n02")):
        Image.new("RGB", (8, 8)).save(tmp_path / "val" / "images" / f"val_{k}.png")
    (tmp_path / "val" / "val_annotations.txt").write_text("val_0.png\tn02\t0\t0\t8\t8\nval_1.png\tn01\t0\t0\t8\t8\n"
                                                          "val_2.png\tn02\t0\t0\t8\t8\n")
    src = make_source("imagefolder", "test", data_root=tmp_path, image_size=8)
    assert src.num_classes == 2 and len(src) == 3
    assert src.get(torch.arange(3))[1].tolist() == [1, 0, 1]


def test_corrupt_image_names_the_file(tmp_path: Path) -> None:
    root = _fake_imagefolder(tmp_path)
    bad = root / "train" / "bee" / "1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    src = make_source("imagefolder", "train", data_root=root, image_size=8)
    src.get(torch.tensor([0, 1, 2]))
    index = [p for p, _ in src.samples].index(str(bad))
    with pytest.raises(ValueError, match="1.png") as err:
        src.get(torch.tensor([0, index]))
    assert str(bad) in str(err.value)


# ----------------------------------------------------------------------------------------------------------------
# Errors


def test_missing_mnist_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        make_source("mnist", "train", data_root=tmp_path / "nowhere")
    msg = str(err.value)
    assert str(Path("MNIST") / "raw" / "train-images-idx3-ubyte") in msg and "download=True" in msg
    assert "does not exist" in msg


def test_missing_cifar_and_svhn_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py.*test_batch.*download=True"):
        make_source("cifar10", "test", data_root=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"test_32x32\.mat.*download=True"):
        make_source("svhn", "test", data_root=tmp_path)


def test_missing_data_root_names_the_argument_and_the_layout() -> None:
    for name, layout in (("mnist", "MNIST/"), ("cifar10", "CIFAR10/"), ("imagefolder", "<class>"),
                         ("cluttered_mnist", "MNIST/"), ("fashion_mnist", "apt-get install dataset-fashion-mnist")):
        with pytest.raises(FileNotFoundError, match="data_root=<folder>") as err:
            make_source(name, "train")
        assert layout in str(err.value)


def test_missing_imagefolder_split(tmp_path: Path) -> None:
    (tmp_path / "train" / "a").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "train" / "a" / "x.png")
    with pytest.raises(FileNotFoundError, match=r"val"):
        make_source("imagefolder", "test", data_root=tmp_path)


def test_unknown_dataset_lists_names() -> None:
    with pytest.raises(ValueError, match="Valid datasets") as err:
        make_source("nope", "train")
    for name in ("mnist", "fashion_mnist", "cifar10", "cifar100", "svhn", "stl10", "imagefolder", "cluttered_mnist"):
        assert name in str(err.value) and name in DATASETS


def test_canvas_smaller_than_image_refused(tmp_path: Path) -> None:
    root = _fake_mnist(tmp_path)
    with pytest.raises(ValueError, match="canvas"):
        make_source("mnist", "train", data_root=root, canvas=20)
    with pytest.raises(ValueError, match="canvas"):
        make_source("mnist", "train", data_root=root, canvas=(60, 27))
    with pytest.raises(ValueError, match="fragment_size"):
        make_source("mnist", "train", data_root=root, canvas=60, fragment_size=40)


# ----------------------------------------------------------------------------------------------------------------
# Cluttered canvas


def _digit_windows(canvas: torch.Tensor, digit: torch.Tensor) -> torch.Tensor:
    """For each placement of the digit's box on the canvas: is the canvas there >= the digit everywhere?"""
    h, w = digit.shape[-2:]
    win = F.unfold(canvas[None], (h, w))[0]  # (C*h*w, positions)
    return (win >= digit.reshape(-1, 1)).all(dim=0)


def test_cluttered_mnist(tmp_path: Path) -> None:
    root = _fake_mnist(tmp_path)
    src = make_source("cluttered_mnist", "train", data_root=root)
    assert src.image_shape == (1, 60, 60) and src.num_classes == 10 and len(src) == 24 - 2  # 2 carved for val
    plain = make_source("mnist", "train", data_root=root)
    idx = torch.tensor([0, 7, 13, 21])
    x, y = src.get(idx)
    digits, labels = plain.get(idx)
    assert x.shape == (4, 1, 60, 60) and torch.equal(y, labels) and 0 <= x.min() and x.max() <= 1
    for canvas, digit in zip(x, digits):
        assert canvas.max() >= digit.max()
        assert _digit_windows(canvas, digit).any()
        assert (canvas > 0).sum() > (digit > 0).sum()
    big = make_source("cluttered_mnist", "test", data_root=root, canvas=100, fragments=8)
    assert big.get(torch.arange(3))[0].shape == (3, 1, 100, 100)


def test_canvas_without_fragments_holds_exactly_the_digit(tmp_path: Path) -> None:
    root = _fake_mnist(tmp_path)
    x, _ = make_source("mnist", "test", data_root=root, canvas=(40, 50), fragments=0).get(torch.arange(5))
    digits, _ = make_source("mnist", "test", data_root=root).get(torch.arange(5))
    assert x.shape == (5, 1, 40, 50)
    assert torch.allclose(x.sum(dim=(1, 2, 3)), digits.sum(dim=(1, 2, 3)))
    assert all(_digit_windows(c, d).any() for c, d in zip(x, digits))
    assert len({tuple(torch.nonzero(c[0])[0].tolist()) for c in x}) > 1


def test_object_corners_are_where_get_places_the_image(tmp_path: Path) -> None:
    """object_corners(i) is the base image's place on canvas i: without fragments the window there is the image
    exactly; with fragments (max-blended) at least the image, in every split."""
    root = _fake_mnist(tmp_path)
    for split, fragments in (("test", 0), ("train", 4), ("val", 4)):
        src = make_source("mnist", split, data_root=root, canvas=(40, 50), fragments=fragments, seed=2)
        idx = torch.arange(len(src)).flip(0)  # the val split: 2 images
        x, _ = src.get(idx)
        digits, _ = make_source("mnist", split, data_root=root).get(idx)
        corners = src.object_corners(idx)
        assert corners.shape == (len(src), 2) and corners.dtype == torch.long
        for canvas, digit, (top, left) in zip(x, digits, corners.tolist()):
            window = canvas[:, top:top + 28, left:left + 28]
            assert torch.equal(window, digit) if fragments == 0 else bool((window >= digit).all())
        assert torch.equal(src.object_corners(idx[[1, 0]]), corners[[1, 0]])  # a pure function of the index
        assert len({tuple(c) for c in corners.tolist()}) > 1


def test_canvas_is_deterministic_per_index(tmp_path: Path) -> None:
    root = _fake_mnist(tmp_path)
    a = make_source("mnist", "train", data_root=root, canvas=60, fragments=4, seed=3)
    b = make_source("mnist", "train", data_root=root, canvas=60, fragments=4, seed=3)
    xa, _ = a.get(torch.tensor([3, 1, 7]))
    xb, _ = b.get(torch.tensor([7, 0, 9, 3, 5, 1]))
    assert torch.equal(xa[0], xb[3]) and torch.equal(xa[1], xb[5]) and torch.equal(xa[2], xb[0])
    assert torch.equal(xa, a.get(torch.tensor([3, 1, 7]))[0])
    other_seed = make_source("mnist", "train", data_root=root, canvas=60, fragments=4, seed=4)
    assert not torch.equal(xa, other_seed.get(torch.tensor([3, 1, 7]))[0])
    test_split = make_source("mnist", "test", data_root=root, canvas=60, fragments=4, seed=3)
    assert not torch.equal(a.get(torch.tensor([0]))[0], test_split.get(torch.tensor([0]))[0])


def test_fragments_come_from_other_images() -> None:
    n = 6
    images = (torch.arange(1, n + 1, dtype=torch.uint8) * 40).view(n, 1, 1, 1).expand(n, 1, 10, 10).clone()
    base = TensorSource(images, torch.arange(n) % 2, 2, "train")
    src = ClutteredCanvasSource(base, 40, fragments=6, fragment_size=4, seed=1)
    x, _ = src.get(torch.arange(n))
    levels = {0} | {40 * (i + 1) for i in range(n)}
    for i, canvas in enumerate(x):
        values = set((canvas * 255).round().int().unique().tolist())
        assert values <= levels and 40 * (i + 1) in values
        assert values - {0, 40 * (i + 1)}, "no fragment of another image is visible"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_canvas_same_on_gpu(tmp_path: Path) -> None:
    root = _fake_mnist(tmp_path)
    idx = torch.tensor([4, 2, 11])
    cpu, ycpu = make_source("cluttered_mnist", "train", data_root=root).get(idx)
    gpu, ygpu = make_source("cluttered_mnist", "train", "cuda", data_root=root).get(idx.cuda())
    assert gpu.device.type == "cuda" and torch.equal(cpu, gpu.cpu()) and torch.equal(ycpu, ygpu.cpu())


def test_download_flag_is_a_no_op_when_files_exist(tmp_path: Path) -> None:
    root = _fake_mnist(tmp_path)
    assert len(make_source("mnist", "train", data_root=root, download=True, val_size=0)) == 24
    assert len(make_source("cifar10", "test", data_root=_fake_cifar10(tmp_path), download=True, verify=False)) == 4


def test_svhn_without_scipy_says_so(tmp_path: Path) -> None:
    try:
        import scipy.io  # noqa: F401
    except ImportError:
        (tmp_path / "train_32x32.mat").write_bytes(b"")
        with pytest.raises(ImportError, match="pip install scipy"):
            make_source("svhn", "train", data_root=tmp_path, verify=False)
    else:
        pytest.skip("scipy is installed")


def test_validation_split_is_carved_from_train_and_held_out_of_it(tmp_path: Path) -> None:
    root = _fake_mnist(tmp_path)
    full = make_source("mnist", "train", data_root=root, val_size=0)
    train, val = (make_source("mnist", split, data_root=root, val_size=5) for split in ("train", "val"))
    assert (len(train), len(val)) == (19, 5)
    x_all = full.get(torch.arange(24))[0].flatten(1)
    x_train, x_val = train.get(torch.arange(19))[0].flatten(1), val.get(torch.arange(5))[0].flatten(1)
    rows = {tuple(r.tolist()) for r in x_all}
    assert {tuple(r.tolist()) for r in x_train} | {tuple(r.tolist()) for r in x_val} == rows
    assert not {tuple(r.tolist()) for r in x_train} & {tuple(r.tolist()) for r in x_val}
    again = make_source("mnist", "val", data_root=root, val_size=5).get(torch.arange(5))[0].flatten(1)
    assert torch.equal(again, x_val)  # the same images every time
    assert len(make_source("mnist", "val", data_root=root)) == 2  # default: a tenth, at most 5,000
    with pytest.raises(ValueError, match="val_size=24 must leave train images"):
        make_source("mnist", "val", data_root=root, val_size=24)


def test_procedural_validation_images_are_neither_train_nor_test_images() -> None:
    train, val, test = (make_source("glyphs", split, train_size=64, test_size=64, val_size=64)
                        for split in ("train", "val", "test"))
    images = [s.get(torch.arange(64))[0].flatten(1) for s in (train, val, test)]
    assert len(val) == 64
    for a, b in ((0, 1), (1, 2)):
        assert not any(torch.equal(images[a][i], images[b][j]) for i in range(64) for j in range(64))
    bigger = make_source("glyphs", "train", train_size=128).get(torch.arange(64, 128))[0].flatten(1)
    assert torch.equal(bigger, images[1])  # val continues the train stream past train_size
