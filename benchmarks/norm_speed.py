"""Norm-layer and whole-model training-step speed and op counts, per norm and per-GPU form.

Prints a table and appends one JSON record (figures plus the machine they ran on) to
benchmarks/results/norm_speed.jsonl. Run:  python benchmarks/norm_speed.py [--device cuda] [--quick] [--note TEXT]
(--tiny: seconds, a smoke test; --out FILE: record elsewhere).

Questions it answers:
- what does standing in for k GPUs (per-GPU BN, k = 1, 2, 4, 8, 16) cost vs plain BN on the same
  images, in ops per training step and in step time? For the forms of per-GPU BN:
  ``one-bn`` (ablation.norms.PerGPUBatchNorm2d as create_model builds it: interleaved rows, one
  F.batch_norm over a (b, k*C, H, W) view, gamma/beta of all layers repeated by one model-level hook),
  ``one-bn/layer`` (the same, each layer repeating its own gamma/beta), ``var5`` (5-D var_mean over a
  (b, k, C, H, W) view) and ``loop`` (the per-chunk loop it replaced, one F.batch_norm per modelled
  GPU and the rule applied every step, here over the interleaved rows: 2 ops per layer more than it
  issued over contiguous chunks);
- the same per layer, NCHW and channels-last (where the one-bn view has to copy);
- how do GN/LN/IN compare with BN per step (GN's channels-last path is slow in some torch versions)?

Ops are counted three ways on one training step (zero_grad, forward, loss, backward, SGD step):
``top_level_ops``: aten ops with no parent op in the profiler, what Python issues (the speed issue's
"230 vs 760"; ops inside a custom autograd.Function's forward count too, the optimizer's do not, as
in that count); ``backward_nodes``: autograd nodes the backward runs; ``dispatched_ops``: every aten op
that reaches the kernels' dispatcher, forward, backward and optimizer (TorchDispatchMode);
``non_view_ops``: those of them that are not views (views touch no data), the closest to kernel
launches on a GPU.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from common import append, machine, results_file, stamp
from torch.utils._python_dispatch import TorchDispatchMode

from ablation import config
from ablation.norms import NormSpec, PerGPUBatchNorm2d, create_norm, split_per_gpu
from ablation.train.models import create_model

OUT = results_file("norm_speed")
LAYER_INPUT = (64, 256, 28, 28)  # a ResNet-50 layer1-sized activation
# --tiny: small layer input, a ResNet-18 of width 32 (GN's 32 groups fit) on 16 px images, 2 forms of k, one round.
TINY_LAYER_INPUT = (32, 32, 4, 4)
TINY_MODEL = ["model.widths=[32,32,32,32]", "model.stem_width=32", "model.stem=small"]


# ---------------------------------------------------------------- the forms of per-GPU BN compared


class _LoopBN(PerGPUBatchNorm2d):
    """The per-chunk loop PerGPUBatchNorm2d used before: one F.batch_norm per modelled GPU, rule every step."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.gpus_per_process == 1:
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        chunks = split_per_gpu(x, self.gpus_per_process)
        if self.running_stats == "rank0":
            outs = [
                F.batch_norm(c, self.running_mean if i == 0 else None, self.running_var if i == 0 else None, self.weight, self.bias, True,
                             self.momentum, self.eps)
                for i, c in enumerate(chunks)
            ]
        else:
            means, vars_, outs = [], [], []
            for c in chunks:
                rm, rv = self.running_mean.clone(), self.running_var.clone()
                outs.append(F.batch_norm(c, rm, rv, self.weight, self.bias, True, self.momentum, self.eps))
                means.append(rm)
                vars_.append(rv)
            with torch.no_grad():
                self.running_mean.copy_(torch.stack(means).mean(0))
                self.running_var.copy_(torch.stack(vars_).mean(0))
        return torch.stack(outs, 1).flatten(0, 1)  # back to interleaved rows


