"""The `archer` command (console script `archer = archer_mcore.cli:main`).

`main.py` builds the parser and maps errors to exit codes; each verb has its own module
(config_cmd, train, eval, convert, plan, submit) with `add_args(parser)` and `run(args)`.
Note that `archer_mcore.cli.main` is the function here; import the module's other names
with `from archer_mcore.cli.main import build_parser`.
"""

from archer_mcore.cli.main import main

__all__ = ["main"]
