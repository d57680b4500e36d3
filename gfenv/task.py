"""What a task is, and the one way to name it everywhere.

A task is the data (``dataset``, ``data_root`` and the dataset's own words: ``canvas``, ``fragments``,
``fragment_size``, ``image_size``, ...) and the model that reads it (``patch_size``, ``steps``, ``backbone``,
``classifier``, ``hidden``, ``glance_mode``, and its stage-1 ``checkpoint``). The same flat words name it in
``gymnasium.make``, the env's constructor, every stage of ``train_agent.py``, ``evaluate_agent.py`` and the bench;
``dataset_kwargs={...}`` is still taken, folded into the flat words. ``resolve_task`` turns the words into a
``TaskSpec`` (the source to read, the checkpoint to load, what to check the checkpoint against); a stage-1
checkpoint records its task (``task`` in its meta), so naming the checkpoint names the rest.

Registered tasks (``TASKS``, ``register_task``) are env ids with their words; ``import gfenv`` registers them with
gymnasium. Adding a task is one ``register_task(Task(...))`` call.
"""

from __future__ import annotations

import copy
import inspect
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium

from gfenv.checkpoint import load_checkpoint
from gfenv.data import DATASETS, check_dataset_words, load_builtin_datasets, make_source
from gfenv.utils import InvalidType

ASSETS = Path(__file__).parent / "assets"
MODEL_WORDS = ("patch_size", "steps", "backbone", "classifier", "hidden", "glance_mode")
"""Words that describe the model (checked against the checkpoint) rather than the data."""
STAGE1_DEFAULTS = {"patch_size": 32, "steps": 5, "backbone": "small_cnn"}
"""What stage 1 trains when a task leaves these words out."""
DEFAULT_DATASET = "glyphs"
ENV_SETTINGS = ("num_envs", "split", "num_classes", "action", "grid", "observation", "reward", "mac_cost", "sampling",
                "device", "seed", "render_mode", "autoreset_mode", "max_episode_steps", "cache", "cache_dir",
                "cache_images", "model", "source")
"""The env's arguments that are not the task: how episodes run, not what is read."""
SIZE_WORDS = ("train_size", "test_size", "val_size")
"""Dataset words that change how many images a split has, not which task it is."""


@dataclass(frozen=True)
class Task:
    """A registered task: an env id and the words that name its data and model."""

    env_id: str
    words: dict[str, Any]
    """The registered kwargs (``gymnasium.spec(env_id).kwargs``): dataset, dataset words, model words."""
    summary: str
    """One line: what the images are and what makes looking matter."""
    data: str = ""
    """What ``data_root`` must hold and how to get it; empty for procedural tasks."""
    checkpoint: str | None = None
    """The shipped stage-1 checkpoint (a file of ``gfenv/assets``); None: train one with stage 1."""
    stage1_options: str = ""
    """``train_agent.py`` options its stage 1 needs (e.g. ``--device cuda --low-memory``)."""
    stage1: dict[str, Any] = field(default_factory=dict)
    """Stage-1 settings (``Stage1Config`` fields, e.g. ``epochs``) this task's stage 1 uses over the defaults; the
    user's ``--hyperparams`` and flags override them (``stage_settings``)."""
    stage3: dict[str, Any] = field(default_factory=dict)
    """Stage-3 settings (``Stage3Config`` fields and ``episodes``) this task's stage 3 uses over the defaults; a
    user's own settings override them (``stage_settings``)."""

    @property
    def name(self) -> str:
        """The id without its namespace, e.g. ``GlanceFocus-v0``: the run folders' name."""
        return self.env_id.rsplit("/", 1)[-1]

    @property
    def steps(self) -> int:
        return int(self.words.get("steps", STAGE1_DEFAULTS["steps"]))


TASKS: dict[str, Task] = {}
SPLIT_IDS: dict[str, tuple[str, str]] = {}
"""The split ids ``register_task`` adds beside each task's id: ``<namespace>/<name>-train-v<n>`` (or ``-test-``) ->
(the task's id, the split)."""
SPLIT_ID_SPLITS = ("train", "test")


def split_id(env_id: str, split: str) -> str:
    """``gfenv/GlanceFocus-v0`` -> ``gfenv/GlanceFocus-train-v0`` (Gymnasium's ``[namespace/]name[-v<n>]``: the split
    goes at the end of the name)."""
    namespace, name, version = gymnasium.envs.registration.parse_env_id(env_id)
    return gymnasium.envs.registration.get_env_id(namespace, f"{name}-{split}", version)


