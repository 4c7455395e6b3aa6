"""Batch-dependent variants: Batch Renormalization (brn), EvoNorm-B0 (evonorm_b0) and PreciseBN.

Definitions against hand-computed references (float64), the stand-in for k GPUs against k separate
modules on their chunks, state across save/load, tiny CPU runs (4 processes against one standing in for 4: tests/test_trainer.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import RUN
from helpers import norm_spec as spec

from ablation import config, rundir
from ablation.norms import create_norm, sync_running_stats
from ablation.norms.precise import precise_bn

F64 = {"rtol": 1e-12, "atol": 1e-12}


def randomize(layer: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Random gamma, beta (and EvoNorm's v, kept positive and away from 0) so every parameter is tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(torch.rand(p.shape, generator=g) + 0.5 if name == "v" else torch.randn(p.shape, generator=g))
    return layer


def chunk_rows(n: int, k: int) -> list[torch.Tensor]:
    """Rows of each modelled GPU in an interleaved process batch: GPU i owns rows i, i+k, ..."""
    return [torch.arange(i, n, k) for i in range(k)]


def step_against_separate(stand_in: torch.nn.Module, gpus: list[torch.nn.Module], x: torch.Tensor, up: torch.Tensor,
                          channels_last: bool) -> torch.Tensor:
    """One training step of a layer standing in for k GPUs and of k separate layers, one per GPU's rows:
    outputs, input gradients and parameter gradients (summed over GPUs, as DDP does) must agree. Returns
    the stand-in's output; every gradient is zeroed again."""
    k = len(gpus)
    y = stand_in(x.to(memory_format=torch.channels_last) if channels_last else x)
    (y * up).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    y_ref = torch.empty_like(y)
    for m, rows in zip(gpus, chunk_rows(len(x), k)):
        out = m(x_ref[rows])
        (out * up[rows]).sum().backward()
        y_ref[rows] = out.detach()
    torch.testing.assert_close(y, y_ref, **F64)
    torch.testing.assert_close(x.grad, x_ref.grad, **F64)
    for name, p in stand_in.named_parameters():
        torch.testing.assert_close(p.grad, sum(dict(m.named_parameters())[name].grad for m in gpus), **F64, msg=name)
    stand_in.zero_grad()
    for m in gpus:
        m.zero_grad()
    return y


def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance over (N, H, W)."""
    return x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)


def c4(t: torch.Tensor) -> torch.Tensor:
    """A per-channel vector shaped to broadcast over (N, C, H, W)."""
    return t.view(1, -1, 1, 1)


# ---------------------------------------------------------------- Batch Renormalization


def brn_reference(x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, r_max: float,
                  d_max: float, eps: float = 1e-5):
    """BRN training output by the paper's formula; r and d computed as constants. Returns (y, r, d, mu_B, sigma_B)."""
    mu_b, var_b = moments(x)
    sigma_b = torch.sqrt(var_b + eps)
    r = (sigma_b / sigma).clamp(1 / r_max, r_max).detach()
    d = ((mu_b - mu) / sigma).clamp(-d_max, d_max).detach()
    y = c4(gamma) * ((x - c4(mu_b)) / c4(sigma_b) * c4(r) + c4(d)) + c4(beta)
    return y, r, d, mu_b, sigma_b


def test_brn_registry_defaults_are_the_gn_papers_and_fields_are_brn_only() -> None:
    layer = create_norm(4, spec("brn"))
    assert (layer.r_max, layer.d_max, layer.warmup_steps, layer.eps, layer.momentum) == (1.5, 0.5, 0, 1e-5, 0.1)
    for key, value in (("r_max", 2.0), ("d_max", 1.0), ("renorm_warmup_steps", 10)):
        with pytest.raises(config.ConfigError, match=rf"norm.{key} applies to brn, not 'bn'"):
            config.load(None, [f"norm.{key}={value}"])
    with pytest.raises(config.ConfigError, match="norm.r_max must be >= 1"):
        config.load(None, ["norm.name=brn", "norm.r_max=0.5"])
    # omitted fields keep every existing run id; set, they enter brn's (normalized: defaults resolved)
    assert config.run_id(config.load(None, ["norm.name=brn"])) == config.run_id(config.load(None, ["norm.name=brn", "norm.r_max=1.5"]))
    assert config.run_id(config.load(None, ["norm.name=brn"])) != config.run_id(config.load(None, ["norm.name=brn", "norm.r_max=3"]))


