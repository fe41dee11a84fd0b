"""`python -m hpipe` and the `hpipe` console script.

The CLI's imports (typer, rich, pydantic) take a moment; a Ctrl-C during them, or one that
slips past the CLI's own handler, is still exit 130 with one line, not a traceback and
death by SIGINT (``hpipe.stopping``)."""

from hpipe.stopping import exit_interrupted


def main() -> None:
    try:
        from hpipe.cli import main as cli_main

        cli_main()
    except KeyboardInterrupt as e:
        exit_interrupted(e)


if __name__ == "__main__":
    main()
