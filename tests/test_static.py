"""The static full-resolution reference: training, checkpoints, determinism, evaluation on the env's images, CLI."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gfenv.checkpoint import CheckpointError, load_checkpoint
from gfenv.cli import train as train_agent
from gfenv.data import make_source
from gfenv.env import DEFAULT_CHECKPOINT, GlanceFocusVectorEnv
from gfenv.flops import count_macs
from gfenv.train.common import seed_everything
from gfenv.train.static import (
    StaticClassifier,
    StaticConfig,
    evaluate_static,
    load_static,
    save_static,
    static_config,
    train_static,
)

SMALL = {"canvas": 32, "train_size": 64, "test_size": 32}
ENV_KWARGS = {"dataset": "glyphs", "dataset_kwargs": SMALL, "checkpoint": "default"}  # the env needs a stage-1 model


def tiny(**kw) -> StaticConfig:
    base = {"dataset_kwargs": dict(SMALL), "batch_size": 32, "epochs": 1000.0, "max_iterations": 4, "eval_images": 32,
            "log_every": 1}
    return StaticConfig(**{**base, **kw})


def weights(path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def test_training_lowers_the_loss_on_its_data(tmp_path):
    cfg = tiny(max_iterations=30)
    seed_everything(cfg.seed)
    initial = StaticClassifier(10, (1, 32, 32)).eval()
    trained, meta = load_static(train_static(cfg, tmp_path, progress=False))
    x, y = make_source("glyphs", "train", **SMALL).get(torch.arange(64))
    with torch.no_grad():
        before, after = F.cross_entropy(initial(x), y), F.cross_entropy(trained(x), y)
    assert after < 0.8 * before
    assert meta["iterations"] == 30 and 0 <= meta["test_accuracy"] <= 100 and (tmp_path / "tb").is_dir()


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    model = StaticClassifier(10, (1, 32, 32)).eval()
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.1, 0.1)  # non-default buffers must survive too
    save_static(tmp_path / "m.pt", model, {"note": "x"})
    loaded, meta = load_static(tmp_path / "m.pt")
    x = torch.rand(3, 1, 32, 32)
    assert torch.equal(model(x), loaded(x)) and meta == {"note": "x"} and loaded.config == model.config


def test_same_seed_same_weights_and_interrupted_resume_equals_one_run(tmp_path, monkeypatch):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    train_static(tiny(), a, progress=False)
    train_static(tiny(), b, progress=False)
    wa, wb = weights(a / "model.pt"), weights(b / "model.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    other = weights(train_static(tiny(seed=1), tmp_path / "s1", progress=False))
    assert any(not torch.equal(wa[k], other[k]) for k in wa)

    calls = {"n": 0}
    real = StaticClassifier.forward

    def interrupted(self, images):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, images)

    monkeypatch.setattr(StaticClassifier, "forward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_static(tiny(), c, progress=False)
    monkeypatch.setattr(StaticClassifier, "forward", real)
    assert load_checkpoint(c / "last.pt")["iteration"] == 2
    load_static(c / "last.pt")  # Ctrl-C leaves a loadable model
    train_static(tiny(), c, resume=True, progress=False)
    wc = weights(c / "model.pt")
    assert all(torch.equal(wa[k], wc[k]) for k in wa)


class Lookup(StaticClassifier):
    """Predicts the label of an image it was shown, class 0 for any other: 100 % only on exactly those images."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        super().__init__(10, tuple(images.shape[1:]))
        self.known, self.known_labels = images, labels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        match = (images[:, None] == self.known[None]).flatten(2).all(2)  # (B, K)
        pred = torch.where(match.any(1), self.known_labels[match.float().argmax(1)], 0)
        return F.one_hot(pred, 10).float()


def test_evaluate_static_scores_the_images_the_env_evaluates(tmp_path):
    model = StaticClassifier(10, (1, 32, 32)).eval()
    res = evaluate_static(save_static(tmp_path / "m.pt", model), ENV_KWARGS, episodes=12)
    assert 0 <= res["accuracy"] <= 100 and res["episodes"] == 12
    assert res["macs"] == count_macs(model, torch.zeros(1, 1, 32, 32)) > 0
    env = GlanceFocusVectorEnv(num_envs=12, split="test", sampling="sequential", **ENV_KWARGS)
    env.reset(seed=0)
    assert evaluate_static(Lookup(env.images, env.labels), ENV_KWARGS, episodes=12)["accuracy"] == 100.0
    assert (env.labels != 0).sum() > 0  # a lookup on other images would score below 100


def test_a_checkpoint_of_another_task_is_refused(tmp_path):
    path = save_static(tmp_path / "m.pt", StaticClassifier(10, (1, 32, 32)))
    with pytest.raises(CheckpointError, match=r"m\.pt.*\(1, 32, 32\).*\(1, 48, 48\)"):
        evaluate_static(path, {"dataset_kwargs": {**SMALL, "canvas": 48}}, episodes=4)
    five = save_static(tmp_path / "five.pt", StaticClassifier(5, (1, 32, 32)))
    with pytest.raises(CheckpointError, match="num_classes=5 but the data has 10"):
        evaluate_static(five, ENV_KWARGS, episodes=4)
    with pytest.raises(CheckpointError, match="not a static-reference checkpoint.*stage-1"):
        load_static(DEFAULT_CHECKPOINT)
    with pytest.raises(ValueError, match="sets split"):
        evaluate_static(path, {**ENV_KWARGS, "split": "train"}, episodes=4)


def test_cli_config_takes_the_task_and_the_stage1_backbone():
    cfg = static_config({"dataset": "glyphs", "canvas": 64, "data_root": "/d", "checkpoint": "default",
                         "patch_size": 32}, {"lr": 0.1}, epochs=3.0, batch_size=None)
    assert cfg.dataset_kwargs == {"canvas": 64, "data_root": "/d"} and cfg.backbone == "small_cnn"
    assert (cfg.lr, cfg.epochs, cfg.batch_size) == (0.1, 3.0, StaticConfig.batch_size)
    with pytest.raises(ValueError, match="disagrees with the stage-1 checkpoint"):
        static_config({"checkpoint": "default", "backbone": "resnet18"})


def test_cli_stage_static_trains_and_prints_accuracy_and_macs(tmp_path, capsys):
    args = ["--stage", "static", "--env-kwargs", "canvas=32", "train_size=64", "test_size=32", "--hyperparams",
            "max_iterations=2", "eval_images=16", "--batch-size", "16", "--no-progress", "--run-dir", str(tmp_path)]
    assert train_agent.main(args) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "M MACs per image" in out
    model, meta = load_static(tmp_path / "model.pt")
    assert meta["iterations"] == 2 and meta["test_images"] == 16 and model.image_shape == (1, 32, 32)
    assert train_agent.main([*args, "--hyperparams", "learning_rat=1"]) == 2
    assert "learning_rat" in capsys.readouterr().err
