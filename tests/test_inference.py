"""The env's inference path for frozen encoders (BatchNorm folded, channels_last) and the allocator setting."""

import resource

import pytest
import torch

from gfenv.backbones import build_encoder
from gfenv.models import encode
from gfenv.utils import keep_freed_memory


def _frozen(name: str, in_channels: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    enc = build_encoder(name, in_channels)
    for m in enc.modules():  # BatchNorm statistics far from the identity, so folding them really matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return enc.eval().requires_grad_(False)


@pytest.mark.parametrize("name", ["small_cnn", "resnet18"])
def test_folded_encoder_gives_the_encoders_outputs(name):
    enc = _frozen(name)
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        (feats, fmap), (f2, m2) = enc(x), encode(enc, x)
    assert f2.shape == feats.shape and m2.shape == fmap.shape
    scale = fmap.abs().max()
    torch.testing.assert_close(f2, feats, atol=1e-5 * scale, rtol=1e-5)
    torch.testing.assert_close(m2, fmap, atol=1e-5 * scale, rtol=1e-5)


def test_folded_encoder_follows_weight_changes():
    enc = _frozen("small_cnn")
    x = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        before = encode(enc, x)[0]
        bn = next(m for m in enc.modules() if isinstance(m, torch.nn.BatchNorm2d))
        bn.running_mean.add_(0.3)  # an in-place change, as an optimiser step or load_state_dict makes
        after, plain = encode(enc, x)[0], enc(x)[0]
        assert not torch.allclose(after, before)
        torch.testing.assert_close(after, plain, atol=1e-5, rtol=1e-5)
        enc.load_state_dict(_frozen("small_cnn").state_dict())
        torch.testing.assert_close(encode(enc, x)[0], enc(x)[0], atol=1e-5, rtol=1e-5)


def test_folded_encoder_follows_reassigned_tensors_and_submodules():
    """New tensors or modules put into the encoder (not in-place changes) are followed as well."""
    enc = _frozen("small_cnn")
    x = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        encode(enc, x)
        bn = next(m for m in enc.modules() if isinstance(m, torch.nn.BatchNorm2d))
        bn.running_var = bn.running_var * 4  # a new buffer tensor
        torch.testing.assert_close(encode(enc, x)[0], enc(x)[0], atol=1e-5, rtol=1e-5)
        conv = enc.features[0]
        enc.features[0] = torch.nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1, bias=False).eval()
        enc.features[0].requires_grad_(False)  # a new submodule
        torch.testing.assert_close(encode(enc, x)[0], enc(x)[0], atol=1e-5, rtol=1e-5)
        bn.weight = torch.nn.Parameter(bn.weight * -1, requires_grad=False)  # a new parameter
        torch.testing.assert_close(encode(enc, x)[0], enc(x)[0], atol=1e-5, rtol=1e-5)


def test_trainable_or_training_encoders_run_as_they_are():
    enc = _frozen("small_cnn")
    x = torch.rand(4, 1, 32, 32)
    enc.requires_grad_(True)
    assert torch.equal(encode(enc, x)[0], enc(x)[0])
    out = encode(enc, x)[0]
    assert out.requires_grad  # gradients flow through the real module
    enc.requires_grad_(False).train()
    with torch.no_grad():
        assert torch.equal(encode(enc, x)[1], enc(x)[1])  # batch statistics in training mode: not folded


def test_keep_freed_memory_stops_page_faults_on_reused_big_tensors(monkeypatch):
    monkeypatch.setenv("GFENV_KEEP_FREED_MEMORY", "0")
    assert keep_freed_memory() is False  # the opt-out
    monkeypatch.delenv("GFENV_KEEP_FREED_MEMORY")
    if not keep_freed_memory():
        pytest.skip("not glibc: the setting does not apply")
    torch.ones(16 << 20)  # 64 MB, allocated and freed once: from then on the block is reused
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.ones(16 << 20)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    # without the setting each one is a fresh mapping: 10 x 16,384 page faults; with it, at most a heap growth or two
    assert faults < 3 * 16384, f"{faults} page faults for 10 reused 64 MB tensors"


@pytest.mark.parametrize("classifier", ["gru", "cascaded"])
@pytest.mark.parametrize("batch", [1, 3, 12, 256])
def test_classifier_first_step_is_the_step_from_the_initial_state_bit_for_bit(classifier, batch):
    """The env takes the glance's classifier step with ``first()`` (no hidden-state product for the GRU): the same
    logits and state as ``step(x, init_state(B), 0)`` to the bit, in and out of autocast, and the same gradients."""
    from gfenv.models import CLASSIFIERS

    torch.manual_seed(batch)
    model = CLASSIFIERS[classifier](feature_dim=32, num_classes=10, hidden=48, steps=5)
    with torch.no_grad():
        model.gru.bias_hh.normal_() if classifier == "gru" else None  # a non-zero hidden bias: it must be used
    x = (torch.randn(batch, 32) * 3).requires_grad_(True)
    plain = model.step(x, model.init_state(batch), 0)
    first = model.first(x)
    assert all(torch.equal(a, b) for a, b in zip(plain, first))
    grads = [torch.autograd.grad(out[0].square().sum() + out[1].sum(), x)[0] for out in (plain, first)]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain, first = model.step(x, model.init_state(batch), 0), model.first(x)
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(plain, first))
