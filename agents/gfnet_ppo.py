"""GFNet's own patch policy and PPO (stage 2), the reference learned agent: a GRU over the previous glimpse's feature
map, a fixed-std Gaussian location (or a masked categorical over grid cells), Monte-Carlo returns, one update a batch.

Runs on the batched torch env directly: whole episodes in lockstep, everything on ``device``, seeded end to end.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from gymnasium.vector.vector_env import AutoresetMode
from torch import nn
from tqdm.auto import tqdm

from agents.base import register_agent
from agents.learned import LearnedAgent
from gfenv.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from gfenv.env import GlanceFocusVectorEnv
from gfenv.flops import count_macs
from gfenv.rollout import FIXED_ENV_KWARGS, check_action_mode, play_batch
from gfenv.utils import check_fields

FORMAT = "gfenv-gfnet-ppo-v1"
RETURN_EPS = 1e-5
GFNET_LINEAR_WIDTH = 2048  # the first layer of GFNet's ResNet/DenseNet state encoder


@dataclass
class GFNetPPOConfig:
    """GFNet's stage-2 settings (the paper's defaults, but a GRU of 256 for the small CNN instead of 1024)."""

    learning_rate: float = 3e-4
    """Adam's learning rate."""
    gamma: float = 0.7
    """Discount of the Monte-Carlo returns."""
    clip_range: float = 0.2
    """PPO's clipping of the probability ratio: [1 - clip_range, 1 + clip_range]."""
    value_coef: float = 0.5
    """Weight of the critic's squared error against the normalised returns."""
    entropy_coef: float = 0.01
    """Weight of the entropy bonus (constant for the fixed-std Gaussian, so it only acts in grid mode)."""
    n_epochs: int = 1
    """Gradient steps on each batch of episodes (GFNet: one)."""
    action_std: float = 0.1
    """Fixed standard deviation of the Gaussian over the location in [0, 1]^2 (not learned)."""
    hidden_size: int = 256
    """Width of the state encoder's output and of the GRU (GFNet: 1024 for ResNet-50, 256 for smaller ones)."""
    state_encoder: str = "linear"
    """How the feature map enters the GRU (``STATE_ENCODERS``): ``linear`` over the flattened map, ``gfnet_linear``
    (GFNet's exact ResNet/DenseNet encoder: linear to 2048, then to ``hidden_size``) or ``conv`` (a 1x1 conv to
    ``conv_channels`` first, its choice for the mobile nets)."""
    conv_channels: int = 32
    """Channels of the ``conv`` state encoder's 1x1 convolution."""

    def __post_init__(self) -> None:
        check_fields(self, "gfnet_ppo hyperparameter")  # types first: a string where a number goes is named
        if self.state_encoder not in STATE_ENCODERS:
            raise ValueError(f"Unknown state_encoder {self.state_encoder!r}; choose one of {sorted(STATE_ENCODERS)}.")
        checks = {"learning_rate": self.learning_rate > 0, "gamma": 0.0 <= self.gamma <= 1.0,
                  "clip_range": self.clip_range > 0, "n_epochs": self.n_epochs >= 1, "action_std": self.action_std > 0,
                  "hidden_size": self.hidden_size >= 1, "conv_channels": self.conv_channels >= 1}
        bad = [f"{name}={getattr(self, name)!r}" for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"Invalid gfnet_ppo hyperparameter(s): {', '.join(bad)}.")

    @classmethod
    def from_dict(cls, overrides: Mapping[str, Any] | None) -> GFNetPPOConfig:
        """The defaults with ``overrides`` applied; an unknown name is refused with the list of valid ones."""
        overrides = dict(overrides or {})
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(overrides) - set(valid))
        if unknown:
            raise ValueError(f"Unknown gfnet_ppo hyperparameter(s) {unknown}; valid names: {', '.join(valid)}.")
        return cls(**overrides)


