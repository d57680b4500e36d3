"""Budgeted batch classification (MSDNet's protocol, used by GFNet): exit thresholds fitted on training images.

A test image exits at the first step k whose max softmax probability reaches eta_k (eta_T = -inf). The thresholds
are fitted on the train split for 39 exit distributions q_k ∝ p^k (p = i / 20, i = 1..39); each gives one
(average MACs, accuracy) point on the test split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

PS = tuple(i / 20 for i in range(1, 40))


def exit_distribution(p: float, steps: int) -> torch.Tensor:
    """(T,) float64: q_k = p^k / sum_j p^j for k = 1..T, the fractions of images meant to exit at each step."""
    if p <= 0 or steps < 1:
        raise ValueError(f"Need p > 0 and steps >= 1, got p={p}, steps={steps}.")
    q = torch.tensor([p**k for k in range(1, steps + 1)], dtype=torch.float64)
    return q / q.sum()


def _check_confidences(name: str, conf: torch.Tensor) -> torch.Tensor:
    conf = torch.as_tensor(conf)
    if conf.ndim != 2 or conf.shape[0] < 1 or conf.shape[1] < 1:
        raise ValueError(f"{name} must be an (images, steps) tensor of max softmax probabilities, got shape "
                         f"{tuple(conf.shape)}.")
    if not bool(torch.isfinite(conf).all()):
        raise ValueError(f"{name} holds NaN or inf; confidences are probabilities in [0, 1].")
    return conf.double()


def fit_thresholds(confidences: torch.Tensor, probs_of_exit: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """(T,) float64 thresholds eta_k fitted on training confidences (N, T), MSDNet's way.

    For k = 1..T-1 in order: of the images that have not exited yet, taken by decreasing confidence at step k, the
    floor(N q_k)-th one's confidence becomes eta_k (+inf when that count is 0 or fewer images remain, so none
    exit); then every remaining image with confidence >= eta_k exits at k. eta_T = -inf takes the rest.
    """
    conf = _check_confidences("confidences", confidences)
    n, steps = conf.shape
    q = torch.as_tensor(probs_of_exit, dtype=torch.float64).flatten()
    if q.numel() != steps:
        raise ValueError(f"probs_of_exit has {q.numel()} entries for {steps} steps; give one per step.")
    if bool((q < 0).any()) or not math.isclose(float(q.sum()), 1.0, rel_tol=1e-6):
        raise ValueError(f"probs_of_exit must be non-negative and sum to 1, got {q.tolist()}.")
    thresholds = torch.full((steps,), math.inf, dtype=torch.float64)
    remaining = torch.ones(n, dtype=torch.bool)
    for k in range(steps - 1):
        count = math.floor(n * float(q[k]))
        candidates = conf[remaining, k].sort(descending=True).values
        if 0 < count <= candidates.numel():
            thresholds[k] = candidates[count - 1]
        remaining &= conf[:, k] < thresholds[k]
    thresholds[-1] = -math.inf
    return thresholds


def exit_steps(confidences: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """(N,) long: the first step index k (0-based) at which each image's confidence reaches ``thresholds[k]``."""
    conf = _check_confidences("confidences", confidences)
    thresholds = torch.as_tensor(thresholds, dtype=torch.float64)
    if thresholds.shape != (conf.shape[1],):
        raise ValueError(f"Need one threshold per step ({conf.shape[1]}), got shape {tuple(thresholds.shape)}.")
    reached = conf >= thresholds
    reached[:, -1] = True
    return reached.long().argmax(1)


def budgeted_curve(train_conf: torch.Tensor, test_conf: torch.Tensor, test_correct: torch.Tensor,
                   macs_per_step: torch.Tensor | Sequence[float], ps: Sequence[float] = PS) -> list[dict[str, Any]]:
    """One point per p in ``ps`` (default the 39 values i / 20): thresholds fitted on ``train_conf`` (N_train, T),
    applied to ``test_conf`` (N, T); ``test_correct`` (N, T) says whether the prediction at each step is right and
    ``macs_per_step`` is the cumulative multiply-adds after each step, (T,) or per image (N, T).

    Each point: ``p``, ``q`` (exit distribution), ``thresholds`` (eta_k; +inf: nobody exits, -inf at T),
    ``exit_fractions`` (test images exiting at each step), ``macs`` (mean MACs at the exit step) and ``accuracy``
    (percent correct at the exit step).
    """
    train = _check_confidences("train_conf", train_conf)
    test = _check_confidences("test_conf", test_conf)
    n, steps = test.shape
    correct = torch.as_tensor(test_correct).bool()
    if correct.shape != test.shape or train.shape[1] != steps:
        raise ValueError(f"Shapes disagree: train_conf {tuple(train.shape)}, test_conf {tuple(test.shape)}, "
                         f"test_correct {tuple(correct.shape)}; all need the same number of steps, and test_correct "
                         f"the shape of test_conf.")
    macs = torch.as_tensor(macs_per_step, dtype=torch.float64)
    if macs.shape == (steps,):
        macs = macs.expand(n, steps)
    if macs.shape != (n, steps):
        raise ValueError(f"macs_per_step must have shape ({steps},) or ({n}, {steps}), got {tuple(macs.shape)}.")
    rows = torch.arange(n)
    curve = []
    for p in ps:
        q = exit_distribution(p, steps)
        thresholds = fit_thresholds(train, q)
        exits = exit_steps(test, thresholds)
        curve.append({"p": float(p), "q": q.tolist(), "thresholds": thresholds.tolist(),
                      "exit_fractions": (torch.bincount(exits, minlength=steps).double() / n).tolist(),
                      "macs": float(macs[rows, exits].mean()),
                      "accuracy": 100.0 * float(correct[rows, exits].double().mean())})
    return curve
