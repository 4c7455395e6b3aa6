"""compile=<backend>: no graph breaks, no recompiles across train -> eval -> train, results as eager."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import RUN, TINY, ablation, ablation_ok, run_folder

from ablation import config, rundir
from ablation.train.models import create_model

NORMS = [["norm.name=bn"], ["norm.name=gn", "norm.groups=4"], ["norm.name=bn", "norm.running_stats=mean"]]
# Every other registry norm, with weight standardization on one: the graph-break test only (the recompile test
# compiles the backward too, which the first two cover).
VARIANTS = [
    ["norm.name=brn"], ["norm.name=brn", "norm.renorm_warmup_steps=10"], ["norm.name=evonorm_b0"],
    ["norm.name=evonorm_s0", "norm.groups=4"], ["norm.name=frn"], ["norm.name=gn", "norm.groups=4", "model.weight_std=true"],
    ["norm.name=ln"], ["norm.name=in"], ["norm.name=syncbn"],
]


def tiny_model(extra: list[str]) -> torch.nn.Module:
    """The tiny test ResNet standing in for 4 GPUs (per-GPU BN chunks included)."""
    cfg = config.load(None, TINY + ["gpus=4", "batch_per_gpu=4", *extra])
    torch.manual_seed(0)
    return create_model(cfg, 4, gpus_per_process=4)


@pytest.mark.parametrize("extra", NORMS + VARIANTS, ids=lambda e: "-".join(x.split("=")[1] for x in e))
def test_the_model_compiles_without_graph_breaks(extra: list[str]) -> None:
    model = tiny_model(extra)
    x = torch.randn(16, 3, 16, 16)
    for train in (True, False):
        model.train(train)
        explained = torch._dynamo.explain(model)(x)
        assert explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.parametrize("extra", NORMS[:2], ids=["bn", "gn"])
def test_no_recompiles_across_train_eval_train(extra: list[str]) -> None:
    torch._dynamo.reset()
    model = tiny_model(extra)
    compiled = torch.compile(model, backend="eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 4, (16,))

    def epoch() -> None:
        compiled.train()
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(compiled(x), y).backward()
            opt.step()
        compiled.eval()
        with torch.no_grad():
            compiled(x)
            compiled(x[:5])  # the smaller last evaluation batch

    epoch()
    epoch()  # the first epoch compiles train, eval and a dynamic batch size; the second must reuse them
    with torch.compiler.set_stance("fail_on_recompile"):
        epoch()


def test_an_unknown_backend_is_a_one_line_error(tiny_data: Path, tmp_path: Path, cli_env: dict[str, str]) -> None:
    proc = ablation(["train", *RUN, "compile=nope", f"data.root={tiny_data}", "--results", str(tmp_path)], cli_env)
    assert proc.returncode == 2 and proc.stderr.startswith("error: compile: unknown torch.compile backend 'nope'; valid: off, ")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_compiled_run_matches_eager_within_float_tolerance(tiny_data: Path, tmp_path: Path, cli_env: dict[str, str]) -> None:
    args = ["train", *RUN, f"data.root={tiny_data}", "log_steps=true"]
    eager = run_folder(ablation_ok([*args, "--results", str(tmp_path / "eager")], cli_env))
    compiled = run_folder(ablation_ok([*args, "compile=inductor", "--results", str(tmp_path / "compiled")], cli_env))
    assert eager.name == compiled.name  # compile is not part of the run id
    a, b = (torch.tensor([r["loss"] for r in rundir.read_jsonl(f / "steps.jsonl")]) for f in (eager, compiled))
    assert len(a) == len(b) == 24
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    wa, wb = (torch.load(f / "checkpoint.pt", weights_only=True)["model"] for f in (eager, compiled))
    for k in wa:
        torch.testing.assert_close(wb[k].float(), wa[k].float(), rtol=1e-3, atol=1e-4, msg=k)
    ea, eb = (json.loads((f / "final.json").read_text())["val_err1"] for f in (eager, compiled))
    assert abs(ea - eb) <= 100 / 32  # at most one of 32 val images flips
    assert statistics.fmean(a.tolist()) == pytest.approx(statistics.fmean(b.tolist()), rel=1e-4)


def test_compile_off_is_read_as_the_word_not_a_yaml_boolean() -> None:
    assert config.load(None, ["compile=off"]).compile == "off"  # YAML 1.1 would make it False
    assert config.load(None, ["compile=aot_eager"]).compile == "aot_eager"
