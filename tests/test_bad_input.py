"""Bad input and faults: every argument refused with its name, its value and what is allowed; actions checked
against the action space; corrupt dataset files named; shared runs never run code from their files; a run folder
claimed by one process only; CLIs fail early in one line; SIGTERM/SIGINT mid-run save and release the folder.

``CASES`` is the table: each row makes one bad call and states the exception type, the argument the message must
name and the value it must quote.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from agents import SB3Agent, make_agent
from agents.gfnet_ppo import GFNetPPOConfig
from gfenv import GlanceFocusEnv, GlanceFocusVectorEnv
from gfenv.checkpoint import CheckpointError, UnsafeFileError, load_checkpoint
from gfenv.cli import bench as bench_cli
from gfenv.cli import evaluate as evaluate_cli
from gfenv.cli import train as train_cli
from gfenv.data import make_source
from gfenv.env import DEFAULT_CHECKPOINT
from gfenv.train.pipeline import PipelineConfig
from gfenv.train.runs import LOCK, RunDirInUse, claim_run_dir, load_agent, write_config
from gfenv.train.stage1 import Stage1Config
from gfenv.train.stage2 import PolicyTrainingConfig
from gfenv.train.stage3 import Stage3Config
from gfenv.train.static import StaticConfig
from gfenv.utils import parse_kv

ROOT = Path(__file__).resolve().parent.parent
PPO_TINY = {"n_steps": 8, "batch_size": 16, "n_epochs": 1}


def env(**kwargs) -> GlanceFocusVectorEnv:
    return GlanceFocusVectorEnv(**{"num_envs": 2, "split": "test", **kwargs})


@cache
def built(action: str) -> GlanceFocusVectorEnv:
    """One reset env of 4 slots per action mode, shared by the action rows (a refused step changes nothing)."""
    e = GlanceFocusVectorEnv(num_envs=4, split="test", action=action, seed=0)
    e.reset(seed=0)
    return e


@cache
def single() -> GlanceFocusEnv:
    e = GlanceFocusEnv(split="test")
    e.reset(seed=0)
    return e


def parse(parser: argparse.ArgumentParser, *argv: str) -> argparse.Namespace:
    parser.exit_on_error = False  # an ArgumentError instead of exit 2, so the table can read its message
    return parser.parse_args(list(argv))


# -------------------------------------------------------------------------------------------- dataset files
def write_idx(path: Path, array: np.ndarray) -> None:
    path.write_bytes(struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
                     + array.tobytes())


def mnist(tmp: Path, damage: str) -> str:
    """A fake MNIST in torchvision's layout with one file damaged; returns data_root."""
    raw = tmp / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", 20), ("t10k", 10)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", np.full((n, 28, 28), 7, np.uint8))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8))
    images, labels = raw / "t10k-images-idx3-ubyte", raw / "t10k-labels-idx1-ubyte"
    if damage == "garbage":
        images.write_bytes(os.urandom(64) + b"garbage")
    elif damage == "truncated":
        images.write_bytes(images.read_bytes()[:1000])
    elif damage == "empty":
        labels.write_bytes(b"")
    elif damage == "gzipped":
        images.write_bytes(b"\x1f\x8b\x08\x00" + images.read_bytes())
    elif damage == "count":
        write_idx(labels, np.zeros(9, np.uint8))
    elif damage == "no_images":
        write_idx(images, np.zeros((0, 28, 28), np.uint8))
    return str(tmp)


