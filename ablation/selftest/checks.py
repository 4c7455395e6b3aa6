"""The self-test's checks: each runs one code path of the harness on the device and holds its figure to a stated tolerance.

Every tolerance is in TOLERANCES with the reason for its size (docs/selftest.md repeats them). A check that needs
what this machine lacks (two GPUs) says so and is skipped; a check of the node's capacity rather than the code's
correctness (can the loaders feed the GPU) warns instead of failing.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ablation import config
from ablation.selftest import cuda

# name -> (bound, unit, why the bound is what it is). The figure of each check must be <= its bound
# (>= for the loader check, whose figure is a ratio of speeds).
TOLERANCES: dict[str, tuple[float, str, str]] = {
    "bn_stand_in": (1e-4, "max |diff| / max |ref|", "the same fp32 math in another order: each per-channel mean and variance is a "
                    "sum over b*H*W values, whose rounding differs by ~sqrt(n)*6e-8 (~1e-6 at n = 200); 100x that room, while a wrong "
                    "row-to-GPU assignment or running-statistics rule differs by O(1)"),
    "channels_last": (1e-3, "relative L2 of loss and gradients", "fp32 convolutions with other algorithms (NHWC kernels) round "
                      "differently, ~1e-6 per layer, grown through ~50 layers and BN's backward to ~1e-5; a layout bug (a "
                      "view of the wrong memory) is O(1)"),
    "bf16": (0.1, "relative L2 of loss and gradients", "bfloat16 keeps 8 mantissa bits (relative rounding 4e-3 per op); one "
             "step's gradients through a deep network differ from fp32 by a few percent, while statistics or a loss computed "
             "in bf16 where fp32 is needed (a norm's variance) differ by O(1) or overflow"),
    "compile": (1e-3, "max relative loss difference over the steps", "a compiled graph fuses and reorders fp32 reductions "
                "(~1e-6 per op); over a few SGD steps that stays below 1e-4, while a graph that drops an in-place update "
                "(running statistics, the per-GPU BN step count) or the wrong mode differs at the first step"),
    "ddp_vs_stand_in": (1e-4, "relative L2 of loss and gradients", "the same per-GPU batches, the same fp32 math; gradients "
                        "averaged by the process group's all-reduce instead of one sum over the batch: rounding only"),
    "syncbn": (1e-4, "max |diff| / max |ref|", "statistics over the global batch summed across processes vs in one process: "
               "fp32 rounding of the sums only"),
    "decode": (1.0, "max |diff| in uint8 levels (CPU)", "the same decoder family on both sides (libjpeg-turbo in Pillow and in "
               "torchvision; same IDCT and upsampling): at most one level of rounding; a wrong crop box, flip or channel "
               "order is tens of levels"),
    "decode_gpu": (16.0, "max |diff| in uint8 levels (GPU)", "nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's: a "
                   "few levels on photographs, up to ~16 at sharp colour edges; a wrong crop box, flip or channel order is "
                   "50 and more"),
    "loaders": (1.0, "loader images/s / model images/s (>=)", "the loaders must deliver at least what the model consumes at "
                "every images-per-GPU of the sweep; below 1 the GPU waits for data (a warning: the node's capacity, not a "
                "fault in the code)"),
    "throughput": (0.0, "images/s per GPU (>)", "every step must run and be finite; the figures go to the GPU-hour estimates"),
}

# The tiny settings of `--device cpu`: the shapes of the test suite's tiny ResNet (seconds on a CPU).
TINY = ("model.name=resnet18", "model.widths=[8,16,16,16]", "model.stem_width=8", "model.stem=small",
        "data.image_size=32", "data.eval_resize=32", "data.workers=0")
CLASSES = 10  # the tiny checks' output classes (the real model's 1000 on a GPU)


@dataclass(frozen=True)
class Settings:
    """What the self-test runs with: the device, how many processes the multi-GPU checks use, the model's overrides."""

    device: str  # "cpu" or "cuda"
    gpus: int  # processes (GPUs) of the multi-process checks; fewer than 2 skips them
    overrides: tuple[str, ...]  # the model and data config the checks build from
    batches: tuple[int, ...]  # images per GPU the throughput and loader checks measure (the sweep's)
    steps: int  # timed steps per throughput figure
    warmup: int  # untimed steps before them
    compile_backend: str  # torch.compile backend of the compile check
    cpus_per_task: int  # CPU cores a GPU's loaders get (the profile's cpus_per_task)
    data: str | None = None  # a dataset to time the loaders and decode on; None: generated JPEGs
    tiny: bool = False

    def cfg(self, *more: str) -> config.RunConfig:
        """The run config of a check: the settings' overrides, then `more`."""
        return config.load(None, [*self.overrides, *more])

    @property
    def classes(self) -> int:
        """Output classes of the checks' models."""
        return CLASSES if self.tiny else 1000


