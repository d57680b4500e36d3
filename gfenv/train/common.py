"""What the training stages share: seeding, the per-epoch batch order, autocast, the optimiser, the resume state and
GFNet's glimpse loss (stage 1 on random patches, stage 3 on a policy's)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from gfenv.checkpoint import load_checkpoint
from gfenv.glimpse import crop, glance
from gfenv.models import GFNetModel
from gfenv.train import distributed as dist

OPTIMIZERS = ("sgd", "adamw")
AMP_MODES = ("auto", "none", "bf16", "fp16")
"""Autocast settings: ``auto`` (bf16 on CUDA, none on a CPU), ``none``, ``bf16``, ``fp16``."""


def make_optimizer(name: str, params: Iterable, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """GFNet's SGD (momentum 0.9, Nesterov) or AdamW over ``params`` (tensors or param groups with their own lr)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"Unknown optimizer {name!r}; choose one of {OPTIMIZERS}.")


def low_memory(settings: dict) -> dict:
    """The smallest training footprint one flag away (``--low-memory``, stages 1 and 3): bf16 autocast (unless
    another autocast dtype is set), activation checkpointing and at least 4 micro-batches; ``settings`` updated."""
    settings["amp"] = "bf16" if settings.get("amp", "auto") in ("auto", "none") else settings["amp"]
    settings["grad_checkpointing"] = True
    settings["accum_steps"] = max(int(settings.get("accum_steps", 1) or 1), 4)
    return settings


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class EpochOrder:
    """Which items of a split each training iteration takes: every epoch a shuffle seeded by (seed, epoch) alone, so a
    resumed run (at any iteration) takes the same batches as an uninterrupted one."""

    def __init__(self, size: int, batch_size: int, iters_per_epoch: int, seed: int, device: torch.device):
        self.size, self.batch_size, self.iters_per_epoch = size, batch_size, iters_per_epoch
        self.seed, self.device = seed, device
        self._epoch, self._perm = None, None

    def batch(self, iteration: int) -> torch.Tensor:
        """The item indices of ``iteration`` (0-based, counted over all epochs)."""
        epoch, pos = divmod(iteration, self.iters_per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator(device=self.device).manual_seed(self.seed * 100_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.size, generator=gen, device=self.device), epoch
        return self._perm[pos * self.batch_size:(pos + 1) * self.batch_size]


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def _encode(encoder: nn.Module, x: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    if use_checkpoint and torch.is_grad_enabled():
        return activation_checkpoint(lambda inp: encoder(inp)[0], x, use_reentrant=False)
    return encoder(x)[0]


STEP_WEIGHTS = ("uniform", "linear", "last")
"""How ``glimpse_loss`` weighs the predictions after each glimpse."""


def glimpse_loss(model: GFNetModel, images: torch.Tensor, labels: torch.Tensor, corners: torch.Tensor,
                 dsn_ratio: float = 1.0, grad_checkpointing: bool = False,
                 taken: torch.Tensor | None = None, step_weights: str = "uniform",
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """GFNet's loss on the glance and the focus patches with top-left ``corners`` (B, T-1, 2), in order.

    Stage 1 draws the corners at random, stage 3 takes the policy's. ``taken`` (B, T-1) bool leaves out the patches
    an episode never took (after an early stop); the loss is the weighted mean over the glimpses taken.
    ``step_weights`` (``STEP_WEIGHTS``): ``uniform`` (GFNet: every glimpse's prediction counts the same), ``linear``
    (glimpse t of T weighs t, so the late answers, built on more glimpses, dominate) or ``last`` (an episode's last
    glimpse taken only). Returns (loss, per-step correct counts (T,)).
    """
    cfg = model.config
    b, n_focus, p = images.shape[0], corners.shape[1], cfg.patch_size
    g = glance(images, p, cfg.glance_mode)
    feats = [_encode(model.glance_encoder, g, grad_checkpointing)]  # (B, D)
    if n_focus > 0:
        rep = images.repeat_interleave(n_focus, dim=0) if b > 0 else images
        patches = crop(rep, corners.reshape(-1, 2), p)  # (B*(T-1), C, P, P)
        f = _encode(model.focus_encoder, patches, grad_checkpointing).reshape(b, n_focus, -1)
        feats += list(f.unbind(1))
    weight = torch.ones(b, n_focus + 1, device=images.device)  # (B, T)
    if taken is not None:
        weight[:, 1:] = taken.float()
    taken_mask = weight  # the glimpses taken are a prefix of the T
    if step_weights == "linear":
        weight = weight * torch.arange(1, n_focus + 2, device=images.device, dtype=weight.dtype)
    elif step_weights == "last":  # the glimpse an episode ends on: its answer
        last = taken_mask.sum(1, keepdim=True).long() - 1  # (B, 1)
        weight = torch.zeros_like(weight).scatter_(1, last, 1.0)
    elif step_weights != "uniform":
        raise ValueError(f"step_weights={step_weights!r}: choose one of {', '.join(STEP_WEIGHTS)}.")
    state = model.classifier.init_state(b, device=images.device, dtype=feats[0].dtype)
    loss = images.new_zeros(())
    correct = []
    for t, ft in enumerate(feats):
        logits, state = model.classifier.step(ft, state, t)
        ce = F.cross_entropy(logits.float(), labels, reduction="none")
        ce = ce + dsn_ratio * F.cross_entropy(model.head(t)(ft).float(), labels, reduction="none")  # (B,)
        loss = loss + (ce * weight[:, t]).sum()
        correct.append(((logits.argmax(1) == labels) & (taken_mask[:, t] > 0)).sum())
    return loss / weight.sum().clamp(min=1.0), torch.stack(correct)


class GlimpseLoss(nn.Module):
    """``glimpse_loss`` of ``model`` as a module's forward, for DistributedDataParallel (which averages the
    gradients of the passes through its own forward only)."""

    def __init__(self, model: GFNetModel):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, labels: torch.Tensor, corners: torch.Tensor, dsn_ratio: float = 1.0,
                grad_checkpointing: bool = False, taken: torch.Tensor | None = None, step_weights: str = "uniform",
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return glimpse_loss(self.model, images, labels, corners, dsn_ratio, grad_checkpointing, taken, step_weights)


def data_parallel_loss(model: GFNetModel, device: torch.device) -> nn.Module:
    """``GlimpseLoss(model)``, wrapped in DistributedDataParallel inside a process group.

    With T = 1 the focus encoder and its head take no part in the loss, which DDP must be told about.
    """
    return dist.wrap(GlimpseLoss(model), device, find_unused_parameters=model.config.steps < 2)


def load_training_state(last: Path, device: torch.device, model: nn.Module, opt: torch.optim.Optimizer,
                        sched: torch.optim.lr_scheduler.LRScheduler, check: Callable[[dict], None] | None = None,
                        ) -> dict:
    """``--resume``: the training state saved in ``last`` (``check`` may refuse it) loaded into the model, optimiser
    and schedule; returns the whole state (``iteration``, generators, ...)."""
    if not last.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {last}; start without --resume.")
    state = load_checkpoint(last, map_location=device)
    if check is not None:
        check(state)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    return state

