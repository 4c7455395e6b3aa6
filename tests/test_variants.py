"""Batch-independent variants: Weight Standardization, FRN+TLU, EvoNorm-S0, and norm+activation placement in ResNet v1.

Definitions are checked against the formulas written out element by element (plain Python floats),
not against the layers' own tensor code.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import TINY
from helpers import norm_spec as spec
from timm.models.resnet import BasicBlock, Bottleneck
from torch import nn

from ablation import config, rundir
from ablation.errors import ConfigError
from ablation.norms import create_norm
from ablation.norms.evonorm import EvoNormS0
from ablation.norms.weight_std import WSConv2d, standardize
from ablation.train.models import check_model_norm, create_model, init_weights, last_norms
from ablation.train.trainer import train

NORM_ACT = ("frn", "evonorm_s0")


def randomize(layer: nn.Module, seed: int = 1) -> nn.Module:
    """Random values for every parameter (gamma, beta, tau, v), so each enters the test."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return layer


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


X = torch.randn(2, 4, 3, 2, generator=torch.Generator().manual_seed(0)) * 2 + 0.5  # N, C, H, W


# ---------------------------------------------------------------- Weight Standardization


@torch.no_grad()
def test_ws_conv_uses_the_official_definition_unbiased_std_plus_eps() -> None:
    conv = nn.Conv2d(2, 3, kernel_size=2, bias=True)
    with torch.no_grad():
        conv.weight.copy_(torch.arange(24, dtype=torch.float32).reshape(3, 2, 2, 2) ** 1.5 / 10 - 1)
        conv.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
    ws = WSConv2d.from_conv(conv)
    assert ws.weight is conv.weight and ws.bias is conv.bias  # the raw weight stays the parameter

    expected_w = torch.empty(3, 2, 2, 2)
    for o in range(3):
        w = [float(v) for v in conv.weight[o].flatten()]
        n = len(w)
        mean = sum(w) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in w) / (n - 1))  # unbiased
        expected_w[o] = torch.tensor([(v - mean) / (std + 1e-5) for v in w]).reshape(2, 2, 2)
    torch.testing.assert_close(standardize(conv.weight), expected_w, rtol=1e-6, atol=1e-6)

    x = torch.randn(2, 2, 4, 3, generator=torch.Generator().manual_seed(3))
    out = ws(x)
    # the convolution itself, written out at one output position (o=1, i=1, j=0)
    by_hand = float(conv.bias[1]) + sum(
        float(expected_w[1, c, a, b]) * float(x[1, c, 1 + a, 0 + b]) for c in range(2) for a in range(2) for b in range(2)
    )
    assert float(out[1, 1, 1, 0]) == pytest.approx(by_hand, rel=1e-5)
    torch.testing.assert_close(out, F.conv2d(x, expected_w, conv.bias), rtol=1e-5, atol=1e-5)
    # the other definition (timm's StdConv2d: biased variance, eps inside the root) is a different layer
    biased = timm.layers.StdConv2d(2, 3, kernel_size=2, bias=True)
    biased.load_state_dict(conv.state_dict())
    assert not torch.allclose(biased(x), out, rtol=1e-3, atol=1e-4)


def test_weight_std_swaps_every_conv_not_the_fc_and_keeps_he_init_and_state_keys() -> None:
    overrides = ["model.name=resnet18", "norm.name=gn", "model.weight_std=true"]
    torch.manual_seed(0)
    model = create_model(config.load(None, overrides), 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 20 and all(type(c) is WSConv2d for c in convs)  # stem, 16 in blocks, 3 downsample
    assert type(model.fc) is nn.Linear
    plain = create_model(config.load(None, overrides[:2]), 10)
    assert list(model.state_dict()) == list(plain.state_dict())  # same keys: WS adds no parameter
    conv = model.layer3[1].conv2
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.05)  # raw weight, He fan-out
    small = create_model(config.load(None, TINY + ["norm.name=gn", "norm.groups=4", "model.weight_std=true"]), 4)
    assert type(small.conv1) is WSConv2d  # the small stem's conv too (swapped after it is built)


