"""Tasks and how they are named: every registered id carries its documented flat words; the same words name a task in
gymnasium.make, the env and every stage; a task without its data or stage-1 checkpoint names both and prints the
complete command that trains the checkpoint; a stage-1 checkpoint records its task. No downloads."""

from __future__ import annotations

import pickle
import shlex
import struct
from pathlib import Path

import gymnasium
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

import gfenv
from gfenv.checkpoint import CheckpointError, save_model
from gfenv.cli import train as train_agent
from gfenv.models import GFNetModel, ModelConfig
from gfenv.official import NormalizedSource
from gfenv.task import TASKS, canonical_words, resolve_task

DOCUMENTED = {
    "gfenv/ClutteredMNIST60-v0": {"dataset": "cluttered_mnist", "canvas": 60, "fragments": 4, "fragment_size": 8,
                                  "backbone": "small_cnn", "patch_size": 24, "steps": 5},
    "gfenv/ClutteredMNIST100-v0": {"dataset": "cluttered_mnist", "canvas": 100, "fragments": 8, "fragment_size": 8,
                                   "backbone": "small_cnn", "patch_size": 24, "steps": 7},
    "gfenv/FashionMNIST60-v0": {"dataset": "fashion_mnist", "canvas": 60, "fragments": 4, "fragment_size": 8,
                                "backbone": "small_cnn", "patch_size": 24, "steps": 5},
    "gfenv/FashionMNIST100-v0": {"dataset": "fashion_mnist", "canvas": 100, "fragments": 8, "fragment_size": 8,
                                 "backbone": "small_cnn", "patch_size": 24, "steps": 5},
    "gfenv/CIFAR10Canvas128-v0": {"dataset": "cifar10", "image_size": 64, "canvas": 128, "fragments": 4,
                                  "fragment_size": 16, "backbone": "small_cnn", "patch_size": 32, "steps": 5},
    "gfenv/ImageNetResNet50P96-v0": {"dataset": "imagefolder", "image_size": 224, "crop_fraction": 0.875,
                                     "backbone": "resnet50", "patch_size": 96, "steps": 5},
}


@pytest.mark.parametrize("env_id", DOCUMENTED)
def test_task_is_registered_with_its_documented_words(env_id):
    spec = gymnasium.spec(env_id)
    assert spec.kwargs == DOCUMENTED[env_id] == TASKS[env_id].words
    assert (spec.entry_point, spec.vector_entry_point) == ("gfenv.env:GlanceFocusEnv", "gfenv.env:GlanceFocusVectorEnv")


