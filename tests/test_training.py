"""Stage 1 through the real CLI: a tiny run writes a checkpoint the env loads; resume; Ctrl-C leaves a checkpoint."""

from __future__ import annotations

import os

import torch

from gfenv.checkpoint import load_checkpoint, load_model
from gfenv.cli import train as train_agent
from gfenv.env import GlanceFocusVectorEnv

TINY = ["--stage", "1", "--env-kwargs", "train_size=64", "test_size=32", "--hyperparams", "eval_images=32",
        "log_every=1", "--batch-size", "16", "--no-progress"]


def test_stage1_cli_writes_a_checkpoint_the_env_loads(tmp_path):
    assert train_agent.main(["--stage", "1", "--epochs", "1", "--run-dir", str(tmp_path), *TINY]) == 0
    model, meta = load_model(tmp_path / "model.pt")
    assert meta["stage"] == 1 and len(meta["val_accuracy_random"]) == model.config.steps
    assert (tmp_path / "tb").is_dir()
    env = GlanceFocusVectorEnv(num_envs=2, checkpoint=tmp_path / "model.pt",
                               dataset_kwargs={"train_size": 64, "test_size": 32})
    obs, info = env.reset(seed=0)
    assert obs["focus"].shape == (2, model.feature_dim)


def test_same_seed_same_weights_and_resume_continues(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train_agent.main(["--epochs", "1", "--run-dir", str(a), *TINY])
    train_agent.main(["--epochs", "1", "--run-dir", str(b), *TINY])
    wa, wb = load_checkpoint(a / "model.pt")["model"], load_checkpoint(b / "model.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    train_agent.main(["--epochs", "2", "--run-dir", str(a), "--resume", *TINY])
    assert load_checkpoint(a / "last.pt")["iteration"] == 8
    assert any(not torch.equal(wa[k], v) for k, v in load_checkpoint(a / "model.pt")["model"].items())


def test_ctrl_c_leaves_a_loadable_checkpoint(tmp_path, monkeypatch):
    import gfenv.train.stage1 as training

    calls = {"n": 0}
    real = training.stage1_loss

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "stage1_loss", interrupted)
    assert train_agent.main(["--epochs", "1", "--run-dir", str(tmp_path), *TINY]) == 130
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["iteration"] == 2
    monkeypatch.setattr(training, "stage1_loss", real)
    train_agent.main(["--epochs", "1", "--run-dir", str(tmp_path), "--resume", *TINY])
    assert load_checkpoint(tmp_path / "last.pt")["iteration"] == 4


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert train_agent.main(["--run-dir", str(tmp_path / "none"), "--resume", *TINY]) == 2
    assert "--resume" in capsys.readouterr().err


def test_unknown_hyperparameter_is_refused(tmp_path, capsys):
    assert train_agent.main(["--run-dir", str(tmp_path), "--hyperparams", "learning_rat=1", *TINY]) == 2
    assert "learning_rat" in capsys.readouterr().err


def test_low_memory_options_train_on_cpu(tmp_path):
    args = ["--epochs", "1", "--run-dir", str(tmp_path), "--grad-checkpointing", "--accum-steps", "2", *TINY]
    assert train_agent.main(args) == 0
    cfg = load_checkpoint(tmp_path / "last.pt")["stage1"]
    assert cfg["grad_checkpointing"] and cfg["accum_steps"] == 2
    low = train_agent.build_parser().parse_args(["--low-memory"])
    c, _ = train_agent.stage1_config(low)
    assert c.grad_checkpointing and c.accum_steps == 4 and c.amp == "bf16"


def test_sigterm_saves_like_ctrl_c_and_the_run_resumes(tmp_path):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "train_agent.py"
    args = [sys.executable, str(script), "--stage", "1", "--env-kwargs", "train_size=4096", "test_size=32",
            "val_size=32", "--hyperparams", "eval_images=32", "checkpoint_every=100000", "--batch-size", "16",
            "--epochs", "1", "--run-dir", str(tmp_path), "--no-progress"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = []
    for line in proc.stdout:  # the settings line, then the time estimate after a few iterations
        lines.append(line)
        if "s per iteration" in line:
            break
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, "".join(lines) + out
    assert "Interrupted at iteration" in out and "--resume" in out
    assert 0 < load_checkpoint(tmp_path / "last.pt")["iteration"] < 256
    assert "dataset=glyphs" in lines[0]  # what is being trained, printed at the start
