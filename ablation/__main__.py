"""`python -m ablation` is the `ablation` command."""

import sys

from ablation.cli import main

sys.exit(main())
