"""`ablation report` over many run folders: wall time, with where it goes.

Generates N synthetic run folders (default 10,000) as the trainer writes them (config.yaml, config.json,
env.json, metrics.jsonl of 100 epochs and its metrics.npy, final.json) under <workdir>/results/runs/, and sweep folders under
<workdir>/results/<sweep>/ linking to them (each run in one sweep, a tenth in two); then times
`report.build` over <workdir>/results, split into phases (find, read, frames, csv, tables, figures):
cold (a fresh output folder: no collect index, every output made), then warm (the same folder again,
nothing changed: the index and the outputs already there are used), then after --changed runs gained an
epoch (their metrics.jsonl rewritten with one more row; put back after). Prints the figures and appends one
JSON record (figures plus the machine they ran on) to benchmarks/results/report_speed.jsonl. Run:

    python benchmarks/report_speed.py [--runs 10000] [--epochs 100] [--workdir DIR] [--repeats 1] [--profile]
    python benchmarks/report_speed.py --tiny --out FILE   # seconds: a smoke test

The folders are generated once per workdir (default: a folder under the system's temp dir, kept for
the next run; --fresh regenerates). The aggregator never imports torch: neither does this script.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import inspect
import io
import json
import math
import os
import pstats
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import yaml
from common import append, machine, results_file, stamp

from ablation import config, rundir
from ablation.results import report

OUT = results_file("report_speed")
SPEC_VERSION = 3  # bump when the generated folders change, so an old workdir is regenerated

# (overrides, the error the run converges to): the paper's Table 1-3 settings at five batch sizes.
NORMS = [
    (["norm.name=bn"], {32: 23.6, 16: 23.7, 8: 24.8, 4: 27.3, 2: 34.7}),
    (["norm.name=gn"], {32: 24.1, 16: 24.2, 8: 24.0, 4: 24.2, 2: 24.1}),
    (["norm.name=ln"], {b: 25.3 for b in (32, 16, 8, 4, 2)}),
    (["norm.name=in"], {b: 28.4 for b in (32, 16, 8, 4, 2)}),
    (["norm.name=gn", "norm.groups=16"], {b: 24.6 for b in (32, 16, 8, 4, 2)}),
    (["norm.name=gn", "norm.channels_per_group=16"], {b: 24.2 for b in (32, 16, 8, 4, 2)}),
]
BATCHES = (32, 16, 8, 4, 2)
SWEEPS = 10


def _dumper() -> type:
    return getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def generate(results: Path, runs: int, epochs: int, seed: int = 0) -> None:
    """Write `runs` run folders under results/runs and SWEEPS sweep folders linking to them."""
    rng = random.Random(seed)
    root = results / "runs"
    root.mkdir(parents=True)
    base = {}
    for norm, _ in NORMS:
        for b in BATCHES:
            cfg = config.load(None, [*norm, f"batch_per_gpu={b}", f"epochs={epochs}"])
            base[(tuple(norm), b)] = cfg
    combos = list(base)
    sweep_runs: list[list[str]] = [[] for _ in range(SWEEPS)]
    for i in range(runs):
        key = combos[i % len(combos)]
        target = next(t for n, t in NORMS if tuple(n) == key[0])[key[1]]
        cfg = dataclasses.replace(base[key], seed=i // len(combos))
        rid = config.run_id(cfg)
        folder = root / rid
        folder.mkdir()
        d = config.derive(cfg)
        doc = {"run_id": rid, "config_hash": config.config_hash(cfg), **config.to_dict(cfg), "derived": dataclasses.asdict(d)}
        (folder / "config.yaml").write_text(yaml.dump(doc, Dumper=_dumper(), sort_keys=False))
        (folder / "config.json").write_text(json.dumps(doc, indent=2) + "\n")
        env = {"processes": 8, "cpu_threads": 10, "host": "node01", "starts": [{"resumed_from_step": 0, "processes": 8}]}
        (folder / "env.json").write_text(json.dumps(env, indent=2))
        r = rng.random()
        status = "ok" if r < 0.9 else "diverged" if r < 0.93 else "failed" if r < 0.96 else None
        done = epochs if status == "ok" else rng.randint(1, epochs - 1)
        end = target + rng.gauss(0, 0.2)
        val = [end + 70 * math.exp(-e / (epochs / 6)) + rng.gauss(0, 0.1) for e in range(done)]
        if status == "diverged":
            val[-1] = float("nan")
        rows = [
            {"epoch": e + 1, "lr": 0.1 * 0.1 ** (e * 10 // (3 * epochs)), "train_loss": v / 20, "train_err1": v + 2.0, "val_err1": v,
             "val_err5": v / 3,
             "images_per_s": 3200.0 + rng.random(), "epoch_seconds": 400.0 + rng.random(), "wall_seconds": 400.0 * (e + 1)}
            for e, v in enumerate(val)
        ]
        rundir.write_metrics(folder, rows, durable=False)  # metrics.jsonl and its twin metrics.npy, as the trainer writes them
        if status:
            med = sorted(val[-5:])[len(val[-5:]) // 2]
            reason = None if status == "ok" else ("loss is nan" if status == "diverged" else "RuntimeError: out of memory")
            final = {"status": status, "reason": reason,
                     "run_id": rid, "val_err1": med if status == "ok" else None, "val_err5": med / 3 if status == "ok" else None,
                     "best_val_err1": min(val), "epochs_done": done, "epochs": epochs, "gpu_hours": 88.9, "wall_seconds": 40000.0}
            (folder / "final.json").write_text(json.dumps(final, indent=2) + "\n")
        sweep_runs[i % SWEEPS].append(rid)
        if i % 10 == 0:
            sweep_runs[(i + 1) % SWEEPS].append(rid)
    for s, ids in enumerate(sweep_runs):
        sweep_dir = results / f"sweep{s:02d}"
        (sweep_dir / "runs").mkdir(parents=True)
        for rid in ids:
            (sweep_dir / "runs" / rid).symlink_to(Path("..") / ".." / "runs" / rid)
        (sweep_dir / "manifest.json").write_text(json.dumps({"name": sweep_dir.name, "runs": [{"run_id": r} for r in ids]}))


def workdir_for(args: argparse.Namespace) -> Path:
    """The folder with the generated results (made when missing or stale)."""
    work = Path(args.workdir) if args.workdir else Path(tempfile.gettempdir()) / f"ablation-report-bench-{args.runs}x{args.epochs}"
    stamp = work / "generated.json"
    want = {"version": SPEC_VERSION, "runs": args.runs, "epochs": args.epochs}
    if args.fresh or not stamp.is_file() or json.loads(stamp.read_text()) != want:
        if work.exists():
            shutil.rmtree(work)
        t = time.perf_counter()
        generate(work / "results", args.runs, args.epochs)
        stamp.write_text(json.dumps(want))
        print(f"generated {args.runs} run folders in {work} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return work


def timed_old_build(results: Path, out: Path, timings: dict[str, float]) -> report.Report:
    """report.build of a version without `timings`: the same phases, from its functions wrapped here."""
    from ablation.results import collect

    spent: dict[str, float] = {}

    def wrap(module: object, name: str, phase: str) -> None:
        fn = getattr(module, name)

        def timed(*a: object, **kw: object) -> object:
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[phase] = spent.get(phase, 0.0) + time.perf_counter() - t

        setattr(module, name, timed)

    wrap(collect, "find_run_folders", "find")
    wrap(collect, "read_run", "read")
    wrap(report, "collect", "collect")
    for name in ("batch_size_table", "norm_table", "group_tables", "load_reference"):
        wrap(report, name, "tables")
    for name in ("figure_error_vs_batch", "figure_curves", "figure_delta"):
        wrap(report, name, "figures")
    t = time.perf_counter()
    rep = report.build([results], out, ["bn", "gn"])
    total = time.perf_counter() - t
    timings["find"] = spent["find"]
    timings["read"] = spent["read"]
    timings["frames"] = spent["collect"] - spent["find"] - spent["read"]
    # what is left: the CSVs and the tables' files (their writing is not a function of its own)
    timings["csv"] = total - spent["collect"] - spent["tables"] - spent["figures"]
    timings["tables"] = spent["tables"]
    timings["figures"] = spent["figures"]
    return rep


@contextlib.contextmanager
def runs_gain_an_epoch(results: Path, n: int) -> Iterator[None]:
    """n run folders (spread over the sorted list) whose metrics (metrics.jsonl and .npy) have one more row meanwhile; put back after."""
    folders = sorted((results / "runs").iterdir())
    picked = folders[:: max(1, len(folders) // n)][:n]
    old = {f: rundir.read_jsonl(f / rundir.METRICS) for f in picked}
    try:
        for f, rows in old.items():
            rundir.write_metrics(f, [*rows, {**rows[-1], "epoch": rows[-1]["epoch"] + 1}], durable=False)
        yield
    finally:
        for f, rows in old.items():
            rundir.write_metrics(f, rows, durable=False)


def drop_page_cache_hint() -> str:
    """Whether the file reads are warm: the generator just wrote them, or an earlier run read them."""
    return "warm (files in the page cache)"


def main() -> None:
    """Generate (once), time the report, print, record a JSON line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=10_000)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--workdir", help="where the generated results live (default: a kept folder in the temp dir)")
    p.add_argument("--fresh", action="store_true", help="regenerate the folders")
    p.add_argument("--repeats", type=int, default=1, help="time the report this many times; the median is recorded")
    p.add_argument("--profile", action="store_true", help="print the 25 most expensive functions (cumulative) of the last repeat")
    p.add_argument("--changed", type=int, default=5, help="runs that gain an epoch before a third report into the same folder (0: none)")
    p.add_argument("--note", default="", help="free text stored with the record (e.g. 'shared machine')")
    p.add_argument("--no-record", action="store_true", help="print only; append nothing to the results file")
    p.add_argument("--tiny", action="store_true", help="40 runs of 5 epochs in a temporary folder (unless --workdir), one repeat, "
                   "2 changed: a smoke test that keeps this script working")
    p.add_argument("--out", type=Path, default=OUT, help=f"JSON-lines record (default {OUT})")
    args = p.parse_args()
    if args.tiny:
        args.runs, args.epochs, args.repeats, args.changed = 40, 5, 1, min(args.changed, 2)
        if not args.workdir:
            with tempfile.TemporaryDirectory() as tmp:
                args.workdir = tmp
                bench(args)
            return
    bench(args)