def register_task(task: Task) -> Task:
    """Add ``task`` to ``TASKS`` and register its id with gymnasium (single and batched entry points,
    ``max_episode_steps`` = T - 1), with an id per split beside it (``split_id``: ``...-train-v0``, ``...-test-v0``,
    the same task with ``split`` fixed); an id taken by another task is refused."""
    if task.env_id in TASKS and TASKS[task.env_id] != task:
        raise ValueError(f"A task with id {task.env_id!r} is already registered.")
    canonical = canonical_words(task.words)
    if canonical != task.words:
        raise ValueError(f"Task {task.env_id}: give its words flat, as {canonical}.")
    TASKS[task.env_id] = task
    ids = {task.env_id: {}, **{split_id(task.env_id, s): {"split": s} for s in SPLIT_ID_SPLITS}}
    for env_id, extra in ids.items():
        if env_id not in gymnasium.registry:
            gymnasium.register(env_id, entry_point="gfenv.env:GlanceFocusEnv",
                               vector_entry_point="gfenv.env:GlanceFocusVectorEnv",
                               kwargs={**copy.deepcopy(task.words), **extra}, max_episode_steps=task.steps - 1)
        if extra:
            SPLIT_IDS[env_id] = (task.env_id, extra["split"])
    return task


def registered_words(env_id: str) -> dict[str, Any]:
    """The words a registered gfenv id names (``gymnasium.spec(env_id).kwargs``, flat) for the project's commands,
    which choose the split themselves: a per-split id (``...-test-v0``) is refused, naming the task's own id."""
    if env_id in SPLIT_IDS:
        base, split = SPLIT_IDS[env_id]
        raise ValueError(f"{env_id} is {base} with split={split!r} fixed, for Gymnasium clients; the gfenv commands "
                         f"choose the split themselves: use {base}.")
    return canonical_words(gymnasium.spec(env_id).kwargs)


# ------------------------------------------------------------------------------------------------- resolution
def canonical_words(words: Mapping[str, Any]) -> dict[str, Any]:
    """``words`` flat: the entries of ``dataset_kwargs`` (a dict, or YAML text) moved to the top level; None values
    dropped. The same setting given both ways with different values is refused, naming both; ``root`` is refused in
    favour of ``data_root``."""
    flat = {k: v for k, v in words.items() if k != "dataset_kwargs" and v is not None}
    nested = words.get("dataset_kwargs") or {}
    if isinstance(nested, str):
        import yaml

        nested = yaml.safe_load(nested) or {}
    if not isinstance(nested, Mapping):
        raise InvalidType(f"dataset_kwargs={nested!r} must be a dict of dataset settings, e.g. "
                         "dataset_kwargs={'canvas': 60}; or give them flat: canvas=60.")
    for key, value in nested.items():
        if value is None:
            continue
        if key in flat and flat[key] != value:
            raise ValueError(f"{key} is given twice: {key}={flat[key]!r} and dataset_kwargs={{{key!r}: {value!r}}}; "
                             f"give it once (flat: {key}=...).")
        flat[key] = value
    if "root" in flat:
        raise ValueError(f"root={flat['root']!r}: the dataset folder is named data_root; pass "
                         f"data_root={flat['root']}.")
    return flat


def task_words(words: Mapping[str, Any]) -> dict[str, Any]:
    """``canonical_words(words)`` without the env settings (``ENV_SETTINGS``): the words a training stage reads."""
    return {k: v for k, v in canonical_words(words).items() if k not in ENV_SETTINGS}


