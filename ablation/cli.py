"""The `ablation` command line. Heavy modules (torch) are imported only by the commands that need them."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ablation.errors import EXIT_DIVERGED, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, exit_status, one_line  # noqa: F401

DEFAULT_RUNS = "results/runs"


def _split_config_args(items: list[str]) -> tuple[str | None, list[str]]:
    """(config file or None, key=value overrides) from positional arguments."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def _load(args: argparse.Namespace):
    """The run config named by the command's positional arguments."""
    from ablation import config

    path, overrides = _split_config_args(args.items)
    return config.load(path, overrides)


def cmd_train(args: argparse.Namespace) -> int:
    """Train one run into <results>/<run_id>/ (resuming or skipping as its folder says)."""
    cfg = _load(args)
    from ablation.train.trainer import train_command

    return train_command(cfg, args.results)


def cmd_config(args: argparse.Namespace) -> int:
    """Print the resolved config, its run id and derived values (for ImageNet unless --train-images)."""
    import dataclasses

    import yaml

    from ablation import config

    if args.list:
        for key, help_, default in config.field_help():
            print(f"{key:34s} {default!r:28s} {help_}")
        return EXIT_OK
    cfg = _load(args)
    _check_models([cfg])  # G against every layer's channels, as a sweep checks it: a config that cannot build is an error
    doc = {"run_id": config.run_id(cfg), **config.to_dict(cfg), "derived": dataclasses.asdict(config.derive(cfg, args.train_images))}
    print(yaml.safe_dump(doc, sort_keys=False), end="")
    return EXIT_OK


def cmd_data_synth(args: argparse.Namespace) -> int:
    """Write a deterministic synthetic ImageFolder dataset of JPEG files."""
    from ablation.data.synth import SynthSpec, write_synth

    spec = SynthSpec(classes=args.classes, train_per_class=args.train_per_class, val_per_class=args.val_per_class,
                     size=args.size, seed=args.seed)
    wrote = write_synth(args.root, spec, progress=sys.stderr.isatty())
    print(f"{'wrote' if wrote else 'already there (cached):'} {args.root}")
    return EXIT_OK


def cmd_data_check(args: argparse.Namespace) -> int:
    """Check a dataset folder: an ImageFolder tree's layout and summary; an ImageNet source: what it is and what to run."""
    from ablation.data.archives import archive_kind
    from ablation.data.layout import scan_layout
    from ablation.data.prepare import describe

    if archive_kind(args.root):  # a folder of archives read in place (the official downloads or tar shards)
        info = scan_layout(args.root, lambda line: print(line, file=sys.stderr)).info
        print(f"{info.root} ({info.layout}, read in place): {len(info.classes)} classes, {info.train_images} train / "
              f"{info.val_images} val images, fingerprint {info.fingerprint}")
        return EXIT_OK
    print(describe(args.root))
    return EXIT_OK


def cmd_data_prepare(args: argparse.Namespace) -> int:
    """Write the ImageFolder tree the harness reads from an ImageNet download (official archives, Kaggle, Hugging Face)."""
    from ablation.data import prepare

    subset = prepare.Subset(args.classes, args.per_class, args.val_per_class)
    opts = prepare.Options(verify=not args.no_verify, subset=subset, workers=args.workers, progress=sys.stderr.isatty(), fmt=args.format)
    doc = prepare.prepare(args.src, args.out, opts)
    print(prepare.summary_line(args.out, doc))
    return EXIT_OK


def cmd_data_index(args: argparse.Namespace) -> int:
    """Index an archive folder's member offsets once, so that runs read the images in place."""
    from ablation.data import archives
    from ablation.data.layout import scan_archives

    path, _ = archives.write_index(args.root, args.cache)
    info = scan_archives(archives.load_index(args.root, path)).info  # checks it as a run would read it
    print(f"indexed {info.root} ({info.layout}): {len(info.classes)} classes, {info.train_images} train / {info.val_images} val "
          f"images, fingerprint {info.fingerprint}: {path}")
    if args.cache is not None and Path(args.cache).expanduser().resolve() != archives.default_cache().resolve():
        print(f"runs look for it in {archives.default_cache()}: set ABLATION_INDEX_CACHE={args.cache} where they run")
    return EXIT_OK


def cmd_data_shard(args: argparse.Namespace) -> int:
    """Write the tar shards of an ImageFolder tree, indexed, to read in place."""
    from ablation.data.shards import write_shards

    progress = (lambda line: print(line, file=sys.stderr)) if sys.stderr.isatty() else None
    paths = write_shards(args.tree, args.out, int(args.shard_mb * 2**20), progress=progress)
    print(f"wrote {len(paths)} shard(s) and their index to {args.out}; train on it with data.root={args.out}")
    return EXIT_OK


