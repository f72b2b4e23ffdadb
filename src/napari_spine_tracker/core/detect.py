"""``detect_series``: the one entry point the CLI, the widget and Python users share.

register sessions (phase correlation) -> tiled network inference (peaks with displacement to the
previous session) -> Hungarian linking with gap closing -> spine table.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from ..errors import InputError
from .decode import ADAPT_LOWEST, SUGGEST_FLOOR, VOUCH_BELOW
from .edits import open_suggestions
from .infer import DeviceSessions, InferenceOptions, check_threshold, predict_series
from .link import (
    DEFAULT_GATE_UM,
    DEFAULT_MAX_GAP,
    check_linking,
    keep_vouched,
    link_detections,
    suggested_tracks,
)
from .models import DEFAULT_MODEL, LoadedModel, coarse_model_hint, load_model

log = logging.getLogger(__name__)


def _as_series(series, voxel_size_um):
    """(data (T, Z, Y, X) array-like, voxel size, session shapes) from a Series or an array."""
    shapes = None
    if hasattr(series, "data") and hasattr(series, "voxel_size_um"):  # io.series.Series
        data, shapes = series.data, getattr(series, "session_shapes", None)
        voxel_size_um = voxel_size_um if voxel_size_um is not None else series.voxel_size_um
    else:
        data = series
        if not hasattr(data, "shape") or not hasattr(data, "__getitem__"):
            data = np.asarray(data)
    if data.ndim == 3:
        data = np.asarray(data)[None]
    if data.ndim != 4:
        raise InputError(f"expected a series (T, Z, Y, X) or one session (Z, Y, X), got {data.ndim} "
                         f"dimensions {tuple(data.shape)}; choose a channel or drop extra axes first.")
    if voxel_size_um is None:
        raise InputError("the voxel size is unknown: pass voxel_size_um=(z, y, x) in µm "
                         "(on the command line: --voxel-size Z Y X).")
    voxel = tuple(float(v) for v in np.broadcast_to(np.asarray(voxel_size_um, float), (3,)))
    if not all(np.isfinite(v) and v > 0 for v in voxel):
        raise InputError(f"voxel size must be three positive numbers (z, y, x µm), got {voxel_size_um!r}.")
    if min(data.shape[1:]) < 1 or data.shape[0] < 1:
        raise InputError(f"the series is empty (shape {tuple(data.shape)}).")
    return data, voxel, shapes


def detect_series(series, voxel_size_um: Sequence[float] | None = None, *,
                  model: str | LoadedModel = DEFAULT_MODEL, device: str = "auto",
                  threshold: float | str | None = None, register: bool = True,
                  gate_um: float | str = DEFAULT_GATE_UM,
                  max_gap: int = DEFAULT_MAX_GAP, max_rotation_deg: float = 3.0, views: int | None = None,
                  options: InferenceOptions | None = None, track_evidence: bool = True,
                  return_suggestions: bool = False, progress: Callable[[int, int], None] | None = None,
                  should_stop: Callable[[], bool] | None = None) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
    """Detect and track spines in a series; returns a spine table (DESIGN §3).

    Parameters
    ----------
    series
        An ``io.series.Series`` (from ``load_series``), or an array-like (T, Z, Y, X) or (Z, Y, X);
        lazy arrays are read tile by tile.
    voxel_size_um
        (z, y, x) µm; taken from the Series when omitted.
    model
        A shipped model name, a checkpoint path, or a loaded model.
    device
        ``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda`` or ``mps``.
    threshold
        Peak probability threshold. ``None`` or ``"auto"`` (default): the model's (chosen on
        validation), lowered to the split of this series' own peak scores where that is lower,
        not below 0.3 (another microscope shifts a model's scores; docs/model_report.md, "A threshold
        for each series"; ``decode.series_threshold``). ``"model"``: the model's as it is. A number: that.
        The threshold used is in ``table.attrs["threshold"]``, the model's in ``"model_threshold"``.
    register, gate_um, max_gap
        Rigid registration between sessions; linking gate in µm, or ``"auto"`` (default): from the
        series' own link distances (``link.link_detections``); sessions a spine may be missed and
        keep its id. The gate used is in ``table.attrs["gate_um"]``.
    max_rotation_deg
        The largest turn in the imaging plane that registration looks for between consecutive
        sessions (0: translation only).
    views
        Test-time augmentation: average the heatmap over 1, 2 or 4 mirror images of each tile
        (default 1), at about 3.5 times the network's time with 4: most of a CPU run, a few per
        cent of a GPU run. With the weights shipped before stage 5, on the synthetic test series 4
        views raised F1 / IDF1 from 0.928 / 0.915 to 0.938 / 0.921, and with the adapted threshold
        on a second microscope's series from 0.714 / 0.666 to 0.721 / 0.676 (at a fixed threshold
        they found fewer spines there; docs/model_report.md, "A threshold for each series").
    track_evidence
        Let a track vouch for its dim sessions (default): peaks down to ``decode.VOUCH_BELOW``
        (0.1) under the threshold are linked too, and one under the threshold is kept where the mean
        score of its track reaches the threshold + 0.05 (``link.vouched_by_track``); its ``score``
        stays its own. Held out, F1 / IDF1 on the synthetic test series 0.928 / 0.918 -> 0.935 /
        0.920 and on a second microscope's series 0.808 / 0.764 -> 0.838 / 0.784 (docs/model_report.md,
        "Track evidence"). False: the threshold alone decides.
    return_suggestions
        Also return the suggestions of missed spines: the peaks scoring from
        ``decode.SUGGEST_FLOOR`` (0.2; ``options.suggest_floor`` where set) up to the threshold, at
        least ``decode.SUGGEST_APART_UM`` from every spine of their session, highest score first
        (``t, z, y, x, score, track_id``: the track each would continue, 0 for a new spine;
        ``link.suggested_tracks``); a peak its track vouched for is a spine, not a suggestion. They
        hold a third to a half of the spines the detection misses (36-51 % on held-out synthetic
        series with track evidence), among many that are not spines; the review offers them one
        by one (docs/model_report.md, "Suggestions of missed spines").
    progress, should_stop
        ``progress(done, total)`` is called as work proceeds; ``should_stop()`` is polled per tile
        and per session, and a True answer raises ``errors.Cancelled`` (nothing is written).

    Returns
    -------
    pd.DataFrame
        ``track_id, t, z, y, x, score, status`` (status ``predicted``), ``head_radius_um`` and
        ``link_um`` (``link.link_detections``); coordinates in voxels of each session's own image.
        With ``return_suggestions``: ``(table, suggestions)``.
    """
    from .devices import free_memory
    from .register import check_max_rotation, estimate_motion

    check_max_rotation(max_rotation_deg)
    check_linking(gate_um, max_gap)  # before the work, not after it
    check_threshold(threshold)
    data, voxel, shapes = _as_series(series, voxel_size_um)
    loaded = load_model(model, device=device)
    hint = coarse_model_hint(voxel, model)
    if hint:
        log.warning(hint)
    # progress units: one per session registered, then 100 for inference (linking is quick)
    register_units = data.shape[0] if (register and data.shape[0] > 1) else 0
    total_units = register_units + 100

    def stage(offset: int, units: int):
        def report(done: int, total: int) -> None:
            if progress is not None and total:
                progress(offset + round(units * done / total), total_units)
        return report

    opts = options or InferenceOptions()
    if threshold is not None:
        opts = dataclasses.replace(opts, threshold=threshold)
    if views is not None:
        opts = dataclasses.replace(opts, views=views)
    suggest_floor = opts.suggest_floor if opts.suggest_floor is not None else SUGGEST_FLOOR
    floors = [suggest_floor] if return_suggestions else []
    if track_evidence:  # peaks down to VOUCH_BELOW under the lowest threshold this run can use
        ceiling, adapt = opts.decoding(loaded)
        floors.append(max(0.01, (min(ceiling, ADAPT_LOWEST) if adapt else ceiling) - VOUCH_BELOW))
    if floors:
        opts = dataclasses.replace(opts, suggest_floor=min(floors))
    held = None
    try:
        # on a GPU the series crosses once, held there for registration and inference alike
        held = DeviceSessions.for_run(data, shapes, loaded.device, opts.resident)
        motion = None
        if register_units:
            # on a GPU registration's FFTs run there too (they were a third of a GPU run on the CPU)
            motion = estimate_motion(data if held is None else held, voxel, max_rotation_deg=max_rotation_deg,
                                     progress=stage(0, register_units), should_stop=should_stop,
                                     device=None if loaded.device.type == "cpu" else loaded.device)
        detections = predict_series(data, voxel, loaded, motion=motion, session_shapes=shapes, options=opts,
                                    held=held, progress=stage(register_units, 100), should_stop=should_stop)
        if not loaded.decode.get("use_displacement", True):  # validation found registration links better
            detections = detections.drop(columns=["dz", "dy", "dx"])
        used = detections.attrs["threshold"]
        linked_from = used - VOUCH_BELOW if track_evidence else used
        table = link_detections(detections[detections["score"] >= linked_from].reset_index(drop=True), voxel,
                                motion=motion, gate_um=gate_um, max_gap=max_gap, device=loaded.device,
                                should_stop=should_stop)
        if track_evidence:
            table = keep_vouched(table, used)
    finally:
        if held is not None:
            held.release()
        free_memory(loaded.device)
    drop = [c for c in ("dz", "dy", "dx") if c in table.columns]
    log.info("detected %d spine-sessions in %d tracks (peak threshold %.2f, linking gate %.2f µm)", len(table),
             table["track_id"].nunique(), detections.attrs["threshold"], table.attrs["gate_um"])
    table = table.drop(columns=drop)
    table.attrs.update(detections.attrs, model_threshold=float(loaded.decode["threshold"]))
    if return_suggestions:
        below = detections[(detections["score"] < used) & (detections["score"] >= suggest_floor)]
        suggestions = _apart_from(below, table, voxel)  # those kept by their track are spines now
        # the track each would continue, where the tracker had to close a gap or end a track there
        suggestions["track_id"] = suggested_tracks(table, suggestions, voxel, motion=motion,
                                                   gate_um=table.attrs["gate_um"], max_gap=max_gap)
        return table, suggestions
    return table


def _apart_from(suggestions: pd.DataFrame, kept: pd.DataFrame, voxel_size_um) -> pd.DataFrame:
    """``suggestions`` (``t, z, y, x, score``) at least ``SUGGEST_APART_UM`` from every ``kept``
    point of their session, highest score first."""
    is_open = open_suggestions(kept[["t", "z", "y", "x"]].to_numpy(float), suggestions, voxel_size_um)
    out = suggestions.loc[is_open, ["t", "z", "y", "x", "score"]].sort_values("score", ascending=False, kind="stable")
    out = out.reset_index(drop=True)
    out.attrs = {}
    return out


def threshold_note(table: pd.DataFrame) -> str:
    """What a user should be told about the peak threshold a detection used: that it was lowered
    from the model's to the series' own split; empty when it was not."""
    used, model = table.attrs.get("threshold"), table.attrs.get("model_threshold")
    if not table.attrs.get("threshold_adapted") or used is None or model is None or used >= model:
        return ""
    return f"peak threshold {used:.2f}, lowered from the model's {model:.2f} to this series' own split"
