"""Official GFNet-Pytorch checkpoints: a file with the released structure (built here from torchvision models and
GFNet-layout classifier and policy modules, ``module.`` prefixes and all) loads into gfenv's modules with identical
outputs; another architecture is refused by name; the report prints what the file stores."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from gymnasium.vector.vector_env import AutoresetMode
from PIL import Image
from torch import nn

from gfenv.checkpoint import CheckpointError
from gfenv.eval.evaluation import run_episodes
from gfenv.eval.official import gfnet_agent, gfnet_checkpoint_report, gfnet_env
from gfenv.glimpse import glance
from gfenv.official import IMAGENET_MEAN, IMAGENET_STD, detect_arch, load_gfnet_checkpoint

PATCH, STEPS, CLASSES, FC_HIDDEN, POLICY_HIDDEN = 32, 3, 10, 24, 16


class FullLayer(nn.Module):
    """GFNet's recurrent classifier, by its key names: a GRU ``rnn`` over the steps and a linear ``fc``."""

    def __init__(self, features: int, hidden: int, classes: int):
        super().__init__()
        self.rnn = nn.GRU(features, hidden)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(features)  # (T, B, H) from a zero state
        return self.fc(out)  # (T, B, K)


class ActorCritic(nn.Module):
    """GFNet's ResNet/DenseNet policy, by its key names."""

    def __init__(self, state_dim: int, hidden: int):
        super().__init__()
        self.state_encoder = nn.Sequential(nn.Linear(state_dim, 2048), nn.ReLU(), nn.Linear(2048, hidden), nn.ReLU())
        self.gru = nn.GRU(hidden, hidden)
        self.actor = nn.Sequential(nn.Linear(hidden, 2), nn.Sigmoid())
        self.critic = nn.Sequential(nn.Linear(hidden, 1))

    def forward(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, _ = self.gru(self.state_encoder(states.flatten(2)))  # (L, B, H)
        return self.actor(out), self.critic(out).squeeze(-1)


def encode(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GFNet's encoders' forward: (average-pooled features, last feature map)."""
    if isinstance(net, torchvision.models.ResNet):
        fmap = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3,
                             net.layer4)(x)
    else:
        fmap = torch.relu(net.features(x))
    return fmap.mean((2, 3)), fmap


def official_parts(arch: str, seed: int = 0) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    prime, model = (torchvision.models.get_model(arch, num_classes=CLASSES).eval() for _ in range(2))
    for net in (prime, model):
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):  # non-trivial running statistics
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    dim = prime.fc.in_features if arch == "resnet50" else prime.classifier.in_features
    side = math.ceil(PATCH / 32)
    return {"prime": prime, "model": model, "fc": FullLayer(dim, FC_HIDDEN, CLASSES).eval(),
            "policy": ActorCritic(dim * side * side, POLICY_HIDDEN).eval()}


def gfnet_flops(parts: dict[str, nn.Module]) -> dict[str, int]:
    """GFNet's per-call multiply-adds of the policy (without the critic) and the classifier, from the layer sizes."""
    pol, fc = parts["policy"], parts["fc"]
    s, hp = pol.state_encoder[0].in_features, pol.gru.hidden_size
    d, h, k = fc.rnn.input_size, fc.rnn.hidden_size, fc.fc.out_features
    return {"policy_flops": s * 2048 + 2048 * hp + 6 * hp * hp + 2 * hp, "fc_flops": 3 * h * (d + h) + h * k}


def save_official(parts: dict[str, nn.Module], path: Path, arch: str, prefix: str = "module.", **extra) -> Path:
    """A .pth.tar with the keys of GFNet's released checkpoints (DataParallel prefix on the encoders)."""
    payload = {
        "model_name": arch, "patch_size": PATCH,
        "model_prime_state_dict": {prefix + k: v for k, v in parts["prime"].state_dict().items()},
        "model_state_dict": {prefix + k: v for k, v in parts["model"].state_dict().items()},
        "fc": parts["fc"].state_dict(), "policy": parts["policy"].state_dict(),
        "flops": [761186240, 1568511872, 2375837504], "model_flops": 750725056, **gfnet_flops(parts),
        "anytime_classification": [68.85, 73.708, 74.654],
        "dynamic_threshold": torch.rand(39, STEPS),
        "budgeted_batch_classification": [[0.8e9 + 1e7 * i for i in range(39)], [60.0 + 0.25 * i for i in range(39)]],
        **extra,
    }
    torch.save(payload, path)
    return path


@pytest.fixture(scope="module", params=["resnet50", "densenet121"])
def official(request, tmp_path_factory):
    arch = request.param
    parts = official_parts(arch)
    path = save_official(parts, tmp_path_factory.mktemp(arch) / f"{arch}_patch-size-{PATCH}_T{STEPS}.pth.tar", arch)
    return arch, parts, path


@torch.no_grad()
def test_loaded_checkpoint_gives_the_official_modules_outputs(official):
    arch, parts, path = official
    ckpt = load_gfnet_checkpoint(path)
    model = ckpt.model
    assert (ckpt.arch, ckpt.patch_size, ckpt.steps) == (arch, PATCH, STEPS)
    assert model.config.glance_mode == ("bicubic" if arch == "resnet50" else "bilinear")
    torch.manual_seed(1)
    x = torch.randn(2, 3, PATCH, PATCH)
    for ours, theirs in ((model.glance_encoder, parts["prime"]), (model.focus_encoder, parts["model"])):
        pooled, fmap = ours(x)
        ref_pooled, ref_fmap = encode(theirs, x)
        torch.testing.assert_close(fmap, ref_fmap, rtol=0, atol=0)
        torch.testing.assert_close(pooled, ref_pooled)
    head = parts["prime"].fc if arch == "resnet50" else parts["prime"].classifier
    torch.testing.assert_close(model.glance_head(pooled), head(pooled))

    feats = torch.randn(STEPS, 2, model.feature_dim)  # (T, B, D)
    state = model.classifier.init_state(2)
    ours = []
    for t in range(STEPS):
        logits, state = model.classifier.step(feats[t], state, t)
        ours.append(logits)
    torch.testing.assert_close(torch.stack(ours), parts["fc"](feats))

    agent = gfnet_agent(ckpt)
    obs = torch.randn(STEPS - 1, 2, *ckpt.map_shape)  # (L, B, D, h, w)
    hidden = torch.zeros(2, agent.config.hidden_size)
    means, values = [], []
    for t in range(STEPS - 1):
        mean, hidden = agent.policy.decide(obs[t].flatten(1), hidden, torch.zeros(2, 49, dtype=torch.bool))
        means.append(mean)
        values.append(agent.policy.critic(hidden).squeeze(1))
    ref_means, ref_values = parts["policy"](obs)
    torch.testing.assert_close(torch.stack(means), ref_means)
    torch.testing.assert_close(torch.stack(values), ref_values)
    assert agent.macs_per_step == gfnet_flops(parts)["policy_flops"]


@torch.no_grad()
def test_env_episode_matches_gfnets_inference_loop(official, tensor_images):
    """The env with GFNet's policy acting: same patches and probabilities as GFNet's own loop (standardised images,
    policy mean location, floor(a * (H - P)) corners), given the same glance resize."""
    arch, parts, path = official
    ckpt = load_gfnet_checkpoint(path, arch=arch)
    torch.manual_seed(2)
    images = torch.rand(3, 3, 80, 80)
    env = gfnet_env(ckpt, source=tensor_images(images, torch.tensor([0, 1, 2]), CLASSES), num_envs=3,
                        sampling="sequential", autoreset_mode=AutoresetMode.DISABLED)
    agent = gfnet_agent(ckpt)
    obs, _ = env.reset(seed=0)
    agent.reset(env)
    ours = [env.probs.clone()]
    for _ in range(STEPS - 1):
        obs, *_ = env.step(agent.act(obs, env))
        ours.append(env.probs.clone())

    x = (images - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pooled, fmap = encode(parts["prime"], glance(x, PATCH, ckpt.model.config.glance_mode))
    feats, maps, corners = [pooled], [fmap], []
    for _ in range(1, STEPS):
        loc, _ = parts["policy"](torch.stack(maps))
        corner = torch.floor(loc[-1] * (80 - PATCH)).long()  # (B, 2) rows, cols
        corners.append(corner)
        patches = torch.stack([x[i, :, r:r + PATCH, c:c + PATCH] for i, (r, c) in enumerate(corner.tolist())])
        pooled, fmap = encode(parts["model"], patches)
        feats.append(pooled)
        maps.append(fmap)
    probs = parts["fc"](torch.stack(feats)).softmax(-1)
    torch.testing.assert_close(torch.stack(ours), probs)
    torch.testing.assert_close(env.history, torch.stack(corners, 1))


def test_checkpoint_without_module_prefix_and_with_numpy_results_loads(tmp_path):
    parts = official_parts("densenet121", seed=3)
    path = save_official(parts, tmp_path / "train.pth.tar", "densenet121", prefix="", patch_size=None,
                         anytime_classification=[np.float64(68.212), np.float64(72.994), np.float64(74.23)])
    with pytest.raises(CheckpointError, match="does not store its patch size; pass patch_size="):
        load_gfnet_checkpoint(path)
    ckpt = load_gfnet_checkpoint(path, patch_size=PATCH)
    assert ckpt.arch == "densenet121" and ckpt.patch_size == PATCH
    assert load_gfnet_checkpoint(path, patch_size=PATCH, steps=4).model.config.steps == 4
    assert [float(v) for v in ckpt.results["anytime_classification"]] == [68.212, 72.994, 74.23]
    torch.testing.assert_close(ckpt.model.focus_encoder.body[0].conv0.weight, parts["model"].features.conv0.weight)


class NotData:
    pass


def test_other_architectures_and_unsafe_files_are_refused(tmp_path):
    parts = official_parts("densenet121")
    path = save_official(parts, tmp_path / "d121.pth.tar", "densenet121")
    with pytest.raises(CheckpointError, match=r"densenet121 weights but arch='resnet50'"):
        load_gfnet_checkpoint(path, arch="resnet50")
    liar = save_official(parts, tmp_path / "liar.pth.tar", "resnet50")
    with pytest.raises(CheckpointError, match=r"model_name='resnet50' but its encoder weights are densenet121"):
        load_gfnet_checkpoint(liar)
    small = {"prime": torchvision.models.resnet18(num_classes=CLASSES), "model": torchvision.models.resnet18(
        num_classes=CLASSES), "fc": parts["fc"], "policy": parts["policy"]}
    with pytest.raises(CheckpointError, match=r"resnet18 weights; this loader maps GFNet's resnet50 and densenet121"):
        load_gfnet_checkpoint(save_official(small, tmp_path / "r18.pth.tar", "resnet18"))
    assert detect_arch({"conv_stem.weight": torch.zeros(1)}).startswith("a MobileNetV3/EfficientNet")
    unsafe = save_official(parts, tmp_path / "unsafe.pth.tar", "densenet121", extra=NotData())
    with pytest.raises(CheckpointError, match=r"NotData.*never unpickles arbitrary objects"):
        load_gfnet_checkpoint(unsafe)
    (tmp_path / "garbage.pth.tar").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_gfnet_checkpoint(tmp_path / "garbage.pth.tar")
    torch.save({"format": "gfenv-model-v1", "config": {}, "model": {}}, tmp_path / "ours.pt")
    with pytest.raises(CheckpointError, match="load_model"):
        load_gfnet_checkpoint(tmp_path / "ours.pt")


def test_report_prints_stored_results_and_needs_an_imagenet_folder(official, tmp_path):
    arch, parts, path = official
    text = gfnet_checkpoint_report(path)
    assert f"model_arch : {arch}" in text and f"patch_size : {PATCH} (T = {STEPS}" in text
    assert "top-1 (%)        68.85   73.71   74.65   (stored)" in text
    assert "stored (G)       0.761   1.569   2.376" in text
    assert "budgeted_batch_classification (stored, 39 points):" in text and "     0.800      60.00" in text
    flops = gfnet_flops(parts)
    policy_line = next(line for line in text.splitlines() if line.startswith("  policy "))
    classifier_line = next(line for line in text.splitlines() if line.startswith("  classifier "))
    assert f"{flops['policy_flops'] / 1e6:.2f}  [{flops['policy_flops'] / 1e6:.2f}]" in policy_line
    assert f"{flops['fc_flops'] / 1e6:.2f}  [{flops['fc_flops'] / 1e6:.2f}]" in classifier_line
    with pytest.raises(FileNotFoundError, match=r"<root>/val/<wnid>/\*\.JPEG"):
        gfnet_checkpoint_report(path, data_root=tmp_path / "imagenet")


def _imagenet_like(root, per_class: int, size: tuple[int, int], seed: int) -> None:
    """ImageNet's layout, <root>/val/<wnid>/<image>, with random RGB images: one folder per class."""
    rng = np.random.default_rng(seed)
    for k in range(CLASSES):
        folder = root / "val" / f"n{k:08d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_report_reevaluates_on_an_imagefolder(tmp_path):
    parts = official_parts("densenet121", seed=4)
    path = save_official(parts, tmp_path / "d121.pth.tar", "densenet121")
    _imagenet_like(tmp_path / "imagenet", per_class=1, size=(40, 48), seed=0)
    text = gfnet_checkpoint_report(path, data_root=tmp_path / "imagenet", max_images=6, batch_size=4)
    line = next(line for line in text.splitlines() if "re-evaluated" in line)
    assert f"6 images of {tmp_path / 'imagenet'}" in line
    printed = line.removeprefix("top-1 (%)").split("(")[0].split()
    ckpt = load_gfnet_checkpoint(path)
    env = gfnet_env(ckpt, tmp_path / "imagenet", num_envs=6, sampling="sequential",
                        autoreset_mode=AutoresetMode.DISABLED)
    expected = run_episodes(gfnet_agent(ckpt), env, 6, seed=0)["accuracy"]
    assert printed == [f"{a:.2f}" for a in expected] and len(printed) == STEPS


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_report_reevaluates_on_cuda_as_on_cpu(tmp_path):
    parts = official_parts("resnet50", seed=5)
    path = save_official(parts, tmp_path / "r50.pth.tar", "resnet50")
    _imagenet_like(tmp_path / "imagenet", per_class=3, size=(64, 80), seed=1)
    lines = {}
    for device in ("cpu", "cuda"):
        text = gfnet_checkpoint_report(path, data_root=tmp_path / "imagenet", device=device, batch_size=16)
        line = next(line for line in text.splitlines() if "re-evaluated" in line)
        lines[device] = [float(v) for v in line.removeprefix("top-1 (%)").split("(")[0].split()]
    assert len(lines["cuda"]) == STEPS  # TF32 convolutions may flip at most a near-tie: one image of 30
    assert all(abs(a - b) <= 100 / 30 + 0.01 for a, b in zip(lines["cuda"], lines["cpu"]))