class _Var5BN(PerGPUBatchNorm2d):
    """5-D form: statistics of x.view(b, k, C, H, W) over dims 0, 3, 4; running statistics as one-bn's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.gpus_per_process
        if not self.training or k == 1:
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        n, c, h, w = x.shape
        x5 = x.view(n // k, k, c, h, w)
        var, mean = torch.var_mean(x5, dim=(0, 3, 4), unbiased=False, keepdim=True)
        y = (x5 - mean) * (torch.rsqrt(var + self.eps) * self.weight.view(c, 1, 1)) + self.bias.view(c, 1, 1)
        with torch.no_grad():
            count = (n // k) * h * w
            self.gpu_running_mean.view(k, c).lerp_(mean.view(k, c), self.momentum)
            self.gpu_running_var.view(k, c).lerp_(var.view(k, c) * (count / (count - 1)), self.momentum)
        return y.view(n, c, h, w)


# one-bn: as shipped (create_model adds share_affine_repeats); one-bn/layer: each layer repeats its own gamma, beta.
FORMS = {"one-bn": PerGPUBatchNorm2d, "one-bn/layer": PerGPUBatchNorm2d, "var5": _Var5BN, "loop": _LoopBN}


def use_form(model: torch.nn.Module, form: str) -> torch.nn.Module:
    """Switch every per-GPU BN layer of the model to one of FORMS (same parameters and buffers)."""
    for m in model.modules():
        if isinstance(m, PerGPUBatchNorm2d):
            m.__class__ = FORMS[form]
    if form != "one-bn":  # the model-level repeats serve the shipped form only
        for hooks in (model._forward_pre_hooks, model._forward_hooks):
            for key, fn in list(hooks.items()):
                if getattr(fn, "__module__", "").startswith("ablation.norms"):  # batch.py since the norms package split
                    del hooks[key]
    return model


# ---------------------------------------------------------------- measuring


# Ops that only make a new view of the same memory (no kernel on a GPU).
_METADATA_OPS = {"aten::_unsafe_view", "aten::_reshape_alias", "aten::lift_fresh"}


class _CountDispatched(TorchDispatchMode):
    """Counts every aten op that reaches the dispatcher below autograd, and those that are not views."""

    def __init__(self) -> None:
        super().__init__()
        self.n = self.data = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.n += 1
        self.data += not (func.is_view or func.name() in _METADATA_OPS)
        return func(*args, **(kwargs or {}))


def _issued_by_python(event) -> bool:  # noqa: ANN001
    """An aten op that Python issued: no aten op, backward node or optimizer step above it. Other scopes (a
    custom autograd.Function's forward, a record_function) are looked through, so no op hides in one."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(("aten::", "autograd::engine::", "Optimizer.")):
            return False
        parent = parent.cpu_parent
    return True


def count_ops(step: Callable[[], None]) -> dict[str, int]:
    """Ops of one call of step(), three ways (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.events()
    top = [e.name for e in events if e.cpu_parent is None]
    issued = [e for e in events if e.name.startswith("aten::") and _issued_by_python(e)]
    counter = _CountDispatched()
    with counter:
        step()
    return {
        "top_level_ops": len(issued),
        "backward_nodes": sum(n.startswith("autograd::engine::evaluate_function") for n in top),
        "dispatched_ops": counter.n,
        "non_view_ops": counter.data,
    }


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_rounds(steps: dict[str, Callable[[], None]], repeats: int, device: str) -> dict[str, tuple[float, float]]:
    """(median, min) seconds per call of each step, timed in rounds that each call every step once, in an
    order rotated from round to round, so that a change of load and a position in the round hit all alike.
    On a shared machine interference only adds time: compare the minima."""
    for fn in steps.values():
        fn()
    keys = list(steps)
    times: dict[str, list[float]] = {key: [] for key in keys}
    for r in range(repeats):
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
            _sync(device)
            t = time.perf_counter()
            steps[key]()
            _sync(device)
            times[key].append(time.perf_counter() - t)
    return {key: (sorted(ts)[len(ts) // 2], min(ts)) for key, ts in times.items()}


def layer_bench(device: str, repeats: int, shape: tuple[int, int, int, int] = LAYER_INPUT) -> list[dict]:
    """Forward+backward of one norm layer on an activation of this shape (default ResNet-50 layer1-sized),
    NCHW and channels-last."""
    rows = []
    cases = [("bn", 1, ""), *[("bn", 8, f) for f in FORMS if f != "one-bn/layer"], ("bn", 32, "one-bn"),
             ("syncbn", 1, ""), ("gn", 1, ""), ("ln", 1, ""), ("in", 1, "")]
    for channels_last in (False, True):
        x0 = torch.randn(*shape, device=device)
        if channels_last:
            x0 = x0.to(memory_format=torch.channels_last)
        steps, meta = {}, {}
        for name, k, form in cases:
            cfg = config.load(None, [f"norm.name={name}"]).norm
            layer = create_norm(shape[1], NormSpec(cfg, k)).to(device)
            if form:
                use_form(layer, form)
            x = x0.clone().requires_grad_(True)
            key = f"{name} k={k} {form}".strip()
            steps[key] = (lambda layer=layer, x=x: layer(x).sum().backward())
            meta[key] = {"norm": name, "gpus_per_process": k, "form": form or None}
        for key, (s, best) in timed_rounds(steps, repeats, device).items():
            rows.append({"what": "layer", **meta[key], "channels_last": channels_last, "ms": 1000 * s, "ms_min": 1000 * best})
    return rows


def model_bench(device: str, repeats: int, image: int, batch: int, model: str, chunks: list[int],
                model_overrides: tuple[str, ...] = ()) -> list[dict]:
    """One SGD training step of the model on the same `batch` images: plain BN, per-GPU BN over k chunks
    in each form, GN, LN, IN. Ops counted once, times in alternating rounds."""
    cases = [("bn", 1, "")]
    cases += [("bn", k, form) for k in chunks if k > 1 for form in FORMS]
    cases += [("gn", 1, ""), ("ln", 1, ""), ("in", 1, "")]
    x = torch.randn(batch, 3, image, image, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    steps, rows = {}, {}
    for name, k, form in cases:
        cfg = config.load(None, [f"norm.name={name}", f"model.name={model}", *model_overrides])
        torch.manual_seed(0)
        net = create_model(cfg, 1000, gpus_per_process=k).to(device)
        if form:
            use_form(net, form)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

        def step(net=net, opt=opt) -> None:  # noqa: ANN001
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()

        key = f"{name} k={k} {form}".strip()
        step()
        rows[key] = {"what": f"{model} step", "norm": name, "gpus_per_process": k, "form": form or None, "image": image, "batch": batch,
                     **count_ops(step)}
        steps[key] = step
    for key, (s, best) in timed_rounds(steps, repeats, device).items():
        rows[key].update(ms=1000 * s, ms_min=1000 * best, images_per_s=batch / best)
    plain = rows["bn k=1"]
    for r in rows.values():
        r["ops_vs_plain_bn"] = r["top_level_ops"] / plain["top_level_ops"]
        r["dispatched_vs_plain_bn"] = r["dispatched_ops"] / plain["dispatched_ops"]
        r["non_view_vs_plain_bn"] = r["non_view_ops"] / plain["non_view_ops"]
        r["time_vs_plain_bn"] = r["ms_min"] / plain["ms_min"]  # minima: see timed_rounds
    return list(rows.values())


def main() -> None:
    """Run the benchmarks, print a table, record a JSON line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="fewer repeats, no layer benchmark")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 9, 3 with --quick)")
    p.add_argument("--no-layers", action="store_true", help="model step only")
    p.add_argument("--image", type=int, default=64, help="model step: image size (the speed issue's 64)")
    p.add_argument("--batch", type=int, default=16, help="model step: images per process (the speed issue's 16)")
    p.add_argument("--chunks", default="1,2,4,8,16", help="model step: modelled GPUs per process to compare")
    p.add_argument("--note", default="", help="recorded with the figures (e.g. 'shared machine')")
    p.add_argument("--tiny", action="store_true", help="a small layer input and a small ResNet-18 on 16 px images, k = 1 and 2, "
                   "one round: a smoke test that keeps this script working")
    p.add_argument("--out", type=Path, default=OUT, help=f"JSON-lines record (default {OUT})")
    args = p.parse_args()
    repeats = args.repeats or (1 if args.tiny else 3 if args.quick else 9)
    if args.tiny:
        rows = [] if args.no_layers else layer_bench(args.device, repeats, TINY_LAYER_INPUT)
        rows += model_bench(args.device, repeats, 16, 8, "resnet18", [1, 2], tuple(TINY_MODEL))
    else:
        rows = [] if args.quick or args.no_layers else layer_bench(args.device, repeats)
        rows += model_bench(args.device, repeats, args.image, args.batch, "resnet50", [int(k) for k in args.chunks.split(",")])
    for r in rows:
        form = r.get("form") or ""
        line = f"{r['what']:15s} {r['norm']:6s} k={r['gpus_per_process']:<3d} {form:7s}"
        if r["what"] == "layer":
            line += f" {'channels-last' if r['channels_last'] else 'nchw':13s} {r['ms']:9.2f} ms (min {r['ms_min']:.2f})"
        else:
            line += (
                f" {r['top_level_ops']:5d} top-level ops ({r['ops_vs_plain_bn']:.2f}x)  {r['dispatched_ops']:5d} dispatched "
                f"({r['dispatched_vs_plain_bn']:.2f}x)  {r['non_view_ops']:5d} non-view ({r['non_view_vs_plain_bn']:.2f}x)  "
                f"{r['backward_nodes']:4d} bwd nodes  {r['ms']:7.1f} ms, min {r['ms_min']:7.1f} ({r['time_vs_plain_bn']:.3f}x)"
            )
        print(line)
    record = {"time": stamp(), "machine": machine(args.device), "note": args.note, "repeats": repeats, "tiny": args.tiny, "rows": rows}
    append(args.out, [record])
    print(f"recorded in {args.out}")


if __name__ == "__main__":
    main()