@dataclass
class TaskSpec:
    """A task resolved from its words: what the env (or a training stage) reads and loads."""

    dataset: str
    dataset_words: dict[str, Any] = field(default_factory=dict)
    """The dataset's own settings (canvas, fragments, image_size, train_size, ...)."""
    data_root: str | None = None
    model_words: dict[str, Any] = field(default_factory=dict)
    """The model words given (patch_size, steps, backbone, ...): checked against the checkpoint."""
    checkpoint: Path | None = None
    """The stage-1 checkpoint to load; None when the caller brings its own model (or none is needed)."""
    env_id: str | None = None
    """The registered task these words name, if any."""

    @property
    def source_kwargs(self) -> dict[str, Any]:
        """What ``make_source`` takes besides dataset, split and device: the dataset words and ``data_root``."""
        return {**self.dataset_words, **({"data_root": self.data_root} if self.data_root is not None else {})}

    @property
    def words(self) -> dict[str, Any]:
        """The task in flat words (what runs record): dataset, data_root, dataset words, model words."""
        out = {"dataset": self.dataset, **({"data_root": self.data_root} if self.data_root is not None else {})}
        return {**out, **self.dataset_words, **self.model_words}

    def source(self, split: str, device: Any = "cpu"):
        """The image source of ``split`` on ``device``."""
        return make_source(self.dataset, split, device, **self.source_kwargs)

    def stage1_command(self) -> str:
        """The ``train_agent.py`` command that trains this task's stage-1 checkpoint, complete as printed."""
        words = {**{"dataset": self.dataset}, **self.dataset_words, **STAGE1_DEFAULTS, **self.model_words}
        if self.data_root is not None or "data_root" in inspect.signature(DATASETS[self.dataset]).parameters:
            words["data_root"] = self.data_root or "<DATA_ROOT>"  # a dataset that reads a local folder
        options = TASKS[self.env_id].stage1_options if self.env_id in TASKS else ""
        args = " ".join(shlex.quote(f"{k}={v}") for k, v in words.items())
        return (f"python train_agent.py --stage 1 --env-kwargs {args}{' ' + options if options else ''} "
                f"--run-dir {self.stage1_run_dir()}")

    def stage1_run_dir(self) -> str:
        """``runs/stage1/<name>``: the registered task's name, else the dataset and its words."""
        if self.env_id is not None:
            return f"runs/stage1/{TASKS[self.env_id].name}"
        parts = [self.dataset, *(f"{k}{v}" for k, v in self.dataset_words.items() if k not in ("seed",))]
        return "runs/stage1/" + "_".join(str(p).replace("/", "-").replace(" ", "") for p in parts)


def stage_settings(env_id: str | None, stage: str, user: dict[str, Any], announce: bool = False) -> dict[str, Any]:
    """The settings of ``stage`` (``"stage1"`` or ``"stage3"``) for a run on ``env_id``: the ones the task registers
    (``Task.stage1`` / ``Task.stage3``; none for an unregistered id), then the user's. ``announce`` prints the
    registered ones, if any."""
    task = TASKS.get(env_id) if env_id else None
    registered = dict(getattr(task, stage)) if task is not None else {}
    if announce and registered:
        print(f"stage {stage[-1]}: {env_id}'s settings {' '.join(f'{k}={v}' for k, v in registered.items())} "
              f"(--hyperparams override them)")
    return {**registered, **user}


def recorded_task(checkpoint: str | Path) -> tuple[str | None, dict[str, Any]]:
    """(env id, task words) that a gfenv checkpoint records (``meta["env"]``, ``meta["task"]``: written by stage 1
    and stage 3); (None, {}) for files that record none (older checkpoints, GFNet-Pytorch's ``.pth.tar``)."""
    path = Path(checkpoint).expanduser()
    if path.name.endswith(".pth.tar") or not path.is_file():
        return None, {}
    meta = load_checkpoint(path).get("meta") or {}
    return meta.get("env"), dict(meta.get("task") or {})


def _data_problems(spec: TaskSpec) -> list[str]:
    """What is wrong with ``data_root`` for a dataset that reads a local folder: missing, or not a folder."""
    if "data_root" not in inspect.signature(DATASETS[spec.dataset]).parameters:
        return []
    layout = TASKS[spec.env_id].data if spec.env_id in TASKS and TASKS[spec.env_id].data else (
        f"the files of dataset {spec.dataset!r}")
    if spec.data_root is None:
        return [f"pass data_root=<folder>: {spec.env_id or spec.dataset} reads a local folder (nothing is "
                f"downloaded) that must hold {layout}"]
    if not Path(spec.data_root).expanduser().is_dir():
        return [f"data_root={spec.data_root} does not exist: it must hold {layout}"]
    return []


def identify(dataset: str, dataset_words: Mapping[str, Any]) -> str | None:
    """The registered task with exactly this data (its dataset and dataset words; split sizes aside), if any."""
    for task in TASKS.values():
        words = dict(task.words)
        if words.pop("dataset", DEFAULT_DATASET) != dataset:
            continue
        mine = {k: v for k, v in words.items() if k not in (*MODEL_WORDS, *ENV_SETTINGS, "data_root", "checkpoint")}
        if {k: v for k, v in dataset_words.items() if k not in SIZE_WORDS} == mine:
            return task.env_id
    return None