@dataclass
class Check:
    """One line of the table: what was checked, its figure, the bound it was held to and the verdict."""

    name: str
    what: str
    status: str  # pass | fail | warn | skipped
    figure: float | None = None
    bound: float | None = None
    unit: str = ""
    detail: str = ""
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    key: str = ""  # its TOLERANCES entry where that is not its name (decode on a GPU: decode_gpu)

    def as_json(self) -> dict[str, Any]:
        """The check as selftest.json holds it."""
        why = TOLERANCES.get(self.key or self.name, (None, "", ""))[2]
        return {"name": self.name, "what": self.what, "status": self.status, "figure": self.figure, "tolerance": self.bound,
                "unit": self.unit, "why_tolerance": why, "detail": self.detail, "seconds": round(self.seconds, 3), **self.extra}


def held(name: str, what: str, figure: float, detail: str = "", *, key: str | None = None, at_least: bool = False,
         fail_status: str = "fail") -> Check:
    """A check whose figure is held to TOLERANCES[key or name]: pass, else fail_status (a NaN never passes)."""
    bound, unit, _ = TOLERANCES[key or name]
    ok = math.isfinite(figure) and (figure >= bound if at_least else figure <= bound)
    return Check(name, what, "pass" if ok else fail_status, figure, bound, unit, detail, key=key or name)


def skipped(name: str, what: str, why: str) -> Check:
    """A check this machine cannot run."""
    bound, unit, _ = TOLERANCES[name]
    return Check(name, what, "skipped", None, bound, unit, f"skipped: {why}")


@contextmanager
def strict_fp32(device: str) -> Iterator[None]:
    """fp32 means fp32 inside: TF32 off on a GPU for the comparisons, restored after."""
    old = cuda.strict_fp32(device)
    try:
        yield
    finally:
        cuda.restore_fp32(old)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 where both are 0)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / scale if scale else (a - b).abs().max().item()


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    a, b = a.detach().double().cpu().flatten(), b.detach().double().cpu().flatten()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# --------------------------------------------------------------------------- per-GPU BN stand-in


def per_chunk_loop(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running: tuple[torch.Tensor, torch.Tensor],
                   k: int, momentum: float, eps: float) -> torch.Tensor:
    """The reference per-GPU BN: one F.batch_norm per modelled GPU over its rows (i, i+k, ...); `running` gets the
    average of the k GPUs' updates (the `mean` rule)."""
    rows = [torch.arange(i, x.shape[0], k, device=x.device) for i in range(k)]
    out = torch.empty_like(x)
    updates = []
    for r in rows:
        rm, rv = running[0].clone(), running[1].clone()
        out = out.index_copy(0, r, F.batch_norm(x[r], rm, rv, weight, bias, True, momentum, eps))
        updates.append((rm, rv))
    with torch.no_grad():
        for j, buf in enumerate(running):
            buf.copy_(torch.stack([u[j] for u in updates]).mean(0))
    return out


def bn_stand_in(s: Settings) -> Check:
    """Per-GPU BN standing in for 8 GPUs (one F.batch_norm over a (b, 8C, H, W) view) vs the per-chunk loop, fp32."""
    from ablation.norms.batch import PerGPUBatchNorm2d

    what = "per-GPU BN standing in for 8 GPUs vs the per-chunk loop (fp32, outputs, gradients, running stats)"
    k, b = 8, 2
    c, hw = (16, 8) if s.tiny else (64, 28)
    g = torch.Generator().manual_seed(0)
    x0 = (torch.randn(k * b, c, hw, hw, generator=g) * 3 + 1).to(s.device)
    w = torch.randn(k * b, c, hw, hw, generator=g).to(s.device)
    layer = PerGPUBatchNorm2d(c, eps=1e-5, momentum=0.1, gpus_per_process=k, running_stats="mean").to(s.device)
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 2.0, c))
        layer.bias.copy_(torch.linspace(-1.0, 1.0, c))
    weight = layer.weight.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    running = (torch.zeros(c, device=s.device), torch.ones(c, device=s.device))
    with strict_fp32(s.device):
        x1, x2 = x0.clone().requires_grad_(), x0.clone().requires_grad_()
        y1 = layer(x1)
        (y1 * w).sum().backward()
        y2 = per_chunk_loop(x2, weight, bias, running, k, 0.1, 1e-5)
        (y2 * w).sum().backward()
        layer.eval()  # folds the per-GPU running statistics by the rule
    pairs = {"output": (y1, y2), "input grad": (x1.grad, x2.grad), "weight grad": (layer.weight.grad, weight.grad),
             "bias grad": (layer.bias.grad, bias.grad), "running mean": (layer.running_mean, running[0]),
             "running var": (layer.running_var, running[1])}
    diffs = {name: rel(a, b) for name, (a, b) in pairs.items()}
    worst = max(diffs, key=diffs.get)  # type: ignore[arg-type]
    return held("bn_stand_in", what, max(diffs.values()), f"worst: {worst} ({k} GPUs x {b} images, {c} channels, {hw}x{hw})")


