"""Stage 1 of GFNet (warm-up): encoders and classifier trained on uniformly random focus locations.

Loss = [sum_t CE(f_C at step t) + dsn_ratio * sum_t CE(encoder's own head at step t)] / T. SGD Nesterov with a
cosine schedule by default (AdamW optional), autocast on GPU, activation checkpointing, gradient accumulation,
TensorBoard scalars, atomic checkpoints, ``resume`` and a checkpoint on Ctrl-C.

Under ``torchrun --nproc_per_node=N`` the encoders and classifier train with DistributedDataParallel (see
``gfenv.train.distributed``): every process reads its share of each global batch, gradients are averaged over the
processes, and rank 0 alone prints, logs and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from gfenv.checkpoint import save_checkpoint
from gfenv.data import ImageSource, make_source
from gfenv.glimpse import GLANCE_MODES, check_patch_size, location_to_corner
from gfenv.models import GFNetModel, ModelConfig
from gfenv.train import distributed as dist
from gfenv.train.common import (
    AMP_MODES,
    OPTIMIZERS,
    EpochOrder,
    autocast_dtype,
    data_parallel_loss,
    glimpse_loss,
    load_training_state,
    make_optimizer,
    seed_everything,
)
from gfenv.train.runs import claim_run_dir
from gfenv.utils import check_device, check_fields


@dataclass
class Stage1Config:
    """Stage-1 (warm-up) settings; defaults train the embedded cluttered-glyphs task on a 2-core CPU."""

    dataset: str = "glyphs"
    """Dataset name from ``gfenv.data.DATASETS``."""
    dataset_kwargs: dict = field(default_factory=dict)
    """The dataset's settings (``data_root=...`` for real data, canvas, fragments, ...)."""
    env_id: str | None = None
    """The registered task these settings name, recorded in the checkpoint with them (later stages read both)."""
    backbone: str = "small_cnn"
    """Encoder backbone (``gfenv.models.BACKBONES``)."""
    classifier: str = "gru"
    """``gru`` (GFNet's recurrent classifier) or ``cascaded``."""
    hidden: int = 256
    """GRU hidden size."""
    patch_size: int = 32
    """P: the side of glance and focus patches."""
    steps: int = 5
    """T: glimpses per image (the glance plus T - 1 focus patches)."""
    glance_mode: str = "area"
    """How the glance is resized: ``area`` (exact box filter: fine texture becomes grey), ``bilinear`` or ``bicubic``
    (GFNet's choice on ImageNet), both anti-aliased."""
    epochs: float = 4.0
    """Passes over the train split (fractions allowed)."""
    batch_size: int = 128
    """Images per optimiser step, over all processes (the effective batch). Under torchrun each of the N processes
    takes every N-th image of the batch, so a micro-batch holds batch_size / (N x accum_steps) images."""
    accum_steps: int = 1
    """Split each process's share of a batch into this many micro-batches (same result, less memory)."""
    optimizer: str = "sgd"
    """``sgd`` (GFNet: Nesterov, momentum 0.9) or ``adamw``."""
    backbone_lr: float = 0.05
    """Learning rate of the encoders."""
    classifier_lr: float = 0.1
    """Learning rate of the classifier and the encoders' heads."""
    weight_decay: float = 1e-4
    """Weight decay."""
    dsn_ratio: float = 1.0
    """Weight of each encoder's own linear-head loss."""
    amp: str = "auto"
    """Autocast dtype: ``auto`` (bf16 on CUDA, none on CPU), ``bf16``, ``fp16`` or ``none``."""
    grad_checkpointing: bool = False
    """Recompute encoder activations in the backward pass (less memory, ~30 % more time)."""
    channels_last: bool = False
    """Use the channels_last memory format (faster convolutions on recent GPUs)."""
    eval_images: int = 2000
    """Validation images (carved from train) for the accuracy printed after training."""
    log_every: int = 50
    """Iterations between TensorBoard scalars."""
    checkpoint_every: int = 500
    """Iterations between checkpoints of the training state."""
    seed: int = 0
    """Seeds Python, numpy, torch and the on-device data generator (the batches are the same for any number of
    processes; under torchrun rank r draws its patch locations from a seed of its own, ``dist.rank_seed``)."""
    device: str = "cpu"
    """``cpu``, ``cuda`` or ``cuda:N`` (under torchrun ``cuda`` is ``cuda:LOCAL_RANK``)."""

    def __post_init__(self) -> None:
        check_fields(self, "stage-1 setting", {
            "classifier": {"choices": ("gru", "cascaded")}, "glance_mode": {"choices": GLANCE_MODES},
            "optimizer": {"choices": OPTIMIZERS}, "amp": {"choices": AMP_MODES}, "hidden": {"low": 1},
            "patch_size": {"low": 1}, "steps": {"low": 1}, "epochs": {"above": 0.0}, "batch_size": {"low": 1},
            "accum_steps": {"low": 1}, "backbone_lr": {"low": 0.0}, "classifier_lr": {"low": 0.0},
            "weight_decay": {"low": 0.0}, "dsn_ratio": {"low": 0.0}, "eval_images": {"low": 1},
            "log_every": {"low": 1}, "checkpoint_every": {"low": 1}, "seed": {"low": 0}})

    def task(self) -> dict:
        """The task in the env's flat words, as the checkpoint records it."""
        return {"dataset": self.dataset, **self.dataset_kwargs,
                **{k: getattr(self, k) for k in ("patch_size", "steps", "backbone", "classifier", "hidden",
                                                  "glance_mode")}}

    def model_config(self, num_classes: int, in_channels: int) -> ModelConfig:
        return ModelConfig(num_classes=num_classes, in_channels=in_channels, patch_size=self.patch_size,
                           steps=self.steps, backbone=self.backbone, classifier=self.classifier, hidden=self.hidden,
                           glance_mode=self.glance_mode)



