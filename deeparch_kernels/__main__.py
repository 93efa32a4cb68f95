"""``python -m deeparch_kernels``: the same as the ``deeparch-bench`` command (see cli.py)."""
import sys

from .cli import main

sys.exit(main())