@pytest.mark.parametrize("env_id", DOCUMENTED)
def test_making_a_task_without_data_names_the_data_root_and_the_training_command(env_id, tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        gymnasium.make(env_id)
    message = str(err.value)
    assert "nothing is downloaded" in message and "python train_agent.py --stage 1" in message
    run = f"runs/stage1/{TASKS[env_id].name}"
    assert f"--run-dir {run}" in message and f"checkpoint={run}/model.pt" in message
    with pytest.raises(FileNotFoundError, match=r"data_root=\S*missing does not exist"):
        gymnasium.make_vec(env_id, num_envs=2, data_root=str(tmp_path / "missing"), checkpoint="x.pt")
    with pytest.raises(FileNotFoundError) as err:
        gymnasium.make_vec(env_id, num_envs=2, data_root=str(tmp_path), checkpoint=str(tmp_path / "none.pt"))
    message = str(err.value)
    assert "none.pt does not exist" in message and f"data_root={tmp_path} " in message  # trains on the given folder


@pytest.mark.parametrize("env_id", DOCUMENTED)
def test_the_printed_training_command_trains_the_registered_task(env_id, tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        gymnasium.make_vec(env_id, data_root=str(tmp_path))
    message = str(err.value)
    command = shlex.split(next(line for line in message.splitlines() if "python train_agent.py" in line))
    assert command[:2] == ["python", "train_agent.py"]
    cfg, spec = train_agent.stage1_config(train_agent.build_parser().parse_args(command[2:]))
    words = DOCUMENTED[env_id]
    assert (cfg.dataset, cfg.backbone, cfg.patch_size, cfg.steps) == (
        words["dataset"], words["backbone"], words["patch_size"], words["steps"])
    dataset_words = {k: v for k, v in words.items() if k not in ("dataset", "backbone", "patch_size", "steps")}
    assert cfg.dataset_kwargs == {**dataset_words, "data_root": str(tmp_path)} and cfg.env_id == env_id == spec.env_id
    if env_id == "gfenv/ImageNetResNet50P96-v0":
        assert (cfg.hidden, cfg.glance_mode, cfg.device) == (1024, "bicubic", "cuda")


def test_a_setting_named_twice_is_refused_with_both_values():
    with pytest.raises(ValueError, match=r"canvas=60 and dataset_kwargs=\{'canvas': 100\}"):
        canonical_words({"canvas": 60, "dataset_kwargs": {"canvas": 100}})
    with pytest.raises(ValueError, match="canvas=60 and dataset_kwargs"):
        gfenv.GlanceFocusVectorEnv(num_envs=1, canvas=60, dataset_kwargs={"canvas": 100})
    with pytest.raises(ValueError, match="data_root=/d"):
        resolve_task({"dataset": "mnist", "root": "/d"})
    assert canonical_words({"canvas": 60, "dataset_kwargs": {"canvas": 60, "fragments": 2}}) == {
        "canvas": 60, "fragments": 2}


def test_flat_words_and_dataset_kwargs_name_the_same_task():
    flat = gfenv.GlanceFocusVectorEnv(num_envs=2, checkpoint="default", canvas=96, train_size=8)
    nested = gfenv.GlanceFocusVectorEnv(num_envs=2, checkpoint="default", dataset_kwargs={"canvas": 96,
                                                                                          "train_size": 8})
    assert flat.task == nested.task and flat.source.image_shape == (1, 96, 96) and len(flat.source) == 8
    with pytest.raises(ValueError, match="does not take canvs"):
        gfenv.GlanceFocusVectorEnv(num_envs=1, checkpoint="default", canvs=96)


def test_a_stage1_checkpoint_records_its_task_and_names_it_for_the_env(tmp_path):
    args = ["--stage", "1", "--env-kwargs", "canvas=64", "train_size=32", "test_size=16", "--epochs", "1",
            "--batch-size", "16", "--hyperparams", "eval_images=16", "--run-dir", str(tmp_path), "--no-progress"]
    assert train_agent.main(args) == 0
    env = gymnasium.make_vec("gfenv/GlanceFocus-v0", num_envs=2, checkpoint=str(tmp_path / "model.pt"))
    assert env.source.image_shape == (1, 64, 64) and len(env.source) == 32
    assert env.task.words == {"dataset": "glyphs", "canvas": 64, "train_size": 32, "test_size": 16}
    with pytest.raises(ValueError, match="trained on canvas=64, but the task asks for canvas=96"):
        gymnasium.make_vec("gfenv/GlanceFocus-v0", num_envs=2, checkpoint=str(tmp_path / "model.pt"), canvas=96)


def _write_idx(path: Path, array: np.ndarray) -> None:
    magic = (0x08 << 8) | array.ndim
    path.write_bytes(struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes())


def _fake_mnist(root: Path, n: int = 12) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8))
    return root


def test_cluttered_mnist_tasks_run_with_local_data_and_a_checkpoint(tmp_path):
    root = _fake_mnist(tmp_path / "data")
    torch.manual_seed(0)
    checkpoint = save_model(tmp_path / "model.pt", GFNetModel(ModelConfig(num_classes=10, in_channels=1,
                                                                          patch_size=24, steps=5)))
    env = gymnasium.make("gfenv/ClutteredMNIST60-v0", data_root=str(root), checkpoint=str(checkpoint), fragments=0)
    obs, _ = env.reset(seed=0)
    source = env.unwrapped.vec.source
    assert source.image_shape == (1, 60, 60) and source.fragments == 0 and env.unwrapped.vec.patch_size == 24
    env.step(env.action_space.sample())
    vec = gymnasium.make_vec("gfenv/ClutteredMNIST100-v0", num_envs=2, data_root=str(root),
                             checkpoint=str(checkpoint))
    vec.reset(seed=0)
    assert (vec.height, vec.steps, vec.source.fragments) == (100, 7, 8)


