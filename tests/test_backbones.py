"""Tests for the torchvision backbones and the MAC counter.

Models are built with random weights only; nothing is downloaded.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gfenv.backbones import BACKBONES, TORCHVISION_BACKBONES, build_encoder, cached_weights_path
from gfenv.flops import count_macs, model_macs
from gfenv.models import GFNetModel, ModelConfig

FAST = ("resnet18", "mobilenet_v3_small", "efficientnet_b0")
CASES = [name if name in FAST else pytest.param(name, marks=pytest.mark.slow) for name in TORCHVISION_BACKBONES]


@pytest.mark.parametrize("name", CASES)
def test_backbone_contract(name: str) -> None:
    torch.manual_seed(0)
    enc = build_encoder(name, in_channels=3).eval()
    with torch.no_grad():
        pooled, fmap = enc(torch.randn(1, 3, 64, 64))
    d = enc.feature_dim
    assert pooled.shape == (1, d)
    assert fmap.ndim == 4 and fmap.shape[:2] == (1, d)
    torch.testing.assert_close(pooled, fmap.mean(dim=(2, 3)))


def test_all_registered() -> None:
    build_encoder("small_cnn", 1)
    assert set(TORCHVISION_BACKBONES) <= set(BACKBONES)


def test_grey_input_is_repeated_to_rgb() -> None:
    torch.manual_seed(0)
    grey = build_encoder("mobilenet_v3_small", in_channels=1).eval()
    rgb = build_encoder("mobilenet_v3_small", in_channels=3).eval()
    rgb.load_state_dict(grey.state_dict())
    x = torch.randn(1, 1, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(grey(x)[0], rgb(x.repeat(1, 3, 1, 1))[0])


def test_bad_channel_count() -> None:
    with pytest.raises(ValueError, match="in_channels"):
        build_encoder("resnet18", in_channels=2)


def test_unknown_backbone_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="resnet18") as info:
        build_encoder("resnet9000", in_channels=3)
    assert "efficientnet_b3" in str(info.value) and "small_cnn" in str(info.value)


def test_local_weights_round_trip(tmp_path) -> None:
    import torchvision

    torch.manual_seed(1)
    full = torchvision.models.get_model("resnet18", weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(full.state_dict(), path)
    torch.manual_seed(2)
    loaded = build_encoder("resnet18", 3, weights=str(path)).eval()
    full.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        pooled, _ = loaded(x)
        full.fc = nn.Identity()
        torch.testing.assert_close(pooled, full(x))


def test_missing_weights_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_encoder("resnet18", 3, weights=str(tmp_path / "nope.pth"))


def test_cache_without_file_never_downloads(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert cached_weights_path("resnet18") == expected
    with pytest.raises(FileNotFoundError) as info:
        build_encoder("resnet18", 3, weights="cache")
    assert str(expected) in str(info.value)
    assert not expected.exists()


def test_cache_with_file(tmp_path, monkeypatch) -> None:
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = cached_weights_path("mobilenet_v3_small")
    path.parent.mkdir(parents=True)
    full = torchvision.models.get_model("mobilenet_v3_small", weights=None)
    torch.save(full.state_dict(), path)
    enc = build_encoder("mobilenet_v3_small", 3, weights="cache")
    torch.testing.assert_close(enc.body[0][0].weight, full.features[0][0].weight)


def test_count_macs_linear() -> None:
    assert count_macs(nn.Linear(10, 20), torch.randn(1, 10)) == 200


def test_count_macs_conv() -> None:
    conv = nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1)
    x = torch.randn(2, 3, 16, 16)
    out = conv(x)
    assert count_macs(conv, x) == out.numel() * 3 * 3 * 3


def test_count_macs_function() -> None:
    a, b = torch.randn(4, 5), torch.randn(5, 6)
    assert count_macs(torch.matmul, a, b) == 4 * 5 * 6


def test_model_macs() -> None:
    model = GFNetModel(ModelConfig())
    model.train()
    macs = model_macs(model, (1, 64, 64))
    assert set(macs) == {"glance_encoder", "focus_encoder", "classifier", "glance"}
    assert all(isinstance(v, int) and v > 0 for v in macs.values())
    assert macs["glance_encoder"] == macs["focus_encoder"] == macs["glance"]
    assert model.training


def test_model_macs_channel_mismatch() -> None:
    with pytest.raises(ValueError, match="channels"):
        model_macs(GFNetModel(ModelConfig()), (3, 64, 64))