def cmd_data_bench(args: argparse.Namespace) -> int:
    """Time the training data pipelines on a dataset: every CPU second per image (loader and training process), the
    device's time beside it, the cores that feed the GPUs, and which data.pipeline does it."""
    import dataclasses

    from ablation import config
    from ablation.data import bench as databench

    if args.images < 1:
        from ablation.errors import ConfigError

        raise ConfigError(f"--images must be at least 1, got {args.images}")
    cfg = _load(args)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=args.root))
    d = config.derive(cfg, train_images=config.IMAGENET_TRAIN_IMAGES)
    result = databench.run(args.root, dataclasses.replace(cfg.data, eval_resize=d.eval_resize), args.images, cfg.seed, device=cfg.device)
    per_gpu = args.gpu_images_per_s or databench.GPU_IMAGES_PER_S
    for line in databench.report(result, cfg.data.pipeline, cfg.data.image_size, cfg.gpus, per_gpu):
        print(line)
    return EXIT_OK


DEFAULT_RESULTS = "results"


def cmd_selftest(args: argparse.Namespace) -> int:
    """Check every CUDA path of the harness on this node (or --device cpu: on the CPU, tiny): a table and selftest.json."""
    from ablation.errors import ConfigError
    from ablation.selftest import records
    from ablation.sweep import estimates

    try:
        batches = tuple(int(b) for b in args.batches.split(",") if b.strip())
    except ValueError:
        batches = ()
    if not batches or min(batches) < 1:
        raise ConfigError(f"--batches must be positive images per GPU separated by commas, e.g. 32,16,8,4,2; got {args.batches!r}")
    if args.gpus is not None and args.gpus < 1:
        raise ConfigError(f"--gpus must be at least 1, got {args.gpus}")
    if args.submit and not args.profile:
        raise ConfigError("--submit needs --profile slurm/profiles/<cluster>.yaml: the self-test runs as one job on the sweep's nodes")
    profile = None
    if args.profile:
        from ablation.sweep.cluster import load_profile

        profile = load_profile(args.profile)
    device = args.device or ("cuda" if profile is not None and profile.gpus_per_node else "cpu" if profile is not None else None)
    if device is None:
        from ablation.selftest import cuda

        device = "cuda" if cuda.available() else "cpu"
    cpus = args.cpus_per_task or (profile.cpus_per_task if profile is not None else 8 if device == "cuda" else 1)
    gpus = args.gpus if args.gpus is not None else (profile.gpus_per_node or None if profile is not None else None)
    out = Path(args.out) if args.out else records.default_out(args.results, profile.name if args.submit and profile else None)
    gpu_records = Path(args.gpu_records) if args.gpu_records else None
    if gpu_records is None and device == "cuda":  # where --dry-run estimates read them; a CPU's tiny figures estimate nothing
        gpu_records = estimates.gpu_records_path() or estimates.GPU_RECORDS
    options = {"device": device, "gpus": gpus, "batches": batches, "cpus_per_task": cpus, "data": args.data,
               "compile_backend": args.compile_backend}
    if args.submit:
        from ablation.selftest import submit

        job = submit.submit(profile, options, out.resolve(), gpu_records.resolve() if gpu_records else None)
        print(f"submitted self-test job {job} with profile {profile.name}: its table goes to {out / 'slurm'}/{job}_0_log.out, "
              f"its record to {out / records.SELFTEST_JSON}")
        return EXIT_OK
    from ablation.selftest import run

    doc = run.run(run.settings(**options), out, gpu_records)
    return EXIT_OK if doc["passed"] else EXIT_FAILED


def _profile(args: argparse.Namespace):
    """(profile, where it comes from): --profile, else the default profile ($ABLATION_PROFILE, the user config file), else
    the built-in local profile: one process standing in for all GPUs."""
    from ablation.sweep.cluster import Profile, default_profile, load_profile

    path, source = (args.profile, "--profile") if args.profile else default_profile()
    if path:
        return load_profile(path, args.executor), f"{path}, from {source}"
    if args.executor == "slurm":
        from ablation.errors import ConfigError

        raise ConfigError("--executor slurm needs --profile slurm/profiles/<cluster>.yaml (partition, GPUs per node, time limit)")
    return Profile(name="default", executor=args.executor or "local", stand_in=True, processes_per_job=1, array_parallelism=1), None


