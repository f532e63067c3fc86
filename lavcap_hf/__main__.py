"""`python -m lavcap_hf ...` (also under `accelerate launch -m lavcap_hf ...`): the `lavcap` command, whose parsers
live in the torch-free `lavcap_cli` package; each subcommand imports its job's module when it runs."""

import sys

from lavcap_cli import main

if __name__ == "__main__":
    sys.exit(main())
