"""`python -m lavcap_cli`: the `lavcap` command."""

import sys

from . import main

sys.exit(main())
