"""``python -m heavytail``: the same as the ``heavytail`` command."""

import sys

from heavytail.cli import main

sys.exit(main())