def _refuse_training_here(sweep, args: argparse.Namespace, profile_file: str | None) -> None:
    """A sweep of the paper's networks at its image size (days of GPU time a run) is not trained on this machine by
    default: it needs a profile (a cluster) or --executor local said out loud (a GPU node the user is on)."""
    if profile_file or args.executor:
        return
    from ablation.results.recipe import paper_recipe  # the paper's networks and image size, held once (yaml only)

    models, size = paper_recipe()["models"], paper_recipe()["fields"]["data.image_size"]
    big = [r for r in sweep.runs if r.config.model.name in models and r.config.data.image_size >= size]
    if big:
        from ablation.errors import ConfigError

        c = big[0].config
        raise ConfigError(
            f"sweep {sweep.name}: {len(big)} run(s) of {c.model.name} at {c.data.image_size} px would train on this machine, one after "
            "another: pass --profile slurm/profiles/<cluster>.yaml to submit them to a cluster, or --executor local to train them here"
        )


def cmd_sweep(args: argparse.Namespace) -> int:
    """Expand a sweep; with --dry-run show what would run, else submit what is not done."""
    if args.list:
        return _list_presets()
    if not args.spec:
        args.parser.error("the following arguments are required: spec")  # optional only beside --list
    from ablation import sweepdir
    from ablation.sweep import estimates, launch, slurmjobs, status
    from ablation.sweep import spec as sweepmod
    from ablation.sweep.cluster import check_run_fits

    sweep = sweepmod.load(args.spec, args.overrides)
    profile, profile_file = _profile(args)
    results = Path(args.results)
    sweepdir.require_sweep_folder(results / sweep.name)
    for run in sweep.runs:
        check_run_fits(profile, run.config, run.run_id)
    _check_models([r.config for r in sweep.runs])
    _refuse_training_here(sweep, args, profile_file)
    from ablation.train.tracking import require

    for tracking in sorted({r.config.tracking for r in sweep.runs}):
        require(tracking)  # tracking=wandb without wandb: one line here, not a failure in every job
    from ablation.train.models import checkpoint_bytes

    warning = estimates.signal_delay_warning(profile, [r.config for r in sweep.runs], sweepdir.runs_root(results), checkpoint_bytes)
    if warning:
        print(warning, file=sys.stderr)
    roots = sorted({r.config.data.root for r in sweep.runs})
    if not args.no_data_check:  # a dry run checks what a submission checks
        _check_data([r.config for r in sweep.runs])
    planned = launch.plan(sweep, results, args.retry_failed)
    todo = launch.to_submit(planned)
    cfg_of = {r.run_id: r.config for r in sweep.runs}
    hours, source = estimates.estimate_hours([cfg_of[r] for r in todo], profile, sweepdir.runs_root(results))
    unit = "GPU-hours" if profile.gpus_per_node else "device-hours (CPU)"
    est = f"~{hours:.1f} {unit} ({source})" if hours is not None else f"{unit}: unknown ({source})"
    if hours is not None and profile.throughput_illustrative and "profile " in source:
        est = f"~{hours:.1f} {unit} from ILLUSTRATIVE throughputs (set your GPUs' in {profile.name}'s throughput_images_per_s) ({source})"
    first = cfg_of[todo[0]] if todo else sweep.runs[0].config
    print(f"sweep {sweep.name}: {sweep.description}" if sweep.description else f"sweep {sweep.name}")
    print(status.format_table([s for s, _ in planned], list(sweep.axes)))
    data = "skipped (--no-data-check)" if args.no_data_check else f"{', '.join(roots)} has train/ and val/"
    print(f"checked: profile {profile.name} ({profile_file or 'built-in: this machine, one process per run'}); "
          f"norms and G on every layer; data: {data}")
    print(
        f"{len(sweep.runs)} runs: {len(todo)} to submit, {len(sweep.runs) - len(todo)} done or in flight; "
        f"{len(todo)} jobs on {profile.executor} ({profile.name}), {launch.describe_profile(profile, first)}; {est}"
    )
    if args.print_sbatch:
        print(slurmjobs.sbatch_script(results / sweep.name, profile, first, sweep.name))
    if args.dry_run or not todo:
        if not todo:
            print("nothing to submit")
        return EXIT_OK
    from ablation.selftest import records

    where = profile_file.split(", from ")[0] if profile_file else profile.name  # the profile's file, as --profile takes it
    untested = records.sweep_warning(profile.gpus_per_node, profile.gpu, where, results)
    if untested:
        print(untested, file=sys.stderr)
    sweep_dir, failed = launch.launch_sweep(sweep, results, args.overrides, profile, todo)
    if profile.executor == "slurm":
        print(f"follow with: ablation status {sweep_dir}")
    else:
        print(status.summary(status.sweep_states(sweep_dir)))
    return EXIT_FAILED if failed else EXIT_OK