def test_brn_clips_r_and_d_as_defined() -> None:
    """Channels chosen so r is inside, at r_max and at 1/r_max, and d at +d_max and -d_max."""
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([1.0, 4.0, 0.2, 1.0], dtype=torch.float64).view(1, 4, 1, 1)
    x = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64) * scale + 2.0
    layer = randomize(create_norm(4, spec("brn", momentum=0.25))).double()
    mu_b, var_b = moments(x)
    sigma_b = torch.sqrt(var_b + 1e-5)
    with torch.no_grad():
        layer.running_std.copy_(sigma_b * torch.tensor([1.1, 0.3, 3.0, 1.0], dtype=torch.float64))
        layer.running_mean.copy_(mu_b - layer.running_std * torch.tensor([0.2, 2.0, -2.0, 0.1], dtype=torch.float64))
    mu0, sigma0 = layer.running_mean.clone(), layer.running_std.clone()
    y_ref, r, d, _, _ = brn_reference(x, mu0, sigma0, layer.weight, layer.bias, 1.5, 0.5)
    # the hand-computed r and d do hit every clip (the test covers each branch)
    assert 1 / 1.5 < r[0] < 1.5 and r[1] == 1.5 and r[2] == 1 / 1.5
    assert -0.5 < d[0] < 0.5 and d[1] == 0.5 and d[2] == -0.5
    torch.testing.assert_close(layer(x), y_ref, **F64)
    # moving averages of mu_B and sigma_B (not of the variance)
    torch.testing.assert_close(layer.running_mean, 0.75 * mu0 + 0.25 * mu_b, **F64)
    torch.testing.assert_close(layer.running_std, 0.75 * sigma0 + 0.25 * sigma_b, **F64)
    assert int(layer.num_batches_tracked) == 1


def test_brn_gradients_treat_r_and_d_as_constants() -> None:
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(8, 5, 3, 2, generator=g, dtype=torch.float64) * 2 + 1).requires_grad_()
    up = torch.randn(8, 5, 3, 2, generator=g, dtype=torch.float64)
    layer = randomize(create_norm(5, spec("brn"))).double()
    with torch.no_grad():  # running statistics near the batch's, so r and d are inside their limits (not clipped)
        mu_b, var_b = moments(x)
        layer.running_mean.copy_(mu_b + 0.1 * torch.sqrt(var_b))
        layer.running_std.copy_(torch.sqrt(var_b) * 1.2)
    mu, sigma = layer.running_mean.clone(), layer.running_std.clone()
    (layer(x) * up).sum().backward()

    x_ref = x.detach().clone().requires_grad_()
    w, b = (p.detach().clone().requires_grad_() for p in (layer.weight, layer.bias))
    y_ref, r, d, _, _ = brn_reference(x_ref, mu, sigma, w, b, 1.5, 0.5)
    assert ((r > 1 / 1.5) & (r < 1.5)).all() and (d.abs() < 0.5).all()
    (y_ref * up).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **F64)
    torch.testing.assert_close(layer.weight.grad, w.grad, **F64)
    torch.testing.assert_close(layer.bias.grad, b.grad, **F64)

    # Had r and d carried gradient (through mu_B and sigma_B), the input gradient would differ.
    x_nd = x.detach().clone().requires_grad_()
    mu_b, var_b = moments(x_nd)
    sigma_b = torch.sqrt(var_b + 1e-5)
    r_nd, d_nd = sigma_b / sigma, (mu_b - mu) / sigma
    y_nd = c4(w.detach()) * ((x_nd - c4(mu_b)) / c4(sigma_b) * c4(r_nd) + c4(d_nd)) + c4(b.detach())
    (y_nd * up).sum().backward()
    assert not torch.allclose(x_nd.grad, x.grad, rtol=1e-6, atol=1e-8)


