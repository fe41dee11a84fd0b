"""`python -m hpipe.cli COMMAND ...`, as the `hpipe` script."""

from hpipe.cli import main

main()
