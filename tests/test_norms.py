"""Norm registry: definitions from the reference, batch independence, per-GPU BN semantics, plugins."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ablation import config
from ablation.errors import ConfigError, NormError
from ablation.norms import NormSpec, PerGPUBatchNorm2d, create_norm, registered_norms


def spec(name: str, gpus_per_process: int = 1, **norm: object) -> NormSpec:
    """A NormSpec for a norm name and options."""
    return NormSpec(config.replace(config.RunConfig(), **{"norm.name": name, **{f"norm.{k}": v for k, v in norm.items()}}).norm, gpus_per_process)


def randomize_affine(layer: torch.nn.Module) -> torch.nn.Module:
    """Give gamma and beta random values so the affine part is tested too."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in ("weight", "bias"):
            p = getattr(layer, name, None)
            if p is not None:
                p.copy_(torch.randn(p.shape, generator=g))
    return layer


X = torch.randn(6, 16, 5, 4, generator=torch.Generator().manual_seed(0)) * 3 + 1


def test_registry_holds_every_builtin() -> None:
    assert set(config.BUILTIN_NORMS) <= set(registered_norms())


def test_ln_is_group_norm_with_one_group_and_per_channel_affine() -> None:
    layer = randomize_affine(create_norm(16, spec("ln")))
    mean = X.mean(dim=(1, 2, 3), keepdim=True)
    var = X.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
    expected = (X - mean) / torch.sqrt(var + 1e-5) * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(X), expected, rtol=1e-5, atol=1e-5)
    assert layer.weight.shape == (16,)  # per-channel gamma, not per-pixel like nn.LayerNorm([C, H, W])


def test_in_normalizes_each_channel_of_each_image_with_affine() -> None:
    layer = randomize_affine(create_norm(16, spec("in")))
    mean = X.mean(dim=(2, 3), keepdim=True)
    var = X.var(dim=(2, 3), unbiased=False, keepdim=True)
    expected = (X - mean) / torch.sqrt(var + 1e-5) * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(X), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("options", "groups"), [({"groups": 4}, 4), ({"channels_per_group": 2}, 8), ({}, 16)])
def test_gn_matches_the_definition(options: dict, groups: int) -> None:
    # 16 channels: G=32 cannot apply, so the default case uses channels=32 below
    channels = 32 if not options else 16
    x = torch.randn(3, channels, 4, 4)
    layer = randomize_affine(create_norm(channels, spec("gn", **options)))
    g = 32 if not options else groups
    xg = x.view(3, g, -1)
    expected = ((xg - xg.mean(-1, keepdim=True)) / torch.sqrt(xg.var(-1, unbiased=False, keepdim=True) + 1e-5)).view_as(x)
    expected = expected * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["gn", "ln", "in", "none", "plugins.mynorms:rms_norm"])
def test_batch_free_norms_do_not_depend_on_batch_mates(name: str) -> None:
    layer = randomize_affine(create_norm(16, spec(name, **({"groups": 4} if name == "gn" else {}))))
    layer.train()
    alone = layer(X[:1])
    other_mates = torch.cat([X[:1], torch.randn(5, 16, 5, 4) * 10])
    torch.testing.assert_close(layer(other_mates)[:1], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(X)[:1], alone, rtol=1e-5, atol=1e-5)


def test_bn_does_depend_on_batch_mates() -> None:
    layer = create_norm(16, spec("bn"))
    assert not torch.allclose(layer(X[:2])[:1], layer(X[:3])[:1])


def test_per_gpu_bn_normalizes_each_chunk_by_its_own_statistics() -> None:
    layer = randomize_affine(create_norm(16, spec("bn", gpus_per_process=3)))
    assert isinstance(layer, PerGPUBatchNorm2d)
    out = layer(X)  # 6 images = 3 modelled GPUs x 2 images
    ref = randomize_affine(create_norm(16, spec("bn")))
    for i in range(3):
        torch.testing.assert_close(out[2 * i : 2 * i + 2], ref(X[2 * i : 2 * i + 2]), rtol=1e-5, atol=1e-5)


def test_per_gpu_bn_running_stats_rules() -> None:
    chunks = X.view(3, 2, 16, 5, 4)
    rank0 = create_norm(16, spec("bn", gpus_per_process=3, running_stats="rank0"))
    rank0(X)
    m = 0.1
    torch.testing.assert_close(rank0.running_mean, m * chunks[0].mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rank0.running_var, (1 - m) + m * chunks[0].transpose(0, 1).reshape(16, -1).var(1), rtol=1e-5, atol=1e-6)
    mean = create_norm(16, spec("bn", gpus_per_process=3, running_stats="mean"))
    mean(X)
    chunk_means = torch.stack([c.mean(dim=(0, 2, 3)) for c in chunks])
    torch.testing.assert_close(mean.running_mean, m * chunk_means.mean(0), rtol=1e-5, atol=1e-6)
    assert int(mean.num_batches_tracked) == 1


def test_per_gpu_bn_rejects_a_batch_that_does_not_split() -> None:
    layer = create_norm(16, spec("bn", gpus_per_process=4))
    with pytest.raises(ValueError, match="cannot be split over 4"):
        layer(X)


def test_per_gpu_bn_eval_uses_running_statistics() -> None:
    layer = create_norm(16, spec("bn", gpus_per_process=3)).eval()
    torch.testing.assert_close(layer(X), X / torch.sqrt(torch.tensor(1 + 1e-5)), rtol=1e-5, atol=1e-5)


