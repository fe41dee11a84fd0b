"""Running plans for real with torch: model units, weights, stage workers, launcher.

Everything that imports torch lives under this package, so planning and
simulating work without it.  ``execute`` (in ``launcher.py``) is the entry point
behind ``hpipe execute``.
"""


def execute(*args, **kwargs):
    """Run a plan with one worker process per stage device; see ``launcher.execute``."""
    from hpipe.runtime.launcher import execute as _execute

    return _execute(*args, **kwargs)