def test_cifar10_canvas_task_runs_with_local_data_and_a_checkpoint(tmp_path):
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), "labels": [0, 1, 9]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    torch.manual_seed(0)
    checkpoint = save_model(tmp_path / "model.pt", GFNetModel(ModelConfig(num_classes=10, in_channels=3,
                                                                          patch_size=32, steps=5)))
    env = gymnasium.make_vec("gfenv/CIFAR10Canvas128-v0", num_envs=2, data_root=str(tmp_path / "data"),
                             checkpoint=str(checkpoint), verify=False)
    env.reset(seed=0)
    assert env.source.image_shape == (3, 128, 128) and env.source.base.image_shape == (3, 64, 64)
    assert (env.source.fragments, env.source.fragment_size, env.patch_size) == (4, 16, 32)


def _official_stage1(arch: str, path: Path, classes: int) -> Path:
    """A GFNet-Pytorch stage-1 file (no policy yet) for ``arch`` at P = 96."""
    nets = [torchvision.models.get_model(arch, num_classes=classes) for _ in range(2)]
    features = nets[0].fc.in_features if arch == "resnet50" else nets[0].classifier.in_features
    fc = nn.ModuleDict({"rnn": nn.GRU(features, 8), "fc": nn.Linear(8, classes)})
    torch.save({"model_name": arch, "patch_size": 96, "fc": fc.state_dict(),
                "model_prime_state_dict": {"module." + k: v for k, v in nets[0].state_dict().items()},
                "model_state_dict": {"module." + k: v for k, v in nets[1].state_dict().items()}}, path)
    return path


def test_imagenet_task_takes_an_official_checkpoint_of_its_architecture_only(tmp_path):
    root = tmp_path / "imagenet"
    for split in ("train", "val"):
        for k in range(3):
            (root / split / f"n{k:08d}").mkdir(parents=True)
            Image.new("RGB", (40, 30), (80 * k, 60, 200)).save(root / split / f"n{k:08d}" / "a.png")
    torch.manual_seed(0)
    dense = _official_stage1("densenet121", tmp_path / "d121.pth.tar", 3)
    with pytest.raises(CheckpointError, match=r"densenet121 weights but arch='resnet50'"):
        gymnasium.make_vec("gfenv/ImageNetResNet50P96-v0", num_envs=2, data_root=str(root), checkpoint=str(dense))
    official = _official_stage1("resnet50", tmp_path / "r50.pth.tar", 3)
    env = gymnasium.make_vec("gfenv/ImageNetResNet50P96-v0", num_envs=2, data_root=str(root), split="test",
                             checkpoint=str(official), observation="gfnet")
    obs, _ = env.reset(seed=0)
    assert isinstance(env.source, NormalizedSource) and env.source.image_shape == (3, 224, 224)
    assert obs.shape == (2, 2048 * 3 * 3) and env.model.config.backbone == "resnet50"
    env.step(torch.zeros(2, 2))


def test_each_task_has_a_train_and_a_test_id_that_the_gfenv_commands_refuse():
    for env_id, task in TASKS.items():
        for split in ("train", "test"):
            spec = gymnasium.spec(gfenv.task.split_id(env_id, split))
            assert spec.kwargs == {**task.words, "split": split} and spec.max_episode_steps == task.steps - 1
    assert gfenv.task.split_id("gfenv/GlanceFocus-v0", "test") == "gfenv/GlanceFocus-test-v0"
    env = gymnasium.make_vec("gfenv/GlanceFocus-test-v0", num_envs=2)
    assert env.source.split == "test"
    with pytest.raises(ValueError, match="use gfenv/GlanceFocus-v0"):
        gfenv.task.registered_words("gfenv/GlanceFocus-test-v0")


def test_import_gfenv_leaves_the_heavy_modules_unimported():
    import subprocess
    import sys

    heavy = ("torchvision", "torch._dynamo", "torch.utils.flop_counter", "stable_baselines3", "tensorboard",
             "matplotlib", "rl_zoo3", "torchrl")
    code = (f"import sys, gfenv; print([m for m in {heavy!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(gfenv.__file__).parent.parent)
    assert out.stdout.strip() == "[]"


def test_every_registered_task_has_a_block_in_every_agents_hyperparameter_file():
    import yaml

    from agents.learned import learned_agent_names
    from gfenv.train.stage2 import HYPERPARAMS_DIR

    for agent in learned_agent_names():
        blocks = yaml.safe_load((HYPERPARAMS_DIR / f"{agent}.yml").read_text())
        missing = sorted(set(TASKS) - set(blocks))
        assert not missing, (agent, missing)
