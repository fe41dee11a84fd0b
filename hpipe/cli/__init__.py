"""The `hpipe` command line (typer).  Files are written here, never in the engines.

One module per kind of command, on ``common`` (the app, shared options, scenario reading,
``main``): ``planning`` (devices, models, plan, simulate, sweep: no torch), ``running``
(execute, generate), ``measuring`` (profile, validate).

Exit codes: 0 done; 2 bad input (file, field and problem, no traceback);
3 infeasible (says by how much); 1 anything else; 130 interrupted (Ctrl-C); 143 terminated (SIGTERM); 129 hung up (SIGHUP).
"""

# Each registers its commands on app, in the order `hpipe --help` lists them.
from hpipe.cli import planning  # noqa: F401, E402
from hpipe.cli import running  # noqa: F401, E402
from hpipe.cli import measuring  # noqa: F401, E402
from hpipe.cli.common import app, main

__all__ = ["app", "main"]
