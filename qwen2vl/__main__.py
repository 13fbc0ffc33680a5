"""`python -m qwen2vl`: the `qwen2vl` command."""

import sys

from .cli import main

sys.exit(main())