def test_brn_eval_is_the_moving_mean_and_std_without_another_eps() -> None:
    layer = randomize(create_norm(3, spec("brn"))).double().eval()
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        layer.running_std.copy_(torch.tensor([0.01, 2.0, 0.5]))  # a tiny sigma: an extra eps would show
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    expected = c4(layer.weight) * (x - c4(layer.running_mean)) / c4(layer.running_std) + c4(layer.bias)
    torch.testing.assert_close(layer(x), expected, **F64)


def test_brn_warmup_ramps_linearly_from_plain_bn() -> None:
    """renorm_warmup_steps=4: limits (1 + 0.5 t/4, 0.5 t/4) at training step t, (1.5, 0.5) from step 4 on."""
    layer = randomize(create_norm(3, spec("brn", momentum=0.0, renorm_warmup_steps=4))).double()  # momentum 0: mu, sigma stay put
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        layer.running_mean.fill_(-3.0)
        layer.running_std.fill_(0.1)  # far from every batch: r and d clip at the current limits
    for t in range(7):
        x = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)
        f = min(t, 4) / 4
        y_ref, r, d, _, _ = brn_reference(x, layer.running_mean, layer.running_std, layer.weight, layer.bias, 1 + 0.5 * f, 0.5 * f)
        if t == 0:  # plain BN
            torch.testing.assert_close(y_ref, F.batch_norm(x, None, None, layer.weight, layer.bias, True, 0.0, 1e-5), **F64)
        assert torch.allclose(r, torch.full_like(r, 1 + 0.5 * f)) and torch.allclose(d, torch.full_like(d, 0.5 * f))
        torch.testing.assert_close(layer(x), y_ref, **F64)
        assert int(layer.num_batches_tracked) == t + 1


def test_brn_warmup_counter_survives_a_state_dict_save_and_load() -> None:
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(8, 4, 3, 3, generator=g) * 2 + 1 for _ in range(6)]
    make = lambda: create_norm(4, spec("brn", gpus_per_process=2, renorm_warmup_steps=5))  # noqa: E731
    whole = make()
    outs = [whole(x) for x in xs]
    first = make()
    for x in xs[:3]:
        first(x)
    state = first.state_dict()
    assert int(state["num_batches_tracked"]) == 3 and {"running_mean", "running_std"} <= set(state)
    resumed = make()
    resumed.load_state_dict(state)
    for x, out in zip(xs[3:], outs[3:]):
        assert torch.equal(resumed(x), out)  # the ramp continues at step 3: bitwise the uninterrupted layer
    for key, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    # Without the counter the ramp would restart at plain BN: a different output (the counter matters).
    restarted = make()
    restarted.load_state_dict({k: v for k, v in state.items() if k != "num_batches_tracked"}, strict=False)
    assert not torch.allclose(restarted(xs[3]), outs[3])


@pytest.mark.parametrize("rule", ["rank0", "mean"])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_brn_stand_in_equals_k_separate_modules(k: int, rule: str, channels_last: bool) -> None:
    """One layer standing in for k GPUs == k layers, one per GPU's chunk, with the rule applied to their
    buffers after every step (rank0: GPU 0's to all, as DDP's broadcast_buffers; mean: the average)."""
    g = torch.Generator().manual_seed(10 * k + (rule == "mean"))
    c, b = 5, 3
    stand_in = randomize(create_norm(c, spec("brn", gpus_per_process=k, running_stats=rule, momentum=0.3, renorm_warmup_steps=2))).double()
    gpus = [create_norm(c, spec("brn", momentum=0.3, renorm_warmup_steps=2)).double() for _ in range(k)]
    for m in gpus:
        m.load_state_dict(stand_in.state_dict())
    for step in range(5):
        x = (torch.randn(k * b, c, 3, 2, generator=g, dtype=torch.float64) * (1 + step)
             + torch.randn(c, 1, 1, generator=g, dtype=torch.float64) * 3).requires_grad_()
        up = torch.randn(k * b, c, 3, 2, generator=g, dtype=torch.float64)
        y = step_against_separate(stand_in, gpus, x, up, channels_last)
        assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        with torch.no_grad():
            for name in ("running_mean", "running_std"):
                bufs = [getattr(m, name) for m in gpus]
                value = bufs[0].clone() if rule == "rank0" else torch.stack(bufs).mean(0)
                for buf in bufs:
                    buf.copy_(value)
        for name in ("running_mean", "running_std"):
            torch.testing.assert_close(getattr(stand_in, name), getattr(gpus[0], name), **F64)
    assert int(stand_in.num_batches_tracked) == 5
    stand_in.eval()
    for m in gpus:
        m.eval()
    torch.testing.assert_close(stand_in(x.detach()), gpus[0](x.detach()), **F64)