def bench(args: argparse.Namespace) -> None:
    """Time the report over the generated folders of args.workdir (made when missing), print, record."""
    work = workdir_for(args)
    results = work / "results"
    walls, cpus, phases, warms, warm_phases, partials, partial_phases = [], [], [], [], [], [], []
    for i in range(args.repeats):
        out = work / "report"
        if out.exists():
            shutil.rmtree(out)
        timings: dict[str, float] = {}
        prof = cProfile.Profile() if args.profile and i == args.repeats - 1 else None
        t, c = time.perf_counter(), os.times()
        if prof:
            prof.enable()
        if "timings" in inspect.signature(report.build).parameters:
            rep = report.build([results], out, ["bn", "gn"], timings=timings)
        else:  # an older report.build (before it took timings): its functions timed from outside
            rep = timed_old_build(results, out, timings)
        if prof:
            prof.disable()
        walls.append(time.perf_counter() - t)
        c2 = os.times()
        cpus.append(c2.user + c2.system + c2.children_user + c2.children_system - (c.user + c.system + c.children_user + c.children_system))
        phases.append(timings)
        print(f"repeat {i + 1}: {walls[-1]:.2f} s (CPU {cpus[-1]:.2f} s, workers included)  "
              + "  ".join(f"{k} {v:.2f}" for k, v in timings.items()))
        if "timings" in inspect.signature(report.build).parameters:  # again into the same folder, nothing changed
            warm: dict[str, float] = {}
            t = time.perf_counter()
            report.build([results], out, ["bn", "gn"], timings=warm)
            warms.append(time.perf_counter() - t)
            warm_phases.append(warm)
            print(f"  warm: {warms[-1]:.2f} s  " + "  ".join(f"{k} {v:.2f}" for k, v in warm.items()))
            if args.changed:
                partial: dict[str, float] = {}
                with runs_gain_an_epoch(results, args.changed):
                    t = time.perf_counter()
                    report.build([results], out, ["bn", "gn"], timings=partial)
                    partials.append(time.perf_counter() - t)
                partial_phases.append(partial)
                print(f"  {args.changed} runs changed: {partials[-1]:.2f} s  " + "  ".join(f"{k} {v:.2f}" for k, v in partial.items()))
        if prof:
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(25)
            print(s.getvalue())
    k = sorted(range(len(walls)), key=walls.__getitem__)[len(walls) // 2]
    n_runs, n_curves = len(rep.runs), len(rep.curves)
    print(f"report over {n_runs} runs ({n_curves} epoch rows, roots: {results}): cold {walls[k]:.2f} s (median of {len(walls)}), "
          f"CPU {cpus[k]:.2f} s")
    for name, sec in phases[k].items():
        print(f"  {name:8s} {sec:6.2f} s")
    w = sorted(range(len(warms)), key=warms.__getitem__)[len(warms) // 2] if warms else None
    if w is not None:
        print(f"warm (same output folder, nothing changed): {warms[w]:.2f} s (median of {len(warms)})")
        for name, sec in warm_phases[w].items():
            print(f"  {name:8s} {sec:6.2f} s")
    c = sorted(range(len(partials)), key=partials.__getitem__)[len(partials) // 2] if partials else None
    if c is not None:
        print(f"after {args.changed} runs gained an epoch (same output folder): {partials[c]:.2f} s (median of {len(partials)})")
        for name, sec in partial_phases[c].items():
            print(f"  {name:8s} {sec:6.2f} s")
    if args.no_record:
        return
    import pandas

    record = {
        "time": stamp(),
        "machine": machine(pandas=pandas.__version__, libyaml=bool(getattr(yaml, "__with_libyaml__", False))),
        "tiny": args.tiny,
        "note": args.note,
        "runs": args.runs,
        "epochs": args.epochs,
        "folders_walked": args.runs + sum(1 for _ in (results).glob("sweep*/runs/*")),
        "cache": drop_page_cache_hint(),
        "seconds": walls[k],
        "cpu_seconds": cpus[k],  # user + system, this process and its workers: steadier than wall time on a shared machine
        "all_seconds": walls,
        "phases": phases[k],
        "warm_seconds": warms[w] if w is not None else None,  # the same output folder again, nothing changed
        "all_warm_seconds": warms,
        "warm_phases": warm_phases[w] if w is not None else None,
        "changed_runs": args.changed,
        "changed_seconds": partials[c] if c is not None else None,  # the same folder again after that many runs gained an epoch
        "changed_phases": partial_phases[c] if c is not None else None,
        "runs_rows": n_runs,
        "curve_rows": n_curves,
    }
    append(args.out, [record])
    print(f"recorded in {args.out}")


if __name__ == "__main__":
    main()
