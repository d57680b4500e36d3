"""Registered tasks beside ``gfenv/GlanceFocus-v0``: RAM's cluttered MNIST (60 x 60, 100 x 100), CIFAR-10 on a cluttered
canvas and ImageNet with GFNet's ResNet-50 setting. Each reads a local dataset (``data_root``; never downloads) and a
stage-1 checkpoint trained for it; without either, making the env names what is missing and the command that makes it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gfenv.env import GlanceFocusEnv, GlanceFocusVectorEnv


@dataclass(frozen=True)
class Variant:
    """A registered task: its env id, the env kwargs it is registered with, and how to get its data and model."""

    env_id: str
    name: str
    """Short name: the stage-1 run folder is ``runs/stage1/<name>``."""
    kwargs: dict[str, Any]
    """The registered kwargs (``gymnasium.spec(env_id).kwargs``)."""
    data: str
    """What ``data_root`` must hold."""
    stage1: str = ""
    """Stage-1 settings beyond the registered kwargs (``--env-kwargs`` of train_agent.py)."""
    options: str = ""
    """Extra train_agent.py options for stage 1."""
    official_checkpoints: bool = False
    """Whether GFNet-Pytorch's released ``.pth.tar`` files for this setting can be passed as ``checkpoint``."""

    def stage1_command(self, data_root: Any = None) -> str:
        """The command that trains this task's stage-1 checkpoint (``runs/stage1/<name>/model.pt``)."""
        kw = self.kwargs
        parts = [f"dataset={kw['dataset']}", *(f"{k}={v}" for k, v in kw["dataset_kwargs"].items()),
                 f"backbone={kw['backbone']}", f"patch_size={kw['patch_size']}", f"steps={kw['steps']}",
                 *self.stage1.split(), f"data_root={data_root or '<DATA_ROOT>'}"]
        options = f" {self.options}" if self.options else ""
        return (f"python train_agent.py --stage 1 --env-kwargs {' '.join(parts)}{options} "
                f"--run-dir runs/stage1/{self.name}")

    def env_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``kwargs`` (the registered ones with the user's over them) ready for ``GlanceFocusVectorEnv``: the
        user's ``dataset_kwargs`` are merged over the variant's, and a missing data root or checkpoint raises
        FileNotFoundError naming the data layout and the stage-1 training command."""
        from gfenv import datasets  # noqa: F401  (registers the real datasets, which the env's name check looks up)

        kw = dict(kwargs)
        kw["dataset_kwargs"] = {**self.kwargs["dataset_kwargs"], **(kwargs.get("dataset_kwargs") or {})}
        root = kw.get("data_root") or kw["dataset_kwargs"].get("root")
        problems = []
        if kw.get("source") is None:
            if root is None:
                problems.append(f"pass data_root=<folder>: it must hold {self.data}")
            elif not Path(root).expanduser().is_dir():
                problems.append(f"data_root={root} does not exist: it must hold {self.data}")
        checkpoint = kw.get("checkpoint")
        if kw.get("model") is None and (checkpoint is None or not Path(checkpoint).expanduser().is_file()):
            have = "no stage-1 checkpoint was given" if checkpoint is None else f"checkpoint={checkpoint} is missing"
            official = (" (or GFNet-Pytorch's released ResNet-50 P = 96, T = 5 .pth.tar file)"
                        if self.official_checkpoints else "")
            problems.append(f"{have}; train one with\n  {self.stage1_command(root)}\nthen pass "
                            f"checkpoint=runs/stage1/{self.name}/model.pt{official}")
        if problems:
            raise FileNotFoundError(f"{self.env_id} needs a local dataset and a stage-1 checkpoint (nothing is "
                                    f"downloaded): " + ";\n".join(problems) + ".")
        if self.official_checkpoints and kw.get("model") is None and str(checkpoint).endswith(".pth.tar"):
            kw = self._official(kw, root)
        return kw

    def _official(self, kw: dict[str, Any], root: Any) -> dict[str, Any]:
        """Env kwargs for a GFNet-Pytorch checkpoint: its model, and the ImageNet images standardised for it."""
        from gfenv.official import load_gfnet_checkpoint

        device = kw.get("device", "cpu")
        ckpt = load_gfnet_checkpoint(kw.pop("checkpoint"), arch=kw.get("backbone"), map_location=device)
        if ckpt.patch_size != kw.get("patch_size"):
            raise ValueError(f"{ckpt.path} was trained with patch_size={ckpt.patch_size}; {self.env_id} uses "
                             f"patch_size={kw.get('patch_size')}.")
        kw["model"] = ckpt.model
        if kw.get("source") is None:
            kw["source"] = ckpt.source(root, kw.get("split", "train"), device)
        return kw


CLUTTERED_MNIST_DATA = ("MNIST as torchvision stores it: "
                        "<data_root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte")
VARIANTS: dict[str, Variant] = {v.env_id: v for v in (
    Variant("gfenv/ClutteredMNIST60-v0", "cluttered_mnist_60",
            {"dataset": "cluttered_mnist", "dataset_kwargs": {"canvas": 60, "fragments": 4, "fragment_size": 8},
             "backbone": "small_cnn", "patch_size": 24, "steps": 5, "data_root": None, "checkpoint": None},
            CLUTTERED_MNIST_DATA),
    Variant("gfenv/ClutteredMNIST100-v0", "cluttered_mnist_100",
            {"dataset": "cluttered_mnist", "dataset_kwargs": {"canvas": 100, "fragments": 8, "fragment_size": 8},
             "backbone": "small_cnn", "patch_size": 24, "steps": 7, "data_root": None, "checkpoint": None},
            CLUTTERED_MNIST_DATA),
    Variant("gfenv/CIFAR10Canvas128-v0", "cifar10_canvas_128",
            {"dataset": "cifar10", "dataset_kwargs": {"image_size": 64, "canvas": 128, "fragments": 4,
                                                      "fragment_size": 16},
             "backbone": "small_cnn", "patch_size": 32, "steps": 5, "data_root": None, "checkpoint": None},
            "CIFAR-10 as torchvision stores it: <data_root>/cifar-10-batches-py/{data_batch_1..5,test_batch,"
            "batches.meta}"),
    Variant("gfenv/ImageNetResNet50P96-v0", "imagenet_resnet50_p96",
            {"dataset": "imagefolder", "dataset_kwargs": {"image_size": 224, "crop_fraction": 0.875},
             "backbone": "resnet50", "patch_size": 96, "steps": 5, "data_root": None, "checkpoint": None},
            "ImageNet as an ImageFolder tree: <data_root>/train/<wnid>/*.JPEG and <data_root>/val/<wnid>/*.JPEG "
            "(1000 class folders each)",
            stage1="hidden=1024 glance_mode=bicubic", options="--device cuda --low-memory",
            official_checkpoints=True),
)}


class _VariantEnv(GlanceFocusEnv):
    variant: Variant

    def __init__(self, render_mode: str | None = None, **kwargs: Any):
        super().__init__(render_mode=render_mode, **self.variant.env_kwargs(kwargs))


class _VariantVectorEnv(GlanceFocusVectorEnv):
    variant: Variant

    def __init__(self, num_envs: int = 16, **kwargs: Any):
        super().__init__(num_envs=num_envs, **self.variant.env_kwargs(kwargs))


class ClutteredMNIST60Env(_VariantEnv):
    """
    ## Description
    RAM's cluttered translated MNIST (Mnih et al., 2014) as a glance-and-focus task: each 28 x 28 digit at a random
    place on a 60 x 60 black canvas with 4 clutter fragments of 8 x 8 cut from other digits. The glance (the canvas
    resized to 24 x 24) shows roughly where the digit is; 24 x 24 focus patches read it at full resolution.
    Everything else (spaces, rewards, info keys, episode end) is ``gfenv/GlanceFocus-v0``'s; see
    ``GlanceFocusVectorEnv``.

    ## Arguments
    ``gymnasium.make("gfenv/ClutteredMNIST60-v0", data_root=..., checkpoint=...)`` (``make_vec`` for the batched env).
    Registered kwargs: ``dataset="cluttered_mnist"``, ``dataset_kwargs={"canvas": 60, "fragments": 4,
    "fragment_size": 8}``, ``backbone="small_cnn"``, ``patch_size=24``, ``steps=5``, ``data_root=None``,
    ``checkpoint=None``. Required: ``data_root``, a folder with ``MNIST/raw/`` as torchvision stores it, and
    ``checkpoint``, a stage-1 model for this task (the error message without one prints the command that trains it:
    ``python train_agent.py --stage 1 --env-kwargs dataset=cluttered_mnist canvas=60 fragments=4 fragment_size=8
    backbone=small_cnn patch_size=24 steps=5 data_root=DATA --run-dir runs/stage1/cluttered_mnist_60``).
    Any other ``GlanceFocusVectorEnv`` argument may be passed; ``dataset_kwargs`` are merged over the registered ones.

    ## Version History
    - v0: initial release.
    """

    variant = VARIANTS["gfenv/ClutteredMNIST60-v0"]


class ClutteredMNIST60VectorEnv(_VariantVectorEnv):
    """The batched ``gfenv/ClutteredMNIST60-v0`` (``gymnasium.make_vec``); see ``ClutteredMNIST60Env``."""

    variant = VARIANTS["gfenv/ClutteredMNIST60-v0"]


class ClutteredMNIST100Env(_VariantEnv):
    """
    ## Description
    RAM's larger cluttered translated MNIST: each 28 x 28 digit at a random place on a 100 x 100 canvas with 8 clutter
    fragments of 8 x 8. The glance (24 x 24, about 4x smaller) barely resolves the digit, so where the 24 x 24 focus
    patches go matters; T = 7 glimpses (the glance and 6 patches, as RAM's 6-glimpse model). Spaces, rewards, info
    keys and episode end are ``gfenv/GlanceFocus-v0``'s; see ``GlanceFocusVectorEnv``.

    ## Arguments
    Registered kwargs: ``dataset="cluttered_mnist"``, ``dataset_kwargs={"canvas": 100, "fragments": 8,
    "fragment_size": 8}``, ``backbone="small_cnn"``, ``patch_size=24``, ``steps=7``, ``data_root=None``,
    ``checkpoint=None``. Required: ``data_root`` (``MNIST/raw/`` as torchvision stores it) and ``checkpoint`` (trained
    by ``python train_agent.py --stage 1 --env-kwargs dataset=cluttered_mnist canvas=100 fragments=8
    fragment_size=8 backbone=small_cnn patch_size=24 steps=7 data_root=DATA --run-dir
    runs/stage1/cluttered_mnist_100``).

    ## Version History
    - v0: initial release.
    """

    variant = VARIANTS["gfenv/ClutteredMNIST100-v0"]


class ClutteredMNIST100VectorEnv(_VariantVectorEnv):
    """The batched ``gfenv/ClutteredMNIST100-v0`` (``gymnasium.make_vec``); see ``ClutteredMNIST100Env``."""

    variant = VARIANTS["gfenv/ClutteredMNIST100-v0"]


class CIFAR10Canvas128Env(_VariantEnv):
    """
    ## Description
    CIFAR-10 made a glance-and-focus task: each 32 x 32 image is upsampled to 64 x 64 and put at a random place on a
    128 x 128 black canvas with 4 clutter fragments of 16 x 16 from other images. The 32 x 32 glance shows the object
    at a quarter of its canvas size (half its original resolution); a 32 x 32 focus patch sees a quarter of the object
    at full resolution, so the four focus steps of T = 5 can cover it. (Upsampling alone would not do: a 32 x 32
    glance of an upsampled CIFAR image already holds every original pixel, and focus patches would add nothing.)
    Spaces, rewards, info keys and episode end are ``gfenv/GlanceFocus-v0``'s; see ``GlanceFocusVectorEnv``.

    ## Arguments
    Registered kwargs: ``dataset="cifar10"``, ``dataset_kwargs={"image_size": 64, "canvas": 128, "fragments": 4,
    "fragment_size": 16}``, ``backbone="small_cnn"``, ``patch_size=32``, ``steps=5``, ``data_root=None``,
    ``checkpoint=None``. Required: ``data_root`` (``cifar-10-batches-py/`` as torchvision stores it) and ``checkpoint``
    (trained by ``python train_agent.py --stage 1 --env-kwargs dataset=cifar10 image_size=64 canvas=128
    fragments=4 fragment_size=16 backbone=small_cnn patch_size=32 steps=5 data_root=DATA --run-dir
    runs/stage1/cifar10_canvas_128``).

    ## Version History
    - v0: initial release.
    """

    variant = VARIANTS["gfenv/CIFAR10Canvas128-v0"]


class CIFAR10Canvas128VectorEnv(_VariantVectorEnv):
    """The batched ``gfenv/CIFAR10Canvas128-v0`` (``gymnasium.make_vec``); see ``CIFAR10Canvas128Env``."""

    variant = VARIANTS["gfenv/CIFAR10Canvas128-v0"]


class ImageNetResNet50P96Env(_VariantEnv):
    """
    ## Description
    GFNet's main ImageNet setting: 224 x 224 centre crops (resize to 256, crop 224), ResNet-50 glance and focus
    encoders, 96 x 96 patches, T = 5 glimpses, a GRU classifier. The policy input (observation ``gfnet``) is the
    2048 x 3 x 3 feature map of the previous glimpse. Spaces, rewards, info keys and episode end are
    ``gfenv/GlanceFocus-v0``'s; see ``GlanceFocusVectorEnv``. Meant for a GPU.

    ## Arguments
    Registered kwargs: ``dataset="imagefolder"``, ``dataset_kwargs={"image_size": 224, "crop_fraction": 0.875}``,
    ``backbone="resnet50"``, ``patch_size=96``, ``steps=5``, ``data_root=None``, ``checkpoint=None``. Required:
    ``data_root``, an ImageNet ImageFolder tree (``train/<wnid>/``, ``val/<wnid>/``), and ``checkpoint``: a stage-1
    model trained by ``python train_agent.py --stage 1 --env-kwargs dataset=imagefolder image_size=224
    crop_fraction=0.875 backbone=resnet50 patch_size=96 steps=5 hidden=1024 glance_mode=bicubic data_root=DATA
    --device cuda --low-memory --run-dir runs/stage1/imagenet_resnet50_p96``, or GFNet-Pytorch's released
    ResNet-50 P = 96, T = 5 ``.pth.tar``, which is loaded with ``gfenv.official`` (its images are then standardised
    with the ImageNet mean and std, as its encoders expect).

    ## Version History
    - v0: initial release.
    """

    variant = VARIANTS["gfenv/ImageNetResNet50P96-v0"]


class ImageNetResNet50P96VectorEnv(_VariantVectorEnv):
    """The batched ``gfenv/ImageNetResNet50P96-v0`` (``gymnasium.make_vec``); see ``ImageNetResNet50P96Env``."""

    variant = VARIANTS["gfenv/ImageNetResNet50P96-v0"]


ENTRY_POINTS = {cls.variant.env_id: cls.__name__.removesuffix("Env") for cls in (
    ClutteredMNIST60Env, ClutteredMNIST100Env, CIFAR10Canvas128Env, ImageNetResNet50P96Env)}


def register_variants() -> None:
    """Register every variant with gymnasium (``import gfenv`` does it)."""
    import gymnasium

    for env_id, stem in ENTRY_POINTS.items():
        if env_id not in gymnasium.registry:
            gymnasium.register(env_id, entry_point=f"gfenv.task:{stem}Env",
                               vector_entry_point=f"gfenv.task:{stem}VectorEnv",
                               kwargs=copy.deepcopy(VARIANTS[env_id].kwargs))