def test_brn_rules_differ_when_gpus_see_different_batches() -> None:
    """The two rules are different experiments (so the test above can tell them apart)."""
    x = torch.randn(8, 3, 2, 2, generator=torch.Generator().manual_seed(4)) * torch.arange(1.0, 9.0).view(8, 1, 1, 1)
    rank0, mean = (create_norm(3, spec("brn", gpus_per_process=4, running_stats=r)) for r in ("rank0", "mean"))
    rank0(x), mean(x)
    chunks = [x[rows] for rows in chunk_rows(8, 4)]
    torch.testing.assert_close(rank0.running_mean, 0.1 * moments(chunks[0])[0])
    torch.testing.assert_close(mean.running_mean, 0.1 * torch.stack([moments(c)[0] for c in chunks]).mean(0))
    assert not torch.allclose(rank0.running_std, mean.running_std)


# ---------------------------------------------------------------- EvoNorm-B0


def evonorm_b0_reference(x, var, gamma, beta, v, apply_act: bool, eps: float = 1e-5):  # noqa: ANN001, ANN201
    """EvoNorm-B0 by its formula, for a given var_{N,H,W} (the batch's in training, the running one in eval)."""
    left = torch.sqrt(c4(var) + eps)
    if apply_act:
        right = c4(v) * x + torch.sqrt(x.var(dim=(2, 3), unbiased=False, keepdim=True) + eps)
        den = torch.maximum(left, right)
    else:
        den = left
    return x / den * c4(gamma) + c4(beta)


@pytest.mark.parametrize("apply_act", [True, False], ids=["act", "linear"])
def test_evonorm_b0_matches_the_definition_in_train_and_eval(apply_act: bool) -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64) * 2 + 0.5
    layer = randomize(create_norm(4, spec("evonorm_b0", apply_act=apply_act, momentum=0.2))).double()
    assert (layer.v is not None) == apply_act and layer.eps == 1e-5  # the paper's eps, not timm's 1e-3
    _, var_b = moments(x)
    y = layer(x)
    expected = evonorm_b0_reference(x, var_b, layer.weight, layer.bias, layer.v, apply_act)
    torch.testing.assert_close(y, expected, **F64)
    if apply_act:  # both sides of the max occur, so the nonlinearity is exercised
        left = torch.sqrt(c4(var_b) + 1e-5).expand_as(x)
        right = c4(layer.v) * x + torch.sqrt(x.var(dim=(2, 3), unbiased=False, keepdim=True) + 1e-5)
        assert (left > right).any() and (left < right).any()
    else:  # no mean subtraction: x / sqrt(var + eps) γ + β
        torch.testing.assert_close(y, x / torch.sqrt(c4(var_b) + 1e-5) * c4(layer.weight) + c4(layer.bias), **F64)
    # the running variance is a moving average of the biased batch variance (no Bessel correction)
    torch.testing.assert_close(layer.running_var, 0.8 * torch.ones(4, dtype=torch.float64) + 0.2 * var_b, **F64)
    layer.eval()
    x2 = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(layer(x2), evonorm_b0_reference(x2, layer.running_var, layer.weight, layer.bias, layer.v, apply_act), **F64)


