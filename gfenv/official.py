"""The official GFNet-Pytorch checkpoints (``.pth.tar``, blackfeather-wang/GFNet-Pytorch) in this project's modules.

``load_gfnet_checkpoint`` reads a released file safely (``weights_only``), maps its glance encoder, focus encoder and
recurrent classifier into a ``GFNetModel`` and its patch policy into ``agents.gfnet_ppo``'s layout, and keeps the
results stored with it. ``gfenv.eval.official`` builds an env and an agent on one, and prints the report.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gfenv.backbones import TorchvisionBackbone, _trunk, _upgrade_legacy_keys
from gfenv.checkpoint import CheckpointError
from gfenv.data import ImageSource, make_source
from gfenv.models import GFNetModel, ModelConfig

SUPPORTED_ARCHS = ("resnet50", "densenet121")
GLANCE_MODES = {"resnet50": "bicubic", "densenet121": "bilinear"}  # GFNet's configs.py: prime_interpolation
IMAGE_SIZE = 224
CROP_FRACTION = 0.875  # resize to 256, centre-crop 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ACTION_STD = 0.1  # GFNet's ActorCritic default; not stored in the file
POLICY_WIDTH = 2048  # GFNet's ResNet/DenseNet state encoder: Linear(D*h*w, 2048) -> ReLU -> Linear(2048, H) -> ReLU
DEFAULT_STEPS = 5
STATE_KEYS = ("model_prime_state_dict", "model_state_dict", "fc")
RESULT_KEYS = ("model_name", "patch_size", "flops", "model_flops", "policy_flops", "fc_flops",
               "anytime_classification", "budgeted_batch_classification", "dynamic_threshold", "epoch", "acc",
               "best_acc")
IMAGENET_LAYOUT = ("<root>/train/<wnid>/*.JPEG (1000 class folders, read for the class order) and "
                   "<root>/val/<wnid>/*.JPEG (the 50,000 validation images sorted into the same 1000 folders), "
                   "the layout GFNet's inference.py and torchvision's ImageFolder read")


# ------------------------------------------------------------------------------------------------ safe loading
def _plain_numpy_globals() -> dict[str, Any]:
    """The numpy names a results list may pickle (scalars, numeric arrays, dtypes), under numpy 1 and 2 names."""
    scalar = np.float64(0).__reduce__()[0]
    reconstruct = np.zeros(1).__reduce__()[0]
    names: dict[str, Any] = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        names[f"{module}.scalar"] = scalar
        names[f"{module}._reconstruct"] = reconstruct
    for name in dir(np.dtypes):
        cls = getattr(np.dtypes, name)
        if name.endswith("DType") and name not in ("ObjectDType", "VoidDType") and isinstance(cls, type):
            names[f"numpy.dtypes.{name}"] = cls
    return names


def _safe_load(path: Path, map_location: Any) -> Any:
    """``torch.load(weights_only=True)``; numpy scalars and numeric arrays (plain data) are allowed by name when
    the file holds them, anything else is refused: this never unpickles arbitrary objects."""
    allowed = _plain_numpy_globals()
    extra: list[tuple[Any, str]] = []
    while True:
        try:
            with torch.serialization.safe_globals(extra):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            names = [a or b for a, b in re.findall(r"GLOBAL ([\w.]+)|got <class '([\w.]+)'>", str(err))]
            if not names:
                detail = str(err).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
                raise CheckpointError(f"{path} is not a readable torch checkpoint ({detail}); download it "
                                      f"again.") from err
            new = [(allowed[n], n) for n in names if n in allowed and (allowed[n], n) not in extra]
            if not new:
                found = ", ".join(names)
                raise CheckpointError(
                    f"{path} holds {found}, which a safe (weights_only) load refuses: GFNet's checkpoints hold only "
                    f"tensors, numbers, strings and lists. This loader never unpickles arbitrary objects; re-save "
                    f"the file with plain values.") from err
            extra += new
        except (RuntimeError, EOFError, OSError) as err:
            raise CheckpointError(f"{path} is not a readable torch file ({type(err).__name__}: {err}); "
                                  f"download it again.") from err


def _strip_module(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop nn.DataParallel's ``module.`` prefix."""
    return {k.removeprefix("module."): v for k, v in state.items()}


