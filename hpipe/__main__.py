"""`python -m hpipe` and the `hpipe` console script.

The CLI's imports (typer, rich, pydantic) take a moment; a Ctrl-C during them, or one that
slips past the CLI's own handler, is still exit 130 with one line, not a traceback and
death by SIGINT (``hpipe.stopping``)."""

from hpipe.stopping import exit_interrupted, install_sigterm


def main() -> None:
    install_sigterm()  # before the slow imports: a Ctrl-C swallowed among them is still seen later
    try:
        from hpipe.cli import main as cli_main

        cli_main()
    except KeyboardInterrupt as e:
        exit_interrupted(e)


if __name__ == "__main__":
    main()