class Evil:
    """Unpickling it creates the file ``marker``: what a crafted pickle could do instead."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def cifar(tmp: Path, damage: str) -> str:
    folder = tmp / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": ["a", "b"]}))
    target = folder / "test_batch"
    if damage == "truncated":
        target.write_bytes(target.read_bytes()[:500])
    elif damage == "code":
        target.write_bytes(pickle.dumps({"data": Evil(tmp / "ran"), "labels": [0]}))
    return str(tmp)


def cifar_source(tmp: Path, damage: str):
    root = cifar(tmp, damage)
    try:
        return make_source("cifar10", "test", data_root=root, verify=False)
    finally:
        assert not (tmp / "ran").exists(), "the crafted CIFAR batch was unpickled"


# ---------------------------------------------------------------------------------------------------- the table
def row(call, error, name, value=None, id=None):
    return pytest.param(call, error, name, value, id=id)


CASES = [
    # the env's constructor: type and range of every argument, checked before anything is loaded
    row(lambda t: env(num_envs="four"), TypeError, "num_envs", "'four'", id="env-num_envs-str"),
    row(lambda t: env(num_envs=0), ValueError, "num_envs", "0", id="env-num_envs-zero"),
    row(lambda t: env(num_envs=-3), ValueError, "num_envs", "-3", id="env-num_envs-negative"),
    row(lambda t: env(num_envs=2.5), TypeError, "num_envs", "2.5", id="env-num_envs-fraction"),
    row(lambda t: env(num_envs=True), TypeError, "num_envs", "True", id="env-num_envs-bool"),
    row(lambda t: env(seed="abc"), TypeError, "seed", "'abc'", id="env-seed-str"),
    row(lambda t: env(seed=-1), ValueError, "seed", "-1", id="env-seed-negative"),
    row(lambda t: env(mac_cost="high"), TypeError, "mac_cost", "'high'", id="env-mac_cost-str"),
    row(lambda t: env(mac_cost=-0.5), ValueError, "mac_cost", "-0.5", id="env-mac_cost-negative"),
    row(lambda t: env(mac_cost=float("nan")), ValueError, "mac_cost", "nan", id="env-mac_cost-nan"),
    row(lambda t: env(dataset_kwargs="canvas=64"), TypeError, "dataset_kwargs", "'canvas=64'",
        id="env-dataset_kwargs-str"),
    row(lambda t: env(dataset_kwargs=[64]), TypeError, "dataset_kwargs", "[64]", id="env-dataset_kwargs-list"),
    row(lambda t: env(grid=0), ValueError, "grid", "0", id="env-grid-zero"),
    row(lambda t: env(grid="7"), TypeError, "grid", "'7'", id="env-grid-str"),
    row(lambda t: env(steps=0), ValueError, "steps", "0", id="env-steps-zero"),
    row(lambda t: env(steps=1), ValueError, "steps", "1", id="env-steps-one"),
    row(lambda t: env(steps=2.7), TypeError, "steps", "2.7", id="env-steps-fraction"),
    row(lambda t: env(patch_size=0), ValueError, "patch_size", "0", id="env-patch_size-zero"),
    row(lambda t: env(num_classes=1), ValueError, "num_classes", "1", id="env-num_classes-one"),
    row(lambda t: env(hidden=-1), ValueError, "hidden", "-1", id="env-hidden-negative"),
    row(lambda t: env(action="diagonal"), ValueError, "action", "'diagonal'", id="env-action-unknown"),
    row(lambda t: env(action=3), TypeError, "action", "3", id="env-action-int"),
    row(lambda t: env(observation="image"), ValueError, "observation", "'image'", id="env-observation"),
    row(lambda t: env(sampling="shuffle"), ValueError, "sampling", "'shuffle'", id="env-sampling"),
    row(lambda t: env(split="validation"), ValueError, "split", "'validation'", id="env-split"),
    row(lambda t: env(render_mode="human"), ValueError, "render_mode", "'human'", id="env-render_mode"),
    row(lambda t: env(cache="ram", action="grid"), ValueError, "cache", "'ram'", id="env-cache"),
    row(lambda t: env(cache_images=0), ValueError, "cache_images", "0", id="env-cache_images-zero"),
    row(lambda t: env(glance_mode="nearest"), ValueError, "glance_mode", "'nearest'", id="env-glance_mode"),
    row(lambda t: env(autoreset_mode="sometimes"), ValueError, "autoreset_mode", "'sometimes'",
        id="env-autoreset_mode"),
    row(lambda t: env(device="gpu0"), ValueError, "device", "'gpu0'", id="env-device-unknown"),
    row(lambda t: env(device="cuda:63"), ValueError, "device", "'cuda:63'", id="env-device-absent"),
    row(lambda t: env(max_episode_steps=0), ValueError, "max_episode_steps", "0", id="env-max_episode_steps"),
    row(lambda t: env(reward=lambda a, b: a), TypeError, "reward", "signature", id="env-reward-signature"),
    row(lambda t: env(reward=42), TypeError, "reward", "42", id="env-reward-int"),
    row(lambda t: env(reward="nope"), ValueError, "reward", "'nope'", id="env-reward-unknown"),
    row(lambda t: env(checkpoint=123), TypeError, "checkpoint", "123", id="env-checkpoint-int"),
    row(lambda t: env(data_root=5), TypeError, "data_root", "5", id="env-data_root-int"),
    # the dataset's own words
    row(lambda t: env(checkpoint="default", canvas="big"), TypeError, "canvas", "'big'", id="glyphs-canvas-str"),
    row(lambda t: env(checkpoint="default", fragments=-1), ValueError, "fragments", "-1", id="glyphs-fragments"),
    row(lambda t: env(checkpoint="default", noise="loud"), TypeError, "noise", "'loud'", id="glyphs-noise"),
    row(lambda t: env(checkpoint="default", test_size=0), ValueError, "test_size", "0", id="glyphs-test_size"),
    row(lambda t: env(checkpoint="default", val_size=-1), ValueError, "val_size", "-1", id="glyphs-val_size"),
    row(lambda t: env(checkpoint="default", canvs=96), ValueError, "canvs", "96", id="glyphs-unknown-word"),
    row(lambda t: make_source("mnist", "test", data_root=mnist(t, ""), canvas=(60,)), ValueError, "canvas",
        "(60,)", id="mnist-canvas-one-side"),
    row(lambda t: make_source("mnist", "test", data_root=mnist(t, ""), verify="no"), TypeError, "verify", "'no'",
        id="mnist-verify-str"),
    row(lambda t: make_source("imagefolder", "test", data_root=str(t), crop_fraction=0), ValueError,
        "crop_fraction", "0", id="imagefolder-crop_fraction"),
    # actions, against the action space, before anything is reshaped
    row(lambda t: built("continuous").step(np.zeros((2, 4), np.float32)), ValueError, "actions", "(2, 4)",
        id="actions-transposed"),
    row(lambda t: built("continuous").step(np.zeros(4, np.float32)), ValueError, "actions", "(4,)",
        id="actions-flat"),
    row(lambda t: built("continuous").step(torch.zeros(4, 2, 1)), ValueError, "actions", "(4, 2, 1)",
        id="actions-extra-dim"),
    row(lambda t: built("continuous").step(np.zeros((4, 2), np.complex64)), TypeError, "actions", "complex64",
        id="actions-complex"),
    row(lambda t: built("continuous").step([["a", "b"]] * 4), TypeError, "actions", "<U1", id="actions-strings"),
    row(lambda t: built("continuous").step(torch.zeros(4, 2, dtype=torch.bool)), TypeError, "actions", "bool",
        id="actions-bool"),
    row(lambda t: built("continuous").step([[0.0, 0.0], [0.0]] * 2), ValueError, "actions", "(4, 2)",
        id="actions-ragged"),
    row(lambda t: built("grid").step(np.zeros((4, 1), np.int64)), ValueError, "actions", "(4, 1)",
        id="actions-grid-column"),
    row(lambda t: built("grid").step(np.zeros((2, 2), np.int64)), ValueError, "actions", "(2, 2)",
        id="actions-grid-square"),
    row(lambda t: built("grid").step(np.array([0, 1, 2, 1.5])), ValueError, "actions", "1.5",
        id="actions-grid-fraction"),
    row(lambda t: built("grid").step(np.array([49, 0, 0, 0])), ValueError, "action", "49",
        id="actions-grid-out-of-range"),
    row(lambda t: single().step(np.zeros((1, 2), np.float32)), ValueError, "action", "(1, 2)",
        id="single-env-action-shape"),
    # SB3 hyperparameters, before SB3 (or the env) sees them
    row(lambda t: make_agent("ppo", num_envs=2, hyperparams={"n_steps": "abc"}), TypeError, "n_steps", "'abc'",
        id="ppo-n_steps-str"),
    row(lambda t: make_agent("ppo", num_envs=2, hyperparams={"n_steps": 0}), ValueError, "n_steps", "0",
        id="ppo-n_steps-zero"),
    row(lambda t: make_agent("ppo", num_envs=2, hyperparams={"n_epochs": 2.5}), TypeError, "n_epochs", "2.5",
        id="ppo-n_epochs-fraction"),
    row(lambda t: make_agent("ppo", num_envs=2, hyperparams={"gamma": 1.5}), ValueError, "gamma", "1.5",
        id="ppo-gamma"),
    row(lambda t: make_agent("ppo", num_envs=2, hyperparams={"batch_size": 1}), ValueError, "batch_size", "1",
        id="ppo-batch_size"),
    row(lambda t: make_agent("ppo", num_envs=2, hyperparams={"learning_rate": "lin_abc"}), TypeError,
        "learning_rate", "'lin_abc'", id="ppo-learning_rate-schedule"),
    row(lambda t: make_agent("ppo", num_envs=2, hyperparams={"learning_rate": -1e-3}), ValueError, "learning_rate",
        "-0.001", id="ppo-learning_rate-negative"),
    row(lambda t: make_agent("ppo", num_envs=2, hyperparams={"clip_range": "wide"}), TypeError, "clip_range",
        "'wide'", id="ppo-clip_range"),
    row(lambda t: make_agent("ppo", num_envs=2, hyperparams={"normalize_advantage": "yes"}), TypeError,
        "normalize_advantage", "'yes'", id="ppo-bool"),
    row(lambda t: make_agent("ppo", num_envs=2, hyperparams={"policy": "CnnPolicyX"}), ValueError, "policy",
        "'CnnPolicyX'", id="ppo-policy"),
    row(lambda t: make_agent("ppo", num_envs=2, hyperparams={"policy_kwargs": 5}), TypeError, "policy_kwargs", "5",
        id="ppo-policy_kwargs"),
    row(lambda t: make_agent("sac", num_envs=2, hyperparams={"ent_coef": "sometimes"}), ValueError, "ent_coef",
        "'sometimes'", id="sac-ent_coef"),
    row(lambda t: make_agent("qrdqn", env_kwargs={"action": "grid"}, num_envs=2,
                             hyperparams={"train_freq": [4, "minute"]}), ValueError, "train_freq", "'minute'",
        id="qrdqn-train_freq"),
    row(lambda t: make_agent("qrdqn", env_kwargs={"action": "grid"}, num_envs=2,
                             hyperparams={"exploration_final_eps": 2}), ValueError, "exploration_final_eps", "2",
        id="qrdqn-eps"),
    row(lambda t: make_agent("ars", num_envs=2, env_kwargs={"observation": "flat"}, hyperparams={"n_delta": 0}),
        ValueError, "n_delta", "0", id="ars-n_delta"),
    row(lambda t: GFNetPPOConfig(learning_rate="abc"), TypeError, "learning_rate", "'abc'", id="gfnet_ppo-lr"),
    # training settings (what --hyperparams and the flags fill in)
    row(lambda t: PolicyTrainingConfig(timesteps=0), ValueError, "timesteps", "0", id="stage2-timesteps-zero"),
    row(lambda t: PolicyTrainingConfig(timesteps=-5), ValueError, "timesteps", "-5", id="stage2-timesteps-neg"),
    row(lambda t: PolicyTrainingConfig(num_envs=0), ValueError, "num_envs", "0", id="stage2-num_envs-zero"),
    row(lambda t: PolicyTrainingConfig(eval_freq=-2), ValueError, "eval_freq", "-2", id="stage2-eval_freq"),
    row(lambda t: PolicyTrainingConfig(seed="x"), TypeError, "seed", "'x'", id="stage2-seed"),
    row(lambda t: Stage1Config(epochs=0), ValueError, "epochs", "0", id="stage1-epochs"),
    row(lambda t: Stage1Config(batch_size="abc"), TypeError, "batch_size", "'abc'", id="stage1-batch_size"),
    row(lambda t: Stage1Config(optimizer="adam"), ValueError, "optimizer", "'adam'", id="stage1-optimizer"),
    row(lambda t: Stage1Config(amp="fp8"), ValueError, "amp", "'fp8'", id="stage1-amp"),
    row(lambda t: Stage3Config(classifier_lr=-1.0), ValueError, "classifier_lr", "-1.0", id="stage3-lr"),
    row(lambda t: Stage3Config(train_focus="no"), TypeError, "train_focus", "'no'", id="stage3-bool"),
    row(lambda t: StaticConfig(lr=0.0), ValueError, "lr", "0.0", id="static-lr"),
    row(lambda t: PipelineConfig(episodes=0), ValueError, "episodes", "0", id="main-episodes"),
    # command-line flags (argparse names the flag)
    row(lambda t: parse(train_cli.build_parser(), "--timesteps", "0"), argparse.ArgumentError, "--timesteps", "'0'",
        id="cli-train-timesteps-zero"),
    row(lambda t: parse(train_cli.build_parser(), "--timesteps", "-5"), argparse.ArgumentError, "--timesteps",
        "'-5'", id="cli-train-timesteps-negative"),
    row(lambda t: parse(train_cli.build_parser(), "--num-envs", "0"), argparse.ArgumentError, "--num-envs", "'0'",
        id="cli-train-num-envs"),
    row(lambda t: parse(train_cli.build_parser(), "--eval-freq", "-2"), argparse.ArgumentError, "--eval-freq",
        "'-2'", id="cli-train-eval-freq"),
    row(lambda t: parse(train_cli.build_parser(), "--checkpoint-freq", "-1"), argparse.ArgumentError,
        "--checkpoint-freq", "'-1'", id="cli-train-checkpoint-freq"),
    row(lambda t: parse(train_cli.build_parser(), "--epochs", "0"), argparse.ArgumentError, "--epochs", "'0'",
        id="cli-train-epochs"),
    row(lambda t: parse(train_cli.build_parser(), "--batch-size", "abc"), argparse.ArgumentError, "--batch-size",
        "'abc'", id="cli-train-batch-size"),
    row(lambda t: parse(train_cli.build_parser(), "--seed", "-1"), argparse.ArgumentError, "--seed", "'-1'",
        id="cli-train-seed"),
    row(lambda t: parse(evaluate_cli.build_parser(), "--episodes", "0"), argparse.ArgumentError, "--episodes",
        "'0'", id="cli-evaluate-episodes"),
    row(lambda t: parse(evaluate_cli.build_parser(), "--num-envs", "-1"), argparse.ArgumentError, "--num-envs",
        "'-1'", id="cli-evaluate-num-envs"),
    row(lambda t: parse(evaluate_cli.build_parser(), "--threshold-episodes", "-1"), argparse.ArgumentError,
        "--threshold-episodes", "'-1'", id="cli-evaluate-threshold-episodes"),
    row(lambda t: parse(bench_cli.build_parser(), "--repeats", "0"), argparse.ArgumentError, "--repeats", "'0'",
        id="cli-bench-repeats"),
    row(lambda t: parse_kv(["steps"], "--env-kwargs"), ValueError, "--env-kwargs", "'steps'", id="kv-no-equals"),
    row(lambda t: parse_kv(["=3"], "--hyperparams"), ValueError, "--hyperparams", "'=3'", id="kv-empty-key"),
    row(lambda t: parse_kv(["steps=3", "steps=4"], "--env-kwargs"), ValueError, "steps", "steps=4",
        id="kv-given-twice"),
    # dataset files checked on open: the file and what is wrong with it
    row(lambda t: make_source("mnist", "test", data_root=mnist(t, "garbage")), ValueError,
        "t10k-images-idx3-ubyte", "magic number", id="mnist-garbage"),
    row(lambda t: make_source("mnist", "test", data_root=mnist(t, "truncated")), ValueError,
        "t10k-images-idx3-ubyte", "truncated", id="mnist-truncated"),
    row(lambda t: make_source("mnist", "test", data_root=mnist(t, "empty")), ValueError, "t10k-labels-idx1-ubyte",
        "empty", id="mnist-empty"),
    row(lambda t: make_source("mnist", "test", data_root=mnist(t, "gzipped")), ValueError,
        "t10k-images-idx3-ubyte", "gunzip", id="mnist-gzipped"),
    row(lambda t: make_source("mnist", "test", data_root=mnist(t, "count")), ValueError, "t10k-labels-idx1-ubyte",
        "9 labels", id="mnist-count-mismatch"),
    row(lambda t: make_source("mnist", "test", data_root=mnist(t, "no_images")), ValueError,
        "t10k-images-idx3-ubyte", "no images", id="mnist-no-images"),
    row(lambda t: cifar_source(t, "truncated"), ValueError, "test_batch", "truncated", id="cifar-truncated"),
    row(lambda t: cifar_source(t, "code"), ValueError, "test_batch", "refused unread", id="cifar-crafted-pickle"),
]


@pytest.mark.parametrize(("call", "error", "name", "value"), CASES)
def test_bad_input_is_refused_naming_the_argument(call, error, name, value, tmp_path):
    with pytest.raises(error) as info:
        call(tmp_path)
    message = str(info.value)
    assert name in message, message
    if value is not None:
        assert value in message, message


def test_the_table_is_large_and_each_refusal_is_a_value_error_for_the_command_lines():
    assert len(CASES) >= 60
    from gfenv.utils import InvalidType

    assert issubclass(InvalidType, TypeError) and issubclass(InvalidType, ValueError)  # CLIs catch ValueError


def test_valid_values_still_work():
    """The checks accept what worked before: whole floats for counts, numpy ints, paths, None defaults."""
    e = GlanceFocusVectorEnv(num_envs=np.int64(2), split="test", steps=3.0, seed=np.int64(4), grid=5,
                             checkpoint=Path(DEFAULT_CHECKPOINT))
    assert e.num_envs == 2 and e.steps == 3 and e.grid == 5
    e.reset(seed=0)
    e.step(torch.zeros(2, 2, dtype=torch.float64))  # doubles and ints are numbers in [-1, 1]
    e.step(np.zeros((2, 2), np.int32))


# ------------------------------------------------------------------------------- CLIs: early, one line, exit 2
def _unwritable_dir(tmp_path: Path) -> Path:
    if os.getuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o500)
        return folder
    for candidate in ("/sys", "/proc/self"):
        try:
            fd, probe = tempfile.mkstemp(dir=candidate)
        except OSError:
            return Path(candidate)
        os.close(fd)
        os.unlink(probe)
    pytest.skip("no unwritable folder on this machine (root, and /sys is writable)")


@pytest.mark.parametrize(("argv", "expected"), [
    (["--stage", "2", "--run-dir", "{file}"], "is a file"),
    (["--stage", "2", "--run-dir", "{file}/run"], "is a file"),
    (["--stage", "2", "--run-dir", "{ro}/run"], "cannot be created"),
    (["--stage", "2", "--device", "gpu0"], "--device='gpu0' is not a torch device"),
    (["--stage", "2", "--env-kwargs", "steps=0", "--run-dir", "{tmp}/r"], "steps=0"),
    (["--stage", "2", "--env-kwargs", "steps", "--run-dir", "{tmp}/r"], "--env-kwargs 'steps'"),
    (["--stage", "2", "--hyperparams", "n_steps=abc", "--run-dir", "{tmp}/r"], "n_steps='abc'"),
    (["--stage", "1", "--hyperparams", "epochs=abc", "--run-dir", "{tmp}/r"], "epochs='abc'"),
    (["--stage", "3", "--agent", "center", "--hyperparams", "episodes=0", "--run-dir", "{tmp}/r"], "episodes=0"),
    (["--stage", "static", "--hyperparams", "lr=-1", "--run-dir", "{tmp}/r"], "lr=-1"),
], ids=["run-dir-file", "run-dir-under-file", "run-dir-unwritable", "device-unknown", "env-kwargs-steps-zero",
        "env-kwargs-no-equals", "hyperparams-type", "stage1-hyperparams", "stage3-episodes", "static-lr"])
def test_train_cli_refuses_in_one_line_before_writing(argv, expected, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    fill = {"file": str(tmp_path / "file"), "tmp": str(tmp_path),
            "ro": str(_unwritable_dir(tmp_path)) if "{ro}" in " ".join(argv) else ""}
    argv = [a.format(**fill) for a in argv]
    assert train_cli.main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expected in err and "Traceback" not in err, err
    assert not (tmp_path / "r").exists()  # a refused run leaves no folder behind


def test_device_without_cuda_is_one_line(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert train_cli.main(["--stage", "2", "--device", "cuda"]) == 2
    assert evaluate_cli.main(["--agents", "random", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: --device='cuda': CUDA is not available") for line in err)


@pytest.mark.parametrize(("argv", "expected"), [
    (["--env-kwargs", "foo=1"], "foo=1"),
    (["--env-kwargs", "grid=abc"], "grid='abc'"),
    (["--env-kwargs", "split=train"], "split"),
    (["--json", "{file}/out.json"], "--json"),
    (["--json", "{tmp}"], "--json"),
    (["--markdown", "{ro}/board.md"], "--markdown"),
    (["--plots", "{file}"], "--plots"),
    (["--pictures", "{ro}/p.png"], "--pictures"),
], ids=["unknown-word", "word-type", "fixed-word", "json-under-file", "json-is-folder", "markdown-unwritable",
        "plots-is-file", "pictures-unwritable"])
def test_evaluate_cli_refuses_before_any_evaluation(argv, expected, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    fill = {"file": str(tmp_path / "file"), "tmp": str(tmp_path),
            "ro": str(_unwritable_dir(tmp_path)) if "{ro}" in " ".join(argv) else ""}
    ran = []
    monkeypatch.setattr(evaluate_cli, "benchmark", lambda *a, **k: ran.append(1))
    argv = [a.format(**fill) for a in argv]
    assert evaluate_cli.main(["--agents", "random", "--episodes", "4", "--no-progress", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expected in err and "\n" not in err, err
    assert not ran  # refused before any agent played


def test_debug_flag_and_variable_show_the_traceback(tmp_path, monkeypatch):
    argv = ["--stage", "2", "--hyperparams", "n_steps=abc", "--run-dir", str(tmp_path / "r")]
    with pytest.raises(TypeError, match="n_steps='abc'"):
        train_cli.main([*argv, "--debug"])
    monkeypatch.setenv("GFENV_DEBUG", "1")
    with pytest.raises(TypeError, match="n_steps='abc'"):
        train_cli.main(argv)


# -------------------------------------------------------------------------- shared runs never run their pickles
def tiny_run(folder: Path, name: str = "ppo", action: str = "grid") -> SB3Agent:
    """A stage-2 run folder as train_agent.py writes it, with an untrained tiny agent (model.zip, last.zip)."""
    agent = make_agent(name, env_kwargs={"action": action}, num_envs=2, seed=0, hyperparams=PPO_TINY)
    folder.mkdir(parents=True, exist_ok=True)
    write_config(folder, {"agent": name, "env": "gfenv/GlanceFocus-v0", "env_kwargs": agent.env_kwargs,
                          "hyperparams": PPO_TINY, "seed": 0, "num_envs": 2, "timesteps": 64})
    agent.save(folder / "model.zip")
    agent.save(folder / "last.zip")
    return agent


def rewrite_zip(path: Path, replace: dict[str, bytes | None]) -> None:
    """Replace (or with None drop) entries of the zip at ``path``."""
    with zipfile.ZipFile(path) as archive:
        entries = {n: archive.read(n) for n in archive.namelist()}
    for name, data in replace.items():
        if data is None:
            entries.pop(name, None)
        else:
            entries[name] = data
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)


def crafted_data(path: Path, marker: Path) -> bytes:
    """SB3's ``data`` entry with one more cloudpickled value, which creates ``marker`` when unpickled."""
    with zipfile.ZipFile(path) as archive:
        data = json.loads(archive.read("data"))
    data["learning_rate"] = {":type:": "<class 'float'>",
                             ":serialized:": base64.b64encode(pickle.dumps(Evil(marker))).decode()}
    return json.dumps(data).encode()


