"""Dynamics reports on disk: CSV tables and one PNG figure, each written atomically.

A report folder holds ``sessions.csv`` (one row per session), ``spines.csv`` (one row per spine),
``survival.csv`` (survival of every cohort), ``sizes.csv`` (one row per spine and session, when
head sizes were measured) and ``dynamics.png``. The figure is drawn by :func:`draw_dynamics_figure`
into any matplotlib ``Figure``, so the napari widget shows the same plot (on its Qt canvas) as the
file. Nothing here imports pyplot: figures are plain ``matplotlib.figure.Figure`` objects saved
with the Agg backend, so this works without a display.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .atomic import atomic_open, atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..core.dynamics import DynamicsResult

GAIN_COLOUR = "#2a9d4b"
LOSS_COLOUR = "#d1495b"
COUNT_COLOUR = "#3d5a80"


def write_table_csv(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write ``table`` as CSV (no index, 6 significant digits) atomically; returns the path."""
    path = Path(path)
    with atomic_open(path, "w", newline="", encoding="utf-8") as f:
        table.to_csv(f, index=False, float_format="%.6g")
    return path


def draw_dynamics_figure(
    figure: Figure,
    sessions: pd.DataFrame,
    survival: pd.DataFrame | None = None,
    sizes: pd.DataFrame | None = None,
    title: str | None = None,
    vertical: bool = False,
) -> None:
    """Draw the dynamics figure into ``figure`` (cleared first); panels side by side, or stacked
    when ``vertical`` (a narrow dock widget).

    Panels: survival of the spines present in session 0 (and of the spines gained in each later
    session, dashed), gains and losses per session with the spine count, and, with ``sizes``, the head
    size of each spine relative to its first session with the median.
    """
    figure.clear()
    n_panels = 3 if sizes is not None and len(sizes) else 2
    axes = figure.subplots(n_panels, 1) if vertical else figure.subplots(1, n_panels)
    t = sessions["t"].to_numpy()

    ax = axes[0]
    ax.plot(t, sessions["survival"], "o-", color=COUNT_COLOUR, label="present in session 0")
    if survival is not None and len(survival):
        new = survival[(survival["cohort"] > 0) & (survival["cohort"] < t.max())]
        for i, (_, rows) in enumerate(new.groupby("cohort")):
            ax.plot(rows["t"], rows["fraction"], "s--", color=GAIN_COLOUR, alpha=0.7, markersize=4,
                    label="gained in a later session" if i == 0 else None)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("session")
    ax.set_ylabel("surviving fraction")
    ax.set_title("survival")
    ax.legend(fontsize="small", loc="lower left")

    ax = axes[1]
    ax.bar(t, sessions["gained"], color=GAIN_COLOUR, label="gained")
    ax.bar(t, -sessions["lost"], color=LOSS_COLOUR, label="lost")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("session")
    ax.set_ylabel("spines gained / lost (vs previous session)")
    ax.set_title("gains and losses")
    counts = ax.twinx()
    if "density_per_um" in sessions and sessions["density_per_um"].notna().any():
        counts.plot(t, sessions["density_per_um"], "o-", color=COUNT_COLOUR, label="density")
        counts.set_ylabel("spines per µm of dendrite", color=COUNT_COLOUR)
        counts.set_ylim(0, max(float(np.nanmax(sessions["density_per_um"])) * 1.2, 1e-3))
    else:
        counts.plot(t, sessions["n_present"], "o-", color=COUNT_COLOUR, label="spines present")
        counts.set_ylabel("spines present", color=COUNT_COLOUR)
        counts.set_ylim(0, max(int(sessions["n_present"].max()) * 1.2, 1))
    handles = ax.get_legend_handles_labels()[0] + counts.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize="small", loc="lower left")
    span = max(int(sessions[["gained", "lost"]].to_numpy().max()) if len(sessions) else 0, 1)
    ax.set_ylim(-1.3 * span, 1.3 * span)

    if n_panels == 3:
        ax = axes[2]
        for _, track in sizes.dropna(subset=["size_change"]).groupby("track_id"):
            ax.plot(track["t"], track["size_change"], color="0.75", linewidth=0.6)
        if "median_size_change" in sessions:
            ax.plot(t, sessions["median_size_change"], "o-", color="black", label="median")
        ax.axhline(1, color="black", linewidth=0.6, linestyle=":")
        ax.set_xlabel("session")
        ax.set_ylabel("head size / size in first session")
        ax.set_title("spine head size")
        ax.legend(fontsize="small", loc="upper left")

    for ax in axes:
        if len(t):
            ax.set_xticks(t)
    if title:
        figure.suptitle(title)
    figure.tight_layout()


def new_figure(width_in: float = 13.0, height_in: float = 4.2) -> Figure:
    """A pyplot-free figure (Agg canvas) of the given size in inches."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_in, height_in), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def save_figure_png(figure: Figure, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save ``figure`` as PNG atomically; returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi)
    return path


def write_dynamics_report(result: DynamicsResult, out_dir: str | os.PathLike,
                          title: str | None = None) -> list[Path]:
    """Write the tables of ``result`` and its figure into ``out_dir``; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [
        write_table_csv(result.sessions, out / "sessions.csv"),
        write_table_csv(result.spines, out / "spines.csv"),
        write_table_csv(result.survival, out / "survival.csv"),
    ]
    if result.sizes is not None:
        written.append(write_table_csv(result.sizes, out / "sizes.csv"))
    figure = new_figure(width_in=13.0 if result.sizes is not None else 9.0)
    draw_dynamics_figure(figure, result.sessions, result.survival, result.sizes, title=title)
    written.append(save_figure_png(figure, out / "dynamics.png"))
    return written
