"""``python -m stabmon``: the ``stabmon`` console script (``stabmon inspect PATH``)."""

import sys

from stabmon.cli import main

sys.exit(main())