def test_weight_std_is_in_the_run_id_only_when_set() -> None:
    base = config.load(None, ["norm.name=gn"])
    assert config.run_id(config.load(None, ["norm.name=gn", "model.weight_std=false"])) == config.run_id(base)
    assert config.run_id(config.load(None, ["norm.name=gn", "model.weight_std=true"])) != config.run_id(base)


# ---------------------------------------------------------------- FRN + TLU


@pytest.mark.parametrize("apply_act", [True, False])
@torch.no_grad()
def test_frn_matches_the_definition(apply_act: bool) -> None:
    layer = randomize(create_norm(4, spec("frn", apply_act=apply_act)))
    assert layer.eps == 1e-6  # the paper's epsilon, from the registry
    assert (layer.tau is not None) == apply_act
    out = layer(X)
    n_, c_, h_, w_ = X.shape
    clipped = 0
    for n in range(n_):
        for c in range(c_):
            vals = [float(X[n, c, i, j]) for i in range(h_) for j in range(w_)]
            nu2 = sum(v * v for v in vals) / len(vals)
            for i in range(h_):
                for j in range(w_):
                    y = float(layer.weight[c]) * float(X[n, c, i, j]) / math.sqrt(nu2 + 1e-6) + float(layer.bias[c])
                    if apply_act:
                        clipped += y < float(layer.tau[c])
                        y = max(y, float(layer.tau[c]))
                    assert float(out[n, c, i, j]) == pytest.approx(y, rel=1e-5, abs=1e-6)
    assert clipped > 0 or not apply_act  # the TLU was exercised


def test_frn_eps_follows_norm_eps() -> None:
    assert create_norm(4, spec("frn", eps=1e-3)).eps == 1e-3


# ---------------------------------------------------------------- EvoNorm-S0


@pytest.mark.parametrize("apply_act", [True, False])
@torch.no_grad()
def test_evonorm_s0_matches_the_definition(apply_act: bool) -> None:
    layer = randomize(create_norm(4, spec("evonorm_s0", apply_act=apply_act, groups=2)))
    assert isinstance(layer, EvoNormS0) and layer.groups == 2 and layer.eps == 1e-5
    assert (layer.v is not None) == apply_act
    out = layer(X)
    n_, c_, h_, w_ = X.shape
    for n in range(n_):
        for g in range(2):
            chans = (2 * g, 2 * g + 1)
            vals = [float(X[n, c, i, j]) for c in chans for i in range(h_) for j in range(w_)]
            mean = sum(vals) / len(vals)
            var = sum((v - mean) ** 2 for v in vals) / len(vals)  # biased, over the group's channels and positions
            for c in chans:
                for i in range(h_):
                    for j in range(w_):
                        x = float(X[n, c, i, j])
                        num = x * sigmoid(float(layer.v[c]) * x) if apply_act else x
                        y = num / math.sqrt(var + 1e-5) * float(layer.weight[c]) + float(layer.bias[c])
                        assert float(out[n, c, i, j]) == pytest.approx(y, rel=1e-5, abs=1e-6)


def test_evonorm_s0_groups_default_to_32_and_must_divide_every_width() -> None:
    assert create_norm(64, spec("evonorm_s0")).groups == 32
    assert config.normalized(config.load(None, ["norm.name=evonorm_s0"])).norm.groups == 32
    with pytest.raises(ConfigError, match="norm.groups=32 does not divide a layer's 8 channels"):
        check_model_norm(config.load(None, TINY + ["norm.name=evonorm_s0"]))
    with pytest.raises(ConfigError, match="norm.groups=3 does not divide"):
        check_model_norm(config.load(None, ["model.name=resnet18", "norm.name=evonorm_s0", "norm.groups=3"]))
    with pytest.raises(ConfigError, match="norm.channels_per_group applies to gn, not 'evonorm_s0'"):
        config.load(None, ["norm.name=evonorm_s0", "norm.channels_per_group=4"])
    with pytest.raises(ConfigError, match="norm.groups applies to gn, evonorm_s0, not 'frn'"):
        config.load(None, ["norm.name=frn", "norm.groups=4"])