@pytest.mark.parametrize("rule", ["rank0", "mean"])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("apply_act", [True, False], ids=["act", "linear"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_evonorm_b0_stand_in_equals_k_separate_modules(k: int, rule: str, apply_act: bool, channels_last: bool) -> None:
    """Outputs, input and parameter gradients, and the running variance (each GPU's own chain, then the rule)."""
    g = torch.Generator().manual_seed(20 * k + apply_act)
    c, b = 5, 2
    stand_in = randomize(create_norm(c, spec("evonorm_b0", gpus_per_process=k, apply_act=apply_act, running_stats=rule,
                                             momentum=0.3))).double()
    gpus = [create_norm(c, spec("evonorm_b0", apply_act=apply_act, momentum=0.3)).double() for _ in range(k)]
    for m in gpus:
        m.load_state_dict(stand_in.state_dict())
    for step in range(4):
        x = (torch.randn(k * b, c, 3, 2, generator=g, dtype=torch.float64) * (1 + step) + step).requires_grad_()
        up = torch.randn(k * b, c, 3, 2, generator=g, dtype=torch.float64)
        step_against_separate(stand_in, gpus, x, up, channels_last)
    chains = torch.stack([m.running_var for m in gpus])
    expected = chains[0] if rule == "rank0" else chains.mean(0)
    state = stand_in.state_dict()  # taken in training mode: the rule is applied first
    assert set(state) == {"weight", "bias", "running_var"} | ({"v"} if apply_act else set())
    torch.testing.assert_close(state["running_var"], expected, **F64)
    stand_in.eval()
    torch.testing.assert_close(stand_in.running_var, expected, **F64)
    xe = torch.randn(3, c, 3, 2, generator=g, dtype=torch.float64)
    torch.testing.assert_close(stand_in(xe), evonorm_b0_reference(xe, expected, stand_in.weight, stand_in.bias, stand_in.v, apply_act),
                               **F64)


def test_evonorm_b0_running_variance_follows_sync_and_load_like_bn() -> None:
    from ablation.norms.batch import PerGPURunningStats

    x = torch.randn(8, 3, 2, 2, generator=torch.Generator().manual_seed(6)) * torch.arange(1.0, 9.0).view(8, 1, 1, 1)
    layer = create_norm(3, spec("evonorm_b0", gpus_per_process=4, running_stats="mean"))
    assert isinstance(layer, PerGPURunningStats)
    layer(x)
    sync_running_stats(layer)  # one process: the fold over its modelled GPUs
    per_gpu = torch.stack([moments(x[rows])[1] for rows in chunk_rows(8, 4)])
    torch.testing.assert_close(layer.running_var, 0.9 + 0.1 * per_gpu.mean(0))
    other = create_norm(3, spec("evonorm_b0", gpus_per_process=2))
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.gpu_running_var, layer.running_var.repeat(2))


# ---------------------------------------------------------------- PreciseBN


def true_average(mus: list[torch.Tensor], variances: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Wu & Johnson's population statistics from per-batch means and biased variances, written out."""
    mu = torch.stack(mus).mean(0)
    return mu, torch.stack([v + m * m for m, v in zip(mus, variances)]).mean(0) - mu * mu


def per_gpu_bn(x: torch.Tensor, k: int, gamma: torch.Tensor, beta: torch.Tensor, stats: list) -> torch.Tensor:
    """Training-mode per-GPU BN by hand; appends each GPU's (mean, biased var) of its input to stats."""
    out = torch.empty_like(x)
    for rows in chunk_rows(x.shape[0], k):
        mu, var = moments(x[rows])
        stats.append((mu, var))
        out[rows] = (x[rows] - c4(mu)) / torch.sqrt(c4(var) + 1e-5) * c4(gamma) + c4(beta)
    return out


@pytest.mark.parametrize("rule", ["rank0", "mean"])
def test_precise_bn_is_the_true_average_over_every_modelled_gpus_batches(rule: str) -> None:
    """bn, k = 2, two layers (the second sees the first's training-mode, per-GPU output) over 3 process batches."""
    k, b, c = 2, 3, 4
    g = torch.Generator().manual_seed(7)
    bn1, bn2 = (randomize(create_norm(c, spec("bn", gpus_per_process=k, running_stats=rule)), seed=s).double() for s in (1, 2))
    conv = torch.nn.Conv2d(c, c, 1, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(c, c, 1, 1, generator=g, dtype=torch.float64))
    model = torch.nn.Sequential(bn1, conv, bn2)
    for _ in range(2):  # some training first: moving averages, per-GPU chains and counters that must not move
        model(torch.randn(k * b, c, 2, 2, generator=g, dtype=torch.float64))
    chains = {n: t.clone() for n, t in model.named_buffers()}
    batches = [torch.randn(k * b, c, 2, 2, generator=g, dtype=torch.float64) * 3 + 1 for _ in range(3)]

    assert precise_bn(model, iter(batches)) == 3
    stats1, stats2 = [], []
    with torch.no_grad():
        for x in batches:
            per_gpu_bn(conv(per_gpu_bn(x, k, bn1.weight, bn1.bias, stats1)), k, bn2.weight, bn2.bias, stats2)
    assert len(stats1) == len(stats2) == 3 * k  # each modelled GPU's batch is a batch
    for layer, stats in ((bn1, stats1), (bn2, stats2)):
        mu, var = true_average([s[0] for s in stats], [s[1] for s in stats])
        torch.testing.assert_close(layer.running_mean, mu, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.running_var, var, rtol=1e-10, atol=1e-12)
        assert torch.equal(layer.gpu_running_mean, layer.running_mean.repeat(k))
        assert torch.equal(layer.gpu_running_var, layer.running_var.repeat(k))
        assert int(layer.num_batches_tracked) == 2  # the pass took no training step
        # fvcore's update_bn_stats (mean of Bessel-corrected batch variances) is another number at n = 3 x 2 x 2
        n = b * 4
        fvcore = torch.stack([s[1] * n / (n - 1) for s in stats]).mean(0) + torch.stack([s[0] for s in stats]).var(0, unbiased=False)
        assert not torch.allclose(layer.running_var, fvcore, rtol=1e-3)
    assert all(torch.equal(chains[n], t) for n, t in model.named_buffers() if "num_batches" in n)
    before = {n: t.clone() for n, t in model.named_buffers()}
    precise_bn(model, iter(batches))  # recomputing gives the same numbers: a function of the weights and batches
    assert all(torch.equal(before[n], t) for n, t in model.named_buffers())


def test_precise_bn_sets_brn_mean_and_std_and_is_not_redone_until_a_training_step() -> None:
    k, g = 2, torch.Generator().manual_seed(8)
    layer = randomize(create_norm(3, spec("brn", gpus_per_process=k, renorm_warmup_steps=10))).double()
    layer(torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64))
    batches = [torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64) * 2 - 1 for _ in range(2)]
    assert precise_bn(layer, iter(batches)) == 2
    stats = [moments(x[rows]) for x in batches for rows in chunk_rows(4, k)]
    mu, var = true_average([s[0] for s in stats], [s[1] for s in stats])
    torch.testing.assert_close(layer.running_mean, mu, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.running_std, torch.sqrt(var + 1e-5), rtol=1e-10, atol=1e-12)
    assert int(layer.num_batches_tracked) == 1 and int(layer.stats_precise) == 1  # the ramp's counter did not move
    state = {n: t.clone() for n, t in layer.state_dict().items()}
    # Already precise (a run resumed in its evaluation): recomputing from them would move mu and sigma.
    assert precise_bn(layer, iter(batches)) == 0 and all(torch.equal(state[n], t) for n, t in layer.state_dict().items())
    layer(batches[0])  # a training step: the statistics are moving averages again
    assert int(layer.stats_precise) == 0 and precise_bn(layer, iter(batches)) == 2


