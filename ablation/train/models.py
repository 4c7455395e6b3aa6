"""Models: timm ResNets (ResNet-50 v1.5 by default) with the chosen norm in every position.

Norm+activation layers (registry ``replaces_activation``: frn, evonorm_s0, evonorm_b0) in timm's ResNet v1.
timm builds ``norm_layer(C)`` and then its own ReLU; such a layer passed there as is would add a second
nonlinearity after its own, and put one before the residual add. ``place_norm_act`` fixes this:

- a position directly followed by the network's activation (stem bn1 -> act1, a deep stem's inner norms,
  a bottleneck's bn1 -> act1 and bn2 -> act2, a basic block's bn1 -> act1) gets the layer built with
  ``NormSpec(apply_act=True)`` (FRN+TLU, EvoNorm with its nonlinearity), and that ReLU becomes nn.Identity;
- a position that stays linear (each block's last norm before the residual add: bn3, or bn2 in a basic
  block; the downsample's norm) keeps ``apply_act=False``: FRN without TLU, EvoNorm-S0 as group-std
  normalization + affine. Zero-init of each block's last gamma (``last_norms``) lands on these;
- the ReLU after the residual add stays a ReLU. That is ResNet v1's topology (the ReLU acts on the sum
  of two branches, there is no norm there to fold it into); removing it would make a different network.
  FRN and EvoNorm were published on pre-activation ResNets (v2), where no such ReLU exists, so v1 has no
  published placement; this one changes nothing but the norm+activation pairs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import timm
import torch
from timm.layers import FilterResponseNormTlu2d
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from ablation.config import RunConfig, norm_batches_per_gpu, normalized
from ablation.errors import ConfigError, NormError
from ablation.norms import NormSpec, create_norm, norm_layer, registry, share_affine_repeats
from ablation.norms.evonorm import EvoNormS0


def create_model(cfg: RunConfig, num_classes: int, gpus_per_process: int = 1) -> nn.Module:
    """The run's ResNet, freshly initialized the paper's way (seed the RNG before calling)."""
    m = cfg.model
    kwargs: dict[str, object] = {}
    if m.widths is not None:
        kwargs["channels"] = m.widths
    if m.stem_width is not None:
        kwargs["stem_width"] = m.stem_width
    if m.layers is not None:
        kwargs["layers"] = m.layers
    spec = NormSpec(normalized(cfg).norm, gpus_per_process, norm_batches_per_gpu(cfg))  # factories see every default resolved
    try:
        model = timm.create_model(
            m.name, pretrained=False, num_classes=num_classes, norm_layer=norm_layer(spec), **kwargs
        )
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ConfigError(f"model.name: timm has no model '{m.name}'; use a ResNet such as resnet50, resnet18, resnet10t") from None
        raise
    if not isinstance(model, ResNet):
        raise ConfigError(f"model.name: '{m.name}' is not a timm ResNet; use resnet50, resnet101, resnet18, resnet10t, ...")
    if m.stem == "small":
        _small_stem(model, m.stem_stride)
    info = registry.lookup(spec.cfg.name)
    if info is not None and info.replaces_activation:
        place_norm_act(model, spec)
    if m.weight_std:
        from ablation.norms.weight_std import standardize_convs

        standardize_convs(model)  # after the small stem, before init: He init of the raw weight
    init_weights(model, cfg)
    return share_affine_repeats(model)  # per-GPU BN: gamma/beta repeated for all layers in a few ops


def _small_stem(model: ResNet, stride: int) -> None:
    """Replace the 7x7/2 conv + max-pool stem by one 3x3 conv, for tiny images (CIFAR-style)."""
    if not isinstance(model.conv1, nn.Conv2d):
        raise ConfigError("model.stem=small needs a single-conv stem (resnet18, resnet50, ...), not a deep stem")
    out = model.conv1.out_channels
    model.conv1 = nn.Conv2d(model.conv1.in_channels, out, kernel_size=3, stride=stride, padding=1, bias=False)
    model.maxpool = nn.Identity()


def _last_conv_channels(modules: Iterable[nn.Module]) -> int:
    """Output channels of the last convolution among modules (and their children): what the next norm sees."""
    return [c for m in modules for c in m.modules() if isinstance(c, nn.Conv2d)][-1].out_channels


def _norm_act_positions(model: ResNet) -> list[tuple[nn.Module, str, str, int]]:
    """(parent, norm name, activation name, channels) of every norm that timm follows directly by its ReLU."""
    out: list[tuple[nn.Module, str, str, int]] = []
    for seq in (model.conv1, model.maxpool):  # a deep stem (conv, norm, act, ...) and timm's conv stem pool
        if isinstance(seq, nn.Sequential):
            kids = list(seq.named_children())
            for i in range(1, len(kids) - 1):
                if isinstance(kids[i + 1][1], nn.ReLU) and not isinstance(kids[i][1], nn.Conv2d):
                    out.append((seq, kids[i][0], kids[i + 1][0], _last_conv_channels(k for _, k in kids[:i])))
    out.append((model, "bn1", "act1", _last_conv_channels([model.conv1])))
    for block in model.modules():
        if isinstance(block, Bottleneck):
            out += [(block, "bn1", "act1", block.conv1.out_channels), (block, "bn2", "act2", block.conv2.out_channels)]
        elif isinstance(block, BasicBlock):
            out.append((block, "bn1", "act1", block.conv1.out_channels))
    return out


def place_norm_act(model: ResNet, spec: NormSpec) -> None:
    """Norm+activation layers where timm has norm -> ReLU; linear positions keep apply_act=False (module docstring)."""
    act_spec = dataclasses.replace(spec, apply_act=True)
    for parent, norm_name, act_name, channels in _norm_act_positions(model):
        if not isinstance(getattr(parent, act_name), nn.ReLU):
            raise NormError(f"norm.name: '{spec.cfg.name}' replaces the activation, "
                            f"but {type(parent).__name__}.{act_name} is not the ReLU it expects")
        setattr(parent, norm_name, create_norm(channels, act_spec))
        setattr(parent, act_name, nn.Identity())


def _is_norm(module: nn.Module) -> bool:
    """Built-in norm layers, whose affine init is set here (a user's norm initializes itself)."""
    return isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, FilterResponseNormTlu2d, EvoNormS0))


