"""``python -m bitsmith`` (also under ``torchrun``)."""

import sys

from .cli.main import main

sys.exit(main())
