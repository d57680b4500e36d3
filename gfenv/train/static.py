"""The static full-resolution reference: GFNet's encoder family reading the whole image at once, plus a linear head.

GFNet claims to match a static network's accuracy at a fraction of its multiply-adds. This module trains that
network on the same task (same data source, same backbone as the stage-1 checkpoint, from scratch, no augmentation)
and evaluates it on the same test images that ``gfenv.eval.evaluation.evaluate`` gives the agents (the first N of the
split, in order), so a report can put both side by side:

    python train_agent.py --stage static --env-kwargs dataset=glyphs --run-dir runs/static/glyphs

The checkpoint is ``{"format": "gfenv-static-v1", "config": {...}, "model": state_dict, "meta": {...}}``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gfenv.backbones import build_encoder
from gfenv.checkpoint import CheckpointError, _load_state_strict, load_checkpoint, save_checkpoint
from gfenv.data import ImageSource, make_source
from gfenv.flops import count_macs
from gfenv.rollout import FIXED_ENV_KWARGS
from gfenv.task import resolve_task, task_words
from gfenv.train.common import (
    AMP_MODES,
    OPTIMIZERS,
    EpochOrder,
    autocast_dtype,
    load_training_state,
    make_optimizer,
    seed_everything,
)
from gfenv.train.runs import claim_run_dir
from gfenv.utils import check_device, check_fields

STATIC_FORMAT = "gfenv-static-v1"


class StaticClassifier(nn.Module):
    """An encoder of the backbone registry on the whole image at full resolution, then a linear head."""

    def __init__(self, num_classes: int, image_shape: tuple[int, int, int], backbone: str = "small_cnn",
                 backbone_kwargs: dict | None = None):
        super().__init__()
        if len(image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {tuple(image_shape)}.")
        self.config = {"num_classes": int(num_classes), "image_shape": [int(s) for s in image_shape],
                       "backbone": backbone, "backbone_kwargs": dict(backbone_kwargs or {})}
        self.encoder = build_encoder(backbone, int(image_shape[0]), **self.config["backbone_kwargs"])
        self.head = nn.Linear(self.encoder.feature_dim, int(num_classes))

    @property
    def num_classes(self) -> int:
        return self.config["num_classes"]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.config["image_shape"])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) of images (B, C, H, W)."""
        return self.head(self.encoder(images)[0])


@dataclass
class StaticConfig:
    """Settings of the static reference; the defaults train the default glyphs task in one epoch: 19 min on a
    2-core CPU shared with other jobs, 99.70 % on the first 2000 test images (99.87 % on all 10,000), 58.98 M MACs
    per image. AdamW (lr 2e-3, wd 0.05) beat SGD Nesterov (lr 0.05, wd 1e-4) in a 300-step check, 88.8 % vs 70.7 %
    test accuracy, so it is the default."""

    dataset: str = "glyphs"
    """Dataset name from ``gfenv.data.DATASETS``."""
    dataset_kwargs: dict = field(default_factory=dict)
    """Extra keyword arguments for the dataset (``root=...`` for real data, canvas, ...)."""
    backbone: str = "small_cnn"
    """Encoder backbone (``gfenv.models.BACKBONES``): use the stage-1 checkpoint's, so the comparison is fair."""
    backbone_kwargs: dict = field(default_factory=dict)
    """Extra keyword arguments of the backbone (as in the stage-1 ``ModelConfig``)."""
    epochs: float = 1.0
    """Passes over the train split (fractions allowed)."""
    max_iterations: int = 0
    """Stop after this many optimiser steps (0: no limit); the learning-rate schedule spans the shorter budget."""
    batch_size: int = 64
    """Images per optimiser step."""
    optimizer: str = "adamw"
    """``adamw`` or ``sgd`` (Nesterov, momentum 0.9, as stage 1)."""
    lr: float = 2e-3
    """Peak learning rate (cosine decay to 0 over the run)."""
    warmup_iterations: int = 0
    """Linear learning-rate warm-up steps at the start."""
    weight_decay: float = 0.05
    """Weight decay."""
    amp: str = "auto"
    """Autocast dtype: ``auto`` (bf16 on CUDA, none on CPU), ``bf16``, ``fp16`` or ``none``."""
    channels_last: bool = False
    """Use the channels_last memory format (faster convolutions on recent GPUs)."""
    eval_images: int = 2000
    """Test images (the first ones, in order) for the accuracy reported after training."""
    log_every: int = 50
    """Iterations between TensorBoard scalars."""
    checkpoint_every: int = 200
    """Iterations between checkpoints of the training state (``last.pt``)."""
    seed: int = 0
    """Seeds Python, numpy, torch and the on-device data order."""
    device: str = "cpu"
    """``cpu``, ``cuda`` or ``cuda:N``."""

    def __post_init__(self) -> None:
        check_fields(self, "static-reference setting", {
            "optimizer": {"choices": OPTIMIZERS}, "amp": {"choices": AMP_MODES}, "epochs": {"above": 0.0},
            "max_iterations": {"low": 0, "hint": "0: no limit"}, "batch_size": {"low": 1}, "lr": {"above": 0.0},
            "warmup_iterations": {"low": 0}, "weight_decay": {"low": 0.0}, "eval_images": {"low": 1},
            "log_every": {"low": 1}, "checkpoint_every": {"low": 1}, "seed": {"low": 0}})


