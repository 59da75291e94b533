"""The training fast path is exact: BN folding for eval-mode attacks, and the bf16 per-layer exceptions."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rslad_edge.attacks import pgd
from rslad_edge.device import resolve_precision
from rslad_edge.models import create_model
from rslad_edge.models.folding import BatchNormFoldedView, fold_batchnorm


def _trained_bn_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = create_model(name).train()
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(3):
            model(torch.rand(16, 3, 32, 32) * 2)
    return model.eval()


@pytest.mark.parametrize("name,folds", [("resnet18", 20), ("mobilenetv2", 57), ("smallcnn", 4)])
def test_folded_view_gives_the_eval_mode_logits_and_input_gradients(name, folds):
    model = _trained_bn_model(name)
    view = BatchNormFoldedView(model)
    assert view.num_folded == folds
    x = torch.rand(4, 3, 32, 32, requires_grad=True)
    expected = model(x)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), x)
    got = view(x)
    (got_grad,) = torch.autograd.grad(got.square().sum(), x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-3, atol=1e-3 * expected_grad.abs().max().item())
    assert not any(p.requires_grad for p in view.parameters() if not any(p is q for q in model.parameters()))


def test_folded_view_follows_the_model_after_refresh_only_for_folded_layers():
    model = _trained_bn_model("smallcnn")
    view = BatchNormFoldedView(model)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        stale = view(x)
        view.refresh()
        fresh, expected = view(x), model(x)
    torch.testing.assert_close(fresh, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(stale, expected, atol=1e-3)  # without refresh the folded convs lag behind


def test_untraceable_model_is_not_folded():
    class DataDependent(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x  # control flow on a value: fx cannot trace it

    assert fold_batchnorm(DataDependent()) is None


@pytest.mark.skipif(resolve_precision("auto", torch.device("cpu")).name != "bf16", reason="CPU without fast bf16")
def test_bf16_keeps_strided_depthwise_convolutions_in_fp32_with_unchanged_weights():
    precision = resolve_precision("bf16", torch.device("cpu"))
    torch.manual_seed(0)
    model = create_model("mobilenetv2").eval()
    keys = model.state_dict().keys()
    precision.prepare(model, torch.device("cpu"))
    patched = [m for m in model.modules() if "forward" in vars(m)]
    assert len(patched) == 3 and all(m.groups == m.in_channels and m.stride == (2, 2) for m in patched)
    assert model.state_dict().keys() == keys
    outputs = []
    patched[0].register_forward_hook(lambda module, args, out: outputs.append(out.dtype))
    with precision.autocast(torch.device("cpu")):
        model(torch.rand(2, 3, 32, 32).contiguous(memory_format=torch.channels_last))
    assert outputs == [torch.float32]


def test_pgd_on_the_folded_view_finds_the_same_adversarial_examples():
    model = _trained_bn_model("smallcnn")
    x = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        target = F.softmax(model(x) + 0.5 * torch.randn(8, 10), 1)
    kwargs = dict(eps=8 / 255, step_size=2 / 255, steps=5, loss="kl", random_start="normal", target_probs=target)
    plain = pgd(model, x, None, generator=torch.Generator().manual_seed(0), **kwargs)
    folded = pgd(BatchNormFoldedView(model), x, None, generator=torch.Generator().manual_seed(0), **kwargs)
    # A gradient sign flipped by float rounding now and then, on a few pixels (a pixel may flip in two of the five
    # steps: the CPU's kernels choose the rounding order).
    assert (plain - folded).abs().max() <= 2 * 2 * 2 / 255 + 1e-6
    assert (plain != folded).float().mean() < 0.01