# --------------------------------------------------------------------------- one step of the model, two ways


def model_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               ctx: Callable[[], Any] = nullcontext) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, every parameter's gradient flattened into one vector) of one forward and backward."""
    model.zero_grad(set_to_none=True)
    with ctx():
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    grads = torch.cat([p.grad.detach().float().flatten() for p in model.parameters() if p.grad is not None])
    return loss.detach().float(), grads


def batch(s: Settings, cfg: config.RunConfig, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n random images of the config's size and their labels, on the device."""
    g = torch.Generator().manual_seed(seed)
    size = cfg.data.image_size
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.randint(0, s.classes, (n,), generator=g)
    return x.to(s.device), y.to(s.device)


def fresh_model(s: Settings, cfg: config.RunConfig, gpus_per_process: int = 1) -> nn.Module:
    """The run's model for this config, seeded, on the device, in training mode."""
    from ablation.train.models import create_model

    torch.manual_seed(0)
    return create_model(cfg, s.classes, gpus_per_process=gpus_per_process).to(s.device).train()


def channels_last(s: Settings) -> Check:
    """One forward and backward in channels-last vs NCHW, fp32: loss and gradients."""
    what = "channels-last vs NCHW, one step in fp32 (loss and gradients)"
    cfg = s.cfg("amp=false", "channels_last=false")
    model = fresh_model(s, cfg)
    other = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x, y = batch(s, cfg, 8)
    with strict_fp32(s.device):
        loss1, g1 = model_step(model, x, y)
        loss2, g2 = model_step(other, x.contiguous(memory_format=torch.channels_last), y)
    figure = max(rel(loss2, loss1), rel_l2(g2, g1))
    return held("channels_last", what, figure, f"loss {loss1.item():.4f} vs {loss2.item():.4f}; gradients {rel_l2(g2, g1):.2e}")


def amp_context(s: Settings, cfg: config.RunConfig) -> Callable[[], Any]:
    """The trainer's bf16 autocast on a GPU (ablation.train.loop.autocast); on a CPU torch's CPU autocast, which the
    trainer never uses (bf16 is slower there) but which runs the same dtype rules."""
    if s.device.startswith("cuda"):
        from ablation.train.distributed import DistEnv
        from ablation.train.loop import autocast

        return lambda: autocast(cfg, DistEnv(device=s.device))
    return lambda: torch.autocast("cpu", dtype=torch.bfloat16)


def bf16(s: Settings) -> Check:
    """One step under bf16 autocast vs fp32: finite, and within the stated bound."""
    what = "bf16 autocast vs fp32, one step (finite; loss and gradients)"
    cfg = s.cfg("amp=true", "channels_last=false")
    model = fresh_model(s, cfg)
    x, y = batch(s, cfg, 8)
    with strict_fp32(s.device):
        loss1, g1 = model_step(model, x, y)
        loss2, g2 = model_step(model, x, y, amp_context(s, cfg))
    finite = bool(torch.isfinite(loss2)) and bool(torch.isfinite(g2).all())
    figure = max(rel(loss2, loss1), rel_l2(g2, g1)) if finite else math.inf
    return held("bf16", what, figure, f"loss fp32 {loss1.item():.4f}, bf16 {loss2.item():.4f}; finite: {finite}")


def compiled(s: Settings) -> Check:
    """A few SGD steps of torch.compile'd vs eager, the same batches: losses."""
    from ablation.train.optim import build_optimizer

    steps = 3
    what = f"compile={s.compile_backend} vs eager, {steps} SGD steps (losses)"
    cfg = s.cfg("amp=false", "channels_last=false", f"compile={s.compile_backend}", "batch_per_gpu=8")
    from ablation.train.trainer import compiled_forwards

    eager = fresh_model(s, cfg)
    twin = copy.deepcopy(eager)
    fwd, _ = compiled_forwards(cfg, twin, twin)  # the trainer's own compile call
    losses: dict[str, list[float]] = {"eager": [], "compiled": []}
    with strict_fp32(s.device):
        for name, model, forward in (("eager", eager, eager), ("compiled", twin, fwd)):
            opt = build_optimizer(cfg, model)
            for i in range(steps):
                x, y = batch(s, cfg, 8, seed=i)
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(forward(x), y)
                loss.backward()
                opt.step()
                losses[name].append(loss.item())
    figure = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses["compiled"], losses["eager"]))
    detail = "losses " + ", ".join(f"{a:.4f}/{b:.4f}" for a, b in zip(losses["eager"], losses["compiled"])) + " (eager/compiled)"
    return held("compile", what, figure, detail)