def _list_presets() -> int:
    """Print the sweep presets and cluster profiles found here (./sweeps, ./slurm/profiles) and beside the package."""
    from ablation.config import ConfigError, load_yaml
    from ablation.sweep.cluster import default_profile, user_config_path

    here = Path.cwd()
    repo = Path(__file__).resolve().parents[1]
    for title, folder, pattern in (("sweep presets", "sweeps", "**/*.yaml"), ("cluster profiles", "slurm/profiles", "*.yaml")):
        files: dict[Path, Path] = {}
        for base in dict.fromkeys([here, repo]):
            for f in sorted((base / folder).glob(pattern)):
                files.setdefault(f.resolve(), f)
        print(f"{title}:")
        if not files:
            print(f"  (none under ./{folder})")
        for f in files.values():
            try:
                doc = load_yaml(f)
            except ConfigError as e:
                doc, what = None, f"unreadable: {e}"
            if doc is None:
                pass
            elif not title.startswith("sweep"):
                what = f"executor {doc.get('executor', 'local')}, {doc.get('gpus_per_node', 0)} GPU(s) per node"
            elif "name" in doc and {"grid", "zip", "blocks"} & set(doc):
                what = str(doc.get("description") or "")
            else:
                continue  # a run config beside the presets (ablation train FILE), not a sweep
            shown = f.relative_to(here) if f.is_relative_to(here) else f
            print(f"  {str(shown):44s} {what}")
    path, source = default_profile()
    print(f"default profile: {path} (from {source})" if path else
          "default profile: built-in (this machine, one process per run); set $ABLATION_PROFILE or 'profile:' in "
          f"{user_config_path()} to change it")
    return EXIT_OK


def _check_data(cfgs: list) -> None:
    """Each distinct data.root has train/ and val/ here, so a typo fails before any job is queued."""
    from ablation.data.layout import check_splits
    from ablation.errors import DataError

    for root in sorted({c.data.root for c in cfgs}):
        try:
            check_splits(root)
        except DataError as e:
            raise DataError(f"{e} (if the data exists only on the compute nodes, pass --no-data-check)") from None


def _check_models(cfgs: list) -> None:
    """Build each distinct model/norm on the meta device: G not dividing C fails before submission."""
    from ablation.train.models import check_model_norm

    seen = set()
    for cfg in cfgs:
        key = repr((cfg.model, cfg.norm))
        if key not in seen:
            seen.add(key)
            check_model_norm(cfg)


def cmd_status(args: argparse.Namespace) -> int:
    """Show each run of a sweep folder: state, epoch, error, job; totals and a rough ETA (a results root: its sweeps)."""
    import json

    from ablation import sweepdir
    from ablation.sweep import status

    sweep_dir = Path(args.sweep_dir)
    if sweep_dir.is_dir() and not sweepdir.is_sweep_folder(sweep_dir) and status.sweep_folders(sweep_dir):
        return _status_of_root(sweep_dir, args.json)
    manifest = sweepdir.load_manifest(sweep_dir)
    while True:
        states = status.sweep_states(sweep_dir)
        running = sum(s.state == "running" for s in states)
        if args.json:
            print(json.dumps(status.as_json(sweep_dir, manifest, states, parallel=max(1, running))), flush=True)
        else:
            print(f"sweep {manifest['name']} ({sweep_dir})")
            print(status.format_table(states, manifest["axes"]))
            print(status.summary(states, parallel=max(1, running)))
            drift = status.version_drift(sweep_dir, [s.run_id for s in states])
            if drift:
                print(drift)
        if not args.watch or all(s.state in ("ok", "diverged", "failed") for s in states):
            return EXIT_OK
        time.sleep(args.watch)
        if not args.json:
            print()


