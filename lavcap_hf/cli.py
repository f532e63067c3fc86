"""`python -m lavcap_hf.cli ...`: the `lavcap` command, whose parsers live in the torch-free `lavcap_cli` package
(the console script); the subcommands' code lives in the modules they name (`batch_captioning.run_caption`, ...)."""

import sys

from lavcap_cli import build_parser, main, parse_command_line

__all__ = ["build_parser", "main", "parse_command_line"]

if __name__ == "__main__":
    sys.exit(main())
