"""ablation: a reproducible harness for ImageNet normalization x batch-size ablations."""

__version__ = "0.1.0"