# ------------------------------------------------------------------------------------------------ architectures
def _blocks(keys: set[str], prefix: str) -> int:
    """How many numbered blocks (``layer1.0``, ``denseblock1.denselayer1``, ...) sit under ``prefix``."""
    return len({k[len(prefix):].split(".")[0] for k in keys if k.startswith(prefix)})


def detect_arch(state: Mapping[str, torch.Tensor]) -> str:
    """The backbone an encoder state dict (``module.`` stripped) belongs to, from its key layout: a torchvision name
    (``resnet50``, ``densenet121``, ...) or a description of the layout."""
    keys = set(state)
    if "conv1.weight" in keys and any(k.startswith("layer4.") for k in keys):
        counts = tuple(_blocks(keys, f"layer{i}.") for i in range(1, 5))
        bottleneck = "layer1.0.conv3.weight" in keys
        names = {((2, 2, 2, 2), False): "resnet18", ((3, 4, 6, 3), False): "resnet34",
                 ((3, 4, 6, 3), True): "resnet50", ((3, 4, 23, 3), True): "resnet101",
                 ((3, 8, 36, 3), True): "resnet152"}
        return names.get((counts, bottleneck), f"a ResNet with {counts} blocks")
    if "features.conv0.weight" in keys:
        counts = tuple(_blocks(keys, f"features.denseblock{i}.") for i in range(1, 5))
        stem = int(state["features.conv0.weight"].shape[0])
        names = {(64, (6, 12, 24, 16)): "densenet121", (64, (6, 12, 32, 32)): "densenet169",
                 (64, (6, 12, 48, 32)): "densenet201", (96, (6, 12, 36, 24)): "densenet161"}
        return names.get((stem, counts), f"a DenseNet with {counts} layers")
    if "conv_stem.weight" in keys:
        return "a MobileNetV3/EfficientNet (gen-efficientnet layout)"
    if any(k.startswith("stem.") for k in keys) and any(k.startswith("s1.") for k in keys):
        return "a RegNet (pycls layout)"
    return f"an unknown layout (keys {sorted(keys)[:3]}...)"


def _check_arch(path: Path, payload: dict, glance_state: dict, focus_state: dict, arch: str | None) -> str:
    glance_arch, focus_arch = detect_arch(glance_state), detect_arch(focus_state)
    if glance_arch != focus_arch:
        raise CheckpointError(f"{path}: the glance encoder (model_prime_state_dict) is {glance_arch} but the focus "
                              f"encoder (model_state_dict) is {focus_arch}; GFNet uses one architecture for both.")
    stored = payload.get("model_name")
    if stored is not None and str(stored) != glance_arch:
        raise CheckpointError(f"{path} says model_name={stored!r} but its encoder weights are {glance_arch}; the "
                              f"file is inconsistent, download it again.")
    if arch is not None and arch != glance_arch:
        raise CheckpointError(f"{path} holds {glance_arch} weights but arch={arch!r} was requested; pass "
                              f"arch={glance_arch!r} (or None), or the {arch} checkpoint.")
    if glance_arch not in SUPPORTED_ARCHS:
        raise CheckpointError(f"{path} holds {glance_arch} weights; this loader maps GFNet's "
                              f"{' and '.join(SUPPORTED_ARCHS)} checkpoints (their torchvision twins are gfenv "
                              f"backbones with the same layers).")
    return glance_arch


