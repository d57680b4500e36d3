"""Official GFNet-Pytorch checkpoints in the benchmark: an env on one's model (``gfnet_env``), its patch policy as a
``gfnet_ppo`` agent (``gfnet_agent``), and ``gfnet_checkpoint_report``, which prints what a file stores like GFNet's
``inference.py --eval_mode 0`` and, given an ImageNet folder, re-evaluates the anytime accuracy through the env.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium.vector.vector_env import AutoresetMode

from agents.gfnet_ppo import GFNetPPOAgent
from gfenv.checkpoint import CheckpointError
from gfenv.data import ImageSource
from gfenv.env import GlanceFocusVectorEnv
from gfenv.eval.evaluation import run_episodes
from gfenv.flops import model_macs
from gfenv.official import (
    ACTION_STD,
    IMAGE_SIZE,
    IMAGENET_LAYOUT,
    POLICY_WIDTH,
    GFNetCheckpoint,
    NormalizedSource,
    check_imagenet_root,
    load_gfnet_checkpoint,
)


def gfnet_env(ckpt: GFNetCheckpoint, data_root: str | os.PathLike | None = None, source: ImageSource | None = None,
              **env_kwargs: Any) -> GlanceFocusVectorEnv:
    """A ``GlanceFocusVectorEnv`` on the checkpoint's model: GFNet's policy input (observation ``gfnet``), continuous
    locations, T = ``ckpt.steps``. Images come from ``data_root`` (ImageNet) or ``source`` (images in [0, 1], which
    are standardised here); ``env_kwargs`` go to the env (``num_envs``, ``split``, ``device``, ...)."""
    device = env_kwargs.get("device", "cpu")
    if source is None:
        if data_root is None:
            raise ValueError("gfnet_env needs data_root=<ImageNet folder> or source=<ImageSource>.")
        source = ckpt.source(data_root, env_kwargs.get("split", "test"), device)
    else:
        source = NormalizedSource(source)
    kwargs = {"observation": "gfnet", "action": "continuous", "steps": ckpt.steps, **env_kwargs}
    return GlanceFocusVectorEnv(model=ckpt.model, source=source, **kwargs)


def gfnet_agent(ckpt: GFNetCheckpoint, device: str = "cpu", **kwargs: Any) -> GFNetPPOAgent:
    """The checkpoint's patch policy as a ``gfnet_ppo`` agent (``GFNetPPOAgent.from_gfnet_checkpoint``)."""
    return GFNetPPOAgent.from_gfnet_checkpoint(ckpt, device=device, **kwargs)


# ------------------------------------------------------------------------------------------------ the report
def macs_per_length(parts: Mapping[str, int], policy: int, steps: int) -> list[int]:
    """Multiply-adds per image after each length 1..T: the glance, then per focus step the policy, the focus
    encoder and the classifier (GFNet's accounting)."""
    first = parts["glance_encoder"] + parts["classifier"]
    focus = parts["focus_encoder"] + parts["classifier"] + policy
    return [first + t * focus for t in range(steps)]


def _numbers(values: Any, fmt: str) -> str:
    values = values.tolist() if isinstance(values, torch.Tensor | np.ndarray) else values
    return "  ".join(format(float(v), fmt) for v in values)


def _giga(values: Any) -> list[float]:
    values = values.tolist() if isinstance(values, torch.Tensor | np.ndarray) else values
    return [float(v) / 1e9 for v in values]


