"""The per-user profile cache: measured profiles of *this* machine, keyed by what makes them valid.

A profile is valid only for the machine, the library versions and the device
placements it was measured with (``hpipe.costmodels.profile``).  A profile that
``hpipe profile``, ``hpipe validate`` or ``costmodel: auto`` measures because
none fitted goes here, not beside the scenario: a scenario folder under version
control then never gets a machine-specific file written over one of its
tracked files (a profile committed on one VM was overwritten by a re-profile on
another).

    $HPIPE_CACHE_DIR/profiles/<scenario>-<key>.json
    (else $XDG_CACHE_HOME/hpipe/profiles/..., else ~/.cache/hpipe/profiles/...)

``key`` is a short hash of the machine (CPU model, logical CPUs, RAM), the
versions (python, torch, hpipe, the profiler's method ``PROFILER_METHOD``) and what
the profile measured (model shape, dtype, workload shape, device ids with their
runtime placements, the links between hosts, which the scenario shapes; not a host's
interconnect, which is never shaped).  Change any of them and the
scenario gets another file, so a cached profile that exists is one made for this very
setup.

Nothing here imports torch (the torch version is read from the installed
package's metadata): planning with ``costmodel: auto`` stays torch-free.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
from importlib import metadata
from pathlib import Path

CACHE_ENV = "HPIPE_CACHE_DIR"
"""Overrides the cache folder (tests point it at a temporary directory)."""


def cache_dir() -> Path:
    """Folder of cached profiles: $HPIPE_CACHE_DIR/profiles, else the XDG cache; absolute (a
    relative one is from the current folder, and the fitted model reads a profile path from
    the scenario's folder)."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return (Path(root).expanduser() / "profiles").resolve()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return (Path(xdg).expanduser() / "hpipe" / "profiles").resolve()


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (the profiler records the same)."""
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def ram_gib() -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 2**20)
    return 0


def torch_version() -> str | None:
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict:
    """What of this machine and its software a profile depends on."""
    import hpipe
    from hpipe.costmodels.profile import PROFILER_METHOD

    return {"cpu_model": cpu_model(), "cpu_cores": os.cpu_count() or 0, "ram_gib": ram_gib(),
            "python": platform.python_version(), "torch": torch_version(),
            "hpipe": getattr(hpipe, "__version__", "0"), "profiler": PROFILER_METHOD}


def _placement(d) -> dict:
    p = d.placement
    return p.model_dump(exclude_none=True) if p is not None else {"threads": 1}


def measured_setup(setup) -> dict:
    """What of a scenario a profile measures: model shape, dtype, workload shape, the devices
    with their placements, and the links between its hosts."""
    spec = setup.model.to_dict()
    cl = setup.scenario.cluster
    return {"model": {k: spec[k] for k in ("family", "n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff",
                                            "vocab_size")},
            "dtype": setup.dtype,
            "workload": [setup.seq_len, setup.batch_size, setup.granularity],
            "devices": [[d.id, _placement(d)] for d in setup.cluster.devices],
            # a host's interconnect is not here: links inside a host run on this machine's
            # loopback (or NCCL), never shaped, so its figures change nothing measured, and a
            # sweep over them shares one profile
            "hosts": [[h.name, getattr(h, "address", None)] for h in cl.hosts],
            # nor a network no pair of hosts crosses (one host, or a link for every pair)
            "network": cl.network.model_dump() if cl.network and cl.network_crossed() else None,
            "links": [lk.model_dump() for lk in (cl.links or [])]}


def profile_key(setup) -> str:
    blob = json.dumps({"machine": machine(), "setup": measured_setup(setup)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def cached_profile_path(setup) -> Path:
    """Where this machine's profile of ``setup`` lives in the cache (it may not exist yet)."""
    # the scenario's name as one file name: "lab/4gpu" or "../x" must not leave the cache folder
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", setup.name).lstrip(".") or "scenario"
    return cache_dir() / f"{stem}-{profile_key(setup)}.json"


def check_cache_writable() -> Path:
    """The cache folder, made if missing; InputError (before a profile is measured, not after)
    where no file can be written there."""
    from hpipe.errors import InputError
    from hpipe.io import can_create_in

    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        why = None if can_create_in(folder) else "no file can be made there"
    except OSError as e:
        why = e.strerror or str(e)
    if why:
        raise InputError(f"cannot write profiles to {folder} ({why}); set {CACHE_ENV} to a folder you can write, "
                         f"or give the profile a path (-o, --profile)",
                         field=f"${CACHE_ENV}" if os.environ.get(CACHE_ENV) else "the profile cache")
    return folder


def runs_here(setup) -> str | None:
    """Why ``setup``'s devices do not run on this machine (so no profile of it can be made
    here), or None: every device has a ``runtime:`` placement and the runtime is installed."""
    missing = [d.id for d in setup.cluster.devices if d.placement is None]
    if missing:
        return f"device {missing[0]} has no runtime: placement (it does not run on this machine)"
    if any(getattr(h, "address", None) for h in setup.scenario.cluster.hosts):
        return "its hosts are other machines (address:)"
    if torch_version() is None:
        return "torch is not installed (pip install 'hpipe[runtime]')"
    return None
