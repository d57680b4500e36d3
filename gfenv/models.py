"""GFNet's vision stack: glance encoder f_G, focus encoder f_L and the classifier f_C.

Encoders return (pooled features, last spatial feature map). Backbones come from the registry of ``gfenv.backbones``:
the small CNN that is fast on a CPU (the default) and torchvision's models. The classifier is GFNet's GRU
over per-step features with a linear head, or the cascaded variant (one linear head per step).
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from gfenv.backbones import build_encoder


class _Frozen(NamedTuple):
    """The inference copy of one frozen encoder and the weights' versions it was built from."""

    key: tuple
    module: nn.Module
    channels_last: bool
    tensors: list[torch.Tensor]  # the encoder's parameters and buffers when the copy was built
    registrations: int  # _REGISTRATIONS[0] then


_FROZEN: weakref.WeakKeyDictionary[nn.Module, _Frozen] = weakref.WeakKeyDictionary()
_REGISTRATIONS = [0]  # counts parameter, buffer and submodule (re)assignments on any module in the process


def _count_registration(*_args) -> None:
    _REGISTRATIONS[0] += 1


for _register in (nn.modules.module.register_module_parameter_registration_hook,
                  nn.modules.module.register_module_buffer_registration_hook,
                  nn.modules.module.register_module_module_registration_hook):
    _register(_count_registration)


def _fold_into(module: nn.Module) -> nn.Module:
    """``module`` (modified in place) with each eval-mode BatchNorm folded into the convolution before it (torch.fx's
    fuse); a module that cannot be traced whole (e.g. a shape check in ``forward``) has its children folded."""
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(module, inplace=True)
    except Exception:  # not symbolically traceable: fold what is below it
        for name, child in module.named_children():
            setattr(module, name, _fold_into(child))
        return module


def _fold(encoder: nn.Module, channels_last: bool) -> nn.Module:
    folded = _fold_into(copy.deepcopy(encoder))
    return folded.to(memory_format=torch.channels_last) if channels_last else folded


