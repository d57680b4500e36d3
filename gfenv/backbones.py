"""GFNet's encoders by name: the registry (``BACKBONES``, ``register_backbone``, ``build_encoder``), the small CNN that
is fast on a CPU, and torchvision's classifiers as encoders. Every encoder returns (pooled (B, D), feature map).

torchvision models are built by ``torchvision.models.get_model`` without downloads (torchvision is imported when one
is built); weights come from a local file or torchvision's cache.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

BACKBONES: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(name: str) -> Callable:
    """Decorator: register an encoder builder ``fn(in_channels, weights=None, **kwargs)`` under ``name``; a name
    already taken by another builder is refused."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if BACKBONES.get(name, fn) is not fn:
            raise ValueError(f"A backbone named {name!r} is already registered ({BACKBONES[name]!r}).")
        BACKBONES[name] = fn
        return fn

    return deco


class SmallCNN(nn.Module):
    """A 4-stage conv net for small patches: stride 1 first (fine texture survives), then three stride-2 stages."""

    def __init__(self, in_channels: int = 1, widths: tuple[int, ...] = (16, 32, 64, 128)):
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(prev, w, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                       nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            prev = w
        self.features = nn.Sequential(*layers)
        self.feature_dim = prev

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.features(x)  # (B, D, h, w)
        return fmap.mean(dim=(2, 3)), fmap


@register_backbone("small_cnn")
def small_cnn(in_channels: int = 1, weights: str | None = None, **kwargs) -> nn.Module:
    return SmallCNN(in_channels, **kwargs)


def build_encoder(name: str, in_channels: int, weights: str | None = None, **kwargs) -> nn.Module:
    """An encoder from the backbone registry; ``weights`` is a local file (no downloads)."""
    if name not in BACKBONES:
        raise ValueError(f"Unknown backbone {name!r}. Valid backbones: {', '.join(sorted(BACKBONES))}.")
    return BACKBONES[name](in_channels=in_channels, weights=weights, **kwargs)



TORCHVISION_BACKBONES: tuple[str, ...] = (
    "resnet18",
    "resnet34",
    "resnet50",
    "densenet121",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "regnet_y_400mf",
    "regnet_y_800mf",
    "regnet_y_1_6gf",
    "efficientnet_b0",
    "efficientnet_b1",
    "efficientnet_b2",
    "efficientnet_b3",
)

_LEGACY_DENSENET_KEY = re.compile(r"(denselayer\d+\.(?:norm|relu|conv))\.([12])\.")


class TorchvisionBackbone(nn.Module):
    """A torchvision classifier without its pooling and head: ``forward`` returns (pooled (B, D), fmap (B, D, h, w)).

    With ``in_channels == 1`` the grey channel is repeated to RGB in ``forward``, so pretrained RGB weights apply
    unchanged; the model always has a 3-channel stem.
    """

    def __init__(self, body: nn.Module, feature_dim: int, in_channels: int = 3):
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(
                f"torchvision backbones take 3-channel (RGB) or 1-channel (grey, repeated to RGB) images, "
                f"got in_channels={in_channels}."
            )
        self.body = body
        self.feature_dim = feature_dim
        self.in_channels = in_channels

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[1] != self.in_channels:
            raise ValueError(f"Expected {self.in_channels} input channel(s), got input of shape {tuple(x.shape)}.")
        if self.in_channels == 1:
            x = x.expand(-1, 3, -1, -1)
        fmap = self.body(x)  # (B, D, h, w)
        return fmap.mean(dim=(2, 3)), fmap


def cached_weights_path(name: str) -> Path:
    """Where torchvision's cache keeps the DEFAULT weights of ``name`` (``torch.hub.get_dir()/checkpoints/``)."""
    import torchvision

    url = torchvision.models.get_model_weights(name).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def resolve_weights(name: str, weights: str | os.PathLike | None) -> Path | None:
    """The local file holding ``weights`` for ``name``: a path, or ``"cache"`` for torchvision's cache. No downloads."""
    if weights is None:
        return None
    if str(weights) == "cache":
        path = cached_weights_path(name)
        if not path.is_file():
            raise FileNotFoundError(
                f"No cached weights for {name!r}: expected {path}. This package never downloads; copy the file "
                f"{path.name} (torchvision's DEFAULT weights for {name}) there, or pass weights=<path to a state_dict>."
            )
        return path
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"Weights file for backbone {name!r} not found: {path}. Pass the path of a saved state_dict of the full "
            f"torchvision {name} model, or weights='cache'."
        )
    return path


def _upgrade_legacy_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old DenseNet files name ``norm1`` as ``norm.1``; rename them to today's module names."""
    return {_LEGACY_DENSENET_KEY.sub(r"\1\2.", k): v for k, v in state_dict.items()}


def load_torchvision_weights(model: nn.Module, name: str, path: Path) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise TypeError(f"{path} does not hold a state_dict (got {type(state).__name__}).")
    if name.startswith("densenet"):
        state = _upgrade_legacy_keys(state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path} is not a state_dict of torchvision's {name}: {err}") from err


def _trunk(name: str, model: nn.Module) -> tuple[nn.Module, int]:
    """The convolutional trunk of a torchvision classifier and its output channel count."""
    if name.startswith("resnet"):
        body = nn.Sequential(
            model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2, model.layer3, model.layer4
        )
        return body, model.fc.in_features
    if name.startswith("regnet"):
        return nn.Sequential(model.stem, model.trunk_output), model.fc.in_features
    if name.startswith("densenet"):
        return nn.Sequential(model.features, nn.ReLU(inplace=True)), model.classifier.in_features
    if name.startswith("mobilenet_v3"):
        return model.features, model.classifier[0].in_features
    if name.startswith("efficientnet"):
        return model.features, model.classifier[-1].in_features
    raise ValueError(f"No trunk rule for torchvision model {name!r}.")


def build_torchvision_backbone(
    name: str, in_channels: int = 3, weights: str | os.PathLike | None = None, **kwargs
) -> TorchvisionBackbone:
    """torchvision's ``name`` (random init, or ``weights``: a state_dict file of the full model, or ``"cache"``).

    ``kwargs`` go to ``torchvision.models.get_model``.
    """
    if in_channels not in (1, 3):
        raise ValueError(
            f"Backbone {name!r} takes in_channels=3 (RGB) or 1 (grey, repeated to RGB), got {in_channels}."
        )
    import torchvision

    path = resolve_weights(name, weights)
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    if path is not None:
        load_torchvision_weights(model, name, path)
    body, dim = _trunk(name, model)
    return TorchvisionBackbone(body, dim, in_channels)


def _builder(name: str) -> Callable[..., nn.Module]:
    def build(in_channels: int = 3, weights: str | os.PathLike | None = None, **kwargs) -> nn.Module:
        return build_torchvision_backbone(name, in_channels, weights, **kwargs)

    build.__name__ = name
    build.__doc__ = f"torchvision's {name} as a GFNet encoder (see ``build_torchvision_backbone``)."
    return build


for _name in TORCHVISION_BACKBONES:
    register_backbone(_name)(_builder(_name))