def test_precise_bn_sets_evonorm_b0_running_variance() -> None:
    k, g = 2, torch.Generator().manual_seed(9)
    layer = randomize(create_norm(3, spec("evonorm_b0", gpus_per_process=k, apply_act=True))).double()
    batches = [torch.randn(6, 3, 2, 2, generator=g, dtype=torch.float64) * 2 + 3 for _ in range(2)]
    assert precise_bn(layer, iter(batches)) == 2
    stats = [moments(x[rows]) for x in batches for rows in chunk_rows(6, k)]
    _, var = true_average([s[0] for s in stats], [s[1] for s in stats])
    torch.testing.assert_close(layer.running_var, var, rtol=1e-10, atol=1e-12)
    assert torch.equal(layer.gpu_running_var, layer.running_var.repeat(k))


# ---------------------------------------------------------------- tiny CPU runs

@pytest.mark.parametrize("name", ["brn", "evonorm_b0"])
def test_variant_trains_a_tiny_cpu_run_with_precise_bn_on_its_first_training_images(name: str, tiny_data: Path, tmp_path: Path,
                                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Each epoch: 12 steps, then PreciseBN over 20 images = 2 global batches (the epoch's first two, same
    augmentation), then one evaluation batch; everything goes through loop.to_device, in that order."""
    from ablation.train import loop
    from ablation.train.trainer import train

    seen: list[torch.Tensor] = []
    real = loop.to_device

    def record(x, y, env, cfg):  # noqa: ANN001, ANN202
        out = real(x, y, env, cfg)
        seen.append(out[0].clone())
        return out

    monkeypatch.setattr(loop, "to_device", record)
    cfg = config.load(None, RUN + [f"data.root={tiny_data}", f"norm.name={name}", "norm.precise_bn_images=20"])
    final = train(cfg, tmp_path / "run")
    assert final["status"] == "ok" and final["steps"] == 24
    rows = rundir.read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert all(math.isfinite(r["train_loss"]) and 0 < r["train_loss"] < 10 for r in rows)
    assert len(seen) == 2 * (12 + 2 + 1)
    for e in range(2):
        epoch = seen[15 * e : 15 * e + 15]
        assert all(t.shape == (16, 3, 16, 16) for t in epoch[:14])
        assert torch.equal(epoch[12], epoch[0]) and torch.equal(epoch[13], epoch[1])
    assert not torch.equal(seen[0], seen[15])  # another epoch, other images
    state = torch.load(tmp_path / "run" / rundir.CHECKPOINT, weights_only=False)["model"]
    key = "running_std" if name == "brn" else "running_var"
    assert any(k.endswith(key) for k in state) and all(torch.isfinite(v).all() for v in state.values())


def test_brn_with_precise_bn_stopped_in_evaluation_resumes_bitwise(tiny_data: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop right after PreciseBN (in the evaluation) checkpoints precise mu, sigma; the resumed run must
    not recompute them from themselves, and ends bitwise equal to an uninterrupted run."""
    from ablation.train import loop
    from ablation.train.trainer import train

    cfg = config.load(None, RUN + [f"data.root={tiny_data}", "norm.name=brn", "norm.precise_bn_images=20", "log_steps=true"])
    assert train(cfg, tmp_path / "whole")["status"] == "ok"

    stop, real, calls = {"now": False}, loop.precise_bn, []

    def precise_then_stop(model, batches):  # noqa: ANN001, ANN202
        ran = real(model, batches)
        calls.append(ran)
        if len(calls) == 1:
            stop["now"] = True  # the evaluation's first poll stops the run
        return ran

    monkeypatch.setattr(loop, "precise_bn", precise_then_stop)
    assert train(cfg, tmp_path / "resumed", should_stop=lambda: stop["now"])["status"] == "interrupted"
    start = json.loads((tmp_path / "resumed" / "env.json").read_text())["starts"][-1]
    assert (start["stopped_at_step"], start["stopped_in"]) == (12, "eval")
    stop["now"] = False
    assert train(cfg, tmp_path / "resumed")["status"] == "ok"
    assert calls == [2, 0, 2]  # epoch 1; epoch 1 again after the resume: already precise, skipped; epoch 2
    from helpers import assert_same_run

    assert_same_run(tmp_path / "whole", tmp_path / "resumed")


# ---------------------------------------------------------------- 4 processes against one standing in for 4


# The stand-in equals 4 real processes for brn (both rules), evonorm_b0 and bn with PreciseBN on:
# tests/test_trainer.py::test_four_processes_equal_one_process_standing_in_for_four.