def resolve_task(words: Mapping[str, Any], need_checkpoint: bool = True) -> TaskSpec:
    """The task named by ``words`` (flat, or with ``dataset_kwargs``), checked.

    ``checkpoint`` names the stage-1 model; a checkpoint that records its task fills in the words not given (the
    dataset, its settings and ``data_root``) and refuses words that contradict it. Without ``checkpoint`` a
    registered task's shipped checkpoint is used; when there is none (and ``need_checkpoint``) FileNotFoundError
    gives the complete stage-1 command that trains it.
    """
    flat = canonical_words(words)
    checkpoint = flat.pop("checkpoint", None)
    model_words = {k: flat.pop(k) for k in MODEL_WORDS if k in flat}
    if checkpoint is not None and checkpoint != "default":
        for key, value in recorded_task(checkpoint)[1].items():
            if key in MODEL_WORDS:
                continue
            if key not in flat:
                flat[key] = value
            elif key != "data_root" and flat[key] != value:
                raise ValueError(f"checkpoint={checkpoint} was trained on {key}={value!r}, but the task asks for "
                                 f"{key}={flat[key]!r}: drop {key} (the checkpoint names it) or use a checkpoint "
                                 f"trained for {key}={flat[key]!r}.")
    dataset = flat.pop("dataset", DEFAULT_DATASET)
    if dataset not in load_builtin_datasets():
        raise ValueError(f"Unknown dataset {dataset!r}. Valid datasets: {', '.join(sorted(DATASETS))}.")
    data_root = flat.pop("data_root", None)
    check_dataset_words(dataset, flat)  # a word no argument takes is refused now, not after a checkpoint search
    spec = TaskSpec(dataset, flat, None if data_root is None else str(data_root), model_words)
    spec.env_id = identify(dataset, flat)
    problems = _data_problems(spec)
    if checkpoint == "default" or (checkpoint is None and spec.env_id is not None and TASKS[spec.env_id].checkpoint):
        # "default": the shipped encoders of the task the words name, else (glyphs on other settings) the default task's
        owner = spec.env_id if spec.env_id is not None else identify(dataset, {})
        shipped = TASKS[owner].checkpoint if owner is not None else None
        if shipped is None:
            problems.append(f"checkpoint='default': no stage-1 checkpoint ships for dataset={dataset!r} with "
                            f"{flat or 'its default settings'}; train one with\n  {spec.stage1_command()}")
        spec.checkpoint = ASSETS / shipped if shipped else None
    elif checkpoint is not None:
        spec.checkpoint = Path(checkpoint).expanduser()
        if not spec.checkpoint.is_file() and need_checkpoint:
            problems.append(f"checkpoint={checkpoint} does not exist; train it with\n  {spec.stage1_command()}\n"
                            f"then pass checkpoint={spec.stage1_run_dir()}/model.pt")
    elif need_checkpoint:
        what = f"the registered task {spec.env_id}" if spec.env_id else f"dataset={dataset!r} with {flat or 'defaults'}"
        problems.append(f"no stage-1 checkpoint for {what}: no encoders ship for it (nothing is downloaded). Train "
                        f"them with\n  {spec.stage1_command()}\nthen pass checkpoint={spec.stage1_run_dir()}/model.pt")
    if problems:
        raise FileNotFoundError(";\n".join(problems) + ".")
    return spec


# ------------------------------------------------------------------------------------------------ the tasks
CANVAS_MNIST_DATA = ("MNIST as torchvision stores it: "
                     "<data_root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte")
FASHION_MNIST_DATA = ("Fashion-MNIST as torchvision stores it: <data_root>/FashionMNIST/raw/{train,t10k}-"
                      "{images-idx3,labels-idx1}-ubyte (on Debian/Ubuntu: apt-get install dataset-fashion-mnist, then "
                      "gunzip its files from /usr/share/datasets/fashion-mnist/ into that folder)")

