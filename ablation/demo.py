"""`ablation demo`: the paper's effect, trained on this machine's CPU in minutes.

Synthetic data (cached) → the demo sweep through the local executor → the report (figure and
Table-2-style table beside the paper's numbers). Every number comes from training that just happened.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import ablation
from ablation import provenance
from ablation.data.synth import SynthSpec, spec_to_json, write_synth
from ablation.results import report
from ablation.results.collect import find_run_folders
from ablation.sweep import launch, local, status
from ablation.sweep import spec as sweepmod
from ablation.sweep.cluster import Profile

SWEEPS = Path(ablation.__file__).resolve().parents[1] / "sweeps"
# Shape is the class; foreground/background colour, position, size, brightness and contrast vary per
# image. Brightness and contrast shift a whole image's statistics: a BN batch of 2 images normalizes
# them away at training time, but the running statistics used at test time cannot. Shapes are kept
# easy enough that 8 epochs train every batch size (see benchmarks/demo_experiment.md).
_NUISANCE = dict(min_colour_distance=0.5, position=0.25, scale=(0.45, 0.75), rotation=0.0, noise=0.05, brightness=0.3, contrast=0.3)
DATA = SynthSpec(classes=10, train_per_class=800, val_per_class=200, size=32, **_NUISANCE)
QUICK_DATA = SynthSpec(classes=10, train_per_class=200, val_per_class=40, size=32, **_NUISANCE)


def fingerprint(quick: bool = False) -> str:
    """A hash of the demo's settings: its sweep file and its data spec (docs/demo.json records it beside made_with)."""
    sweep_text = (SWEEPS / ("demo_quick.yaml" if quick else "demo.yaml")).read_text()
    data = json.dumps(spec_to_json(QUICK_DATA if quick else DATA), sort_keys=True)
    return hashlib.sha256((sweep_text + data).encode()).hexdigest()[:16]


def code_version() -> str:
    """A hash of the package's source files (provenance.code_version)."""
    return provenance.code_version()


def _cpu_capability() -> str:
    """The vector instruction set torch's CPU kernels dispatch to (AVX512, AVX2, ...): it decides the last digits."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


# The libraries whose versions decide the demo's digits (the others only write the report).
NUMERIC_PACKAGES = ("torch", "torchvision", "timm", "numpy", "pillow")


def made_with() -> dict:
    """What decides the demo's digits besides its settings: the code, the libraries and the CPU's float kernels."""
    return {"code": code_version(), "cpu": provenance.cpu_model(), "cpu_capability": _cpu_capability(), "cores": os.cpu_count(),
            "packages": provenance.package_versions()}


def differences(published: dict, quick: bool = False) -> list[str]:
    """What differs between this machine and the published demo (docs/demo.json): settings, code, libraries, CPU kind."""
    here = made_with()
    theirs = published.get("made_with", {})
    out = []
    if published.get("fingerprint") != fingerprint(quick):
        out.append("the demo's settings")
    if theirs.get("code") != here["code"]:
        out.append("the code" + (f" ({here['code']}, published {theirs['code']})" if theirs.get("code") else " (not recorded with it)"))
    for name in NUMERIC_PACKAGES:
        mine, pub = here["packages"].get(name), theirs.get("packages", {}).get(name)
        if mine != pub:
            out.append(f"{name} {mine} (published {pub})")
    if theirs.get("cpu_capability") != here["cpu_capability"]:
        out.append(f"CPU kernels {here['cpu_capability']} (published {theirs.get('cpu_capability')})")
    return out


def _bn_vs_gn_at_2(sweep_dir: Path) -> str:
    """One line: BN against GN at 2 images per GPU on the same validation images (McNemar, one seed: `ablation compare`)."""
    from ablation.results import compare

    try:
        c = compare.compare("norm=bn batch_per_gpu=2", "norm=gn batch_per_gpu=2", results=sweep_dir)
    except compare.CompareError as e:
        return f"demo: BN vs GN at 2 images per GPU not compared: {e}"
    pair = c.pairs[0]
    return (f"demo: BN vs GN at 2 images per GPU, on the same {c.images.n:,} validation images: {pair.err_a:.2f} % vs {pair.err_b:.2f} % "
            f"error; {pair.b} images only BN gets right, {pair.c} only GN; McNemar p {compare.p_is(pair.p)} "
            f"(ablation compare \"norm=bn batch_per_gpu=2\" \"norm=gn batch_per_gpu=2\" --results {sweep_dir})")


def publish(rep_dir: Path, docs: Path, seconds: float, seed: int) -> None:
    """Copy the demo's figure and table into docs/ (the README shows them), with the settings' fingerprint and made_with."""
    from ablation.rundir import atomic_path, write_text

    for src, dst in (("fig_error_vs_batch.png", "demo_error_vs_batch.png"), ("table_batch_size.md", "demo_table.md")):
        with atomic_path(docs / dst) as tmp:  # the README never shows half a figure
            shutil.copyfile(rep_dir / src, tmp)
    meta = {"fingerprint": fingerprint(), "seed": seed, "wall_seconds": round(seconds), "made_at": time.strftime("%Y-%m-%d"),
            "made_with": made_with()}
    write_text(docs / "demo.json", json.dumps(meta, indent=2) + "\n")


PUBLISHED = SWEEPS.parent / "docs" / "demo.json"  # in a clone of the repository; an installed copy has none


def _compare_with_published(seed: int, quick: bool) -> str:
    """One line: whether this machine should give the published table's digits, and if not, why not."""
    if quick:
        return "demo: --quick is a smoke test: 3 epochs on 2,000 images train too little to show BN's rise; `ablation demo` shows it"
    if not PUBLISHED.is_file():
        return "demo: no published table here to compare with (docs/demo.json is in a clone of the repository)"
    published = json.loads(PUBLISHED.read_text())
    diff = differences(published) + ([f"seed {seed} (published {published.get('seed')})"] if seed != published.get("seed") else [])
    if not diff:
        return "demo: same settings, code, libraries and CPU kernels as the published table (docs/demo.md): the same digits are expected"
    return f"demo: this machine differs from the published table's (docs/demo.md) in {'; '.join(diff)}: expect the effect, not its digits"


