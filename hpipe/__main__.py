"""`python -m hpipe` and the `hpipe` console script.

The CLI's imports (typer, rich, pydantic) take a moment; a Ctrl-C during them, or one that
slips past the CLI's own handler, is still exit 130 with one line, not a traceback and
death by SIGINT."""

import sys


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a job scheduler), raised where Ctrl-C would be, so that the same
    clean-up runs: the workers are stopped, nothing is left running."""


_terminated = False
"""Set by SIGTERM: click turns any KeyboardInterrupt into its own Abort, losing the subclass."""


def on_sigterm(signum, frame) -> None:
    global _terminated
    _terminated = True
    raise Terminated()


def exit_interrupted(e: BaseException | None = None) -> None:
    """Exit 130 after a Ctrl-C (143 after SIGTERM), for certain.

    ``sys.exit(130)`` is not enough: when the KeyboardInterrupt escaped code run by
    ``exec`` of a string (dataclasses build their methods so, e.g. during an import),
    CPython 3.11 has already marked it "unhandled" and kills itself with SIGINT at exit,
    whatever we raise.  The workers are stopped by then; the forkserver and resource
    tracker leave when our end of their pipes closes.  ``os._exit`` skips multiprocessing's
    own clean-up at exit, so its temporary folder (the forkserver's socket) goes here."""
    import os

    term = _terminated or isinstance(e, Terminated)
    sys.stderr.write("hpipe: terminated\n" if term else "hpipe: interrupted\n")
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:  # a closed pipe: nothing more to say
            pass
    mp = sys.modules.get("multiprocessing.process")
    tmp = mp.current_process()._config.get("tempdir") if mp is not None else None
    if tmp:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    os._exit(143 if term else 130)


def main() -> None:
    try:
        from hpipe.cli import main as cli_main

        cli_main()
    except KeyboardInterrupt as e:
        exit_interrupted(e)


if __name__ == "__main__":
    main()