def test_syncbn_in_one_process_uses_the_whole_batch() -> None:
    layer = create_norm(16, spec("syncbn", gpus_per_process=3))
    torch.testing.assert_close(layer(X), F.batch_norm(X, None, None, training=True), rtol=1e-5, atol=1e-5)


def test_plugin_norm_by_import_path_receives_its_options() -> None:
    layer = create_norm(16, spec("plugins.mynorms:rms_norm", options={"scale": 2.0}))
    assert type(layer).__name__ == "RMSNorm2d" and layer.scale == 2.0


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("nosuchpkg.mod:f", "cannot import module 'nosuchpkg.mod'"),
        ("plugins.mynorms:missing", "has no callable 'missing'"),
        ("plugins.mynorms:not_a_module", "returned int, not a torch.nn.Module"),
    ],
)
def test_bad_plugins_are_one_line_errors(name: str, message: str) -> None:
    with pytest.raises(NormError, match=message):
        create_norm(16, spec(name))


def test_groups_not_dividing_channels_is_an_error_naming_the_field() -> None:
    with pytest.raises(ConfigError, match=r"norm.groups=3 does not divide a layer's 16 channels"):
        create_norm(16, spec("gn", groups=3))
    with pytest.raises(ConfigError, match=r"norm.channels_per_group=5"):
        create_norm(16, spec("gn", channels_per_group=5))


def test_syncbn_moments_are_stable_for_a_channel_with_a_large_mean() -> None:
    from ablation.norms import global_batch_moments

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 4, 4, generator=g)
    x[:, 0] += 1e4  # mean 1e4, variance 1: E[x^2] = 1e8, where a float32 step is 8
    ref = x.double().var(dim=(0, 2, 3), unbiased=False)
    naive = (x * x).mean(dim=(0, 2, 3)) - x.mean(dim=(0, 2, 3)) ** 2  # the old formula, in float32
    assert not torch.allclose(naive[0].double(), ref[0], rtol=0.5)
    centered, mean, var, n = global_batch_moments(x)
    assert int(n) == 64 * 16 and torch.isfinite(centered).all() and (var >= 0).all()
    torch.testing.assert_close(var.double(), ref, rtol=1e-3, atol=0)
    torch.testing.assert_close(mean.double(), x.double().mean(dim=(0, 2, 3)), rtol=1e-6, atol=0)


def test_syncbn_is_torch_syncbatchnorm_on_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    from ablation import norms

    assert type(create_norm(8, spec("syncbn"))) is norms.SyncBatchNorm2d  # CPU (gloo) or one process
    monkeypatch.setattr(norms.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(norms.dist, "get_backend", lambda *a: "nccl")
    layer = create_norm(8, spec("syncbn", eps=1e-3, momentum=0.2))
    assert type(layer) is torch.nn.SyncBatchNorm and (layer.eps, layer.momentum) == (1e-3, 0.2)


@pytest.mark.slow
def test_syncbn_in_four_processes_equals_batch_norm_over_the_global_batch(tmp_path, cli_env) -> None:
    import subprocess
    import sys

    from conftest import ROOT
    from syncbn_worker import STEPS, global_batch, init_affine

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4"]
    proc = subprocess.run([*torchrun, str(ROOT / "tests" / "syncbn_worker.py"), str(tmp_path)], env=cli_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(4)]

    # float32: x - mean on channel 0 (mean 1e4, std 1) is good to ~1e-3 per element, whatever the method,
    # and its error adds up over the 96 elements in the gamma gradient: a looser absolute tolerance there.
    f32 = {"rtol": 1e-3, "atol": 1e-3}
    for dtype, tol, ptol in ((torch.float64, {"rtol": 1e-10, "atol": 1e-10}, {"rtol": 1e-10, "atol": 1e-10}), (torch.float32, f32, {**f32, "atol": 5e-2})):
        # One process, plain batch norm over the whole global batch, in float64.
        bn = init_affine(torch.nn.BatchNorm2d(5, eps=1e-5, momentum=0.1).double()).train()
        for step in range(STEPS + 1):
            x, w = global_batch(step, torch.float64)
            if step == STEPS:
                bn.eval()
            x = x.to(dtype).double().requires_grad_()
            y = bn(x)
            got = [r[str(dtype)][step] for r in ranks]
            torch.testing.assert_close(torch.cat([g["y"] for g in got]).double(), y.detach(), **tol)
            if step == STEPS:
                break
            (y * w.to(dtype).double()).sum().backward()
            torch.testing.assert_close(torch.cat([g["dx"] for g in got]).double(), x.grad, **tol)
            # DDP sums (averages) parameter gradients over processes; each process holds its share.
            torch.testing.assert_close(sum(g["dweight"] for g in got).double(), bn.weight.grad, **ptol)
            torch.testing.assert_close(sum(g["dbias"] for g in got).double(), bn.bias.grad, **ptol)
            for g in got:  # every process updates its running statistics from the global ones
                torch.testing.assert_close(g["running_mean"].double(), bn.running_mean, rtol=tol["rtol"], atol=0)
                torch.testing.assert_close(g["running_var"].double(), bn.running_var, rtol=tol["rtol"], atol=0)
            bn.zero_grad()
