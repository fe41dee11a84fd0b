"""``costmodel: auto``: plan on a measured profile of this machine where there is one, else the roofline.

    costmodel: auto                 # or {kind: auto, roofline: {compute_efficiency: 0.5}}

A scenario whose devices all run here (``runtime:`` placements, torch
installed) and whose profile the cache holds (``hpipe.costmodels.cache``: same
machine, versions, model shape, workload and placements) is planned with the
fitted cost model on that profile; any other with the roofline.  The choice and
its reason are kept on the cost model (``auto``) and shown by ``describe()``,
so a Result says which model made its predictions and the CLI says it on
stderr.

Making the missing profile is the caller's decision (it runs worker
processes for tens of seconds): ``hpipe execute`` makes a quick one first,
``plan``/``simulate`` do so on a terminal and otherwise print how to
(``hpipe.cli``).  This module only chooses; it never measures.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import ConfigDict

from hpipe.costmodels import CostModelConfig


class AutoConfig(CostModelConfig):
    model_config = ConfigDict(extra="forbid")
    kind: str = "auto"
    roofline: dict[str, Any] = {}
    """Settings of the roofline used when no profile fits (RooflineConfig fields)."""
    fitted: dict[str, Any] = {}
    """Settings of the fitted model used with a cached profile (FittedConfig fields but profile)."""


@dataclass
class AutoChoice:
    used: str
    """'fitted' or 'roofline'."""
    reason: str
    profile_path: str | None = None
    """The cached profile the fitted model reads, or where one would be written."""
    runs_here: bool = False
    """The scenario's devices run on this machine, so a profile of them can be made here."""
    spec: dict = field(default_factory=dict, repr=False)
    """The cost model auto stands for, as a scenario would name it (not in the JSON: the
    fields above say it): another workload of the same scenario priced on the same model
    (``hpipe generate``'s prompt) takes it."""

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "spec"}

    def note(self) -> str:
        """One line for stderr."""
        return f"cost model auto: {self.used} ({self.reason})"


def choose(config: AutoConfig, setup) -> tuple[dict, AutoChoice]:
    """The cost model spec auto stands for on this machine, and why (``AutoChoice.spec`` holds
    the spec too)."""
    spec, why = _choose(config, setup)
    why.spec = spec
    return spec, why


def _choose(config: AutoConfig, setup) -> tuple[dict, AutoChoice]:
    from hpipe.costmodels.cache import cached_profile_path, runs_here
    from hpipe.costmodels.profile import decode_gap, load_profile, model_mismatch
    from hpipe.errors import InputError

    roofline = {"kind": "roofline", **config.roofline}
    why_not = runs_here(setup)
    if why_not:
        return roofline, AutoChoice("roofline", f"no measured profile possible: {why_not}")
    path = cached_profile_path(setup)
    if not path.exists():
        return roofline, AutoChoice("roofline", f"no profile of this machine yet; it would be {path}",
                                    str(path), runs_here=True)
    try:
        prof = load_profile(path)
    except InputError as e:
        return roofline, AutoChoice("roofline", f"cached profile unreadable: {e}", str(path), runs_here=True)
    why = model_mismatch(prof, setup.model, setup.dtype) or decode_gap(prof, setup)
    if why:  # the key covers the model (a hand-edited cache file need not), not output_tokens
        return roofline, AutoChoice("roofline", f"cached profile does not fit: {why}", str(path), runs_here=True)
    spec = {**config.fitted, "kind": "fitted", "profile": str(path)}
    quick = (" (a quick one: a coarse grid; `hpipe profile SCENARIO` measures a finer one)"
             if prof.settings.grid == "quick" else "")
    return spec, AutoChoice("fitted", f"profile of this machine measured {prof.created}{quick}, {path}", str(path),
                            runs_here=True)
