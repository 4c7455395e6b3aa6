"""Models: timm ResNets (ResNet-50 v1.5 by default) with the chosen norm in every position."""

from __future__ import annotations

import timm
import torch
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from ablation.config import RunConfig, normalized
from ablation.errors import ConfigError, NormError
from ablation.norms import NormSpec, norm_layer, share_affine_repeats


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
    spec = NormSpec(normalized(cfg).norm, gpus_per_process)  # factories see every default resolved
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
    init_weights(model, cfg)
    return share_affine_repeats(model)  # per-GPU BN: gamma/beta repeated for all layers in a few ops


def _small_stem(model: ResNet, stride: int) -> None:
    """Replace the 7x7/2 conv + max-pool stem by one 3x3 conv, for tiny images (CIFAR-style)."""
    if not isinstance(model.conv1, nn.Conv2d):
        raise ConfigError("model.stem=small needs a single-conv stem (resnet18, resnet50, ...), not a deep stem")
    out = model.conv1.out_channels
    model.conv1 = nn.Conv2d(model.conv1.in_channels, out, kernel_size=3, stride=stride, padding=1, bias=False)
    model.maxpool = nn.Identity()


def _is_norm(module: nn.Module) -> bool:
    """Built-in norm layers, whose affine init is set here (a user's norm initializes itself)."""
    return isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm))


@torch.no_grad()
def init_weights(model: ResNet, cfg: RunConfig) -> None:
    """He fan-out convs, FC N(0, std), gamma=1 and beta=0, zero gamma in each block's last norm."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, cfg.model.fc_init_std)
            nn.init.zeros_(module.bias)
        elif _is_norm(module) and module.weight is not None:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
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
    """Build the model on the meta device to catch norm/width mismatches before any work is queued (and check `compile`)."""
    if cfg.compile != "off" and cfg.compile not in torch.compiler.list_backends(exclude_tags=()):
        valid = ", ".join(["off", *torch.compiler.list_backends(exclude_tags=())])
        raise ConfigError(f"compile: unknown torch.compile backend {cfg.compile!r}; valid: {valid}")
    try:
        with torch.device("meta"):
            create_model(cfg, num_classes)
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