# Parameters of norm+activation layers besides gamma and beta, and their init: EvoNorm's v, FRN's TLU tau.
_NORM_ACT_INIT = (("v", 1.0), ("tau", 0.0))


@torch.no_grad()
def init_weights(model: ResNet, cfg: RunConfig) -> None:
    """He fan-out convs (the raw weight under WS), FC N(0, std), gamma=1, beta=0 (v=1, tau=0), zero gamma in each block's last norm."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, cfg.model.fc_init_std)
            nn.init.zeros_(module.bias)
        elif _is_norm(module) and module.weight is not None:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
            for name, value in _NORM_ACT_INIT:
                if isinstance(getattr(module, name, None), nn.Parameter):
                    nn.init.constant_(getattr(module, name), value)
    if cfg.model.zero_init_last:
        for block in last_norms(model):
            if getattr(block, "weight", None) is not None:
                nn.init.zeros_(block.weight)


def last_norms(model: ResNet) -> list[nn.Module]:
    """The last norm layer of every residual block (bn3 in bottlenecks, bn2 in basic blocks)."""
    out = []
    for module in model.modules():
        if isinstance(module, Bottleneck):
            out.append(module.bn3)
        elif isinstance(module, BasicBlock):
            out.append(module.bn2)
    return out


def check_model_norm(cfg: RunConfig, num_classes: int = 1000) -> None:
    """Build the model on the meta device to catch norm/width mismatches before any work is queued, then run one real
    layer per width on a small tensor (ablation.norms.checks: shape, plain-tensor attributes, claimed parameters); check `compile`."""
    if cfg.compile != "off" and cfg.compile not in torch.compiler.list_backends(exclude_tags=()):
        valid = ", ".join(["off", *torch.compiler.list_backends(exclude_tags=())])
        raise ConfigError(f"compile: unknown torch.compile backend {cfg.compile!r}; valid: {valid}")
    try:
        with torch.device("meta"):
            model = create_model(cfg, num_classes)
        from ablation.norms.checks import check_layers, model_channels

        check_layers(NormSpec(normalized(cfg).norm), model_channels(model))  # a real layer per width, run on a small tensor
    except (ConfigError, NormError):
        raise
    except Exception as e:  # a user factory's own failure, reported as one line
        raise NormError(f"norm.name: building '{cfg.norm.name}' layers failed: {type(e).__name__}: {e}") from None


def checkpoint_bytes(cfg: RunConfig, num_classes: int = 1000) -> int:
    """Bytes a training checkpoint of this model holds: its state (weights, norm buffers) and SGD's momentum."""
    with torch.device("meta"):
        model = create_model(cfg, num_classes)
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return state + sum(p.numel() * p.element_size() for p in model.parameters())