def stage1_loss(model: GFNetModel, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
                dsn_ratio: float = 1.0, grad_checkpointing: bool = False,
                loss_fn: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """GFNet's warm-up loss on uniformly random focus locations; returns (loss, per-step accuracy counts (T,)).

    ``loss_fn`` (default ``glimpse_loss`` on ``model``) takes the arguments of ``GlimpseLoss.forward``: the trainer
    passes the DistributedDataParallel-wrapped ``GlimpseLoss`` under torchrun.
    """
    b, t_steps, p = images.shape[0], model.config.steps, model.config.patch_size
    loc = torch.rand(b * (t_steps - 1), 2, generator=generator, device=images.device)
    corners = location_to_corner(loc, images.shape[-2], images.shape[-1], p).reshape(b, t_steps - 1, 2)
    if loss_fn is None:
        return glimpse_loss(model, images, labels, corners, dsn_ratio, grad_checkpointing)
    return loss_fn(images, labels, corners, dsn_ratio, grad_checkpointing)


def _param_groups(model: GFNetModel, cfg: Stage1Config) -> list[dict]:
    enc = list(model.glance_encoder.parameters()) + list(model.focus_encoder.parameters())
    rest = (list(model.classifier.parameters()) + list(model.glance_head.parameters())
            + list(model.focus_head.parameters()))
    return [{"params": enc, "lr": cfg.backbone_lr}, {"params": rest, "lr": cfg.classifier_lr}]




@torch.no_grad()
def random_policy_accuracy(model: GFNetModel, source: ImageSource, images: int = 2000, batch_size: int = 250,
                           seed: int = 0) -> list[float]:
    """Accuracy (%) after each step with uniformly random focus locations, on the first ``images`` of ``source``."""
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=source.device).manual_seed(seed)
    correct = torch.zeros(model.config.steps, device=source.device)
    n = min(images, len(source))
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(start + batch_size, n), device=source.device)
        x, y = source.get(idx)
        correct += stage1_loss(model, x, y, gen)[1]
    model.train(was_training)
    return (correct / n * 100).tolist()


