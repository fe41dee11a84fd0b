"""`python -m hpipe` and the `hpipe` console script.

The CLI's imports (typer, rich, pydantic) take a moment; a Ctrl-C during them, or one that
slips past the CLI's own handler, is still exit 130 with one line, not a traceback and
death by SIGINT."""

import sys


def exit_interrupted() -> None:
    """Exit 130 after a Ctrl-C, for certain.

    ``sys.exit(130)`` is not enough: when the KeyboardInterrupt escaped code run by
    ``exec`` of a string (dataclasses build their methods so, e.g. during an import),
    CPython 3.11 has already marked it "unhandled" and kills itself with SIGINT at exit,
    whatever we raise.  The workers are stopped by then; the forkserver and resource
    tracker leave when our end of their pipes closes."""
    import os

    sys.stderr.write("hpipe: interrupted\n")
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:  # a closed pipe: nothing more to say
            pass
    os._exit(130)


def main() -> None:
    try:
        from hpipe.cli import main as cli_main

        cli_main()
    except KeyboardInterrupt:
        exit_interrupted()


if __name__ == "__main__":
    main()
