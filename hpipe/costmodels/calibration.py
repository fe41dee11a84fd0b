"""Calibrating the roofline's per-generation constants on a profile made by ``hpipe profile``.

    costmodel: {kind: roofline, calibration: profiles/my-gpu.json}

The profile's unit times (every unit kind, whole and tensor-parallel shards, over its
grid of slice tokens n, context c and batch b) are fitted with the roofline v2 formula
(``roofline.unit_time_v2``) against the profiled device's datasheet figures; the
constants found replace the row of that device's generation, so every device of the
generation in the scenario -- not only the one profiled -- is priced with them.

The datasheet figures of a profiled device come from the scenario device of the same id
or label (custom devices declare theirs), else from the catalog type of that label.
The fit uses CPU time for single-threaded CPU devices (as the fitted cost model does:
robust to other processes on a shared machine).  Nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hpipe.costmodels.fitted import basis_samples, holdout_mask
from hpipe.costmodels.profile import DeviceProfile, Profile, load_profile
from hpipe.costmodels.roofline import (FitPoint, GenerationConstants, fit_constants, floor_kept_at_zero,
                                       predict_points)
from hpipe.devices import DEVICES, DeviceSpec
from hpipe.errors import InputError
from hpipe.models import DTYPE_BYTES, ModelSpec


def profile_model(profile: Profile) -> ModelSpec:
    return ModelSpec(**profile.model)


def profile_points(profile: Profile, dp: DeviceProfile, peak_tflops: float, bandwidth_gbps: float,
                   basis: str = "cpu") -> list[FitPoint]:
    """Every timed unit of ``dp`` as a fit point, against the given datasheet figures."""
    units = {u.kind: u for u in profile_model(profile).units()}
    dtype_bytes = DTYPE_BYTES[profile.dtype]
    pts = []
    for kind, tp, samples in dp.all_samples():
        s = basis_samples(dp, samples, basis)
        for n, c, b, t in zip(s.n, s.c, s.b, s.seconds):
            pts.append(FitPoint(units[kind], n, c, b, tp, peak_tflops * 1e12, bandwidth_gbps * 1e9,
                                dtype_bytes, t))
    return pts


def device_spec_for(dp: DeviceProfile, setup) -> DeviceSpec | None:
    """Datasheet figures of a profiled device: the scenario's device of that id or label, else the
    catalog type named by its label; None when neither knows it."""
    for dev in setup.cluster.devices:
        if dev.id == dp.device:
            return dev.spec
    for dev in setup.cluster.devices:
        if dev.spec.name == dp.label:
            return dev.spec
    return DEVICES.get(dp.label)


def points_by_generation(profile: Profile, setup, basis: str = "cpu") -> dict[str, tuple[list[FitPoint], str]]:
    """Fit points of every profiled device whose datasheet figures are known, grouped by
    generation: {generation: (points, "device, device")}."""
    out: dict[str, tuple[list[FitPoint], list[str]]] = {}
    for dp in profile.devices:
        spec = device_spec_for(dp, setup)
        if spec is None:
            continue
        pts = profile_points(profile, dp, spec.peak_tflops(profile.dtype), spec.memory_bandwidth_gbps, basis)
        acc = out.setdefault(spec.generation, ([], []))
        acc[0].extend(pts)
        acc[1].append(dp.device)
    return {g: (pts, ", ".join(devs)) for g, (pts, devs) in out.items()}


def calibrate(path: str | Path, setup, constants: dict[str, GenerationConstants],
              basis: str = "cpu") -> dict[str, tuple[GenerationConstants, str]]:
    """Constants refitted on the profile at ``path``: {generation: (constants, profiled devices)}.
    Profiled devices that are neither in the scenario nor in the catalog are left out (their
    datasheet figures are unknown); a profile with none left is an InputError."""
    profile = load_profile(path)
    groups = points_by_generation(profile, setup, basis)
    if not groups:
        listed = ", ".join(f"{dp.device} (label {dp.label})" for dp in profile.devices)
        raise InputError(f"none of the profile's devices ({listed}) is a device of the scenario or a "
                         f"catalog type, so their datasheet figures are unknown", file=str(path))
    return {gen: (fit_constants(pts, constants[gen], fixed={floor_kept_at_zero(gen): 0.0}), devs)
            for gen, (pts, devs) in groups.items()}


def holdout_errors(points: list[FitPoint], start: GenerationConstants,
                   generation: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Relative errors on a seeded quarter of the points held out of the fit (the fitted model's
    hold-out rule): (calibrated on the rest, ``start`` uncalibrated)."""
    keep = holdout_mask(len(points))
    train = [p for p, k in zip(points, keep) if k]
    test = [p for p, k in zip(points, keep) if not k]
    y = np.array([p.seconds for p in test])
    fitted = fit_constants(train, start, fixed={floor_kept_at_zero(generation): 0.0})
    return np.abs(predict_points(test, fitted) / y - 1), np.abs(predict_points(test, start) / y - 1)