def _status_of_root(root: Path, as_json: bool) -> int:
    """A results root: one line per sweep folder in it (or one JSON document of them all)."""
    import json

    from ablation import sweepdir
    from ablation.sweep import status

    docs = []
    for folder in status.sweep_folders(root):
        manifest = sweepdir.load_manifest(folder)
        states = status.sweep_states(folder)
        docs.append(status.as_json(folder, manifest, states))
        if not as_json:
            print(f"{manifest['name']:24s} {status.summary(states)}  ({folder})")
    if as_json:
        print(json.dumps({"results": str(root), "sweeps": docs}))
    else:
        print(f"{len(docs)} sweep(s) in {root}; one in full: ablation status {status.sweep_folders(root)[0]}")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    """Collect run folders and write the paper's tables and figures with its numbers beside ours."""
    from ablation.results import report

    rep = report.build(args.roots, args.out, args.baseline.split(","), args.reference, eval_mode=args.eval_mode)
    counts = rep.status_counts()  # from the files where nothing changed: no table is made again to print these
    order = ["ok", "diverged", "failed", "unfinished"]
    print(f"{sum(counts.values())} runs: " + ", ".join(f"{counts[k]} {k}" for k in order if k in counts))
    print()
    print(rep.main_table())
    print(f"wrote {len(rep.files)} files to {args.out}: " + ", ".join(sorted({p.name for p in rep.files if p.suffix in ('.png', '.md')})))
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    """Is A's error lower than B's, and by how much: per-image tests and seed-level intervals (ablation.results.compare)."""
    import json

    from ablation.results import compare

    result = compare.compare(args.a, args.b, args.results, args.epoch, args.draws)
    if args.json:
        print(json.dumps(result.as_json()))
    else:
        print("\n".join(result.lines()))
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """The embedded default: BN vs GN over per-GPU batch sizes, trained here, with the report."""
    from ablation import demo

    demo.run(args.out, quick=args.quick, seed=args.seed, docs=args.docs, mechanism=args.mechanism)
    return EXIT_OK


def cmd_norms(args: argparse.Namespace) -> int:
    """List the norm registry: every built-in name, its batch dependence, paper eps and the norm.* fields it takes."""
    from ablation.norms import registry

    print(f"{'name':<11} {'statistics':<16} {'eps':<6} {'+act':<4} what")
    for info in registry.entries():
        stats = "per GPU" if info.per_gpu_stats else ("global batch" if info.batch_dependent else "per image")
        print(f"{info.name:<11} {stats:<16} {info.eps:<6g} {'yes' if info.replaces_activation else '':<4} {info.summary}")
        if info.params:
            print(f"{'':<11} norm.{', norm.'.join(info.params)}")
    print("+act: a norm+activation layer (it takes the ReLU after it; see docs/norms.md, 'Norm+activation layers in ResNet v1').")
    print("Or your own: norm.name=package.module:function, with norm.options passed to it (docs/norms.md, 'Your own norm').")
    return EXIT_OK


def cmd_probe(args: argparse.Namespace) -> int:
    """Measure each norm's batch dependence and train/eval gap per images per GPU on a small ResNet (seconds, CPU)."""
    from ablation import probe

    path, overrides = _split_config_args(args.items)
    settings = probe.Settings(probe.parse_batches(args.batches), args.draws, args.probes, args.warmup, args.gpus, args.threads)
    probe.main(path, overrides, args.out, args.norms, settings)
    return EXIT_OK


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that, made with intermixed=True, takes its positionals (key=value overrides)
    before, between and after its options, as hydra, pycls and torchrun users expect.

    argparse's own parse_intermixed_args cannot run on a parser with subcommands, so each command's
    parser does it itself when the top-level parser hands it its arguments.
    """

    def __init__(self, *args, intermixed: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._intermixed = intermixed
        self._inside = False

    def error(self, message: str):  # type: ignore[override]
        """argparse's usage error, with a hint where a config override was typed as an option (--data.root=/x)."""
        dashed = [w for w in message.split() if w.startswith("--") and "." in w.split("=", 1)[0]]
        if message.startswith("unrecognized arguments") and dashed:
            message += f"; config overrides are key=value without dashes, e.g. {dashed[0].lstrip('-')}"
        super().error(message)

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        if not self._intermixed or self._inside:  # Python < 3.13's intermixed parsing calls back here
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


def _version() -> str:
    """ablation's version and those of the libraries that decide its numbers (read without importing them)."""
    import platform

    import ablation
    from ablation import provenance

    libs = provenance.package_versions()
    shown = ", ".join(f"{k} {libs[k] or 'missing'}" for k in ("torch", "torchvision", "timm", "numpy", "pillow"))
    return f"ablation {ablation.__version__} (Python {platform.python_version()}; {shown})"


