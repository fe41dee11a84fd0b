"""`python -m hpipe` and the `hpipe` console script.

The CLI's imports (typer, rich, pydantic) take a moment; a Ctrl-C during them is still
exit 130 with one line, not a traceback and death by SIGINT."""

import sys


def main() -> None:
    try:
        from hpipe.cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("hpipe: interrupted\n")
        sys.exit(130)
    cli_main()


if __name__ == "__main__":
    main()
