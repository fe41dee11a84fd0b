"""Reading `hpipe validate --json` files kept under benchmarks/results/ (for resimulate.py and
resimulate_decode.py): each names the profile it was planned on, by the path that run had.

Most files name it repo-relative (benchmarks/results/profiles-*/...).  Some runs kept
their profiles under /tmp, and a copy went to a profiles-* folder afterwards; the profile's
file name alone does not say which (one scenario's cache key recurs across folders), so
such a file is given with its folder: ``FILE:FOLDER``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def read(arg: str) -> tuple[dict, str, Path | None]:
    """(the JSON, its path, the profiles folder given with it or None) of ``FILE[:FOLDER]``."""
    path, _, folder = arg.partition(":")
    return json.loads(Path(path).read_text()), path, (Path(folder).resolve() if folder else None)


def profile_path(named: str, file: str, folder: Path | None) -> Path:
    """Where the profile a validate file names is here; exits naming the file and what to
    give where it is not (a /tmp path of the run that made it)."""
    path = folder / Path(named).name if folder is not None else Path(named) if Path(named).is_absolute() \
        else ROOT / named
    if path.is_file():
        return path
    copies = sorted(str(p.parent.relative_to(ROOT)) for p in ROOT.glob(f"benchmarks/results/profiles-*/{Path(named).name}"))
    sys.exit(f"{file}: its profile {named} is not here (the run kept it there). Give the file with the folder "
             f"that holds its copy, {file}:FOLDER" + (f"; folders with a {Path(named).name}: {', '.join(copies)}"
                                                     if copies else ""))