def _mechanism(out: Path, seed: int, parallel: int, profile: Profile) -> list[Path]:
    """`--mechanism`: train sweeps/demo_mechanism.yaml on the full demo data and add table_mechanism and fig_mechanism
    to the demo's report folder (the demo's own figures and tables are left as they are); print the table and its time."""
    t0 = time.monotonic()
    data = out / "data"
    write_synth(data, DATA, progress=True)
    overrides = [f"data.root={data}", f"seed={seed}"]
    sweep = sweepmod.load(SWEEPS / "demo_mechanism.yaml", overrides)
    results = out / "results"
    todo = launch.to_submit(launch.plan(sweep, results, retry_failed=True))
    print(f"demo --mechanism: {len(sweep.runs)} runs ({len(sweep.runs) - len(todo)} already done), {parallel} at a time", flush=True)
    sweep_dir, _ = launch.launch_sweep(sweep, results, overrides, profile, todo, on_line=lambda line: print(line, flush=True))
    print(status.summary(status.sweep_states(sweep_dir)))
    rep_dir = out / "report"
    files = report.write_mechanism(find_run_folders([sweep_dir]), rep_dir)  # the sweep's runs, through its links
    table = rep_dir / "table_mechanism.md"
    print()
    print(table.read_text() if table.is_file() else "demo --mechanism: no run recorded its evaluation modes")
    print(f"demo --mechanism: {len(todo)} run(s) trained, table and figure made in {time.monotonic() - t0:.0f}s")
    return files


def run(out: str | Path, quick: bool = False, seed: int = 0, parallel: int = 2, docs: str | Path | None = None,
        mechanism: bool = False) -> Path:
    """Generate data, train the demo sweep, write the report (with the mechanism decomposition when asked); return the report folder."""
    out = Path(out)
    t0 = time.monotonic()
    spec = QUICK_DATA if quick else DATA
    data = out / ("data-quick" if quick else "data")
    if quick:
        print("demo: --quick is a smoke test of the whole path (data, 4 runs, report): no effect is expected", flush=True)
    local.start_local_server()  # torch's imports for the runs, on the other core while the data is written
    print(f"demo: data {data} ({spec.classes} classes, {spec.classes * spec.train_per_class} train / "
          f"{spec.classes * spec.val_per_class} val images, {spec.size}px)", flush=True)
    write_synth(data, spec, progress=True)
    overrides = [f"data.root={data}", f"seed={seed}"]
    sweep = sweepmod.load(SWEEPS / ("demo_quick.yaml" if quick else "demo.yaml"), overrides)
    results = out / "results"
    # Two runs at a time, one thread each: on a 2-core laptop this beats one run with two threads.
    profile = Profile(name="demo", executor="local", stand_in=True, processes_per_job=1, array_parallelism=parallel)
    todo = launch.to_submit(launch.plan(sweep, results, retry_failed=True))
    print(f"demo: {len(sweep.runs)} runs ({len(sweep.runs) - len(todo)} already done), {parallel} at a time", flush=True)
    sweep_dir, _ = launch.launch_sweep(sweep, results, overrides, profile, todo, on_line=lambda line: print(line, flush=True))
    states = status.sweep_states(sweep_dir)
    print(status.summary(states))
    rep_dir = out / "report"
    rep = report.build([sweep_dir], rep_dir, ["bn", "gn"])
    print()
    print(rep.main_table())
    print(_bn_vs_gn_at_2(sweep_dir))
    seconds = time.monotonic() - t0
    print(f"demo: figures {rep_dir / 'fig_error_vs_batch.png'} (Figure 1), {rep_dir / 'fig_val_error_vs_epoch.png'} (Figure 5), "
          f"table {rep_dir / 'table_batch_size.md'} ({seconds:.0f}s)")
    if mechanism:
        _mechanism(out, seed, parallel, profile)
        print(f"demo --mechanism: figure {rep_dir / 'fig_mechanism.png'}, table {rep_dir / 'table_mechanism.md'} "
              f"({time.monotonic() - t0:.0f}s in all)")
    print(_compare_with_published(seed, quick))
    if docs and not quick:
        publish(rep_dir, Path(docs), seconds, seed)
        print(f"demo: published the figure and table to {docs}")
    print(f"next: ablation status {sweep_dir}    # the sweep's runs and their states")
    print(f"      ablation report {sweep_dir} --out {out / 'report-again'}    # the report again, elsewhere")
    return rep_dir
