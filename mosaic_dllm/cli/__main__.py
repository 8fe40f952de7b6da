"""`python -m mosaic_dllm.cli ...`, as `mosaic ...`."""

import sys

from . import main

sys.exit(main())
