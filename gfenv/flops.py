"""Multiply-add (MAC) counts of GFNet's parts, measured with ``torch.utils.flop_counter.FlopCounterMode``.

GFNet reports compute in multiply-adds; FlopCounterMode counts 2 FLOPs per multiply-add, so counts here are FLOPs // 2.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gfenv.glimpse import glance
from gfenv.models import GFNetModel


def count_macs(module_or_fn: nn.Module | Callable[..., Any], *inputs: Any) -> int:
    """Multiply-adds of one call ``module_or_fn(*inputs)``, run under ``torch.no_grad()``.

    FlopCounterMode counts matmuls and convolutions (2 FLOPs per multiply-add) and ignores element-wise ops
    (activations, normalisation, biases, pooling, resizing); the result is its total divided by 2.
    """
    from torch.utils.flop_counter import FlopCounterMode  # imported here: it pulls torch.fx and triton (slow import)

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module_or_fn(*inputs)
    return int(counter.get_total_flops()) // 2


def _channels(image_shape: tuple[int, ...], in_channels: int) -> None:
    if len(image_shape) not in (2, 3):
        raise ValueError(f"image_shape must be (H, W) or (C, H, W), got {tuple(image_shape)}.")
    if len(image_shape) == 3 and image_shape[0] != in_channels:
        raise ValueError(
            f"image_shape {tuple(image_shape)} has {image_shape[0]} channels; the model takes {in_channels}."
        )


def model_macs(model: GFNetModel, image_shape: tuple[int, ...]) -> dict[str, int]:
    """Multiply-adds per image of each call GFNet makes, for images of ``image_shape`` ((C, H, W) or (H, W)).

    Keys: ``glance_encoder`` and ``focus_encoder`` (one P x P patch each, P = ``config.patch_size``), ``classifier``
    (one ``classifier.step``), and ``glance`` (resizing the whole image to P x P, which is not counted, then the
    glance encoder). Measured in eval mode; the model's training mode is restored afterwards.
    """
    cfg = model.config
    _channels(image_shape, cfg.in_channels)
    # the counts follow the architecture, not the weights: one count per (architecture, image shape) in a process
    # (a DummyVecEnv of single envs builds the same model many times)
    key = (repr(cfg), *(type(m).__qualname__ for m in (model.glance_encoder, model.focus_encoder, model.classifier)),
           tuple(image_shape))
    if key not in _MACS:
        _MACS[key] = _count_model_macs(model, image_shape)
    return dict(_MACS[key])


_MACS: dict[tuple, dict[str, int]] = {}


def _count_model_macs(model: GFNetModel, image_shape: tuple[int, ...]) -> dict[str, int]:
    cfg = model.config
    p = cfg.patch_size
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    was_training = model.training
    model.eval()
    try:
        patch = torch.zeros(1, cfg.in_channels, p, p, device=device, dtype=dtype)
        image = torch.zeros(1, cfg.in_channels, *image_shape[-2:], device=device, dtype=dtype)
        features = torch.zeros(1, model.feature_dim, device=device, dtype=dtype)
        state = model.classifier.init_state(1, device=device, dtype=dtype)
        return {
            "glance_encoder": count_macs(model.glance_encoder, patch),
            "focus_encoder": count_macs(model.focus_encoder, patch),
            "classifier": count_macs(model.classifier.step, features, state, 0),
            "glance": count_macs(model.glance_encoder, glance(image, p, cfg.glance_mode)),  # the resize uncounted
        }
    finally:
        model.train(was_training)