# --------------------------------------------------------------------------- decode: device-decode vs PIL


def sample_jpegs(folder: Path, tiny: bool) -> Path:
    """A small ImageFolder of JPEGs like ImageNet's mix: baseline RGB, progressive, grayscale, and a PNG."""
    import numpy as np
    from PIL import Image

    size = 64 if tiny else 400
    cls = folder / "train" / "c0"
    cls.mkdir(parents=True, exist_ok=True)
    (folder / "val" / "c0").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(12):
        # smooth gradients plus edges and noise: what photos mix
        yy, xx = np.mgrid[0:size, 0:size] / size
        img = np.stack([xx * 255, yy * 255, (xx + yy) * 127], -1) + rng.normal(0, 12, (size, size, 3))
        img[size // 3 : size // 2, size // 4 :] = rng.integers(0, 255, 3)
        rgb = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        if i == 9:
            rgb.save(cls / f"{i}.JPEG", quality=90, progressive=True)
        elif i == 10:
            rgb.convert("L").save(cls / f"{i}.JPEG", quality=90)
        elif i == 11:
            rgb.save(cls / f"{i}.PNG")
        else:
            rgb.save(cls / f"{i}.JPEG", quality=90 if i % 2 else 75, subsampling=2 if i % 3 else 0)
    Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(folder / "val" / "c0" / "0.JPEG")
    return folder


def decode(s: Settings, root: Path) -> Check:
    """device-decode's pixels (decoded, cropped and resized on the device) vs PIL's decode with the same crop and resize."""
    from PIL import Image

    from ablation.data import bench as databench
    from ablation.data.pipelines import DeviceDecodeTrainTransform, collate, decode_on_device

    key = "decode" if s.device == "cpu" else "decode_gpu"  # one row, named decode, held to the device's tolerance
    what = "device-decode pixels vs PIL's (max difference; share of files the device decoder took)"
    cfg = s.cfg("data.pipeline=device-decode")
    tf = DeviceDecodeTrainTransform(cfg.data)
    samples = databench.pick_images(root, 64).samples("train")
    torch.manual_seed(0)
    loaded = [(tf(p), 0) for p, _ in samples]
    x, _ = collate(loaded)
    on_device = decode_on_device(x, tf.size, s.device).cpu()
    worst, mean, progressive, rows = 0.0, 0.0, 0, 0
    for i, (path, _) in enumerate(samples):
        with Image.open(path) as img:
            progressive += bool(img.info.get("progressive") or img.info.get("progression"))
            if not x.encoded[i].numel():
                continue  # not an RGB JPEG: the loader decoded it (the split pipeline's own path)
            ref = pil_crop(img, tuple(x.box[i].tolist()), tf.size)
        d = (on_device[i].int() - ref.int()).abs()
        worst, mean, rows = max(worst, d.max().item()), mean + d.float().mean().item(), rows + 1
    mean /= max(rows, 1)
    took = sum(e.numel() > 0 for e in x.encoded) / len(samples)
    detail = (f"{len(samples)} files: mean |diff| {mean:.2f} levels; the device decoder took {100 * took:.0f}% "
              f"(the rest: not RGB JPEGs, decoded by the loader); {progressive} progressive"
              + (" (nvJPEG decodes their Huffman stage on the host)" if s.device.startswith("cuda") else ""))
    check = held("decode", what, worst, detail, key=key)
    check.extra = {"device_decoded_share": took, "mean_diff": mean, "progressive_files": progressive, "files": len(samples)}
    return check


def pil_crop(img: Any, box: tuple[int, ...], size: tuple[int, int]) -> torch.Tensor:
    """PIL's full-size decode of box, resized as the split pipeline resizes (antialiased bilinear on uint8)."""
    import numpy as np

    from ablation.data.pipelines import resize_uint8

    img.load()
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    return resize_uint8(torch.from_numpy(np.array(rgb.crop(box))), *size)
