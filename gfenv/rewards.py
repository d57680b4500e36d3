"""Rewards: what a focus step is worth. A registry of named rewards, and plain callables plugged in by users.

A reward is a callable ``fn(probs_before, probs_after, labels, step, macs, **extra) -> (B,)`` on torch tensors:
the classifier's softmax (B, K) before and after the new glimpse, the true labels (B,), the step index (B,) of the
new glimpse (1 = first focus patch), and the multiply-adds (B,) that the step cost. Registered rewards may also
take ``done`` (B,) bool (the episode ends with this step) and ``probs_random`` (B, K), the softmax a uniformly
random patch would have given (computed only for rewards that ask for it).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from gfenv.utils import InvalidType, check_float

RewardFn = Callable[..., torch.Tensor]
ARGUMENTS = ("probs_before", "probs_after", "labels", "step", "macs")
"""What every reward is called with, in this order."""
REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Register a reward under ``name`` so that ``reward="name"`` selects it; a name taken by another function is
    refused."""

    def deco(fn: RewardFn) -> RewardFn:
        if REWARDS.get(name, fn) is not fn:
            raise ValueError(f"A reward named {name!r} is already registered ({REWARDS[name]!r}).")
        REWARDS[name] = fn
        return fn

    return deco


def _true(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return probs.gather(1, labels[:, None]).squeeze(1)  # (B,)


@register_reward("confidence_gain")
def confidence_gain(probs_before, probs_after, labels, step, macs, **_):
    """GFNet: p_t(y) - p_{t-1}(y)."""
    return _true(probs_after, labels) - _true(probs_before, labels)


@register_reward("log_confidence_gain")
def log_confidence_gain(probs_before, probs_after, labels, step, macs, **_):
    """log p_t(y) - log p_{t-1}(y), floored at 1e-8."""
    after, before = _true(probs_after, labels), _true(probs_before, labels)
    return torch.log(after.clamp_min(1e-8)) - torch.log(before.clamp_min(1e-8))


@register_reward("final_correct")
def final_correct(probs_before, probs_after, labels, step, macs, done, **_):
    """RAM: 1 at the episode's last step if the prediction is right, else 0."""
    return ((probs_after.argmax(1) == labels) & done).to(probs_after.dtype)


@register_reward("vs_random")
def vs_random(probs_before, probs_after, labels, step, macs, probs_random, **_):
    """AdaFocus: p_t(y) minus the p_t(y) that a uniformly random patch would have given."""
    return _true(probs_after, labels) - _true(probs_random, labels)


@register_reward("entropy_drop")
def entropy_drop(probs_before, probs_after, labels, step, macs, **_):
    """Label-free: the drop of the prediction's entropy H(p_{t-1}) - H(p_t)."""

    def entropy(p):
        return -(p * torch.log(p.clamp_min(1e-12))).sum(1)

    return entropy(probs_before) - entropy(probs_after)


_FINITE = frozenset(REWARDS.values())
"""The rewards above: finite whenever the probabilities are (so their values are not checked at each step)."""


class Reward:
    """A resolved reward: a registered name or a user callable, plus an optional cost per million MACs."""

    def __init__(self, reward: str | RewardFn = "confidence_gain", mac_cost: float = 0.0):
        if isinstance(reward, str):
            if reward not in REWARDS:
                raise ValueError(f"Unknown reward {reward!r}. Valid rewards: {', '.join(sorted(REWARDS))}; or pass a "
                                 "callable fn(probs_before, probs_after, labels, step, macs) -> (B,) tensor.")
            fn, name = REWARDS[reward], reward
        elif callable(reward):
            fn, name = reward, getattr(reward, "__name__", type(reward).__name__)
        else:
            raise InvalidType(f"reward={reward!r} (type {type(reward).__name__}): must be a registered reward name "
                              f"({', '.join(sorted(REWARDS))}) or a callable fn(probs_before, probs_after, labels, "
                              "step, macs) -> (B,) tensor.")
        self.fn, self.name = fn, name
        self.mac_cost = check_float("mac_cost", mac_cost, 0.0, hint="subtracted per million multiply-adds")
        self.checked = fn not in _FINITE  # the built-in rewards are finite for finite probabilities: no check
        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError):  # a builtin without a signature: taken as it is
            signature = None
        params = signature.parameters if signature is not None else {}
        var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self.wants = {k for k in ("done", "probs_random") if k in params}
        if var_kw:
            self.wants.add("done")
        self.needs_random = "probs_random" in self.wants
        if signature is not None:
            try:
                signature.bind(*ARGUMENTS, **{k: None for k in self.wants})
            except TypeError as err:
                raise InvalidType(f"reward={name}: its signature {signature} cannot take the env's call "
                                  f"fn({', '.join(ARGUMENTS)}{''.join(', ' + k + '=...' for k in sorted(self.wants))})"
                                  f" ({err}); define it as def {name}(probs_before, probs_after, labels, step, macs, "
                                  "**extra).") from None

    def __call__(self, probs_before: torch.Tensor, probs_after: torch.Tensor, labels: torch.Tensor,
                 step: torch.Tensor, macs: torch.Tensor, done: torch.Tensor,
                 probs_random: torch.Tensor | None = None) -> torch.Tensor:
        extra = {}
        if "done" in self.wants:
            extra["done"] = done
        if "probs_random" in self.wants:
            extra["probs_random"] = probs_random
        r = self.fn(probs_before, probs_after, labels, step, macs, **extra)
        b = labels.shape[0]
        if not isinstance(r, torch.Tensor):
            raise TypeError(f"Reward {self.name!r} returned {type(r).__name__}; it must return a torch tensor of "
                            f"shape ({b},), one value per env.")
        if r.shape != (b,):
            raise ValueError(f"Reward {self.name!r} returned shape {tuple(r.shape)}; it must return shape ({b},), "
                             "one value per env.")
        r = r.to(torch.float32)
        if self.checked:
            check_finite(r, f"Reward {self.name!r} returned NaN or inf; make it return finite values (clamp "
                            "probabilities before taking logs).")
        if self.mac_cost:
            r = r - self.mac_cost * macs.to(torch.float32) / 1e6
        return r


def check_finite(x: torch.Tensor, message: str) -> None:
    """Raise ``ValueError(message)`` if ``x`` holds NaN or inf; on CUDA an asynchronous check (no host sync).

    Large tensors (images) are checked through their sum, one pass instead of four: any NaN or inf makes the sum
    non-finite (on a CPU a non-finite sum is confirmed element-wise, so huge finite values never raise there).
    """
    if x.numel() > 65536 and x.is_floating_point():
        if x.device.type == "cpu":
            if not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
                raise ValueError(message)
        else:
            torch._assert_async(torch.isfinite(x.sum()), message)
    elif x.device.type == "cpu":
        if not bool(torch.isfinite(x).all()):
            raise ValueError(message)
    else:
        torch._assert_async(torch.isfinite(x).all(), message)