BUILTIN_TASKS = (
    Task("gfenv/GlanceFocus-v0", {},
         "cluttered glyphs, 128 x 128: a glyph's 1-2 px texture names the class, its silhouette (visible at the "
         "glance) tells where to look; one well-placed patch suffices (the quick task)",
         checkpoint="glyphs_small_cnn.pt"),
    Task("gfenv/GlyphPointer-v0",
         {"dataset": "pointer", "patch_size": 32, "steps": 4, "backbone": "small_cnn", "action": "grid", "grid": 5},
         "one pointer hop, 160 x 160 in 5 x 5 tiles (a grid cell is a tile): a key's texture names the quadrant of "
         "the target among four look-alikes, the target's texture its value; 12 classes, T = 4 (look twice, in order)",
         checkpoint="pointer_small_cnn.pt", stage1_options="--epochs 0.75"),
    Task("gfenv/GlyphChain-v0",
         {"dataset": "chain", "patch_size": 32, "steps": 8, "backbone": "small_cnn", "action": "grid", "grid": 7},
         "two pointer hops, 224 x 224 in 7 x 7 tiles: key -> node -> node, each read naming where the next lies; "
         "32 classes, T = 8 (the long-horizon task)",
         checkpoint="chain_small_cnn.pt", stage1_options="--epochs 3",
         stage3={"step_weights": "last", "actions": "deterministic", "train_focus": False}),
    Task("gfenv/ClutteredMNIST60-v0",
         {"dataset": "cluttered_mnist", "canvas": 60, "fragments": 4, "fragment_size": 8, "backbone": "small_cnn",
          "patch_size": 24, "steps": 5},
         "RAM's cluttered translated MNIST: a digit on a 60 x 60 canvas with 4 clutter fragments of 8 x 8",
         CANVAS_MNIST_DATA),
    Task("gfenv/ClutteredMNIST100-v0",
         {"dataset": "cluttered_mnist", "canvas": 100, "fragments": 8, "fragment_size": 8, "backbone": "small_cnn",
          "patch_size": 24, "steps": 7},
         "RAM's larger cluttered MNIST: 100 x 100 with 8 fragments; the 24 x 24 glance barely resolves the digit",
         CANVAS_MNIST_DATA),
    Task("gfenv/FashionMNIST60-v0",
         {"dataset": "fashion_mnist", "canvas": 60, "fragments": 4, "fragment_size": 8, "backbone": "small_cnn",
          "patch_size": 24, "steps": 5},
         "RAM's cluttered-canvas protocol on Fashion-MNIST: a garment on a 60 x 60 canvas with 4 fragments of 8 x 8",
         FASHION_MNIST_DATA, stage1={"epochs": 12},
         stage3={"lr_schedule": "cosine", "episodes": 32768}),
    Task("gfenv/FashionMNIST100-v0",
         {"dataset": "fashion_mnist", "canvas": 100, "fragments": 8, "fragment_size": 8, "backbone": "small_cnn",
          "patch_size": 24, "steps": 5},
         "Fashion-MNIST on a 100 x 100 canvas with 8 fragments: a 24 x 24 patch placed at random rarely shows the "
         "garment, so where to look matters",
         FASHION_MNIST_DATA),
    Task("gfenv/CIFAR10Canvas128-v0",
         {"dataset": "cifar10", "image_size": 64, "canvas": 128, "fragments": 4, "fragment_size": 16,
          "backbone": "small_cnn", "patch_size": 32, "steps": 5},
         "CIFAR-10 upsampled to 64 x 64 on a 128 x 128 cluttered canvas: a 32 x 32 patch sees a quarter of the "
         "object",
         "CIFAR-10 as torchvision stores it: "
         "<data_root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}"),
    Task("gfenv/ImageNetResNet50P96-v0",
         {"dataset": "imagefolder", "image_size": 224, "crop_fraction": 0.875, "backbone": "resnet50",
          "patch_size": 96, "steps": 5},
         "GFNet's ImageNet setting: 224 x 224 centre crops, ResNet-50 encoders, 96 x 96 patches (meant for a GPU); "
         "GFNet-Pytorch's released ResNet-50 P = 96 .pth.tar loads as its checkpoint",
         "ImageNet as an ImageFolder tree: <data_root>/train/<wnid>/*.JPEG and <data_root>/val/<wnid>/*.JPEG (1000 "
         "class folders each)",
         stage1_options="--device cuda --low-memory --hyperparams hidden=1024 glance_mode=bicubic"),
)


def register_builtin_tasks() -> None:
    """Register the built-in tasks (``import gfenv`` does it)."""
    for task in BUILTIN_TASKS:
        register_task(task)
