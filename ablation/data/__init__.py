"""Data stage: datasets on disk and the pipelines that feed a run from them.

layout (ImageFolder checks, scans, transforms, the seeded dataset), synth (synthetic datasets, torch-free),
bench (the pipelines' CPU cost). This package's ``__init__`` imports none of its modules, so ``ablation.data.synth`` stays torch-free.
"""

import importlib
import warnings

# The public names of the flat module ablation.data, which is now ablation.data.layout (deprecated here; imported on use).
_LAYOUT_NAMES = (
    "DatasetInfo", "DatasetScan", "check_splits", "scan_layout", "check_layout", "Lighting", "train_transform", "eval_transform",
    "DecodedCache", "SplitSample", "AugParams", "SplitTrainTransform", "EncodedSample", "DeviceDecodeTrainTransform", "collate",
    "SplitEvalTransform", "pipeline_transforms", "finish_on_device", "sample_seed", "load_rgb", "open_image", "SeededImageFolder",
)


def __getattr__(name: str):
    """`from ablation.data import SeededImageFolder` (the flat module's names): ablation.data.layout's, with a DeprecationWarning."""
    if name not in _LAYOUT_NAMES:
        raise AttributeError(f"module 'ablation.data' has no attribute {name!r}")
    warnings.warn(f"ablation.data.{name} is now ablation.data.layout.{name}", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module("ablation.data.layout"), name)
