"""``python -m napari_spine_tracker``: the command line, for environments without the entry point."""

import sys

from .cli import main

sys.exit(main())