EVALUATE = ["--episodes", "4", "--num-envs", "4", "--threshold-episodes", "0", "--no-progress"]


def test_a_crafted_sb3_zip_never_runs_its_pickle_unless_trusted(tmp_path, capsys):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    agent = tiny_run(run)
    rewrite_zip(run / "model.zip", {"data": crafted_data(run / "model.zip", marker)})
    loaded = load_agent(run)  # the safe load reads weights and JSON only
    assert not marker.exists()
    env = built("grid")
    obs = env._observation()
    loaded.reset(env)
    agent.reset(env)
    assert torch.equal(loaded.act(obs, env), agent.act(obs, env))
    assert evaluate_cli.main(["--agents", f"random,x={run}", *EVALUATE]) == 0
    assert not marker.exists()
    with contextlib.suppress(Exception):  # SB3's own loader unpickles the crafted entry: the payload runs
        load_agent(run, trust_pickled_zip=True)
    assert marker.exists(), "the crafted zip is not a real attack: the test could not fail"


def test_crafted_weights_are_refused_everywhere_an_agent_loads(tmp_path, capsys):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    tiny_run(run)
    buffer = tmp_path / "evil.pth"
    torch.save({"policy": Evil(marker)}, buffer)
    for name in ("model.zip", "last.zip"):
        rewrite_zip(run / name, {"policy.pth": buffer.read_bytes()})
    with pytest.raises(UnsafeFileError, match=r"policy\.pth.*Python objects \((io|builtins)\.open\)"):
        load_agent(run)
    capsys.readouterr()
    assert evaluate_cli.main(["--agents", f"x={run}", *EVALUATE]) == 2
    assert train_cli.main(["--stage", "3", "--run-dir", str(run), "--no-progress"]) == 2
    assert train_cli.main(["--stage", "2", "--resume", "--run-dir", str(run), "--no-progress"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all("policy.pth" in line and "refuses" in line for line in lines), lines
    assert not marker.exists()


def test_a_malicious_pt_is_called_unsafe_not_corrupt(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    torch.save({"format": "gfenv-gfnet-ppo-v1", "policy": Evil(marker)}, path)
    with pytest.raises(UnsafeFileError) as info:
        load_checkpoint(path)
    assert ".open)" in str(info.value) and "corrupt" not in str(info.value)
    (tmp_path / "config.yml").write_text("agent: gfnet_ppo\n")
    with pytest.raises(UnsafeFileError):
        load_agent(path)
    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps(Evil(marker)))  # a bare pickle, not torch's format
    with pytest.raises(UnsafeFileError, match=r"(io|builtins)\.open"):
        load_checkpoint(plain)
    truncated = tmp_path / "half.pt"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(truncated)
    assert not marker.exists()


def test_a_zip_from_elsewhere_loads_only_when_trusted(tmp_path):
    run = tmp_path / "run"
    agent = tiny_run(run)
    rewrite_zip(run / "model.zip", {"gfenv_agent.json": None})
    with pytest.raises(ValueError, match="--trust-pickled-zip"):
        load_agent(run)
    trusted = load_agent(run, trust_pickled_zip=True)  # agent and env kwargs from the run's config.yml
    assert trusted.name == "ppo" and trusted.env_kwargs == agent.env_kwargs


def test_runs_written_before_the_settings_were_recorded_still_load_safely(tmp_path):
    """A v1 gfenv_agent.json (agent, env kwargs, timesteps only): rebuilt from the run's config.yml."""
    run, marker = tmp_path / "run", tmp_path / "pwned"
    agent = tiny_run(run)
    v1 = {"format": "gfenv-sb3-agent-v1", "agent": "ppo", "env_kwargs": agent.env_kwargs, "num_timesteps": 0}
    rewrite_zip(run / "model.zip", {"gfenv_agent.json": json.dumps(v1).encode(),
                                    "data": crafted_data(run / "model.zip", marker)})
    loaded = load_agent(run)
    state, original = loaded.model.policy.state_dict(), agent.model.policy.state_dict()
    assert all(torch.equal(state[k], original[k]) for k in original) and not marker.exists()
    (run / "config.yml").unlink()
    with pytest.raises(CheckpointError, match="trust_pickled_zip"):
        SB3Agent.load(run / "model.zip")


# --------------------------------------------------------------------------------------- one writer per run folder
def test_a_second_writer_is_refused_naming_the_first(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    fcntl = pytest.importorskip("fcntl")
    record = {"pid": 424242, "host": "elsewhere", "started": "2024-01-01 00:00:00", "command": "train_agent.py x"}
    fd = os.open(run / LOCK, os.O_RDWR | os.O_CREAT)
    os.write(fd, json.dumps(record).encode())
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another open file description: another process's lock
    try:
        with pytest.raises(RunDirInUse, match="pid 424242 on elsewhere"):
            with claim_run_dir(run):
                pass
        assert train_cli.main(["--stage", "2", "--run-dir", str(run), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --run-dir") and "in use by another run (pid 424242" in err and "\n" not in err
    finally:
        os.close(fd)
    with claim_run_dir(run):  # the holder died: its lock went with it, the file is taken over
        assert json.loads((run / LOCK).read_text())["pid"] == os.getpid()
    assert not (run / LOCK).exists()


def _start(run: Path, *extra: str) -> subprocess.Popen:
    args = [sys.executable, str(ROOT / "train_agent.py"), "--stage", "2", "--num-envs", "4", "--timesteps", "1000000",
            "--eval-freq", "-1", "--checkpoint-freq", "0", "--no-progress", "--run-dir", str(run),
            "--hyperparams", "n_steps=8", "batch_size=32", "n_epochs=1", *extra]
    # SIGINT as a terminal delivers it: a shell's background job (e.g. pytest started with `&`) inherits it ignored,
    # and Python then installs no KeyboardInterrupt handler
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_two_writers_and_a_signal_mid_run(tmp_path, signum):
    """Process A trains in RUN; B, given the same RUN, is refused naming A; a signal stops A mid-run, which saves
    last.zip, exits 130 and releases RUN; the run resumes from there."""
    run = tmp_path / "run"
    first = _start(run)
    deadline = time.time() + 300
    while not (run / "config.yml").exists():  # claimed, settings written: training starts
        assert first.poll() is None and time.time() < deadline, first.stdout.read()
        time.sleep(0.2)
    second = subprocess.run([sys.executable, str(ROOT / "train_agent.py"), "--stage", "2", "--run-dir", str(run)],
                            capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            timeout=300)
    assert second.returncode == 2, second.stderr
    assert f"in use by another run (pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
    time.sleep(2)
    first.send_signal(signum)
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 130, out
    assert "Interrupted at" in out and "--resume" in out
    assert not (run / LOCK).exists()
    saved = SB3Agent.load(run / "last.zip").num_timesteps
    assert 0 < saved < 1_000_000
    config = yaml.safe_load((run / "config.yml").read_text())
    assert config["timesteps"] == 1_000_000
    assert train_cli.main(["--stage", "2", "--resume", "--run-dir", str(run), "--timesteps", str(saved + 16),
                           "--eval-freq", "-1", "--checkpoint-freq", "0", "--no-progress"]) == 0
    assert SB3Agent.load(run / "model.zip").num_timesteps >= saved + 16
