"""``python -m driver`` is ``gpu-dra``."""

import sys

from driver.cli import main

sys.exit(main())
