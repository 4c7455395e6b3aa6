"""Model: ResNet-50 v1.5 from timm, the chosen norm everywhere, the paper's initialization."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import TINY
from torch import nn

from ablation import config
from ablation.errors import ConfigError
from ablation.norms import PerGPUBatchNorm2d
from ablation.train.models import check_model_norm, create_model, last_norms


@pytest.fixture(scope="module")
def resnet50_gn() -> nn.Module:
    torch.manual_seed(0)
    return create_model(config.load(None, ["norm.name=gn"]), num_classes=1000)


def test_resnet50_is_v1_5_with_stride_on_the_3x3(resnet50_gn: nn.Module) -> None:
    block = resnet50_gn.layer2[0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2) and block.conv2.kernel_size == (3, 3)
    assert sum(p.numel() for p in resnet50_gn.parameters()) == 25_557_032


def test_every_norm_position_holds_the_chosen_norm(resnet50_gn: nn.Module) -> None:
    norms = [m for m in resnet50_gn.modules() if isinstance(m, (nn.GroupNorm, nn.modules.batchnorm._NormBase))]
    assert len(norms) == 53  # stem + 3 per bottleneck x 16 + 4 downsamples
    assert all(isinstance(m, nn.GroupNorm) and m.num_groups == 32 for m in norms)
    bn = create_model(config.load(None, ["model.name=resnet18"]), 10, gpus_per_process=4)
    bns = [m for m in bn.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    assert bns and all(isinstance(m, PerGPUBatchNorm2d) and m.gpus_per_process == 4 for m in bns)


def test_channels_per_group_varies_groups_by_layer() -> None:
    model = create_model(config.load(None, ["norm.name=gn", "norm.channels_per_group=16"]), 10)
    for m in model.modules():
        if isinstance(m, nn.GroupNorm):
            assert m.num_channels // m.num_groups == 16


def test_last_gamma_of_each_block_is_zero_and_others_one(resnet50_gn: nn.Module) -> None:
    last = last_norms(resnet50_gn)
    assert len(last) == 16 and all(torch.all(m.weight == 0) for m in last)
    others = [m for m in resnet50_gn.modules() if isinstance(m, nn.GroupNorm) and all(m is not x for x in last)]
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in others)
    kept = create_model(config.load(None, ["model.name=resnet18", "model.zero_init_last=false"]), 10)
    assert all(torch.all(m.weight == 1) for m in last_norms(kept))


def test_fc_is_normal_with_std_0_01_and_zero_bias(resnet50_gn: nn.Module) -> None:
    fc = resnet50_gn.fc
    assert fc.weight.std().item() == pytest.approx(0.01, rel=0.01)
    assert abs(fc.weight.mean().item()) < 1e-4 and torch.all(fc.bias == 0)


def test_convs_are_he_normal_fan_out(resnet50_gn: nn.Module) -> None:
    for conv in (resnet50_gn.layer3[0].conv2, resnet50_gn.layer4[2].conv3):
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.02)


def test_small_model_for_tests_and_demo() -> None:
    model = create_model(config.load(None, TINY), num_classes=4, gpus_per_process=2)
    assert model.conv1.kernel_size == (3, 3) and isinstance(model.maxpool, nn.Identity)
    assert model(torch.randn(4, 3, 16, 16)).shape == (4, 4)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["norm.name=gn", "norm.groups=48"], "norm.groups=48 does not divide a layer's 64 channels"),
        (["model.name=resnet999"], "model.name: timm has no model 'resnet999'"),
        (["model.name=vit_tiny_patch16_224"], "is not a timm ResNet"),
        (["model.name=resnet10t", "model.stem=small"], "model.stem=small needs a single-conv stem"),
    ],
)
def test_impossible_models_fail_before_training(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_model_norm(config.load(None, overrides))


def test_a_stand_in_model_deep_copies_into_an_independent_twin() -> None:
    """copy.deepcopy of a per-GPU BN model (EMA copies, model soups) trains like the original, and the copy's
    model-level hooks serve its own layers: a step of one leaves the other's parameters and counts alone."""
    import copy

    import torch.nn.functional as F

    torch.manual_seed(0)
    model = create_model(config.load(None, TINY + ["gpus=4", "batch_per_gpu=2"]), 4, gpus_per_process=4).double()
    twin = copy.deepcopy(model)
    x, y = torch.randn(8, 3, 16, 16, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    grads = []
    for m in (model, twin):
        F.cross_entropy(m(x), y).backward()
        grads.append([p.grad for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    before = {k: v.clone() for k, v in twin.state_dict().items()}
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    model(x)
    for k, v in twin.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)
    counts = {int(m.num_batches_tracked) for m in model.modules() if isinstance(m, PerGPUBatchNorm2d)}
    assert counts == {2} and {int(m.num_batches_tracked) for m in twin.modules() if isinstance(m, PerGPUBatchNorm2d)} == {1}