# ---------------------------------------------------------------- batch independence


def _tiny(overrides: list[str]) -> nn.Module:
    torch.manual_seed(0)
    model = create_model(config.load(None, TINY + overrides), 4)
    with torch.no_grad():  # no zero gamma, so every layer shapes the output
        for m in last_norms(model):
            m.weight.fill_(0.7)
    return model.train()


@pytest.mark.parametrize(
    "overrides",
    [["norm.name=frn"], ["norm.name=evonorm_s0", "norm.groups=4"], ["norm.name=gn", "norm.groups=4", "model.weight_std=true"]],
    ids=["frn", "evonorm_s0", "gn+ws"],
)
def test_an_images_output_does_not_depend_on_its_batch_mates(overrides: list[str]) -> None:
    model = _tiny(overrides)
    g = torch.Generator().manual_seed(5)
    image = torch.randn(1, 3, 16, 16, generator=g)
    mates_a, mates_b = torch.randn(3, 3, 16, 16, generator=g), torch.randn(5, 3, 16, 16, generator=g) * 3 + 1
    out_a = model(torch.cat([mates_a[:1], image, mates_a[1:]]))[1]
    out_b = model(torch.cat([image, mates_b]))[0]
    torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-6)


def test_batch_independence_check_catches_bn() -> None:
    model = _tiny(["norm.name=bn"])
    g = torch.Generator().manual_seed(5)
    image = torch.randn(1, 3, 16, 16, generator=g)
    out_a = model(torch.cat([image, torch.randn(3, 3, 16, 16, generator=g)]))[0]
    out_b = model(torch.cat([image, torch.randn(3, 3, 16, 16, generator=g) * 3 + 1]))[0]
    assert not torch.allclose(out_a, out_b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- placement in ResNet v1


def _meta_model(overrides: list[str]) -> nn.Module:
    with torch.device("meta"):
        return create_model(config.load(None, overrides), 1000)


@pytest.mark.parametrize("norm", NORM_ACT)
def test_resnet50_norm_act_placement(norm: str) -> None:
    model = _meta_model([f"norm.name={norm}"])
    assert model.bn1.apply_act and isinstance(model.act1, nn.Identity)
    blocks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    assert len(blocks) == 16
    for b in blocks:
        assert b.bn1.apply_act and b.bn2.apply_act and not b.bn3.apply_act
        assert isinstance(b.act1, nn.Identity) and isinstance(b.act2, nn.Identity)
        assert type(b.act3) is nn.ReLU  # after the residual add: v1's own ReLU stays
        assert b.downsample is None or not b.downsample[-1].apply_act
    assert sum(b.downsample is not None for b in blocks) == 4
    assert [m.apply_act for m in last_norms(model)] == [False] * 16
    layers = [m for m in model.modules() if hasattr(m, "apply_act")]
    assert len(layers) == 53 and sum(m.apply_act for m in layers) == 1 + 2 * 16
    assert not [n for n, m in model.named_modules() if type(m) is nn.ReLU and not n.endswith("act3")]


@pytest.mark.parametrize("norm", NORM_ACT)
def test_resnet18_basic_block_norm_act_placement(norm: str) -> None:
    model = _meta_model(["model.name=resnet18", f"norm.name={norm}"])
    assert model.bn1.apply_act and isinstance(model.act1, nn.Identity)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 8
    for b in blocks:
        assert b.bn1.apply_act and isinstance(b.act1, nn.Identity)
        assert not b.bn2.apply_act and type(b.act2) is nn.ReLU
        assert b.downsample is None or not b.downsample[-1].apply_act
    assert [type(m) for m in last_norms(model)] == [type(model.bn1)] * 8


def test_resnet10t_deep_stem_inner_norms_take_the_activation() -> None:
    model = _meta_model(["model.name=resnet10t", "norm.name=frn"])
    stem = list(model.conv1)
    assert [type(m).__name__ for m in stem] == ["Conv2d", "FilterResponseNormTlu2d", "Identity"] * 2 + ["Conv2d"]
    assert stem[1].apply_act and stem[4].apply_act and stem[1].weight.shape == (stem[0].out_channels,)
    assert not model.layer2[0].downsample[-1].apply_act  # avg-pool downsample: pool, conv, norm


@pytest.mark.parametrize("overrides", [["norm.name=bn"], ["norm.name=gn"], ["model.name=resnet18", "norm.name=gn"]])
def test_plain_norms_keep_timms_structure(overrides: list[str]) -> None:
    ours = _meta_model(overrides)
    name = config.load(None, overrides).model.name
    with torch.device("meta"):
        reference = timm.create_model(name, num_classes=1000)  # timm's own BatchNorm2d ResNet
    ref = dict(reference.named_modules())
    assert list(ref) == [n for n, _ in ours.named_modules()]
    for n, m in ours.named_modules():
        if isinstance(ref[n], nn.BatchNorm2d):
            assert not hasattr(m, "apply_act")
        else:
            assert type(m) is type(ref[n]), n


# ---------------------------------------------------------------- initialization


@pytest.mark.parametrize("norm", NORM_ACT)
def test_init_of_norm_act_layers(norm: str) -> None:
    groups = ["norm.groups=4"] if norm == "evonorm_s0" else []  # G divides the tiny widths (8, 16)
    cfg = config.load(None, TINY + [f"norm.name={norm}", *groups])
    torch.manual_seed(0)
    model = create_model(cfg, 4)
    for m in model.modules():  # scramble, then init again: init_weights itself must set every value
        if hasattr(m, "apply_act"):
            randomize(m)
    init_weights(model, cfg)
    last = {id(m) for m in last_norms(model)}
    layers = [m for m in model.modules() if hasattr(m, "apply_act")]
    downsamples = sum(b.downsample is not None for b in model.modules() if isinstance(b, BasicBlock))
    assert downsamples and len(layers) == 1 + 8 * 2 + downsamples  # stem, 2 per basic block, downsamples
    gate = "v" if norm == "evonorm_s0" else "tau"
    for m in layers:
        assert torch.all(m.weight == (0 if id(m) in last else 1)) and torch.all(m.bias == 0)
        p = getattr(m, gate)
        assert (p is not None) == m.apply_act
        if p is not None:
            assert torch.all(p == (1 if gate == "v" else 0))
    assert len(last) == 8 and all(not m.apply_act for m in layers if id(m) in last)


# ---------------------------------------------------------------- a few training steps


@pytest.mark.parametrize(
    ("overrides", "moved"),
    [
        (["norm.name=frn"], "bn1.tau"),
        (["norm.name=evonorm_s0", "norm.groups=4"], "bn1.v"),
        (["norm.name=gn", "norm.groups=4", "model.weight_std=true"], "conv1.weight"),
    ],
    ids=["frn", "evonorm_s0", "gn+ws"],
)
def test_trains_a_few_steps_on_the_cpu(tiny_data: Path, tmp_path: Path, overrides: list[str], moved: str) -> None:
    cfg = config.load(None, TINY + overrides + [f"data.root={tiny_data}", "gpus=1", "batch_per_gpu=16", "epochs=1", "log_steps=true",
                                                "optim.lr=3.2"])
    torch.manual_seed(cfg.seed)
    initial = create_model(cfg, 4).state_dict()[moved].clone()
    final = train(cfg, tmp_path / "run")
    assert final["status"] == "ok", final
    losses = [row["loss"] for row in rundir.read_jsonl(tmp_path / "run" / "steps.jsonl")]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    trained = torch.load(tmp_path / "run" / rundir.CHECKPOINT, weights_only=False)["model"][moved]
    assert (trained - initial).abs().max() > 1e-4  # the variant's own parameters learn (lr 0.2 at batch 16)