def gfnet_checkpoint_report(path: str | os.PathLike, data_root: str | os.PathLike | None = None,
                            device: str | torch.device = "cpu", *, max_images: int | None = None,
                            batch_size: int = 250) -> str:
    """What an official GFNet checkpoint holds, as GFNet's ``inference.py --eval_mode 0`` prints it: the model,
    patch size, multiply-adds per length (measured here with ``gfenv.flops`` at 224 x 224, beside the stored
    ``flops``), the stored anytime accuracy and budgeted-batch curve.

    With ``data_root`` (an ImageNet folder) the anytime top-1 accuracy is re-evaluated on its val split through
    ``GlanceFocusVectorEnv`` with GFNet's policy acting (its mean location), on ``device`` (a GPU: 50,000 images
    through ResNet-50 five times); ``max_images`` evaluates only the first ones. The env's glance resize is
    anti-aliased, GFNet's is not, so the numbers can differ slightly from the stored ones.
    """
    root = check_imagenet_root(data_root) if data_root is not None else None
    ckpt = load_gfnet_checkpoint(path, map_location=device)
    model, res, p, steps = ckpt.model, ckpt.results, ckpt.patch_size, ckpt.steps
    agent = gfnet_agent(ckpt, device=str(device)) if ckpt.policy is not None else None
    parts = model_macs(model, (3, IMAGE_SIZE, IMAGE_SIZE))
    policy_macs = agent.macs_per_step if agent is not None else 0
    measured = macs_per_length(parts, policy_macs, steps)
    d, h, w = ckpt.map_shape
    lines = [f"GFNet checkpoint {ckpt.path}",
             f"model_arch : {ckpt.arch} (glance and focus encoders: torchvision {ckpt.arch}; classifier: GRU "
             f"{model.feature_dim} -> {model.config.hidden}, {model.config.num_classes} classes)",
             f"patch_size : {p} (T = {steps}; {IMAGE_SIZE} x {IMAGE_SIZE} images; glance: {model.config.glance_mode} "
             f"resize to {p} x {p})"]
    if agent is not None:
        hp = ckpt.policy_hyperparams["hidden_size"]
        lines.append(f"policy     : {d}x{h}x{w} feature map -> linear {d * h * w} -> {POLICY_WIDTH} -> {hp}, GRU {hp}, "
                     f"sigmoid mean location, fixed std {ACTION_STD}")
    else:
        lines.append("policy     : none stored (a stage-1 checkpoint)")
    stored_parts = {"encoder": res.get("model_flops"), "policy": res.get("policy_flops"),
                    "classifier": res.get("fc_flops")}
    ours = {"encoder": parts["focus_encoder"], "policy": policy_macs, "classifier": parts["classifier"]}
    lines.append("MACs per call (M), measured with torch.utils.flop_counter [stored in the checkpoint]:")
    for name, value in ours.items():
        stored = stored_parts[name]
        lines.append(f"  {name:<10} {value / 1e6:9.2f}" + (f"  [{float(stored) / 1e6:.2f}]" if stored is not None
                                                           else ""))
    lines.append("length          " + "  ".join(f"{t:>6}" for t in range(1, steps + 1)))
    lines.append("MACs (G)        " + _numbers([m / 1e9 for m in measured], "6.3f"))
    if "flops" in res:
        lines.append("stored (G)      " + _numbers(_giga(res["flops"]), "6.3f"))
    if "anytime_classification" in res:
        lines.append("top-1 (%)       " + _numbers(res["anytime_classification"], "6.2f") + "   (stored)")
    else:
        lines.append("anytime_classification : not stored")
    if root is not None:
        if agent is None:
            raise CheckpointError(f"{ckpt.path} holds no policy, so its anytime accuracy cannot be re-evaluated.")
        evaluated = _reevaluate(ckpt, agent, root, device, max_images, batch_size)
        lines.append("top-1 (%)       " + _numbers(evaluated["accuracy"], "6.2f") +
                     f"   (re-evaluated here: {evaluated['episodes']} images of {root}, {device})")
    budget = res.get("budgeted_batch_classification")
    if budget is not None and len(budget) == 2:
        lines.append(f"budgeted_batch_classification (stored, {len(budget[0])} points):")
        lines.append("  MACs (G)   top-1 (%)")
        lines += [f"  {macs:8.3f}   {acc:8.2f}" for macs, acc in zip(_giga(budget[0]), budget[1])]
    else:
        lines.append("budgeted_batch_classification : not stored")
    return "\n".join(lines)


def _reevaluate(ckpt: GFNetCheckpoint, agent: Any, root: Path, device: str | torch.device,
                max_images: int | None, batch_size: int) -> dict[str, Any]:
    source = ckpt.source(root, "test", device)
    if source.num_classes != ckpt.model.config.num_classes:
        raise ValueError(f"{root} has {source.num_classes} classes but the checkpoint classifies "
                         f"{ckpt.model.config.num_classes}; point data_root at the full ImageNet folder "
                         f"({IMAGENET_LAYOUT}).")
    episodes = len(source) if max_images is None else min(int(max_images), len(source))
    env = GlanceFocusVectorEnv(model=ckpt.model, source=source, num_envs=min(batch_size, episodes), split="test",
                               sampling="sequential", device=device, autoreset_mode=AutoresetMode.DISABLED,
                               observation="gfnet", action="continuous", steps=ckpt.steps)
    return run_episodes(agent, env, episodes, seed=0)
