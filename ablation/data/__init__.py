"""Data stage: datasets on disk and the pipelines that feed a run from them.

layout (the dataset on disk: ImageFolder checks, scans, reading images), pipelines (transforms, the split and
device-decode pipelines, the seeded dataset), synth (synthetic datasets, torch-free), bench (the pipelines' CPU cost),
imagenet (the ImageNet downloads' names, checksums and label parsers, torch-free), miniature (miniatures of those
downloads, torch-free), prepare (`ablation data prepare`: a download -> the ImageFolder tree) and extract (its units
of work and the processes that run them).
This package's ``__init__`` imports none of its modules, so ``ablation.data.synth`` stays torch-free.
"""

import importlib
import warnings

# The public names of the flat module ablation.data -> the module that holds each now (deprecated here; imported on use).
_MOVED = {
    **dict.fromkeys(("DatasetInfo", "DatasetScan", "check_splits", "scan_layout", "check_layout", "load_rgb", "open_image"),
                    "ablation.data.layout"),
    **dict.fromkeys(("Lighting", "train_transform", "eval_transform", "DecodedCache", "SplitSample", "AugParams",
                     "SplitTrainTransform", "EncodedSample", "DeviceDecodeTrainTransform", "collate", "SplitEvalTransform",
                     "pipeline_transforms", "finish_on_device", "sample_seed", "SeededImageFolder"), "ablation.data.pipelines"),
}


def __getattr__(name: str):
    """`from ablation.data import SeededImageFolder` (the flat module's names): its new module's, with a DeprecationWarning."""
    if name not in _MOVED:
        raise AttributeError(f"module 'ablation.data' has no attribute {name!r}")
    warnings.warn(f"ablation.data.{name} is now {_MOVED[name]}.{name}", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(_MOVED[name]), name)