def encode(encoder: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``encoder(x)`` for the env: frozen encoders (eval mode, no parameter requiring grad) run as an inference copy
    with BatchNorm folded into the convolutions (and channels_last on a CPU, where oneDNN's kernels are faster on the
    small CNN: ``benchmarks/cpu_step_parts.py``); the same outputs to float rounding (about 1e-6 of the features'
    scale). The copy holds its own weights (one more encoder's worth of memory). The copy is
    rebuilt whenever the encoder's weights change (tensor version counters: optimiser steps, ``load_state_dict``),
    so observations always follow the weights in use. Encoders in training or with trainable parameters run as
    they are."""
    if encoder.training:
        return encoder(x)
    frozen = _FROZEN.get(encoder)
    # the encoder's tensors: those the copy was built from unless some module (re)assigned a parameter, buffer or
    # submodule since (walking the module tree on every call costs more than a small CNN's forward at batch 1)
    same_tensors = frozen is not None and frozen.registrations == _REGISTRATIONS[0]
    tensors = frozen.tensors if same_tensors else [*encoder.parameters(), *encoder.buffers()]
    if any(p.requires_grad for p in tensors) or not tensors:
        return encoder(x)
    key = (x.device, x.dtype, *(id(t) for t in tensors), *(t._version for t in tensors))
    if frozen is None or frozen.key != key:
        channels_last = x.device.type == "cpu" and x.dim() == 4
        frozen = _FROZEN[encoder] = _Frozen(key, _fold(encoder, channels_last), channels_last, tensors,
                                            _REGISTRATIONS[0])
    elif not same_tensors:  # registrations elsewhere, the same tensors here: no walk until the next registration
        frozen = _FROZEN[encoder] = frozen._replace(tensors=tensors, registrations=_REGISTRATIONS[0])
    if frozen.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return frozen.module(x)


class _Classifier(nn.Module):
    """What the env and training ask of a classifier f_C: ``init_state``, ``step`` and ``first``."""

    def first(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The glance's step: ``step(features, init_state(B), 0)``."""
        return self.step(features, self.init_state(features.shape[0], features.device, features.dtype), 0)


class RecurrentClassifier(_Classifier):
    """GFNet's f_C for ResNet/DenseNet/RegNet: a GRU cell over each step's features, then a linear head."""

    def __init__(self, feature_dim: int, num_classes: int, hidden: int = 256, steps: int = 5):
        super().__init__()
        self.hidden = hidden
        self.state_dim = hidden
        self.gru = nn.GRUCell(feature_dim, hidden)
        self.head = nn.Linear(hidden, num_classes)

    def init_state(self, batch: int, device=None, dtype=torch.float32) -> torch.Tensor:
        return torch.zeros(batch, self.hidden, device=device, dtype=dtype)  # (B, H)

    def step(self, features: torch.Tensor, state: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        state = self.gru(features, state)
        return self.head(state), state

    def first(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``step(features, init_state(B), 0)`` without the hidden-state product: at h = 0 the hidden gates are the
        bias b_hh exactly. The rest is ATen's CPU GRU cell in its order of operations and memory layout (its
        elementwise kernels round differently on other layouts): r = sigmoid(h_r + i_r), z = sigmoid(h_z + i_z),
        n = tanh(i_n + h_n r), h' = (h - n) z + n; so on a CPU the result is the step's bit for bit. CUDA's GRU cell
        is one fused kernel, which rounds differently (to float rounding)."""
        if torch.is_autocast_enabled(features.device.type):  # autocast casts the cell and a linear differently
            return super().first(features)
        gru, b = self.gru, features.shape[0]
        i_r, i_z, i_n = F.linear(features, gru.weight_ih, gru.bias_ih).unsafe_chunk(3, 1)
        bias = gru.bias_hh if gru.bias_hh is not None else features.new_zeros(3 * self.hidden)
        h_r, h_z, h_n = bias.to(i_r.dtype).expand(b, -1).clone().unsafe_chunk(3, 1)  # (B, 3H), as linear(0) gives
        r = h_r.add_(i_r).sigmoid_()
        z = h_z.add_(i_z).sigmoid_()
        n = i_n.add(h_n.mul_(r)).tanh_()
        state = n.neg().mul_(z).add_(n)
        return self.head(state), state


class CascadedClassifier(_Classifier):
    """GFNet's f_C for MobileNetV3/EfficientNet: at step t a linear head over the features of steps 1..t."""

    def __init__(self, feature_dim: int, num_classes: int, hidden: int = 0, steps: int = 5):
        super().__init__()
        self.feature_dim = feature_dim
        self.steps = steps
        self.state_dim = feature_dim * steps
        self.heads = nn.ModuleList(nn.Linear(feature_dim * (t + 1), num_classes) for t in range(steps))

    def init_state(self, batch: int, device=None, dtype=torch.float32) -> torch.Tensor:
        return torch.zeros(batch, self.state_dim, device=device, dtype=dtype)  # (B, T*D)

    def step(self, features: torch.Tensor, state: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        if t >= self.steps:
            raise ValueError(f"The cascaded classifier has {self.steps} heads; step {t + 1} is beyond them.")
        d = self.feature_dim
        state = torch.cat([state[:, : t * d], features, state[:, (t + 1) * d :]], dim=1)
        return self.heads[t](state[:, : (t + 1) * d]), state


CLASSIFIERS = {"gru": RecurrentClassifier, "cascaded": CascadedClassifier}


@dataclass
class ModelConfig:
    """Everything needed to rebuild a GFNet model; stored in every checkpoint."""

    num_classes: int = 10
    in_channels: int = 1
    patch_size: int = 32
    steps: int = 5
    backbone: str = "small_cnn"
    classifier: str = "gru"
    hidden: int = 256
    glance_mode: str = "bilinear"
    backbone_kwargs: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class GFNetModel(nn.Module):
    """f_G, f_L and f_C together, with each encoder's own linear head (GFNet's deep supervision, dsn)."""

    def __init__(self, config: ModelConfig, glance_weights: str | None = None, focus_weights: str | None = None):
        super().__init__()
        if config.classifier not in CLASSIFIERS:
            raise ValueError(f"Unknown classifier {config.classifier!r}; choose one of {sorted(CLASSIFIERS)}.")
        self.config = config
        kw = config.backbone_kwargs
        self.glance_encoder = build_encoder(config.backbone, config.in_channels, glance_weights, **kw)
        self.focus_encoder = build_encoder(config.backbone, config.in_channels, focus_weights, **kw)
        d = self.focus_encoder.feature_dim
        self.feature_dim = d
        self.glance_head = nn.Linear(d, config.num_classes)
        self.focus_head = nn.Linear(d, config.num_classes)
        self.classifier = CLASSIFIERS[config.classifier](d, config.num_classes, config.hidden, config.steps)

    def encoder(self, t: int) -> nn.Module:
        return self.glance_encoder if t == 0 else self.focus_encoder

    def head(self, t: int) -> nn.Module:
        return self.glance_head if t == 0 else self.focus_head
