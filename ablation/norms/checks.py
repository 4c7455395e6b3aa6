"""What a norm's layers do, checked before any work is queued: one line naming norm.name and the fault.

``ablation.train.models.check_model_norm`` builds the whole model on the meta device, which shows that every
norm position can be built (an import path that does not import, a factory that raises or returns no
module, G not dividing C). It cannot show what a layer computes, so ``check_layers`` then builds one real
layer per distinct channel count of the model on the CPU (and, for a norm+activation layer, both forms)
and runs it on a small random tensor, in training and in evaluation mode:

- the forward must not raise, must return a tensor of its input's shape (a norm that changes the shape
  would fail deep inside the first training step, or silently broadcast), and must be finite;
- a tensor kept as a plain attribute (``self.weight = torch.ones(C)``) is an error: it is neither a
  parameter nor a buffer, so it is never trained, saved in checkpoints or moved to the GPU;
- no learnable parameters is legal (a fixed normalization, like the built-in ``none``), so it is an
  error only where the layer or the sweep says there should be some: ``norm.options.affine`` true, or a
  layer with ``affine`` / ``elementwise_affine`` set (torch's convention) that holds none. A user's
  norm with no learnable parameters and no such claim gets a logged warning, once per name.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable

import torch
from torch import nn

from ablation.errors import ConfigError, NormError, last_line
from ablation.norms import registry
from ablation.norms.factory import NormSpec, create_norm

log = logging.getLogger("ablation")

PROBE_BATCH, PROBE_SIZE = 2, 4  # a (2, C, 4, 4) tensor: batch statistics exist, every layer width is cheap
_warned: set[str] = set()


def model_channels(model: nn.Module) -> list[int]:
    """The channel counts a ResNet's norm positions see: every convolution's output width."""
    return sorted({m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)})


def check_layers(spec: NormSpec, channels: Iterable[int]) -> None:
    """Build and run one layer per channel count (both activation forms for a norm+activation layer); NormError on a fault."""
    name = spec.cfg.name
    try:
        info = registry.lookup(name)
    except ConfigError as e:
        raise NormError(str(e)) from None
    forms = (False, True) if info is not None and info.replaces_activation else (spec.apply_act,)
    learnable = False
    for c in sorted(set(channels)):
        for act in forms:
            with torch.device("cpu"):
                layer = create_norm(c, dataclasses.replace(spec, apply_act=act))
            _check_attributes(layer, name)
            learnable |= _check_claims(layer, spec, name)
            _check_forward(layer, name, c)
    if not learnable and info is None and name not in _warned:
        _warned.add(name)
        log.warning(
            f"norm.name: '{name}' has no learnable parameters (legal: a fixed normalization, like 'none'); "
            "if it should learn a scale or shift, register them as nn.Parameter"
        )


def _check_attributes(layer: nn.Module, name: str) -> None:
    """A tensor held as a plain attribute is neither trained, nor saved, nor moved to the device."""
    for path, module in layer.named_modules():
        for attr, value in vars(module).items():
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                where = f"{path}.{attr}" if path else attr
                raise NormError(
                    f"norm.name: '{name}' keeps the tensor '{where}' as a plain attribute, which is never trained, saved or moved "
                    f"to the GPU; make it nn.Parameter(...) if it is learned, else register_buffer('{attr}', ...)"
                )


def _check_claims(layer: nn.Module, spec: NormSpec, name: str) -> bool:
    """True when the layer has learnable parameters; NormError when it claims some and has none."""
    learnable = any(p.requires_grad for p in layer.parameters())
    if learnable:
        return True
    if spec.cfg.options.get("affine") is True:
        raise NormError(
            f"norm.name: '{name}' has no learnable parameters although norm.options.affine is true; register gamma/beta as nn.Parameter"
        )
    for attr in ("affine", "elementwise_affine"):
        if getattr(layer, attr, None) is True:
            raise NormError(f"norm.name: '{name}' sets {attr}=True but has no learnable parameters; register gamma/beta as nn.Parameter")
    return False


def _check_forward(layer: nn.Module, name: str, channels: int) -> None:
    """Run the layer on a small random tensor in training and evaluation mode: its output must be a finite tensor of the input's shape."""
    shape = (PROBE_BATCH, channels, PROBE_SIZE, PROBE_SIZE)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    for mode in ("train", "eval"):
        layer.train(mode == "train")
        try:
            with torch.no_grad():
                y = layer(x)
        except Exception as e:
            raise NormError(f"norm.name: '{name}' fails on a {shape} input in {mode} mode: {type(e).__name__}: {last_line(e)}") from None
        if not isinstance(y, torch.Tensor):
            raise NormError(f"norm.name: '{name}' returns {type(y).__name__} from forward, not a tensor")
        if tuple(y.shape) != shape:
            raise NormError(
                f"norm.name: '{name}' changes the tensor's shape at {channels} channels: {shape} -> {tuple(y.shape)}; a norm must keep it"
            )
        if not torch.isfinite(y).all():
            raise NormError(f"norm.name: '{name}' returns NaN or inf on a random {shape} input in {mode} mode")