class _VersionAction(argparse.Action):
    """--version: print _version() and exit; the versions are looked up only when asked, not at every start."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # type: ignore[override]
        print(_version())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    p = _Parser(prog="ablation", description="Normalization x batch-size ablations (Wu & He, Group Normalization).")
    p.add_argument("--version", action=_VersionAction, help="print the versions of ablation and its libraries")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", intermixed=True, help="train one run (DDP under torchrun or SLURM)")
    t.add_argument("items", nargs="*", default=[], metavar="[CONFIG.yaml] [key=value ...]",
                   help="a YAML config and/or dotted overrides, e.g. norm.name=gn batch_per_gpu=4")
    t.add_argument("--results", default=DEFAULT_RUNS, help=f"root under which run folders go (default {DEFAULT_RUNS})")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("config", intermixed=True, help="print the resolved config, run id and derived values")
    c.add_argument("items", nargs="*", default=[], metavar="[CONFIG.yaml] [key=value ...]",
                   help="a YAML config and/or dotted overrides (default: the paper's recipe), e.g. norm.name=gn")
    c.add_argument("--train-images", type=int, default=1_281_167, help="training-set size for the derived values (ImageNet's by default)")
    c.add_argument("--list", action="store_true", help="list every config key with its default and meaning")
    c.set_defaults(func=cmd_config)

    d = sub.add_parser("data", help="datasets: synthesize, check, prepare, index or shard archives, bench")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    s = dsub.add_parser("synth", help="write a deterministic synthetic ImageFolder dataset of JPEG files")
    s.add_argument("root", help="folder to write train/<class>/*.JPEG and val/<class>/*.JPEG into (kept when already there)")
    s.add_argument("--classes", type=int, default=10, help="number of classes (default 10)")
    s.add_argument("--train-per-class", type=int, default=64, help="training images per class (default 64)")
    s.add_argument("--val-per-class", type=int, default=16, help="validation images per class (default 16)")
    s.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    s.add_argument("--seed", type=int, default=0, help="seed of the images: the same seed writes the same bytes (default 0)")
    s.set_defaults(func=cmd_data_synth)
    k = dsub.add_parser("check", help="check a dataset's ImageFolder layout or archive folder (or say what an ImageNet download is "
                        "and what to run)")
    k.add_argument("root", help="dataset folder: train/ and val/ in ImageFolder layout, a folder of archives read in place "
                                "(ablation data index), or an ImageNet download (Kaggle, Hugging Face)")
    k.set_defaults(func=cmd_data_check)
    dp = dsub.add_parser("prepare", help="write the ImageFolder tree the harness reads from a downloaded dataset")
    psub = dp.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    pi = psub.add_parser("imagenet", help="ImageNet-1k from the official ILSVRC2012 archives, Kaggle's tree or the Hugging Face tars")
    pi.add_argument("src", help="folder holding the download: the three ILSVRC2012 archives, Kaggle's ILSVRC/ and LOC_*.csv, "
                                "or the Hugging Face data/*.tar.gz (or an ImageFolder tree, to copy or subset it)")
    pi.add_argument("--out", required=True, help="folder to write train/<wnid>/, val/<wnid>/ and dataset.json into (new or empty; "
                                                 "an unfinished prepare there resumes)")
    pi.add_argument("--format", choices=("tree", "tar"), default="tree",
                    help="what to write: tree, an ImageFolder tree; tar, indexed tar shards of it, read in place (default tree)")
    pi.add_argument("--no-verify", action="store_true",
                    help="skip the checks of ImageNet-1k's counts and the archives' md5s (a copy you trust, a miniature)")
    pi.add_argument("--classes", type=int, help="keep N classes, evenly spaced over the sorted wnids (default: all)")
    pi.add_argument("--per-class", type=int, help="keep the first M training images of each class by file name (default: all)")
    pi.add_argument("--val-per-class", type=int, help="keep the first K validation images of each class by file name (default: all)")
    pi.add_argument("--workers", type=int, default=0, help="extraction processes (default 0: one per core of this process's CPU budget)")
    pi.set_defaults(func=cmd_data_prepare)

    x = dsub.add_parser("index", help="index the member offsets of a folder of ImageNet archives (or tar shards) once, "
                        "so that runs read the images in place, without extraction")
    x.add_argument("root", help="folder holding ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz, "
                   "or train-NNNNNN.tar / val-NNNNNN.tar shards")
    x.add_argument("--cache", default=None, help="write the index into this folder instead of beside the archives (default: beside "
                   "them; use it where ROOT is read-only, with ABLATION_INDEX_CACHE=DIR where runs read it)")
    x.set_defaults(func=cmd_data_index)
    h = dsub.add_parser("shard", help="write an ImageFolder tree as indexed tar shards (a few large files), read in place")
    h.add_argument("tree", help="ImageFolder tree holding train/<class>/ and val/<class>/")
    h.add_argument("--out", required=True, help="folder for train-NNNNNN.tar, val-NNNNNN.tar and their index (required)")
    h.add_argument("--shard-mb", type=float, default=1024, help="about how many MiB per shard (default 1024)")
    h.set_defaults(func=cmd_data_shard)

    b = dsub.add_parser("bench", intermixed=True,
                        help="time the training data pipelines on your data: CPU per image (loader and training process), "
                        "device time, cores needed to feed the GPUs")
    b.add_argument("root", help="dataset folder (train/<class>/*.JPEG), or a folder of archives read in place (ablation data index)")
    b.add_argument("items", nargs="*", default=[], metavar="[CONFIG.yaml] [key=value ...]",
                   help="the run's config, e.g. data.pipeline=split data.image_size=224 gpus=8 "
                   "(device=cpu|cuda: where the device side runs)")
    b.add_argument("--images", type=int, default=256, help="training images to time, spread over the classes (default 256)")
    b.add_argument("--gpu-images-per-s", type=float, help="training images/s one GPU consumes (default 2500: ResNet-50, bf16, H100)")
    b.set_defaults(func=cmd_data_bench)

    w = sub.add_parser("sweep", intermixed=True, help="expand a sweep spec and submit what is not done (or --dry-run)")
    w.add_argument("spec", nargs="?", help="sweep spec YAML, e.g. sweeps/paper/fig1_batch_size.yaml (ablation sweep --list shows them)")
    w.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                   help="overrides of the sweep's base config, e.g. data.root=/datasets/imagenet")
    w.add_argument("--list", action="store_true", help="list the sweep presets and cluster profiles, and the default profile")
    w.add_argument("--dry-run", action="store_true",
                   help="run every check a submission runs, show the runs, their states, jobs and GPU-hours; submit nothing")
    w.add_argument("--profile", help="cluster profile YAML (slurm/profiles/*.yaml); default: $ABLATION_PROFILE, else 'profile:' in "
                   "~/.config/ablation/config.yaml, else this machine, one process per run")
    w.add_argument("--executor", choices=["slurm", "local", "debug"],
                   help="override the profile's executor (default: the profile's; local: train here, one run after another)")
    w.add_argument("--results", default=DEFAULT_RESULTS,
                   help=f"results root: runs in DIR/runs, the sweep in DIR/<name> (default {DEFAULT_RESULTS})")
    w.add_argument("--retry-failed", action="store_true", help="also resubmit runs that failed")
    w.add_argument("--print-sbatch", action="store_true", help="print the sbatch script of one job (slurm profiles)")
    w.add_argument("--no-data-check", action="store_true",
                   help="submit (or dry-run) without checking that data.root has train/ and val/ here (data only on the compute nodes)")
    w.set_defaults(func=cmd_sweep, parser=w)

    st = sub.add_parser("status", help="show a sweep's runs: pending / running / ok / diverged / failed / requeued")
    st.add_argument("sweep_dir", help="a sweep folder, e.g. results/fig1_batch_size (demo/results/demo for the demo), "
                    "or a results root to list its sweeps")
    st.add_argument("--watch", type=float, default=0, metavar="SECONDS",
                    help="refresh every SECONDS until every run has ended (default 0: once)")
    st.add_argument("--json", action="store_true", help="print JSON (a sweep: its runs, counts by state, ETA; a root: every sweep)")
    st.set_defaults(func=cmd_status)

    r = sub.add_parser("report", intermixed=True, help="tables and figures from run folders, beside the paper's numbers")
    r.add_argument("roots", nargs="+", help="results folders to collect (sweep folders, results/, run folders)")
    r.add_argument("--out", default="reports", help="where tables, figures and CSVs go (default ./reports)")
    r.add_argument("--baseline", default="bn,gn", help="baselines for the Δ columns and figure (default bn,gn)")
    r.add_argument("--reference", help="folder of reference CSVs, one per paper (default results/reference)")
    r.add_argument("--eval-mode", default="ema", metavar="MODE",
                   help="the evaluation the tables and Figure 1 show: ema (population statistics from the EMA, the paper's; "
                        "default), precise (PreciseBN) or batch (mini-batch statistics); the runs' eval.modes")
    r.set_defaults(func=cmd_report)

    cp = sub.add_parser("compare", help="is A's error lower than B's, and by how much: McNemar, a paired bootstrap and seed-level "
                        "intervals on the same validation images")
    cp.add_argument("a", metavar="A", help="a run folder (or a folder of one setting's seeds), or a selector over --results in one "
                    "argument, e.g. 'norm=gn batch_per_gpu=2'")
    cp.add_argument("b", metavar="B", help="the same for B, e.g. 'norm=my.module:MyNorm batch_per_gpu=2'")
    cp.add_argument("--results", default=DEFAULT_RESULTS, help=f"results root the selectors pick runs from (default {DEFAULT_RESULTS})")
    cp.add_argument("--epoch", type=int, help="the epoch whose per-image results are read (default: the last one every run has)")
    cp.add_argument("--draws", type=int, default=10_000, help="bootstrap resamplings of the images (default 10000)")
    cp.add_argument("--json", action="store_true", help="print the numbers as one JSON document (default: text)")
    cp.set_defaults(func=cmd_compare)

    se = sub.add_parser("selftest", help="check every CUDA path on this GPU node in minutes (or --device cpu: tiny, as CI does); "
                        "a table and selftest.json")
    se.add_argument("--device", choices=["cuda", "cpu"],
                    help="where the checks run (default: cuda where one is visible or the profile has GPUs, else cpu: tiny settings)")
    se.add_argument("--gpus", type=int, help="processes of the multi-GPU checks (default: every visible GPU, the profile's GPUs per "
                    "node; 2 gloo processes on a CPU); fewer than 2 skips them")
    se.add_argument("--batches", default=",".join(map(str, (32, 16, 8, 4, 2))),
                    help="images per GPU the throughput and loader checks measure: the sweep's (default 32,16,8,4,2)")
    se.add_argument("--cpus-per-task", type=int, help="CPU cores one GPU's loaders get (default: the profile's cpus_per_task, else 8 "
                    "on a GPU, 1 on a CPU)")
    se.add_argument("--data", help="a dataset (train/<class>/*.JPEG) to time the loaders and the decode on (default: generated JPEGs)")
    se.add_argument("--compile-backend", help="torch.compile backend of the compile check (default: inductor on a GPU, aot_eager on a CPU)")
    se.add_argument("--profile", help="cluster profile YAML: its GPUs per node and CPUs per task; with --submit, where the job runs")
    se.add_argument("--submit", action="store_true",
                    help="send the self-test as one job through submitit with --profile (default: run here)")
    se.add_argument("--results", default=DEFAULT_RESULTS, help=f"results root; the record goes to DIR/selftest/<time>-<host>/, where "
                    f"`ablation sweep --results DIR` looks for it (default {DEFAULT_RESULTS})")
    se.add_argument("--out", help="folder for selftest.json instead (default: RESULTS/selftest/<UTC time>-<host>)")
    se.add_argument("--gpu-records", help="JSON-lines file the throughput rows are appended to (default on a GPU: where --dry-run "
                    "estimates read them, benchmarks/results/gpu.jsonl; on a CPU: none, a tiny model's figures estimate nothing)")
    se.set_defaults(func=cmd_selftest)

    nr = sub.add_parser("norms", help="list the built-in norms (the registry), their batch dependence and norm.* fields")
    nr.set_defaults(func=cmd_norms)

    pr = sub.add_parser("probe", intermixed=True,
                        help="measure each norm's batch dependence and train/eval gap per images per GPU (seconds, CPU)")
    pr.add_argument("items", nargs="*", default=[], metavar="[CONFIG.yaml] [key=value ...]",
                    help="config and overrides over the probe's small ResNet, e.g. norm.name=gn or norm.name=pkg.mod:factory")
    pr.add_argument("--out", default="probe", help="folder for probe.csv and probe.png (default ./probe)")
    pr.add_argument("--norms", help="comma-separated norms when norm.name is not given (default: every registry norm but none)")
    pr.add_argument("--batches", default="32,16,8,4,2", help="images per GPU to probe (default 32,16,8,4,2)")
    pr.add_argument("--draws", type=int, default=4, help="batches (draws of batch mates) per probe image (default 4)")
    pr.add_argument("--probes", type=int, default=4, help="probe images per batch size (default 4)")
    pr.add_argument("--warmup", type=int, default=40, help="train-mode passes that bring running statistics to the data (default 40)")
    pr.add_argument("--gpus", type=int, default=1,
                    help="modelled GPUs per probe batch: GPUs x b images in one process, as a stand-in run (default 1)")
    pr.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the probe's forwards are small)")
    pr.set_defaults(func=cmd_probe)

    m = sub.add_parser("demo", help="the embedded default: BN vs GN over per-GPU batch sizes on this CPU, with the figure "
                       "(about 5 minutes on 2 cores)")
    m.add_argument("--out", default="demo", help="folder for the demo's data, runs and report (default ./demo)")
    m.add_argument("--quick", action="store_true",
                   help="a smoke test of the whole path in about 30 s (4 runs, 3 epochs): too little training to show the effect")
    m.add_argument("--seed", type=int, default=0, help="training seed (the data stay the same)")
    m.add_argument("--docs", help="maintainers: copy the figure and table into this folder (docs/, which the README shows)")
    m.add_argument("--mechanism", action="store_true", default=False,
                   help="also train sweeps/demo_mechanism.yaml (BN at normalization batch 32..2, every evaluation mode; "
                        "4 runs, a few more minutes) and add fig_mechanism and table_mechanism to the report")
    m.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run a command, turning user errors into one line and a non-zero exit."""
    args = build_parser().parse_args(argv)
    return exit_status(lambda: args.func(args))