def static_config(env_kwargs: dict[str, Any], hyperparams: dict[str, Any] | None = None,
                  **overrides: Any) -> StaticConfig:
    """Settings from the command line: env kwargs name the task as for stage 1 (``dataset``, ``data_root``,
    ``dataset_kwargs``, ``backbone``; other keys that are not env settings are dataset kwargs), ``checkpoint`` (a
    stage-1 model) lends its backbone, ``hyperparams`` set ``StaticConfig`` fields, ``overrides`` (not None) win."""
    cfg = StaticConfig()
    words = task_words(env_kwargs)
    spec = resolve_task(words, need_checkpoint=False)
    cfg.dataset, cfg.dataset_kwargs = spec.dataset, spec.source_kwargs
    backbone = spec.model_words.get("backbone")
    if "checkpoint" in words:
        stage1 = load_checkpoint(spec.checkpoint).get("config") or {}
        cfg.backbone = stage1.get("backbone", cfg.backbone)
        cfg.backbone_kwargs = dict(stage1.get("backbone_kwargs") or {})
        if backbone is not None and backbone != cfg.backbone:
            raise ValueError(f"backbone={backbone!r} disagrees with the stage-1 checkpoint {spec.checkpoint}, which "
                             f"has backbone={cfg.backbone!r}; drop one of them.")
    elif backbone is not None:
        cfg.backbone = backbone
    fields = set(StaticConfig.__dataclass_fields__)
    for key, value in (hyperparams or {}).items():
        if key not in fields:
            raise ValueError(f"Unknown static-reference hyperparameter {key!r}. Valid: {', '.join(sorted(fields))}.")
        setattr(cfg, key, value)
    for key, value in overrides.items():
        if key not in fields:
            raise ValueError(f"Unknown static-reference setting {key!r}. Valid: {', '.join(sorted(fields))}.")
        if value is not None:
            setattr(cfg, key, value)
    return replace(cfg)  # checks every setting (StaticConfig.__post_init__)


def _lr_factor(i: int, total: int, warmup: int) -> float:
    if warmup > 0 and i < warmup:
        return (i + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(i, total) / total))