class _Progress:
    """What stage 1 prints, progress bar or not: its settings at the start, an estimate of the time it takes after a
    few iterations, and one line per epoch."""

    def __init__(self, cfg: Stage1Config, images: int, iters_per_epoch: int, start: int, total: int, run_dir: Path):
        self.cfg, self.iters_per_epoch, self.start, self.total = cfg, iters_per_epoch, start, total
        self.t0 = time.time()
        self.eta_at = min(total, start + max(5, (total - start) // 50))
        words = " ".join(f"{k}={v}" for k, v in cfg.task().items())
        print(f"stage 1: {words}\n  {images} train images, {cfg.epochs:g} epochs = {total} iterations of "
              f"{cfg.batch_size} images ({cfg.optimizer}, lr {cfg.backbone_lr:g}/{cfg.classifier_lr:g}, device "
              f"{cfg.device}" + (f", resumed at {start}" if start else "") + f") -> {run_dir}", flush=True)

    def iteration(self, it: int) -> None:
        if it == self.eta_at:
            per = (time.time() - self.t0) / (it - self.start)
            print(f"  {per:.2f} s per iteration: about {per * (self.total - it) / 60:.1f} min to go", flush=True)

    def epoch(self, it: int, sums: torch.Tensor) -> None:
        done = (it - 1) // self.iters_per_epoch + 1
        count = max(round(float(sums[1])), 1)
        loss, acc = float(sums[0]) / count, (sums[2:] / count * 100).tolist()
        elapsed = time.time() - self.t0
        left = elapsed / (it - self.start) * (self.total - it) if it > self.start else 0.0
        print(f"  epoch {done}/{math.ceil(self.total / self.iters_per_epoch)} (iteration {it}/{self.total}): loss "
              f"{loss:.3f}, train accuracy at steps 1/T {acc[0]:.1f}/{acc[-1]:.1f} %; {elapsed / 60:.1f} min, about "
              f"{left / 60:.1f} min to go", flush=True)


def train_stage1(cfg: Stage1Config, run_dir: str | Path, resume: bool = False, progress: bool = True) -> Path:
    """Train stage 1; writes ``run_dir/last.pt`` (training state) and ``run_dir/model.pt``; returns the latter.

    Under torchrun it joins the process group (unless already in one) and trains data-parallel; rank 0 alone prints,
    shows the progress bar and writes, and every rank returns once ``model.pt`` is written.
    """
    check_device(cfg.device)
    with dist.distributed(cfg.device) as device:
        # rank 0 writes, so rank 0 claims the folder (gfenv.train.runs.claim_run_dir) before anything is written
        with claim_run_dir(run_dir) if dist.is_main() else contextlib.nullcontext():
            return _train_stage1(cfg, Path(run_dir), device, resume, progress and dist.is_main())


def _train_stage1(cfg: Stage1Config, run_dir: Path, device: torch.device, resume: bool, progress: bool) -> Path:
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm

    main, rank, world = dist.is_main(), dist.rank(), dist.world_size()
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    with dist.main_first():  # a dataset download (download=True) happens once, on rank 0
        train = make_source(cfg.dataset, "train", device, **cfg.dataset_kwargs)
        val = make_source(cfg.dataset, "val", device, **cfg.dataset_kwargs)
    c, h, w = train.image_shape
    check_patch_size(cfg.patch_size, h, w)
    if min(cfg.batch_size, len(train)) < world:
        raise ValueError(f"batch_size={cfg.batch_size} images of a {len(train)}-image train split are shared by "
                         f"{world} processes, fewer than one each; raise batch_size or use fewer processes.")
    model = GFNetModel(cfg.model_config(train.num_classes, c)).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(cfg.optimizer, _param_groups(model, cfg), cfg.backbone_lr, cfg.weight_decay)
    iters_per_epoch = math.ceil(len(train) / cfg.batch_size)
    if 0 < len(train) % cfg.batch_size < world:
        iters_per_epoch -= 1  # an epoch's last, short batch would leave a process without images: skip it
    total = max(1, int(cfg.epochs * iters_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, total) / total)))
    gen = torch.Generator(device=device).manual_seed(dist.rank_seed(cfg.seed, rank))
    amp_dtype = autocast_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start = 0
    last = run_dir / "last.pt"
    if resume:
        state = load_training_state(last, device, model, opt, sched)
        start = int(state["iteration"])
        generators = state.get("generators") or [state["generator"]]
        if rank < len(generators):
            gen.set_state(generators[rank].cpu())
        else:  # saved by fewer processes (or on a hard Ctrl-C): a fresh, deterministic stream for this rank
            gen.manual_seed(dist.rank_seed(cfg.seed, rank) + start)
    loss_model = data_parallel_loss(model, device)

    def save_state(iteration: int, gather: bool = True) -> None:
        """Rank 0 writes the training state. ``gather`` (collectives, on every rank at once) stores every rank's
        patch generator too and gives every rank rank 0's BatchNorm statistics, so all hold the saved model."""
        generators = [gen.get_state()]
        if gather:
            generators = dist.all_gather_object(generators[0])
            dist.broadcast_buffers(model)
        if main:
            save_checkpoint(last, {"format": "gfenv-model-v1", "config": model.config.to_dict(),
                                   "model": model.state_dict(), "optimizer": opt.state_dict(),
                                   "scheduler": sched.state_dict(), "generator": generators[0],
                                   "generators": generators, "world_size": world,
                                   "iteration": iteration, "stage1": asdict(cfg),
                                   "meta": {"stage": 1, "dataset": cfg.dataset, "iteration": iteration}})
        if gather:
            dist.barrier()

    writer = SummaryWriter(str(run_dir / "tb")) if main else None
    model.train()
    order = EpochOrder(len(train), cfg.batch_size, iters_per_epoch, cfg.seed, device)
    it = start
    report = _Progress(cfg, len(train), iters_per_epoch, start, total, run_dir) if main else None
    bar = tqdm(total=total, initial=start, desc="stage 1", disable=not progress, dynamic_ncols=True)
    t0 = time.time()
    epoch_sums = torch.zeros(2 + cfg.steps, device=device)  # this epoch's summed loss, images and correct counts
    stop = dist.GracefulStop(device)
    try:
        with stop:
            while it < total:
                idx = order.batch(it)  # the global batch, on every rank
                micros = dist.shard(idx).chunk(cfg.accum_steps)  # this rank's share, in micro-batches
                opt.zero_grad(set_to_none=True)
                loss_sum = 0.0
                correct = None
                for m, micro in enumerate(micros):
                    x, y = train.get(micro)
                    if cfg.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    with dist.no_sync(loss_model, skip=m < len(micros) - 1):  # DDP averages on the last one
                        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                            enabled=amp_dtype is not None):
                            loss, corr = stage1_loss(model, x, y, gen, cfg.dsn_ratio, cfg.grad_checkpointing,
                                                     loss_fn=loss_model)
                        # DDP divides the summed gradients by the world size: x world makes it the batch mean
                        scaler.scale(loss * (micro.numel() * world) / idx.numel()).backward()
                    loss_sum += loss.detach() * micro.numel() / idx.numel()
                    correct = corr if correct is None else correct + corr
                scaler.step(opt)
                scaler.update()
                sched.step()
                it += 1
                bar.update(1)
                n_batch = torch.full((1,), float(idx.numel()), device=device)
                epoch_sums += torch.cat([loss_sum.reshape(1).float() * n_batch, n_batch / world, correct.float()])
                if report is not None:
                    report.iteration(it)
                if it % iters_per_epoch == 0 or it == total:  # one line per epoch, also without a progress bar
                    sums = dist.all_reduce_sum(epoch_sums)
                    if report is not None:
                        report.epoch(it, sums)
                    epoch_sums.zero_()
                if it % cfg.log_every == 0 or it == total:
                    stats = dist.all_reduce_sum(torch.cat([loss_sum.reshape(1).float(), correct.float()]))
                    loss_all, acc = float(stats[0]), (stats[1:] / idx.numel() * 100).tolist()
                    if writer is not None:
                        writer.add_scalar("stage1/loss", loss_all, it)
                        for t, a in enumerate(acc):
                            writer.add_scalar(f"stage1/train_acc_step{t + 1}", a, it)
                    bar.set_postfix(loss=f"{loss_all:.3f}", acc=f"{acc[0]:.0f}/{acc[-1]:.0f}")
                if it % cfg.checkpoint_every == 0:
                    save_state(it)
                if stop.requested():  # Ctrl-C / SIGTERM under torchrun: every rank stops after this step
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        bar.close()
        save_state(it, gather=stop.agreed)
        if writer is not None:
            writer.close()
        if main:
            print(f"\nInterrupted at iteration {it}/{total}: training state saved to {last}; continue with --resume.")
        raise
    bar.close()
    save_state(it)
    out = run_dir / "model.pt"
    if main:
        acc = random_policy_accuracy(model, val, cfg.eval_images, seed=cfg.seed)
        for t, a in enumerate(acc):
            writer.add_scalar(f"stage1/val_acc_random_step{t + 1}", a, it)
        writer.close()
        save_checkpoint(out, {"format": "gfenv-model-v1", "config": model.config.to_dict(),
                              "model": model.state_dict(),
                              "meta": {"stage": 1, "env": cfg.env_id, "task": cfg.task(), "dataset": cfg.dataset,
                                       "dataset_kwargs": cfg.dataset_kwargs,
                                       "iterations": it, "seconds": round(time.time() - t0, 1),
                                       "processes": world, "val_accuracy_random": [round(a, 2) for a in acc]}})
        print(f"stage 1 done in {time.time() - t0:.0f} s on {world} process(es); validation accuracy per step "
              f"({min(cfg.eval_images, len(val))} images, random patches): " + " ".join(f"{a:.1f}" for a in acc)
              + f"\nmodel: {out}", flush=True)
    dist.barrier()
    return out
