"""`python -m merge_tools …` is the same as `sd-merge …`."""

import sys

from merge_tools.cli import main

sys.exit(main())