def discounted_returns(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """R_t = r_t + gamma * R_{t+1} along dim 0 (time), for episodes that all end at the last step."""
    returns = torch.empty_like(rewards)
    running = torch.zeros_like(rewards[0])
    for t in range(rewards.shape[0] - 1, -1, -1):
        running = rewards[t] + gamma * running
        returns[t] = running
    return returns


def normalise(returns: torch.Tensor) -> torch.Tensor:
    """(R - mean) / (std + 1e-5) over the whole batch, as GFNet normalises its returns."""
    std = returns.std() if returns.numel() > 1 else returns.new_zeros(())
    return (returns - returns.mean()) / (std + RETURN_EPS)


# ----------------------------------------------------------------------------------------------- the network
def linear_state_encoder(map_shape: tuple[int, ...], cfg: GFNetPPOConfig) -> nn.Module:
    return nn.Sequential(nn.Linear(math.prod(map_shape), cfg.hidden_size), nn.ReLU())


def conv_state_encoder(map_shape: tuple[int, ...], cfg: GFNetPPOConfig) -> nn.Module:
    d, h, w = map_shape
    return nn.Sequential(nn.Unflatten(1, (d, h, w)), nn.Conv2d(d, cfg.conv_channels, 1, bias=False), nn.ReLU(),
                         nn.Flatten(), nn.Linear(cfg.conv_channels * h * w, cfg.hidden_size), nn.ReLU())


def gfnet_linear_state_encoder(map_shape: tuple[int, ...], cfg: GFNetPPOConfig) -> nn.Module:
    """GFNet's own state encoder for ResNet/DenseNet, layer for layer (so its released policies load exactly)."""
    return nn.Sequential(nn.Linear(math.prod(map_shape), GFNET_LINEAR_WIDTH), nn.ReLU(),
                         nn.Linear(GFNET_LINEAR_WIDTH, cfg.hidden_size), nn.ReLU())


STATE_ENCODERS: dict[str, Callable[[tuple[int, ...], GFNetPPOConfig], nn.Module]] = {
    "linear": linear_state_encoder, "gfnet_linear": gfnet_linear_state_encoder, "conv": conv_state_encoder}


class GaussianHead(nn.Module):
    """GFNet's actor: linear -> 2 -> sigmoid is the mean location in [0, 1]^2; the std is a fixed buffer."""

    def __init__(self, hidden: int, std: float, cells: int):
        super().__init__()
        self.mean = nn.Sequential(nn.Linear(hidden, 2), nn.Sigmoid())
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, hidden: torch.Tensor, visited: torch.Tensor) -> torch.Tensor:
        return self.mean(hidden)  # (N, 2)

    def sample(self, params: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        noise = torch.randn(params.shape, generator=gen, device=params.device)
        return (params + self.std * noise).clamp(0.0, 1.0)  # (N, 2) clipped like GFNet's training actions

    def log_prob_entropy(self, params: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = torch.distributions.Normal(params, self.std.expand_as(params))
        return dist.log_prob(actions).sum(-1), dist.entropy().sum(-1)

    def mode(self, params: torch.Tensor) -> torch.Tensor:
        return params

    def to_env(self, actions: torch.Tensor) -> torch.Tensor:
        return 2.0 * actions - 1.0  # the env's [-1, 1]^2


class CategoricalHead(nn.Module):
    """AdaFocus's discrete actor: one logit per grid cell, visited cells masked out (unless all are visited)."""

    def __init__(self, hidden: int, std: float, cells: int):
        super().__init__()
        self.logits = nn.Linear(hidden, cells)

    def forward(self, hidden: torch.Tensor, visited: torch.Tensor) -> torch.Tensor:
        blocked = visited & ~visited.all(1, keepdim=True)
        logits = self.logits(hidden)  # (N, G*G)
        return logits.masked_fill(blocked, torch.finfo(logits.dtype).min).log_softmax(1)

    def sample(self, params: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return torch.multinomial(params.exp(), 1, generator=gen).squeeze(1)  # (N,)

    def log_prob_entropy(self, params: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = torch.distributions.Categorical(logits=params)
        return dist.log_prob(actions), dist.entropy()

    def mode(self, params: torch.Tensor) -> torch.Tensor:
        return params.argmax(-1)

    def to_env(self, actions: torch.Tensor) -> torch.Tensor:
        return actions.long()


HEADS: dict[str, type[nn.Module]] = {"continuous": GaussianHead, "grid": CategoricalHead}


class GFNetPolicy(nn.Module):
    """pi: state encoder -> GRU cell -> actor head and critic (linear -> 1), over the flattened feature map."""

    def __init__(self, map_shape: tuple[int, ...], action: str, cells: int, cfg: GFNetPPOConfig):
        super().__init__()
        self.hidden_size = cfg.hidden_size
        self.state_encoder = STATE_ENCODERS[cfg.state_encoder](tuple(map_shape), cfg)
        self.gru = nn.GRUCell(cfg.hidden_size, cfg.hidden_size)
        self.actor = HEADS[action](cfg.hidden_size, cfg.action_std, cells)
        self.critic = nn.Linear(cfg.hidden_size, 1)

    def decide(self, obs: torch.Tensor, hidden: torch.Tensor,
               visited: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One decision: (the actor's distribution parameters, the new GRU state)."""
        hidden = self.gru(self.state_encoder(obs), hidden)  # (N, H)
        return self.actor(hidden, visited), hidden

    def evaluate(self, obs: torch.Tensor, actions: torch.Tensor,
                 visited: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Whole episodes (L, N, ...) from a zero GRU state: (log-probabilities, entropies, values), each (L, N)."""
        hidden = obs.new_zeros(obs.shape[1], self.hidden_size)
        log_probs, entropies, values = [], [], []
        for t in range(obs.shape[0]):
            params, hidden = self.decide(obs[t], hidden, visited[t])
            lp, ent = self.actor.log_prob_entropy(params, actions[t])
            log_probs.append(lp)
            entropies.append(ent)
            values.append(self.critic(hidden).squeeze(1))
        return torch.stack(log_probs), torch.stack(entropies), torch.stack(values)


@dataclass
class Rollout:
    """One batch of whole episodes, time first: L = T - 1 decisions for each of N images."""

    obs: torch.Tensor
    """(L, N, D*h*w) the policy's inputs."""
    actions: torch.Tensor
    """(L, N, 2) locations in [0, 1]^2, or (L, N) grid cells."""
    log_probs: torch.Tensor
    """(L, N) log-probabilities of the actions under the policy that took them."""
    rewards: torch.Tensor
    """(L, N) the env's rewards."""
    visited: torch.Tensor
    """(L, N, G*G) the cells visited before each decision."""
    final_info: dict
    """The env's info after the last step."""


# ------------------------------------------------------------------------------------------------- the agent
@register_agent("gfnet_ppo")
class GFNetPPOAgent(LearnedAgent):
    """GFNet's patch policy trained with its PPO on the train split; acts with the mean (or the best unvisited cell).

    ``env_kwargs`` configure the training env and, through ``self.env_kwargs``, the evaluation env; the agent sets
    ``split``, ``sampling``, ``device``, ``seed`` and autoreset itself and always observes ``observation="gfnet"``.
    ``hyperparams`` override ``GFNetPPOConfig``. The training env (``self.env``) is built on first use; ``layout``
    (the feature map's shape and the number of grid cells) lets ``load`` size the policy without building it.
    """

    name = "gfnet_ppo"
    supported_actions = frozenset(HEADS)

    def __init__(self, env_kwargs: dict | None = None, num_envs: int = 64, seed: int = 0, device: str = "cpu",
                 hyperparams: dict | None = None, tensorboard_log: str | None = None, *,
                 layout: tuple[tuple[int, ...], int] | None = None):
        super().__init__(int(torch.randint(2**31, (1,)).item()) if seed is None else int(seed))
        seed = self.seed
        self.config = GFNetPPOConfig.from_dict(hyperparams)
        self.env_kwargs = _check_env_kwargs(env_kwargs)
        check_action_mode(self, self.env_kwargs["action"])
        self.num_envs, self.device, self.tensorboard_log = int(num_envs), torch.device(device), tensorboard_log
        self._env: GlanceFocusVectorEnv | None = None
        if layout is None:
            layout = (tuple(self.env.glance_map_shape), self.env.grid ** 2)
        self.map_shape, self.cells = tuple(int(s) for s in layout[0]), int(layout[1])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.policy = GFNetPolicy(self.map_shape, self.env_kwargs["action"], self.cells, self.config)
        self.policy.to(self.device).eval()
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=self.config.learning_rate)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self.sample_generator = torch.Generator(device=self.device)  # sample(): apart from training's draws
        self.sample_generator.manual_seed(seed)
        self.num_timesteps = 0
        self._env_seeded = False
        self._hidden: torch.Tensor | None = None
        self._writer = None
        obs = torch.zeros(1, math.prod(self.map_shape), device=self.device)
        hidden = torch.zeros(1, self.config.hidden_size, device=self.device)
        visited = torch.zeros(1, self.cells, dtype=torch.bool, device=self.device)
        self.macs_per_step = count_macs(self.policy.decide, obs, hidden, visited)

    @property
    def env(self) -> GlanceFocusVectorEnv:
        """The training env: the train split, ``num_envs`` slots on ``device``, autoreset disabled."""
        if self._env is None:
            self._env = GlanceFocusVectorEnv(num_envs=self.num_envs, split="train", device=self.device, seed=self.seed,
                                             autoreset_mode=AutoresetMode.DISABLED, **self.env_kwargs)
        return self._env

    # ------------------------------------------------------------------------------------------------ acting
    def check_env(self, env: GlanceFocusVectorEnv) -> None:
        super().check_env(env)
        found = (env.action_mode, env.observation_mode, tuple(env.glance_map_shape), env.grid ** 2)
        wanted = (self.env_kwargs["action"], "gfnet", self.map_shape, self.cells)
        if found != wanted:
            raise ValueError(f"This gfnet_ppo agent needs an env with (action, observation, feature map, grid cells) "
                             f"= {wanted}, got {found}; build it with the agent's env_kwargs.")

    def reset(self, env: GlanceFocusVectorEnv) -> None:
        self.check_env(env)
        self._hidden = torch.zeros(env.num_envs, self.config.hidden_size, device=self.device)

    @torch.no_grad()
    def act(self, obs: Any, env: GlanceFocusVectorEnv) -> torch.Tensor:
        """Deterministic: the Gaussian's mean, or the most probable unvisited cell. A slot at its glance (t = 1)
        starts from a zero GRU state, so autoresetting envs work too."""
        return self.policy.actor.to_env(self.policy.actor.mode(self._decide(obs, env))).to(env.device)

    @torch.no_grad()
    def sample(self, obs: Any, env: GlanceFocusVectorEnv) -> torch.Tensor:
        """Stochastic, as in training: a location drawn from the Gaussian (clipped to the image), or an unvisited
        cell drawn from the softmax; the draws come from ``sample_generator`` (seeded with ``seed``)."""
        params = self._decide(obs, env)
        return self.policy.actor.to_env(self.policy.actor.sample(params, self.sample_generator)).to(env.device)

    def _decide(self, obs: Any, env: GlanceFocusVectorEnv) -> torch.Tensor:
        if self._hidden is None or self._hidden.shape[0] != env.num_envs:
            self.reset(env)
        obs = torch.as_tensor(obs, dtype=torch.float32, device=self.device).reshape(env.num_envs, -1)
        start = (env.t == 1).to(self.device)[:, None]
        params, self._hidden = self.policy.decide(obs, self._hidden.masked_fill(start, 0.0),
                                                  env.visited.to(self.device))
        return params

    # ---------------------------------------------------------------------------------------------- training
    @torch.no_grad()
    def collect(self, on_step: Callable[[], bool] | None = None) -> Rollout | None:
        """Play one batch of episodes (one image per slot) with sampled actions; None if ``on_step`` says stop."""
        actor = self.policy.actor
        steps: dict[str, list[torch.Tensor]] = {"obs": [], "actions": [], "log_probs": [], "rewards": [], "visited": []}

        # the batch's own GRU state: a callback may evaluate the agent mid-batch (on other envs), which resets
        # the agent's acting state
        hidden = torch.zeros(self.env.num_envs, self.config.hidden_size, device=self.device)

        def act(obs: torch.Tensor, env: GlanceFocusVectorEnv) -> torch.Tensor:
            nonlocal hidden
            visited = env.visited.clone()
            params, hidden = self.policy.decide(obs, hidden, visited)
            actions = actor.sample(params, self.generator)
            log_prob, _ = actor.log_prob_entropy(params, actions)
            for key, value in (("obs", obs), ("actions", actions), ("log_probs", log_prob), ("visited", visited)):
                steps[key].append(value)
            return actor.to_env(actions)

        def record(obs: Any, reward: torch.Tensor, info: dict, finished: torch.Tensor) -> bool:
            steps["rewards"].append(reward.float())
            self.num_timesteps += self.env.num_envs
            return on_step is None or on_step()

        info = play_batch(self, self.env, seed=None if self._env_seeded else self.seed, act=act, on_step=record)
        self._env_seeded = True
        if info is None:
            return None
        return Rollout(**{k: torch.stack(v) for k, v in steps.items()}, final_info=info)

    def update(self, rollout: Rollout) -> dict[str, float]:
        """GFNet's PPO step(s): normalised Monte-Carlo returns, advantage = return - V, clipped ratio."""
        cfg = self.config
        returns = normalise(discounted_returns(rollout.rewards, cfg.gamma))  # (L, N)
        for _ in range(cfg.n_epochs):
            log_probs, entropy, values = self.policy.evaluate(rollout.obs, rollout.actions, rollout.visited)
            advantages = returns - values.detach()
            ratio = (log_probs - rollout.log_probs).exp()
            clipped = ratio.clamp(1.0 - cfg.clip_range, 1.0 + cfg.clip_range)
            policy_loss = -torch.min(ratio * advantages, clipped * advantages).mean()
            value_loss = F.mse_loss(values, returns)
            entropy_mean = entropy.mean()
            loss = policy_loss + cfg.value_coef * value_loss - cfg.entropy_coef * entropy_mean
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        with torch.no_grad():
            clip_fraction = ((ratio - 1.0).abs() > cfg.clip_range).float().mean()
            approx_kl = ((ratio - 1.0) - ratio.log()).mean()
        info = rollout.final_info
        stats = {"rollout/mean_reward": rollout.rewards.sum(0).mean(), "rollout/last_step_accuracy": info["correct"]
                 .float().mean(), "rollout/last_step_true_confidence": info["true_confidence"].mean(),
                 "train/loss": loss, "train/policy_loss": policy_loss, "train/value_loss": value_loss,
                 "train/entropy": entropy_mean, "train/clip_fraction": clip_fraction, "train/approx_kl": approx_kl}
        return {k: float(v.detach()) for k, v in stats.items()}

    def learn(self, total_timesteps: int, callbacks: list | None = None, progress_bar: bool = False) -> None:
        """Train for ``total_timesteps`` more slot steps, rounded up to whole batches of num_envs x (T - 1).

        ``callbacks`` (``agents.learned.TrainingCallback``) run after every vector step; one returning False stops
        training at once, without updating on the unfinished batch. Scalars go to TensorBoard after each update.
        """
        per_batch = self.num_envs * (self.env.steps - 1)
        updates = max(1, math.ceil(total_timesteps / per_batch))
        callbacks = list(callbacks or ())
        with tqdm(total=updates * per_batch, unit="step", desc=self.name, disable=not progress_bar) as bar:

            def on_step() -> bool:
                bar.update(self.num_envs)
                return all([cb.on_step(self, self.num_timesteps) is not False for cb in callbacks])

            self.policy.train()
            try:
                for _ in range(updates):
                    rollout = self.collect(on_step)
                    if rollout is None:
                        break
                    self.log_scalars(self.update(rollout), self.num_timesteps)
            finally:
                self.policy.eval()
                if self._writer is not None:
                    self._writer.flush()

    def log_scalars(self, values: dict[str, float], num_timesteps: int) -> None:
        if not self.tensorboard_log:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(self.tensorboard_log)
        for key, value in values.items():
            self._writer.add_scalar(key, value, num_timesteps)

    # ------------------------------------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> None:
        """Atomically write the policy, optimiser and settings (``load`` rebuilds the agent from them)."""
        if any(callable(v) for v in self.env_kwargs.values()):
            raise ValueError("Cannot save env_kwargs holding a function (e.g. a reward callable); register it "
                             "(gfenv.register_reward) and pass its name instead.")
        payload = {"format": FORMAT, "hyperparams": asdict(self.config), "env_kwargs": self.env_kwargs,
                   "num_envs": self.num_envs, "seed": self.seed, "num_timesteps": self.num_timesteps,
                   "layout": [list(self.map_shape), self.cells],
                   "policy": {k: v.detach().cpu() for k, v in self.policy.state_dict().items()},
                   "optimizer": self.optimizer.state_dict()}
        save_checkpoint(path, payload)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu", trust_pickled_zip: bool = False,
             **kwargs: Any) -> GFNetPPOAgent:
        """Rebuild a saved agent on ``device``, ready to act; ``kwargs`` (``num_envs``, ``seed``, ``tensorboard_log``)
        override the stored constructor arguments for further training. The training env is built only by ``learn``.
        The file is always read with ``weights_only=True`` (``trust_pickled_zip`` concerns SB3 zips only)."""
        payload = load_checkpoint(path, map_location=device)
        if payload.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not a gfnet_ppo checkpoint (format {payload.get('format')!r}, expected "
                                  f"{FORMAT!r}); save agents with GFNetPPOAgent.save.")
        map_shape, cells = payload["layout"]
        args = {"env_kwargs": payload["env_kwargs"], "num_envs": payload["num_envs"], "seed": payload["seed"],
                "hyperparams": payload["hyperparams"], **kwargs, "device": device}
        agent = cls(**args, layout=(tuple(map_shape), cells))
        agent.policy.load_state_dict(payload["policy"])
        agent.optimizer.load_state_dict(payload["optimizer"])
        agent.num_timesteps = int(payload["num_timesteps"])
        return agent

    @classmethod
    def from_gfnet_checkpoint(cls, checkpoint: Any, device: str = "cpu", grid: int = 7,
                              **kwargs: Any) -> GFNetPPOAgent:
        """An agent acting with the patch policy of an official GFNet-Pytorch checkpoint (``.pth.tar``).

        ``checkpoint`` is its path or what ``gfenv.official.load_gfnet_checkpoint`` returned. The agent acts on
        envs built with that checkpoint's model (``gfenv.eval.official.gfnet_env``): observation ``gfnet``, continuous
        actions, ``grid`` only sizes the visited map. ``kwargs`` go to the constructor (``seed``, ``num_envs``).
        """
        from gfenv.official import GFNetCheckpoint, load_gfnet_checkpoint

        ckpt = checkpoint if isinstance(checkpoint, GFNetCheckpoint) else load_gfnet_checkpoint(checkpoint)
        if ckpt.policy is None:
            raise CheckpointError(f"{ckpt.path} holds no patch policy (a stage-1 checkpoint); use a stage-2 or "
                                  f"stage-3 GFNet checkpoint, or train one with train_agent.py --stage 2.")
        hyperparams = {**(kwargs.pop("hyperparams", None) or {}), **ckpt.policy_hyperparams}
        agent = cls(**{"env_kwargs": {"observation": "gfnet", "action": "continuous", "grid": grid}, **kwargs,
                       "hyperparams": hyperparams, "device": device, "layout": (ckpt.map_shape, grid * grid)})
        agent.policy.load_state_dict(ckpt.policy)
        return agent


def _check_env_kwargs(env_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """The training env's settings as plain values, with the observation and action mode made explicit."""
    kwargs = dict(env_kwargs or {})
    reserved = sorted(set(FIXED_ENV_KWARGS) & set(kwargs))
    if reserved:
        raise ValueError(f"gfnet_ppo sets {', '.join(reserved)} itself (train split, num_envs/seed/device "
                         f"arguments); drop them from env_kwargs.")
    if kwargs.setdefault("observation", "gfnet") != "gfnet":
        raise ValueError(f"gfnet_ppo reads GFNet's policy input, observation='gfnet' (got {kwargs['observation']!r}).")
    kwargs.setdefault("action", "continuous")
    return {k: str(v) if isinstance(v, Path) else v for k, v in kwargs.items()}
