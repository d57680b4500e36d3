"""The real-data path end to end through the command lines, as a user runs it on Fashion-MNIST: stage 1 on a
registered task with a data folder in torchvision's idx layout, stage 2 naming only the stage-1 checkpoint, stage 3
on the run, and the evaluation naming only the runs. A few hundred images written by the test; no download."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import yaml

from gfenv.cli import evaluate as evaluate_agent
from gfenv.cli import train as train_agent

QUIET = ["--no-progress"]


def _write_idx(path: Path, array: np.ndarray) -> None:
    magic = (0x08 << 8) | array.ndim
    path.write_bytes(struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes())


def _fashion_mnist(root: Path, n_train: int = 320, n_test: int = 64) -> Path:
    """Garment-like 28 x 28 images: each class a bar at its own place, with noise."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, label in enumerate(labels):
            images[i, 2 + 2 * label: 6 + 2 * label, 4:24] = 255
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8))
    return root


def test_stage1_to_evaluation_on_a_real_dataset_names_the_task_once(tmp_path, capsys):
    from gfenv.checkpoint import load_model

    data = _fashion_mnist(tmp_path / "data")
    s1, s2, out = tmp_path / "stage1", tmp_path / "stage2", tmp_path / "eval.json"
    assert train_agent.main(["--stage", "1", "--env", "gfenv/FashionMNIST60-v0", "--env-kwargs", f"data_root={data}",
                             "val_size=32", "--epochs", "1", "--batch-size", "32", "--hyperparams", "eval_images=32",
                             "--run-dir", str(s1), *QUIET]) == 0
    # the task's registered stage-1 settings are printed, and the flags override them
    assert "gfenv/FashionMNIST60-v0's settings epochs=12" in capsys.readouterr().out
    assert load_model(s1 / "model.pt")[1]["iterations"] == 9  # one epoch of 288 train images in batches of 32
    # stage 2 names only the checkpoint: it records the task (data, canvas, patch size) and the env id
    assert train_agent.main(["--stage", "2", "--agent", "maskable_ppo", "--env-kwargs", f"checkpoint={s1}/model.pt",
                             "--timesteps", "256", "--num-envs", "8", "--eval-freq", "128", "--eval-episodes", "16",
                             "--checkpoint-freq", "0", "--hyperparams", "n_steps=8", "batch_size=32", "--run-dir",
                             str(s2), *QUIET]) == 0
    config = yaml.safe_load((s2 / "config.yml").read_text())
    assert config["env"] == "gfenv/FashionMNIST60-v0" and config["env_kwargs"]["canvas"] == 60
    assert "FashionMNIST60-v0" in config["hyperparams_from"]
    evaluations = [json.loads(line) for line in (s2 / "evaluations.jsonl").read_text().splitlines()]
    assert evaluations and all(e["split"] == "val" for e in evaluations)  # model selection never sees test
    assert train_agent.main(["--stage", "3", "--run-dir", str(s2), "--hyperparams", "episodes=32", *QUIET]) == 0
    stage3 = load_model(s2 / "stage3" / "model.pt")[1]
    assert stage3["stage3"]["lr_schedule"] == "cosine" and stage3["episodes"] >= 32  # the task's, then the user's
    # the evaluation names only the runs: the baselines are scored on the task the runs record
    assert evaluate_agent.main(["--agents", f"random,center,oracle,mppo={s2},mppo3={s2}/stage3/model.pt",
                                "--episodes", "16", "--num-envs", "16", "--threshold-episodes", "0", "--json",
                                str(out), *QUIET]) == 0
    report = json.loads(out.read_text())
    assert report["env"] == "gfenv/FashionMNIST60-v0" and report["env_kwargs"]["data_root"] == str(data)
    assert set(report["agents"]) == {"random", "center", "oracle", "mppo", "mppo3"}
    assert all(len(r["accuracy"]) == 5 for r in report["agents"].values())
    assert report["agents"]["oracle"]["accuracy"][-1] >= report["agents"]["random"]["accuracy"][-1]
