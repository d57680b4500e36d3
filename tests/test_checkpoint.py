"""Tests for atomic checkpoint saving, safe loading and the standard model checkpoint format.

Corrupt, truncated, foreign and mismatched files must fail with errors that name the file and the problem.
"""

from __future__ import annotations

import os

import pytest
import torch

from gfenv.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint, save_model
from gfenv.models import GFNetModel, ModelConfig


@pytest.fixture
def model_file(tmp_path):
    torch.manual_seed(0)
    model = GFNetModel(ModelConfig(num_classes=10, patch_size=16, hidden=32))
    path = tmp_path / "stage1.pt"
    save_model(path, model, meta={"epoch": 3})
    return path, model


def test_atomic_save_and_round_trip(tmp_path) -> None:
    payload = {"a": torch.randn(3, 4), "step": 7, "nested": {"b": torch.arange(5)}}
    path = tmp_path / "sub" / "dir" / "ck.pt"
    save_checkpoint(path, payload)
    assert os.listdir(path.parent) == ["ck.pt"]
    loaded = load_checkpoint(path)
    torch.testing.assert_close(loaded["a"], payload["a"])
    torch.testing.assert_close(loaded["nested"]["b"], payload["nested"]["b"])
    assert loaded["step"] == 7
    save_checkpoint(path, {"step": 8})
    assert load_checkpoint(path)["step"] == 8
    assert os.listdir(path.parent) == ["ck.pt"]


def test_model_round_trip(model_file) -> None:
    path, model = model_file
    loaded, meta = load_model(path, expect={"num_classes": 10, "backbone": "small_cnn", "in_channels": 1})
    assert meta == {"epoch": 3}
    assert loaded.config == model.config
    model.eval()
    loaded.eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        for t in (0, 1):
            torch.testing.assert_close(loaded.encoder(t)(x)[0], model.encoder(t)(x)[0], rtol=0, atol=0)
        feats = model.glance_encoder(x)[0]
        state = model.classifier.init_state(2)
        torch.testing.assert_close(
            loaded.classifier.step(feats, state, 0)[0], model.classifier.step(feats, state, 0)[0]
        )


def test_truncated_file(model_file) -> None:
    path, _ = model_file
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    with pytest.raises(CheckpointError, match="stage1.pt"):
        load_model(path)


def test_random_bytes_file(tmp_path) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="corrupt or truncated") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_mismatched_config_names_keys_and_values(model_file) -> None:
    path, _ = model_file
    with pytest.raises(CheckpointError) as info:
        load_model(path, expect={"num_classes": 100, "backbone": "resnet18", "patch_size": 16})
    msg = str(info.value)
    assert str(path) in msg
    assert "num_classes=10" in msg and "100" in msg
    assert "backbone='small_cnn'" in msg and "'resnet18'" in msg
    assert "patch_size" not in msg


def test_unknown_expect_key(model_file) -> None:
    with pytest.raises(ValueError, match="num_clases"):
        load_model(model_file[0], expect={"num_clases": 10})


def test_missing_file(tmp_path) -> None:
    path = tmp_path / "absent.pt"
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        load_model(path)


def test_wrong_format(tmp_path) -> None:
    path = tmp_path / "other.pt"
    save_checkpoint(path, {"model": {}, "config": {}})
    with pytest.raises(CheckpointError, match="other.pt"):
        load_model(path)
    save_checkpoint(path, {"format": "something-else", "model": {}, "config": {}})
    with pytest.raises(CheckpointError, match="something-else"):
        load_model(path)


def test_state_dict_mismatch_is_reported(model_file) -> None:
    path, _ = model_file
    payload = load_checkpoint(path)
    del payload["model"]["glance_head.bias"]
    payload["model"]["extra.weight"] = torch.zeros(1)
    payload["model"]["focus_head.weight"] = torch.zeros(3, 3)
    save_checkpoint(path, payload)
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    msg = str(info.value)
    assert "glance_head.bias" in msg and "extra.weight" in msg and "focus_head.weight" in msg
