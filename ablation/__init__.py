"""ablation: a reproducible harness for ImageNet normalization x batch-size ablations.

The code is grouped by stage, in the order data flows: ``sweep`` (spec -> run configs -> launcher), ``train``
(a run config -> a run folder), ``data`` (datasets and pipelines), ``results`` (run folders -> tables and figures),
and ``norms``; ``config``, ``rundir``, ``lock``, ``errors``, ``faults`` and ``signals`` are shared below them all,
and ``cli``, ``demo`` and ``probe`` are the commands above them.

The modules' old flat names (``ablation.report``, ``ablation.trainer`` ...) still resolve, with a
DeprecationWarning, to their new places.
"""

import importlib
import sys
import warnings

__version__ = "0.1.0"

# timm releases up to at least 1.0.22 define a torch.jit.interface at import (timm/models/hrnet.py), which torch 2.14
# calls deprecated on stderr: noise in every command's output, and it would break one-line error messages.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.interface` is deprecated", category=FutureWarning)

# Old flat module name -> its place since the code was grouped by stage (deprecated; kept for users' code and notebooks).
MOVED = {
    "cluster": "ablation.sweep.cluster", "status": "ablation.sweep.status", "launch": "ablation.sweep.launch",
    "trainer": "ablation.train.trainer", "loop": "ablation.train.loop", "loaders": "ablation.train.loaders",
    "bookkeeping": "ablation.train.bookkeeping", "coordination": "ablation.train.coordination",
    "distributed": "ablation.train.distributed", "models": "ablation.train.models",
    "synth": "ablation.data.synth", "databench": "ablation.data.bench",
    "collect": "ablation.results.collect", "report": "ablation.results.report", "runfiles": "ablation.results.runfiles",
}


def __getattr__(name: str):
    """`from ablation import report` (an old flat name): the module at its new place, with a DeprecationWarning."""
    if name not in MOVED:
        raise AttributeError(f"module 'ablation' has no attribute {name!r}")
    warnings.warn(f"ablation.{name} is now {MOVED[name]}", DeprecationWarning, stacklevel=2)
    module = globals()[name] = importlib.import_module(MOVED[name])  # warned once
    sys.modules.setdefault(f"ablation.{name}", module)  # `import ablation.report` works from then on
    return module
