"""GFNet's stage 3: fine-tune the classifier (and, by option, the encoders) on the patches a policy picks.

``Stage3Wrapper`` sits around a ``GlanceFocusVectorEnv`` under any agent; ``finetune`` runs a fixed agent on the train
split and saves the result as a model checkpoint that the env loads with ``checkpoint=PATH``.

Under ``torchrun --nproc_per_node=N`` (``gfenv.train.distributed``) the fine-tuning is data-parallel: each process runs
its own env slots on its own seed with its own copy of the (fixed) policy, the gradient steps on the episodes
collected are averaged over the processes by DistributedDataParallel, and rank 0 alone writes the checkpoint.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import torch
from gymnasium.vector import VectorWrapper
from gymnasium.vector.vector_env import AutoresetMode
from torch import nn

from gfenv.cache import without_cache
from gfenv.checkpoint import save_model
from gfenv.env import GlanceFocusVectorEnv
from gfenv.rollout import FIXED_ENV_KWARGS, AgentLike, play_batch, sampling_act
from gfenv.train import distributed as dist
from gfenv.train.common import AMP_MODES, OPTIMIZERS, STEP_WEIGHTS, autocast_dtype, data_parallel_loss, make_optimizer
from gfenv.utils import check_fields

if TYPE_CHECKING:
    pass

MODES = ("frozen", "joint")
LR_SCHEDULES = ("constant", "cosine")
ACTIONS = ("sampled", "deterministic")
STAGE3_EPISODES = 8192
"""Train images stage 3 runs the policy on by default (the main job's and ``train_agent.py --stage 3``'s)."""


@dataclass
class Stage3Config:
    """Stage-3 settings. Defaults follow GFNet (SGD Nesterov, classifier LR 0.01, weight decay 1e-4)."""

    mode: str = "frozen"
    """``frozen`` (GFNet): the policy is fixed and its actions sampled, only the wrapper learns (``finetune`` runs
    this). ``joint``: the policy keeps learning on the wrapped env (e.g. SB3 ``learn`` on ``to_sb3(wrapper)``), so
    its rewards come from the improving classifier. The wrapper behaves the same in both; the mode is recorded in
    the checkpoint."""
    train_classifier: bool = True
    """Fine-tune the classifier f_C."""
    actions: str = "sampled"
    """How ``finetune`` plays the policy: ``sampled`` (GFNet's frozen mode: its stochastic actions, so the classifier
    sees the spread of glimpses around the policy's choices) or ``deterministic`` (its chosen cells: the sequences
    an evaluation scores)."""
    readout_only: bool = False
    """Fine-tune only the classifier's readout (its output layer): the recurrent state, which the policy reads as
    ``memory``, stays as stage 1 left it, so the policy meets the inputs it was trained on (with ``train_focus`` and
    ``train_glance`` false). For policies whose later cells depend on what the state says was read."""
    train_focus: bool = True
    """Also fine-tune the focus encoder f_L and its deep-supervision head (GFNet's stage 3 trains the encoders and
    the classifier; False: the classifier alone)."""
    train_glance: bool = False
    """Also fine-tune the glance encoder f_G and its deep-supervision head."""
    classifier_lr: float = 0.01
    """Learning rate of the classifier (GFNet's stage 3: 0.01)."""
    encoder_lr: float = 0.001
    """Learning rate of the encoders and their heads, when trained."""
    optimizer: str = "sgd"
    """``sgd`` (momentum 0.9, Nesterov) or ``adamw``."""
    weight_decay: float = 1e-4
    """Weight decay of every trained parameter."""
    lr_schedule: str = "constant"
    """``constant`` (GFNet): every gradient step at ``classifier_lr`` / ``encoder_lr``. ``cosine``: the learning
    rates decay from those values to 0 along a half cosine over ``schedule_episodes`` episodes, set per gradient
    step (each step advances by the episodes it trains on), so the fine-tuning ends annealed as stage 1 does; past
    the schedule they stay at 0."""
    schedule_episodes: int = 0
    """Episodes (over all processes under torchrun) the cosine schedule spans. 0: ``finetune`` sets it to the
    episodes it runs; a ``Stage3Wrapper`` driven by other code needs it set."""
    update_every: int = 256
    """Finished episodes (images with their patch corners) collected before each update (over all processes under
    torchrun: each collects update_every / N)."""
    batch_size: int = 64
    """Images per gradient step (over all processes under torchrun: each takes batch_size / N); an update makes
    ``epochs`` passes over the episodes collected."""
    epochs: int = 1
    """Passes over each batch of collected episodes."""
    step_weights: str = "uniform"
    """How the loss weighs the prediction after each glimpse (``gfenv.train.common.STEP_WEIGHTS``): ``uniform``
    (GFNet, as stage 1), ``linear`` (glimpse t of T weighs t) or ``last`` (each episode's last glimpse only). On long
    episodes the early glimpses, far from the answer, carry most of a uniform loss."""
    dsn_ratio: float = 1.0
    """Weight of each encoder's own linear-head loss (GFNet: 1 for ResNet/DenseNet/RegNet, 5 for MobileNet/EffNet)."""
    bn_batch_stats: bool = False
    """Train the BatchNorm layers of the trained encoders on batch statistics and update their running averages
    (as GFNet does). Default False: BatchNorm stays in eval mode, so training normalises with the running statistics
    the env uses and small batches of policy-picked patches cannot make them drift; BN's affine weights still
    learn."""
    amp: str = "auto"
    """Autocast dtype: ``auto`` (bf16 on CUDA, none on CPU), ``bf16``, ``fp16`` or ``none``."""
    grad_checkpointing: bool = False
    """Recompute the encoders' activations in the backward pass (less memory, about a third more compute)."""
    accum_steps: int = 1
    """Micro-batches per gradient step (gradient accumulation: the same update with 1/accum_steps of the memory)."""
    channels_last: bool = False
    """Train in the channels_last memory format (faster convolutions on recent GPUs)."""
    seed: int = 0
    """Seeds the order in which collected episodes are batched."""

    def __post_init__(self):
        check_fields(self, "stage-3 setting", {
            "mode": {"choices": MODES}, "optimizer": {"choices": OPTIMIZERS}, "amp": {"choices": AMP_MODES},
            "classifier_lr": {"low": 0.0}, "encoder_lr": {"low": 0.0}, "weight_decay": {"low": 0.0},
            "lr_schedule": {"choices": LR_SCHEDULES}, "actions": {"choices": ACTIONS},
            "step_weights": {"choices": STEP_WEIGHTS}, "schedule_episodes": {"low": 0},
            "update_every": {"low": 1}, "batch_size": {"low": 1}, "epochs": {"low": 1}, "dsn_ratio": {"low": 0.0},
            "accum_steps": {"low": 1}, "seed": {"low": 0}})
        if not (self.train_classifier or self.train_focus or self.train_glance):
            raise ValueError("Stage 3 has nothing to train: set train_classifier, train_focus or train_glance.")
        if self.readout_only and (self.train_focus or self.train_glance or not self.train_classifier):
            raise ValueError("readout_only=true trains the classifier's readout alone: set train_focus=false (and "
                             "train_glance=false, train_classifier=true) with it.")
        if self.update_every < 1 or self.batch_size < 1 or self.epochs < 1 or self.accum_steps < 1:
            raise ValueError("update_every, batch_size, epochs and accum_steps must be at least 1.")




class Stage3Wrapper(VectorWrapper):
    """Fine-tunes a copy of ``env.model`` on the glimpses the policy takes, while the episodes run.

    Observations, actions, rewards and infos pass through unchanged, so any agent that drives the torch env
    (``agent.act(obs, wrapper)``; attributes such as ``t``, ``visited`` or ``action_masks`` are forwarded) or SB3
    (through ``gfenv.sb3.to_sb3(wrapper)``) runs on it. When an episode ends the wrapper keeps its image, label and
    focus-patch corners (``env.history``). Once ``update_every`` episodes are kept it trains ``trainable_model``, a
    copy of the env's model, with GFNet's stage-3 loss (``gfenv.train.common.glimpse_loss`` at the policy's corners) and
    copies the weights into ``env.model`` (which stays in eval mode, without gradients). ``wrapper.model`` is the
    env's model, as for the bare env.

    The copy happens only when no episode is in progress, so every observation and reward of an episode comes from
    one set of weights: in lockstep episodes (``continuous`` and ``grid`` actions) right after the step that ends
    them, before the step (NEXT_STEP) or the ``reset()`` (DISABLED) that starts the next. The wrapper presents the
    env's autoreset mode, or with ``autoreset_mode=SAME_STEP`` (which SB3 needs) over an env built with autoreset
    disabled, it resets the env itself after the copy, so the new episodes' glances already use the new weights.
    Episodes out of lockstep (``grid+stop``) have no such boundary
    under autoreset, so that action mode needs ``autoreset_mode=DISABLED``; the copy then happens once every slot
    has finished (or at ``reset()``).

    Memory: the kept episodes hold their images on the env's device until the update (``update_every`` x C x H x W
    floats).

    Inside a torchrun process group (``gfenv.train.distributed.setup``) ``trainable_model`` trains under
    DistributedDataParallel: every process runs its own wrapper and env, ``update_every`` and ``batch_size`` are
    split over the processes, every update averages the gradients over them (so each process must collect the
    same number of episodes per update), and ``save`` writes on rank 0 only.
    """

    def __init__(self, env: GlanceFocusVectorEnv, config: Stage3Config | None = None,
                 autoreset_mode: str | AutoresetMode | None = None):
        super().__init__(env)
        base = env.unwrapped
        if not isinstance(base, GlanceFocusVectorEnv):
            raise TypeError(f"Stage3Wrapper needs a GlanceFocusVectorEnv, got {type(base).__name__}.")
        self.base = base
        self.config = config or Stage3Config()
        self.lockstep = base.lockstep
        self.trainable_model = copy.deepcopy(base.model)
        if self.config.channels_last:
            self.trainable_model = self.trainable_model.to(memory_format=torch.channels_last)
        groups = self._trainable_groups()
        self.optimizer = make_optimizer(self.config.optimizer, groups, self.config.classifier_lr,
                                        self.config.weight_decay)
        self._base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        if self.config.lr_schedule == "cosine" and self.config.schedule_episodes < 1:
            raise ValueError("lr_schedule='cosine' needs schedule_episodes (the episodes the schedule spans); "
                             "finetune() sets it to the episodes it runs.")
        self._schedule_episodes = dist.per_rank(self.config.schedule_episodes)  # this process's share
        self._trained_episodes = 0  # this process's episodes trained on so far (the schedule's position)
        self._loss = data_parallel_loss(self.trainable_model, base.device)  # DDP in a process group
        self._update_every = dist.per_rank(self.config.update_every)
        self._batch_size = dist.per_rank(self.config.batch_size)
        self._amp = autocast_dtype(self.config.amp, base.device)
        self.scaler = torch.amp.GradScaler(base.device.type, enabled=self._amp == torch.float16)
        self._gen = torch.Generator(device=base.device).manual_seed(self.config.seed)
        self._kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._kept_count = 0
        self._recorded = torch.zeros(base.num_envs, dtype=torch.bool, device=base.device)
        self._steps_taken = 0
        self._started = False
        self._between_episodes = True
        self.updates = 0
        self.episodes = 0
        self.losses: list[float] = []
        self._set_autoreset_mode(autoreset_mode)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "env":
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        return getattr(self.env, name)

    # ----------------------------------------------------------------------------------------------- settings
    def _set_autoreset_mode(self, mode: str | AutoresetMode | None) -> None:
        """The mode the wrapper presents (fixed at construction, as Gymnasium fixes an env's): the env's own, or
        SAME_STEP over an env built with autoreset disabled (the wrapper then starts the next episodes itself, after
        any weight copy)."""
        inner = self.base.autoreset_mode
        mode = inner if mode is None else AutoresetMode(mode)
        if not self.lockstep and mode != AutoresetMode.DISABLED:
            raise ValueError(f"Stage 3 with action='grid+stop' needs autoreset_mode=DISABLED, got {mode}: episodes "
                             "that stop early run out of lockstep, so under autoreset no step is free of episodes "
                             "in progress and the weights could never be swapped safely.")
        needed = AutoresetMode.DISABLED if mode == AutoresetMode.SAME_STEP else mode
        if inner != needed:
            raise ValueError(f"Stage3Wrapper(autoreset_mode={mode.value!r}) needs the env built with "
                             f"autoreset_mode={needed.value!r}, got {inner.value!r}"
                             + (" (it resets the env itself, after any weight copy)" if mode != needed else "") + ".")
        self.autoreset_mode = mode
        self.metadata = {**self.base.metadata, "autoreset_mode": mode}

    def _trainable_groups(self) -> list[dict]:
        cfg, m = self.config, self.trainable_model
        readout = getattr(m.classifier, "head", None) or getattr(m.classifier, "heads", None)
        parts = [(cfg.train_classifier, [readout if cfg.readout_only else m.classifier], cfg.classifier_lr),
                 (cfg.train_focus, [m.focus_encoder, m.focus_head], cfg.encoder_lr),
                 (cfg.train_glance, [m.glance_encoder, m.glance_head], cfg.encoder_lr)]
        m.requires_grad_(False)
        groups = []
        for on, modules, lr in parts:
            if on:
                params = [p for mod in modules for p in mod.parameters()]
                for p in params:
                    p.requires_grad_(True)
                groups.append({"params": params, "lr": lr})
        return groups

    def _train_mode(self) -> None:
        cfg, m = self.config, self.trainable_model
        m.train()
        for on, encoder in ((cfg.train_focus, m.focus_encoder), (cfg.train_glance, m.glance_encoder)):
            if not on:
                encoder.eval()
        if not cfg.bn_batch_stats:
            for mod in m.modules():
                if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                    mod.eval()

    # ------------------------------------------------------------------------------------------------ the API
    def reset(self, *, seed: int | list[int] | None = None, options: dict | None = None):
        self._update_if_due()  # a reset is always a boundary: unfinished episodes are dropped
        self._recorded.zero_()
        self._steps_taken = 0
        self._started = True
        self._between_episodes = False
        return self.env.reset(seed=seed, options=options)

    def step(self, actions: Any):
        if not self._started:
            raise gym.error.ResetNeeded("Call reset() on the Stage3Wrapper before step(): it counts the steps of "
                                        "each episode from there.")
        last = self.base.steps - 1
        if self.lockstep and self.autoreset_mode == AutoresetMode.NEXT_STEP and self._steps_taken >= last:
            self._steps_taken = 0
            self._between_episodes = False
            return self.env.step(actions)
        obs, reward, terminated, truncated, info = self.env.step(actions)
        self._steps_taken += 1
        if self.lockstep:
            if self._steps_taken < last:
                return obs, reward, terminated, truncated, info
            self._keep(None)
        else:
            ended = (terminated | truncated) & ~self._recorded
            rows = ended.nonzero().squeeze(1)
            if rows.numel():
                self._keep(rows)
                self._recorded |= ended
            if not bool(self._recorded.all()):
                return obs, reward, terminated, truncated, info
        self._between_episodes = True
        self._update_if_due()
        if self.autoreset_mode == AutoresetMode.SAME_STEP:
            obs, info = self._reset_same_step(obs, info, terminated | truncated)
        return obs, reward, terminated, truncated, info

    def _reset_same_step(self, obs: Any, info: dict, final: torch.Tensor) -> tuple[Any, dict]:
        """Start the next episodes now (after any weight copy), reporting the finished ones as SAME_STEP does."""
        info = {**info, "final_obs": obs, "final_info": dict(info), "_final_obs": final, "_final_info": final}
        obs, fresh = self.env.reset()
        info.update({k: v for k, v in fresh.items() if not k.startswith("_")})
        self._steps_taken = 0
        self._between_episodes = False
        return obs, info

    def _keep(self, rows: torch.Tensor | None) -> None:
        b = self.base
        if rows is None:
            kept = (b.images.clone(), b.labels.clone(), b.history.clone())
        else:
            kept = (b.images[rows], b.labels[rows], b.history[rows])
        self._kept.append(kept)  # (n, C, H, W), (n,), (n, T-1, 2)
        self._kept_count += kept[1].shape[0]
        self.episodes += kept[1].shape[0]

    def _update_if_due(self) -> None:
        if self._kept_count >= self._update_every:
            self._update()

    def flush(self) -> None:
        """Train on the episodes kept so far, however few, and copy the weights into the env; between episodes
        only (after the step that ends them, or before the first ``reset()``)."""
        if not self._between_episodes:
            raise RuntimeError("flush() while episodes are in progress: their weights would change mid-episode; "
                               "call it after the step that ends them.")
        if self._kept_count:
            self._update()

    def _update(self) -> None:
        """Gradient steps on the kept episodes, then the copy into ``env.model`` (between episodes only)."""
        with torch.inference_mode(False), torch.enable_grad():  # learners often step the env under no_grad
            self._gradient_steps()
        self.base.model.load_state_dict(self.trainable_model.state_dict())
        self.updates += 1

    def _gradient_steps(self) -> None:
        cfg, dev, model = self.config, self.base.device, self.trainable_model
        images, labels, corners = (torch.cat(parts).clone() for parts in zip(*self._kept))
        self._kept, self._kept_count = [], 0
        counts = dist.all_gather_object(len(labels))
        if len(set(counts)) > 1:
            raise RuntimeError(f"Stage 3 under torchrun: the processes collected {counts} episodes for this update; "
                               "each must collect as many (the same num_envs and episode schedule on every rank).")
        self._train_mode()
        total, count = torch.zeros((), device=dev), 0
        steps = cfg.epochs * math.ceil(len(labels) / self._batch_size)  # each step advances the schedule equally
        for _ in range(cfg.epochs):
            for idx in torch.randperm(len(labels), generator=self._gen, device=dev).split(self._batch_size):
                self._set_lr(self._trained_episodes + len(labels) * count / steps)
                self.optimizer.zero_grad(set_to_none=True)
                micros = idx.chunk(cfg.accum_steps)
                for m, micro in enumerate(micros):
                    x = images[micro]
                    if cfg.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    with dist.no_sync(self._loss, skip=m < len(micros) - 1):  # DDP averages on the last one
                        with torch.autocast(dev.type, dtype=self._amp or torch.float32, enabled=self._amp is not None):
                            loss, _ = self._loss(x, labels[micro], corners[micro], cfg.dsn_ratio,
                                                 cfg.grad_checkpointing, taken=corners[micro, :, 0] >= 0,
                                                 step_weights=cfg.step_weights)
                        share = micro.numel() / idx.numel()  # 1.0 without accumulation: the same loss
                        self.scaler.scale(loss * share).backward()
                    total = total + loss.detach() * share
                self.scaler.step(self.optimizer)
                self.scaler.update()
                count += 1
        self._trained_episodes += len(labels)
        self._set_lr(self._trained_episodes)  # the rates the next step starts from (0 at the schedule's end)
        model.eval()
        if cfg.bn_batch_stats:
            dist.broadcast_buffers(model)  # rank 0's BatchNorm statistics on every rank
        self.losses.append(float(total / count))

    def _set_lr(self, episodes_done: float) -> None:
        """Each group's learning rate for a gradient step after ``episodes_done`` of this process's episodes (the
        cosine schedule; ``constant`` leaves the optimizer's rates as they are)."""
        if self.config.lr_schedule != "cosine":
            return
        factor = 0.5 * (1.0 + math.cos(math.pi * min(episodes_done / self._schedule_episodes, 1.0)))
        for group, base in zip(self.optimizer.param_groups, self._base_lrs):
            group["lr"] = base * factor

    def save(self, path: str | Path, meta: dict | None = None) -> Path:
        """The fine-tuned weights as a standard model checkpoint (meta ``stage=3``), for ``checkpoint=PATH``.

        Under torchrun rank 0 writes and every rank waits for it; ``episodes`` counts those of all processes."""
        world = dist.world_size()
        info = {"stage": 3, "stage3": asdict(self.config), "updates": self.updates,
                "episodes": self.episodes * world, "processes": world}
        if dist.is_main():
            save_model(path, self.trainable_model, {**info, **(meta or {})})
        dist.barrier()
        return Path(path)


def finetune(agent: AgentLike, env_kwargs: dict[str, Any] | None = None, episodes: int = STAGE3_EPISODES,
             config: Stage3Config | None = None, seed: int = 0, device: str | torch.device = "cpu",
             progress: bool = True, path: str | Path = "runs/stage3/model.pt", num_envs: int = 64) -> Path:
    """GFNet's stage 3 in frozen mode: run ``agent`` (anything with ``reset(env)``/``act(obs, env)``) with sampled
    actions on the train split and fine-tune; returns ``path``, the saved checkpoint.

    Episodes run in whole batches of ``num_envs`` (so at least ``episodes``; ``lr_schedule='cosine'`` with
    ``schedule_episodes=0`` spans them all, so the last step's rates are near 0); the env's stage-1 model comes from
    ``env_kwargs`` (``checkpoint=...``, default the shipped one) merged with the agent's ``env_kwargs``.

    Under torchrun (it joins the process group unless already in one) ``episodes`` and ``num_envs`` are totals over
    the processes: each runs num_envs / N slots seeded by ``dist.rank_seed(seed)`` until it has episodes / N
    episodes, with its own copy of ``agent`` on its own device (``gfenv.train.distributed.local_device``); rank 0 alone
    shows progress and writes ``path``.
    """
    config = config or Stage3Config()
    if config.mode != "frozen":
        raise ValueError("finetune() runs a fixed policy (mode='frozen'); for mode='joint' train the agent on "
                         "Stage3Wrapper(env, autoreset_mode=SAME_STEP) itself, e.g. SB3 learn() on "
                         "gfenv.sb3.to_sb3(wrapper).")
    if episodes < 1:
        raise ValueError(f"episodes must be at least 1, got {episodes}.")
    kwargs = {**(env_kwargs or {}), **getattr(agent, "env_kwargs", {})}
    # a policy trained on cached features fine-tunes on live images: the cache holds the features of the weights
    # being fine-tuned and no images to crop
    kwargs = without_cache(kwargs)
    fixed = sorted(set(FIXED_ENV_KWARGS) & set(kwargs))
    if fixed:
        raise ValueError(f"finetune sets {', '.join(fixed)} itself (train split, autoreset disabled); drop them.")
    with dist.distributed(device) as dev:
        return _finetune(agent, kwargs, episodes, config, seed, dev, progress and dist.is_main(), Path(path),
                         num_envs)


def _finetune(agent: AgentLike, kwargs: dict[str, Any], episodes: int, config: Stage3Config, seed: int,
              device: torch.device, progress: bool, path: Path, num_envs: int) -> Path:
    from tqdm.auto import tqdm

    world, mine = dist.world_size(), dist.per_rank(episodes)  # mine: this process's episodes
    env_seed = dist.rank_seed(seed)
    env = GlanceFocusVectorEnv(num_envs=min(dist.per_rank(num_envs), mine), split="train", device=device,
                               seed=env_seed, autoreset_mode=AutoresetMode.DISABLED, **kwargs)
    if config.lr_schedule == "cosine" and config.schedule_episodes == 0:  # span the episodes run (whole batches)
        config = replace(config, schedule_episodes=math.ceil(mine / env.num_envs) * env.num_envs * world)
    wrapper = Stage3Wrapper(env, config)
    act = sampling_act(agent) if config.actions == "sampled" else agent.act

    def no_grad_act(obs: Any, env: Any) -> torch.Tensor:
        with torch.no_grad():
            return act(obs, env)

    with tqdm(total=mine * world, desc="stage 3", unit="img", disable=not progress) as bar:
        while wrapper.episodes < mine:
            play_batch(agent, wrapper, seed=env_seed if wrapper.episodes == 0 else None, act=no_grad_act)
            bar.update(env.num_envs * world)
            if wrapper.losses:
                bar.set_postfix(loss=f"{wrapper.losses[-1]:.3f}", updates=wrapper.updates)
    wrapper.flush()
    plain = {k: v if isinstance(v, (str, int, float, bool, type(None))) else str(v) for k, v in kwargs.items()}
    meta = {"agent": getattr(agent, "name", type(agent).__name__), "env_kwargs": plain, "seed": seed,
            "env": env.task.env_id, "task": env.task.words}
    return wrapper.save(path, meta)