def _encoder_keys(arch: str) -> tuple[dict[str, str], str]:
    """torchvision ``arch``'s key -> the key in ``TorchvisionBackbone``, and the name of its classification head."""
    with torch.device("meta"):
        import torchvision

        full = torchvision.models.get_model(arch, weights=None)
        body, dim = _trunk(arch, full)
        encoder = TorchvisionBackbone(body, dim, in_channels=3)
    by_id = {id(t): k for k, t in full.state_dict(keep_vars=True).items()}
    mapping = {by_id[id(t)]: k for k, t in encoder.state_dict(keep_vars=True).items()}
    head = "fc" if arch.startswith("resnet") else "classifier"
    return mapping, head


def _encoder_state(path: Path, what: str, arch: str, state: dict, prefix: str, head_prefix: str) -> dict:
    mapping, head = _encoder_keys(arch)
    if arch.startswith("densenet"):
        state = _upgrade_legacy_keys(state)
    wanted = {*mapping, f"{head}.weight", f"{head}.bias"}
    missing, unexpected = sorted(wanted - set(state)), sorted(set(state) - wanted)
    if missing or unexpected:
        raise CheckpointError(f"{path}: {what} does not match torchvision's {arch}: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}.")
    out = {prefix + mapping[k]: v for k, v in state.items() if k in mapping}
    out[head_prefix + "weight"], out[head_prefix + "bias"] = state[f"{head}.weight"], state[f"{head}.bias"]
    return out


def _classifier_state(path: Path, fc: dict) -> tuple[dict, int, int]:
    """GFNet's Full_layer (nn.GRU ``rnn`` + linear ``fc``) as ``RecurrentClassifier`` keys; (state, hidden, classes)."""
    if any(k.startswith("fc_") for k in fc):
        raise CheckpointError(f"{path} has the cascaded classifier (fc_2..fc_5) of GFNet's MobileNetV3/EfficientNet "
                              f"models; only the GRU classifier of ResNet/DenseNet checkpoints is mapped.")
    names = {"rnn.weight_ih_l0": "gru.weight_ih", "rnn.weight_hh_l0": "gru.weight_hh", "rnn.bias_ih_l0": "gru.bias_ih",
             "rnn.bias_hh_l0": "gru.bias_hh", "fc.weight": "head.weight", "fc.bias": "head.bias"}
    if set(fc) != set(names):
        raise CheckpointError(f"{path}: the classifier 'fc' has keys {sorted(fc)}, expected GFNet's GRU classifier "
                              f"{sorted(names)}.")
    state = {"classifier." + names[k]: v for k, v in fc.items()}
    return state, int(fc["rnn.weight_hh_l0"].shape[1]), int(fc["fc.weight"].shape[0])


def _policy_state(path: Path, policy: dict, map_shape: tuple[int, ...], patch_size: int) -> tuple[dict, dict]:
    """GFNet's ActorCritic as ``agents.gfnet_ppo.GFNetPolicy`` keys (state encoder ``gfnet_linear``); (state,
    hyperparams)."""
    names = {"state_encoder.0.weight": "state_encoder.0.weight", "state_encoder.0.bias": "state_encoder.0.bias",
             "state_encoder.2.weight": "state_encoder.2.weight", "state_encoder.2.bias": "state_encoder.2.bias",
             "gru.weight_ih_l0": "gru.weight_ih", "gru.weight_hh_l0": "gru.weight_hh", "gru.bias_ih_l0": "gru.bias_ih",
             "gru.bias_hh_l0": "gru.bias_hh", "actor.0.weight": "actor.mean.0.weight",
             "actor.0.bias": "actor.mean.0.bias", "critic.0.weight": "critic.weight", "critic.0.bias": "critic.bias"}
    first = policy.get("state_encoder.0.weight")
    if first is not None and first.dim() == 4:
        raise CheckpointError(f"{path} has GFNet's convolutional policy (policy_conv, MobileNet/EfficientNet/RegNet); "
                              f"only the linear policy of ResNet/DenseNet checkpoints is mapped.")
    if set(policy) != set(names):
        raise CheckpointError(f"{path}: the policy has keys {sorted(policy)}, expected GFNet's ActorCritic "
                              f"{sorted(names)}.")
    inputs, width = int(first.shape[1]), int(first.shape[0])
    if width != POLICY_WIDTH:
        raise CheckpointError(f"{path}: the policy's state encoder is {inputs} -> {width}; GFNet's is "
                              f"{inputs} -> {POLICY_WIDTH}.")
    if inputs != int(np.prod(map_shape)):
        raise CheckpointError(f"{path}: the policy reads {inputs} features but the encoder's feature map at "
                              f"patch_size={patch_size} is {tuple(map_shape)} = {int(np.prod(map_shape))}; the "
                              f"patch size is wrong.")
    state = {names[k]: v for k, v in policy.items()}
    state["actor.std"] = torch.tensor(ACTION_STD, device=first.device)
    hidden = int(policy["gru.weight_hh_l0"].shape[1])
    return state, {"hidden_size": hidden, "state_encoder": "gfnet_linear", "action_std": ACTION_STD}


