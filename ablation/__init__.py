"""ablation: a reproducible harness for ImageNet normalization x batch-size ablations."""

import warnings

__version__ = "0.1.0"

# timm releases up to at least 1.0.22 define a torch.jit.interface at import (timm/models/hrnet.py), which torch 2.14
# calls deprecated on stderr: noise in every command's output, and it would break one-line error messages.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.interface` is deprecated", category=FutureWarning)