def static_macs(model: StaticClassifier, image_shape: tuple[int, ...] | None = None) -> int:
    """Multiply-adds per image of one forward pass (encoder on the whole image + head), by ``count_macs``."""
    shape = tuple(image_shape or model.image_shape)
    if len(shape) != 3:
        raise ValueError(f"image_shape must be (C, H, W), got {shape}.")
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        return count_macs(model, torch.zeros(1, *shape, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)


@torch.no_grad()
def _accuracy(model: StaticClassifier, source: ImageSource, images: int, batch_size: int = 250,
              wrap: int | None = None) -> float:
    """Percent correct on the first ``images`` of ``source`` in order: index i mod ``wrap`` (default the source's
    length), as the env's sequential sampling draws them."""
    was_training = model.training
    model.eval()
    correct = 0
    wrap = wrap or len(source)
    try:
        for start in range(0, images, batch_size):
            idx = torch.arange(start, min(start + batch_size, images), device=source.device) % wrap
            x, y = source.get(idx)
            correct += int((model(x).argmax(1) == y).sum())
    finally:
        model.train(was_training)
    return 100.0 * correct / images


def _payload(model: StaticClassifier, meta: dict) -> dict:
    return {"format": STATIC_FORMAT, "config": dict(model.config),
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "meta": dict(meta)}


def save_static(path: str | os.PathLike, model: StaticClassifier, meta: dict | None = None) -> Path:
    """Save a static reference (config, CPU state_dict, ``meta``) atomically; ``load_static`` rebuilds it."""
    return save_checkpoint(path, _payload(model, meta or {}))


def load_static(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[StaticClassifier, dict]:
    """Rebuild a static reference saved by ``train_static``; returns (model in eval mode, meta)."""
    path = Path(path)
    payload = load_checkpoint(path, map_location="cpu")
    fmt = payload.get("format")
    if fmt != STATIC_FORMAT:
        found = "no 'format' key" if fmt is None else f"format {fmt!r}"
        hint = (" (that is a GFNet stage-1/3 model; a static reference comes from "
                "`python train_agent.py --stage static`)" if fmt == "gfenv-model-v1" else "")
        raise CheckpointError(f"Checkpoint {path} is not a static-reference checkpoint: it has {found}, expected "
                              f"{STATIC_FORMAT!r}{hint}.")
    config = payload.get("config")
    if not isinstance(config, dict) or not isinstance(payload.get("model"), dict):
        raise CheckpointError(f"Checkpoint {path} has no 'config' or 'model' dict; it is incomplete, re-create it.")
    try:
        model = StaticClassifier(**config)
    except TypeError as err:
        raise CheckpointError(f"Checkpoint {path} has a config this version cannot build: {err}") from err
    _load_state_strict(path, model, payload["model"])
    return model.to(device).eval(), dict(payload.get("meta") or {})


def source_from_env_kwargs(env_kwargs: dict[str, Any], split: str, device: str | torch.device) -> ImageSource:
    """The image source the env builds from ``env_kwargs`` (``dataset``, ``data_root``, ``dataset_kwargs``)."""
    fixed = sorted(set(FIXED_ENV_KWARGS) & set(env_kwargs))
    if fixed:
        raise ValueError(f"evaluate_static sets {', '.join(fixed)} itself (the split's first images, in order); "
                         f"drop them from the env kwargs.")
    return resolve_task(task_words(env_kwargs), need_checkpoint=False).source(split, device)


def check_task(model: StaticClassifier, source: ImageSource, where: str, env_kwargs: dict | None = None) -> None:
    """Raise CheckpointError when the static model was trained for another task than ``source``'s."""
    problems = []
    if model.num_classes != source.num_classes:
        problems.append(f"it was trained for num_classes={model.num_classes} but the data has "
                        f"{source.num_classes} classes")
    if tuple(model.image_shape) != tuple(source.image_shape):
        problems.append(f"it was trained on images of shape {tuple(model.image_shape)} (C, H, W) but the data's are "
                        f"{tuple(source.image_shape)}")
    env_kwargs = env_kwargs or {}
    for key, have in (("backbone", model.config["backbone"]), ("num_classes", model.num_classes)):
        if env_kwargs.get(key) is not None and env_kwargs[key] != have:
            problems.append(f"it has {key}={have!r} but the env kwargs ask for {key}={env_kwargs[key]!r}")
    if problems:
        raise CheckpointError(f"Static checkpoint {where} is for another task: " + "; ".join(problems)
                              + "; train one for this task with `python train_agent.py --stage static "
                              "--env-kwargs ...` (the same env kwargs).")


def evaluate_static(checkpoint: str | os.PathLike | StaticClassifier, env_kwargs: dict[str, Any], episodes: int,
                    device: str | torch.device = "cpu", split: str = "test") -> dict[str, Any]:
    """Accuracy (percent) of a static reference on the first ``episodes`` images of ``split``, in order: the images
    ``gfenv.eval.evaluation.evaluate`` gives the agents with the same env kwargs. Returns ``{"accuracy", "macs"}`` (MACs
    per image of one full-resolution forward pass) plus ``episodes``."""
    if episodes < 1:
        raise ValueError(f"episodes must be at least 1, got {episodes}.")
    source = source_from_env_kwargs(env_kwargs, split, device)
    if isinstance(checkpoint, StaticClassifier):
        model, where = checkpoint.to(device), "(in memory)"
    else:
        model, _ = load_static(checkpoint, device)
        where = str(checkpoint)
    check_task(model, source, where, env_kwargs)
    wrap = len(source)
    if env_kwargs.get("cache") is not None and env_kwargs.get("cache_images"):
        wrap = min(wrap, int(env_kwargs["cache_images"]))  # the env cycles through the cached first images
    return {"accuracy": _accuracy(model, source, episodes, wrap=wrap), "macs": static_macs(model), "episodes": episodes}


def train_static(cfg: StaticConfig, run_dir: str | Path, resume: bool = False, progress: bool = True) -> Path:
    """Train the static reference; writes ``run_dir/last.pt`` (training state) and ``run_dir/model.pt``; returns the
    latter. Ctrl-C saves ``last.pt`` and re-raises; ``resume`` continues from it. The folder is claimed first
    (``gfenv.train.runs.claim_run_dir``)."""
    check_device(cfg.device)
    with claim_run_dir(run_dir):
        return _train_static(cfg, Path(run_dir), resume, progress)


def _train_static(cfg: StaticConfig, run_dir: Path, resume: bool, progress: bool) -> Path:
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm

    device = torch.device(cfg.device)
    seed_everything(cfg.seed)
    train = make_source(cfg.dataset, "train", device, **cfg.dataset_kwargs)
    test = make_source(cfg.dataset, "test", device, **cfg.dataset_kwargs)
    model = StaticClassifier(train.num_classes, train.image_shape, cfg.backbone, cfg.backbone_kwargs).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay)
    iters_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = max(1, int(cfg.epochs * iters_per_epoch))
    if cfg.max_iterations > 0:
        total = min(total, cfg.max_iterations)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: _lr_factor(i, total, cfg.warmup_iterations))
    amp_dtype = autocast_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start = 0
    last = run_dir / "last.pt"
    if resume:
        def check(state: dict) -> None:
            if state.get("format") != STATIC_FORMAT:
                raise CheckpointError(f"--resume: {last} is not a static-reference training state; use another "
                                      f"--run-dir.")

        start = int(load_training_state(last, device, model, opt, sched, check)["iteration"])

    def save_state(iteration: int) -> None:
        save_checkpoint(last, {**_payload(model, {"dataset": cfg.dataset, "iteration": iteration}),
                               "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                               "iteration": iteration, "static": asdict(cfg)})

    writer = SummaryWriter(str(run_dir / "tb"))
    model.train()
    order = EpochOrder(len(train), cfg.batch_size, iters_per_epoch, cfg.seed, device)
    it = start
    bar = tqdm(total=total, initial=start, desc="static", disable=not progress, dynamic_ncols=True)
    t0 = time.time()
    try:
        while it < total:
            x, y = train.get(order.batch(it))
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            it += 1
            bar.update(1)
            if it % cfg.log_every == 0 or it == total:
                acc = float((logits.argmax(1) == y).float().mean() * 100)
                writer.add_scalar("static/loss", float(loss.detach()), it)
                writer.add_scalar("static/train_acc", acc, it)
                writer.add_scalar("static/lr", opt.param_groups[0]["lr"], it)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}", acc=f"{acc:.0f}")
            if it % cfg.checkpoint_every == 0:
                save_state(it)
    except KeyboardInterrupt:
        bar.close()
        save_state(it)
        writer.close()
        print(f"\nInterrupted at iteration {it}/{total}: training state saved to {last}; continue with --resume.")
        raise
    bar.close()
    save_state(it)
    seconds = round(time.time() - t0, 1)
    n_eval = min(cfg.eval_images, len(test))
    acc = _accuracy(model, test, n_eval)
    macs = static_macs(model)
    writer.add_scalar("static/test_acc", acc, it)
    writer.close()
    out = run_dir / "model.pt"
    save_static(out, model, {"dataset": cfg.dataset, "dataset_kwargs": cfg.dataset_kwargs, "iterations": it,
                             "seconds": seconds, "test_images": n_eval, "test_accuracy": round(acc, 2),
                             "macs": macs, "static": asdict(cfg)})
    print(f"static reference done in {seconds:.0f} s: test accuracy {acc:.2f} % on the first {n_eval} test images, "
          f"{macs / 1e6:.2f} M MACs per image\nmodel: {out}")
    return out