# ------------------------------------------------------------------------------------------------ loading
class NormalizedSource(ImageSource):
    """``base``'s images standardised per channel, (x - mean) / std: the input GFNet's ImageNet encoders expect.

    Resizing and cropping are linear, so the glance and focus patches of the standardised image are the standardised
    glance and patches, as in GFNet's pipeline.
    """

    def __init__(self, base: ImageSource, mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD):
        self.base = base
        self.num_classes, self.image_shape, self.device = base.num_classes, base.image_shape, base.device
        self.split = getattr(base, "split", "test")
        self.mean = torch.tensor(mean, device=base.device).view(1, -1, 1, 1)  # (1, C, 1, 1)
        self.std = torch.tensor(std, device=base.device).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return len(self.base)

    def get(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.base.get(indices)
        return (images - self.mean) / self.std, labels


def check_imagenet_root(data_root: str | os.PathLike) -> Path:
    """``data_root`` if it holds an ImageNet folder (val/ or test/), else FileNotFoundError naming the layout."""
    root = Path(data_root).expanduser()
    if not root.is_dir() or not any((root / name).is_dir() for name in ("val", "test")):
        problem = "does not exist" if not root.exists() else "has no val/ folder"
        raise FileNotFoundError(f"ImageNet folder {root} {problem}. Expected {IMAGENET_LAYOUT}.")
    return root


@dataclass
class GFNetCheckpoint:
    """An official GFNet checkpoint in this project's modules (from ``load_gfnet_checkpoint``)."""

    path: Path
    arch: str
    """``resnet50`` or ``densenet121``."""
    patch_size: int
    steps: int
    """T: the number of ``flops`` entries stored, else 5."""
    model: GFNetModel
    """f_G (model_prime_state_dict), f_L (model_state_dict), the GRU classifier (fc), the encoders' own heads."""
    policy: dict[str, torch.Tensor] | None
    """GFNet's policy as an ``agents.gfnet_ppo.GFNetPolicy`` state dict; None for a stage-1 checkpoint."""
    policy_hyperparams: dict[str, Any]
    """The ``GFNetPPOConfig`` overrides that build a policy of that shape."""
    map_shape: tuple[int, int, int]
    """(D, h, w) of an encoder's last feature map on one patch: the policy's input."""
    results: dict[str, Any] = field(default_factory=dict)
    """What the file stores besides weights: model_name, patch_size, flops, model_flops, policy_flops, fc_flops,
    anytime_classification, budgeted_batch_classification, dynamic_threshold (those present)."""

    def source(self, data_root: str | os.PathLike, split: str = "test", device: str | torch.device = "cpu"
               ) -> NormalizedSource:
        """The ImageNet ``split`` under ``data_root`` as GFNet evaluates it: 224 x 224 centre crops, standardised."""
        root = check_imagenet_root(data_root)
        base = make_source("imagefolder", split, device, data_root=root, image_size=IMAGE_SIZE,
                           crop_fraction=CROP_FRACTION)
        return NormalizedSource(base)


def load_gfnet_checkpoint(path: str | os.PathLike, arch: str | None = None, map_location: Any = "cpu", *,
                          patch_size: int | None = None, steps: int | None = None) -> GFNetCheckpoint:
    """Load a GFNet-Pytorch ``.pth.tar`` (released or written by its train.py) into this project's modules.

    ``arch`` (``resnet50``/``densenet121``) is checked against the weights; ``patch_size`` is needed only when the
    file does not store it (train.py's files), ``steps`` (T) overrides the length of the stored ``flops`` (default
    5 without them). A file of another architecture, or with keys this mapping does not know, raises
    CheckpointError naming what it found.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"GFNet checkpoint not found: {path}. GFNet-Pytorch's README links the released "
                                f".pth.tar files (ResNet-50 and DenseNet-121, P = 96, T = 5).")
    payload = _safe_load(path, map_location)
    if not isinstance(payload, dict) or any(not isinstance(payload.get(k), Mapping) for k in STATE_KEYS):
        hint = " (a gfenv model checkpoint: load it with gfenv.checkpoint.load_model)" if isinstance(
            payload, dict) and "format" in payload else ""
        raise CheckpointError(f"{path} is not a GFNet-Pytorch checkpoint{hint}: it needs the dicts "
                              f"{', '.join(STATE_KEYS)} (and 'policy' after stage 2).")
    glance_state = _strip_module(payload["model_prime_state_dict"])
    focus_state = _strip_module(payload["model_state_dict"])
    arch = _check_arch(path, payload, glance_state, focus_state, arch)
    stored_patch = payload.get("patch_size")
    if stored_patch is not None and patch_size is not None and int(stored_patch) != int(patch_size):
        raise CheckpointError(f"{path} was trained with patch_size={stored_patch}, not {patch_size}.")
    if stored_patch is None and patch_size is None:
        raise CheckpointError(f"{path} does not store its patch size; pass patch_size= (96 or 128 in GFNet).")
    patch = int(stored_patch if stored_patch is not None else patch_size)
    counts = payload.get("flops") or payload.get("anytime_classification")
    steps = int(steps) if steps is not None else len(counts) if counts else DEFAULT_STEPS

    classifier, hidden, num_classes = _classifier_state(path, _strip_module(payload["fc"]))
    state = {**_encoder_state(path, "model_prime_state_dict (glance encoder)", arch, glance_state,
                              "glance_encoder.", "glance_head."),
             **_encoder_state(path, "model_state_dict (focus encoder)", arch, focus_state, "focus_encoder.",
                              "focus_head."),
             **classifier}
    config = ModelConfig(num_classes=num_classes, in_channels=3, patch_size=patch, steps=steps, backbone=arch,
                         classifier="gru", hidden=hidden, glance_mode=GLANCE_MODES[arch])
    with torch.device("meta"):
        model = GFNetModel(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}'s weights do not fit GFNet's {arch} layout: {err}") from err
    model.eval()

    param = next(model.parameters())
    with torch.no_grad():
        _, fmap = model.glance_encoder(torch.zeros(1, 3, patch, patch, device=param.device, dtype=param.dtype))
    map_shape = tuple(int(s) for s in fmap.shape[1:])
    policy, policy_hyperparams = None, {}
    if isinstance(payload.get("policy"), Mapping):
        policy, policy_hyperparams = _policy_state(path, _strip_module(payload["policy"]), map_shape, patch)
    results = {k: payload[k] for k in RESULT_KEYS if k in payload}
    return GFNetCheckpoint(path, arch, patch, steps, model, policy, policy_hyperparams, map_shape, results)
