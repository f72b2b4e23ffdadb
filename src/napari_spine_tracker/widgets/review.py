"""Review and correction of the ``spines`` layer: pure edits from core/edits bound to keys and buttons.

:class:`SpineEditor` owns the edit loop of the ``spines`` Points layer: each correction runs a pure
function on the layer's ``(data, features)``, assigns the result to the layer, keeps the ``spine
tracks`` layer in step, records an undo snapshot and emits ``changed`` (the main widget autosaves).
napari's own tools are folded into the same loop: a point added in napari's add mode becomes a new
spine (or continues the selected one with "link"), a dragged prediction becomes ``edited``, a
point deleted with napari's Delete key is recorded for undo.

:class:`ReviewPanel` is the button panel. Keys work when the ``spines`` layer is the active layer;
none of them clashes with napari's Points keys (1-5, P, S, Z, A, Delete, Backspace). The detection's
suggestions of missed spines sit in a Points layer of their own under the spines: G visits them
(where a track expected a spine first, ``edits.review_order``), and Y makes the one shown a spine;
a suggestion where a spine now lies is hidden, so undo brings it back.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
from napari.layers import Points
from napari.layers.base._base_constants import ActionType
from napari.utils.notifications import show_info, show_warning
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QGridLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from ..core import edits
from ..core.edits import SpineState
from ..errors import InputError
from ..io.tables import LINK_COLUMN
from . import _layers

log = logging.getLogger(__name__)

#: key, editor method, help text (the user guide's key table says the same)
KEYS: list[tuple[str, str, str]] = [
    ("C", "confirm_selected", "Confirm the selected prediction(s)"),
    ("N", "jump_to_next", "Jump to the next unconfirmed prediction, least certain first"),
    ("J", "jump_to_next_link", "Jump to the next doubtful link: the spine found farthest from where its "
                               "track was expected first (a new spine may have taken a lost neighbour's id)"),
    ("G", "jump_to_next_suggestion", "Go to the next suggestion of a missed spine (amber squares); where a track "
                                     "expected a spine first"),
    ("Y", "accept_suggestion", "Yes: the suggestion shown is a spine; it continues the track expected there "
                               "(or the selected spine in link mode, or gets a new id); then go to the next"),
    ("T", "assign_selected", "Assign the selected point to track N (re-link; swaps with N's point "
                             "in this session). N is the spine selected before this one"),
    ("M", "merge_selected", "Merge: the selected spine joins track N (or the two selected spines join)"),
    ("X", "split_selected", "Split the selected spine's track: from this session on it gets a new id"),
    ("R", "toggle_reviewed", "Mark this session reviewed (every spine in it is labelled) / unmark"),
    ("L", "toggle_link", "Link: a point added with napari's add tool (P) continues the selected spine"),
    ("Control-Z", "undo", "Undo the last correction"),
    ("Control-Shift-Z", "redo", "Redo"),
    ("Control-C", "copy_selected", "Copy the selected spines"),
    ("Control-V", "paste", "Paste copied spines into this session, keeping their ids where free"),
]


def _offered(suggestions: pd.DataFrame | None) -> pd.DataFrame | None:
    """Suggestions as the editor keeps them: in the order G visits them (``edits.review_order``),
    rows 0..N-1, and a ``track_id`` column (0 where no track is expected); None when there are none."""
    if suggestions is None or not len(suggestions):
        return None
    if "track_id" not in suggestions:  # no track expected anywhere
        suggestions = suggestions.assign(track_id=0)
    return edits.review_order(suggestions)  # rows renumbered


class SpineEditor(QObject):
    """The edit loop of the ``spines`` layer (see module docstring). Main thread only."""

    #: after every edit, undo, redo, when a spines layer appears or suggestions are set; carries
    #: nothing, read ``state``
    changed = Signal()
    #: after N, J or G moved to a point (the counts in a row may have changed); nothing to save
    visited = Signal()

    def __init__(self, viewer, geometry: Callable[[], tuple[Sequence[float], Sequence[float]] | None] | None = None,
                 ) -> None:
        """``geometry()`` gives the (scale, translate) of the image the spines belong to (None when
        there is none): a spines layer that comes without either, as a table opened from disk,
        takes them, so that its points lie on the image and distances are in µm."""
        super().__init__()
        self.viewer = viewer
        self._geometry = geometry
        self.history = edits.EditHistory()
        self.layer: Points | None = None
        self.link_new_points = False
        self.previous_track_id: int | None = None  #: the spine selected before the current one
        self._current_track_id: int | None = None
        self._clipboard: tuple[np.ndarray, object] | None = None
        self._last_jump: tuple[float, int] | None = None  # (score, index) of the prediction visited last
        self._last_link: tuple[float, int] | None = None  # (link_um, index) of the link visited last
        #: the detection's suggestions of missed spines (t, z, y, x voxels, score), in G's order
        self._suggestions: pd.DataFrame | None = None
        self._last_suggestion: int | None = None  # its row visited last
        #: per walk ("N", "J"): the points it visited and left as they were, in a row (a correction
        #: of one starts the count again); a quick pass stops at about 10 (README, "The review's work")
        self.right_in_a_row = {"N": 0, "J": 0}
        self._visit: tuple[str, int, np.ndarray, int] | None = None  # (walk, index, point, track id)
        #: the suggestions G showed and left open, in a row (one made a spine starts it again); a
        #: quick pass stops at 5
        self.not_spines_in_a_row = 0
        self._syncing = False
        viewer.layers.events.inserted.connect(self._on_layer_inserted)
        viewer.layers.events.removed.connect(self._on_layer_removed)
        if _layers.SPINES_LAYER in viewer.layers:
            self._attach(viewer.layers[_layers.SPINES_LAYER])

    # ---------------------------------------------------------------------------------------
    # state

    @property
    def reviewed_sessions(self) -> frozenset[int]:
        return frozenset(_layers.reviewed_sessions_of(self.layer.metadata)) if self.layer else frozenset()

    @property
    def state(self) -> SpineState | None:
        """The layer as a snapshot (None without a spines layer)."""
        if self.layer is None:
            return None
        return SpineState(np.array(self.layer.data, dtype=float).reshape(-1, 4),
                          edits.typed_features(self.layer.features), self.reviewed_sessions)

    def current_session(self) -> int:
        """The session shown by the viewer's time slider."""
        if self.layer is None:
            return 0
        return round(float(self.layer.world_to_data(self.viewer.dims.point)[0]))

    def show(self, state: SpineState, *, scale=None, translate=None) -> Points:
        """Show ``state`` in the spines layer: a new layer starts a new undo history; replacing the
        contents of an existing one is an undoable step."""
        if self.layer is not None:
            if scale is not None:
                self.layer.scale = scale
            if translate is not None:
                self.layer.translate = translate
            self._suggestions = None  # those of the table replaced (a detection sets its own after this)
            self._apply(state, selected=set())
            self._forget_visits()  # a new table: N, J and G start from its top again
            return self.layer
        kwargs = _layers.spine_points_kwargs(state.data, state.features, scale=scale, translate=translate,
                                             reviewed_sessions=state.reviewed_sessions)
        layer = self.viewer.add_points(**kwargs)  # attached by _on_layer_inserted
        if self.layer is not layer:
            self._attach(layer)
        return layer

    # ---------------------------------------------------------------------------------------
    # attaching to a layer

    def _on_layer_inserted(self, event) -> None:
        layer = event.value
        if self.layer is None and isinstance(layer, Points) and layer.name == _layers.SPINES_LAYER:
            self._attach(layer)

    def _on_layer_removed(self, event) -> None:
        if event.value.name == _layers.SUGGESTIONS_LAYER and event.value is not self.layer:
            self._suggestions = None  # the user closed them
            return
        if event.value is self.layer:
            self._detach()
            if _layers.TRACKS_LAYER in self.viewer.layers:
                self.viewer.layers.remove(_layers.TRACKS_LAYER)
            self.changed.emit()

    def _attach(self, layer: Points) -> None:
        if "track_id" not in layer.features.columns or layer.ndim != 4:
            show_warning(f"layer {layer.name!r} is not a spines layer (needs 4D points with a track_id "
                         "feature); open a spine table or run detection.")
            return
        self.layer = layer
        if self._geometry is not None and np.allclose(layer.scale, 1.0) and np.allclose(layer.translate, 0.0):
            found = self._geometry()
            if found is not None:
                layer.scale, layer.translate = found
        self._forget_visits()
        # they belong to the detection that made another table; a table opened from disk may
        # bring its own (saved beside it)
        self._suggestions = _offered(_layers.take_suggestions(layer.metadata))
        layer.events.data.connect(self._on_data)
        layer.selected_data.events.items_changed.connect(self._on_selection)
        for key, method, _ in KEYS:
            layer.bind_key(key, self._key_handler(method), overwrite=True)
        state = self.state
        self.history.reset(state)
        self._sync_tracks(state)
        self._sync_suggestions()
        self.changed.emit()

    def _detach(self) -> None:
        if self.layer is not None:
            self.layer.events.data.disconnect(self._on_data)
            self.layer.selected_data.events.items_changed.disconnect(self._on_selection)
        self.layer = None
        self.history = edits.EditHistory()
        self._forget_visits()
        self._suggestions = None
        self._sync_suggestions()

    def _forget_visits(self) -> None:
        """N, J and G continue after what they visited last; another table starts them over."""
        self._last_jump, self._last_link, self._last_suggestion = None, None, None
        self.right_in_a_row = {"N": 0, "J": 0}
        self._visit = None
        self.not_spines_in_a_row = 0

    def _count_visit(self, walk: str, index: int) -> None:
        """Count the point N or J showed last as right if it is still there as it was (confirming it
        is no correction), else start that walk's count again; then remember ``index``."""
        if self._visit is not None:
            last_walk, at, point, track_id = self._visit
            layer = self.layer
            kept = (at < len(layer.data) and np.array_equal(layer.data[at], point)
                    and int(layer.features["track_id"].iat[at]) == track_id
                    and layer.features["status"].iat[at] in ("predicted", "confirmed"))
            self.right_in_a_row[last_walk] = self.right_in_a_row[last_walk] + 1 if kept else 0
        self._visit = (walk, index, np.array(self.layer.data[index]), int(self.layer.features["track_id"].iat[index]))

    def _key_handler(self, method: str) -> Callable:
        def handler(layer):
            getattr(self, method)()
        handler.__doc__ = dict((m, h) for _, m, h in KEYS)[method]
        return handler

    # ---------------------------------------------------------------------------------------
    # applying states

    @contextlib.contextmanager
    def _syncing_layer(self) -> Iterator[None]:
        self._syncing, before = True, self._syncing
        try:
            yield
        finally:
            self._syncing = before

    def _apply(self, state: SpineState, *, record: bool = True, merge_key: object = None,
               selected: set[int] | None = None) -> None:
        """Put ``state`` into the layers; ``record`` adds an undo step and emits ``changed``."""
        layer = self.layer
        keep = selected if selected is not None else {i for i in layer.selected_data if i < len(state.data)}
        with self._syncing_layer():
            layer.selected_data = set()
            layer.data = state.data
            layer.features = state.features
            if len(state.data):
                layer.face_color = _layers.id_colours(state.features["track_id"])
                layer.border_color = _layers.status_borders(state.features)
            layer.metadata = {**layer.metadata,
                              **_layers.spine_layer_metadata(state.reviewed_sessions)}
            layer.selected_data = keep
        self._sync_tracks(state)
        self._sync_suggestions()
        if record:
            self.history.push(state, merge_key=merge_key)
            self.changed.emit()

    def _sync_tracks(self, state: SpineState) -> None:
        layers = self.viewer.layers
        if not len(state.data):
            if _layers.TRACKS_LAYER in layers:
                layers.remove(_layers.TRACKS_LAYER)
            return
        if _layers.TRACKS_LAYER in layers:
            tracks = layers[_layers.TRACKS_LAYER]
            data, properties = _layers.tracks_data(state.data, state.features)
            tracks.data = data
            tracks.properties = properties
            tracks.color_by = "colour"
            tracks.scale, tracks.translate = self.layer.scale, self.layer.translate
        else:
            kwargs = _layers.spine_tracks_kwargs(state.data, state.features, scale=self.layer.scale,
                                                 translate=self.layer.translate)
            self.viewer.add_tracks(**kwargs)
            # keep the spines layer on top and active, so that its keys work
            layers.move(layers.index(self.layer), len(layers))
            layers.selection.active = self.layer

    # ---------------------------------------------------------------------------------------
    # suggestions of missed spines

    @property
    def suggestions(self) -> pd.DataFrame | None:
        """The suggestions on offer (``t, z, y, x, score, track_id``; those where a spine now lies
        included), None when there are none or the user closed their layer."""
        return None if self._suggestions is None else self._suggestions.copy()

    def set_suggestions(self, suggestions: pd.DataFrame | None) -> int:
        """Offer ``suggestions`` (``t, z, y, x`` in the spines layer's voxels, ``score``, optionally
        ``track_id``, as ``detect_series(return_suggestions=True)`` gives them) beside the spines,
        visited by G in ``edits.review_order``. Returns how many are open (not where a spine already is)."""
        self._suggestions = _offered(suggestions)
        self._last_suggestion = None
        offered = len(self._sync_suggestions())
        self.changed.emit()
        return offered

    def _open_rows(self) -> np.ndarray:
        """Rows of the suggestions still open (edits.open_suggestions), in the order G visits them."""
        if self.layer is None or self._suggestions is None:
            return np.zeros(0, dtype=int)
        return np.flatnonzero(edits.open_suggestions(np.asarray(self.layer.data, float), self._suggestions,
                                                     self.layer.scale[1:]))

    def _sync_suggestions(self) -> np.ndarray:
        """Show the open suggestions (the one visited last outlined white) under the spines, or no
        suggestions layer when there is nothing to offer. Returns the open rows."""
        layers = self.viewer.layers
        if self.layer is None or self._suggestions is None:
            if _layers.SUGGESTIONS_LAYER in layers:
                layers.remove(_layers.SUGGESTIONS_LAYER)
            return np.zeros(0, dtype=int)
        rows = self._open_rows()
        points = self._suggestions.loc[rows, ["t", "z", "y", "x"]].to_numpy(float).reshape(-1, 4)
        borders = np.tile(_layers.SUGGESTION_BORDER, (len(rows), 1))
        borders[rows == self._last_suggestion] = _layers.CURRENT_SUGGESTION_BORDER
        chosen = self._suggestions.iloc[rows]
        features = _layers.suggestion_features(chosen["score"].to_numpy(float), chosen["track_id"].to_numpy(int))
        if _layers.SUGGESTIONS_LAYER in layers:
            layer = layers[_layers.SUGGESTIONS_LAYER]
            layer.data = points
            layer.features = features
            layer.border_color = borders if len(rows) else np.asarray(_layers.SUGGESTION_BORDER)
            layer.scale, layer.translate = self.layer.scale, self.layer.translate
        else:
            kwargs = _layers.suggestion_points_kwargs(points, features, scale=self.layer.scale,
                                                      translate=self.layer.translate)
            if len(rows):
                kwargs["border_color"] = borders
            self.viewer.add_points(**kwargs)
            # under the spines, which stay active so that their keys work
            layers.move(layers.index(self.layer), len(layers))
            layers.selection.active = self.layer
        return rows

    def jump_to_next_suggestion(self) -> int | None:
        """Move time, z and camera to the next open suggestion of a missed spine, in
        ``edits.review_order`` (outlined white); Y accepts it. Returns its row in the suggestions."""
        if self.layer is None or self._suggestions is None:
            show_info("no suggestions of missed spines: they come with a detection run.")
            return None
        rows = self._open_rows()
        if not len(rows):
            show_info("no suggestion left: a spine lies at each one now.")
            return None
        if self._last_suggestion is not None:  # the one shown last: left open, or made a spine
            shown_open = self._last_suggestion in rows
            self.not_spines_in_a_row = self.not_spines_in_a_row + 1 if shown_open else 0
        later = rows[rows > self._last_suggestion] if self._last_suggestion is not None else rows
        row = int(later[0] if len(later) else rows[0])
        self._last_suggestion = row
        self._sync_suggestions()  # its outline
        self._look_at(self._suggestions.loc[row, ["t", "z", "y", "x"]].to_numpy(float))
        self.viewer.layers.selection.active = self.layer
        self.visited.emit()
        return row

    def accept_suggestion(self) -> None:
        """The suggestion visited last is a spine: add it, then go to the next suggestion. Its id:
        the selected spine's in link mode, else as ``edits.accept_suggestion`` gives it (the track
        the tracker expected there, where it is still free, else a new one)."""
        row = self._last_suggestion
        if row is None or row not in self._open_rows():
            show_info("no suggestion shown: press G to go to one.")
            return
        selected = self._selection()
        point = self._suggestions.loc[row, ["t", "z", "y", "x"]].to_numpy(float)
        if self.link_new_points and len(selected) == 1:
            added = self._edit(edits.add_spine, point, selected=set(),
                               track_id=int(self.layer.features["track_id"].iloc[selected[0]]))
        else:
            added = self._edit(edits.accept_suggestion, point, int(self._suggestions["track_id"].iloc[row]),
                               selected=set())
        if added:
            self.jump_to_next_suggestion()

    def _edit(self, function: Callable, *args, merge_key: object = None, selected=None, **kwargs) -> bool:
        """Run a pure edit on the current state and apply it; a user error becomes a warning."""
        if self.layer is None:
            show_warning("no spines layer: run detection or open a spine table first.")
            return False
        state = self.state
        try:
            data, features = function(state.data, state.features, *args, **kwargs)
        except InputError as exc:
            show_warning(str(exc))
            return False
        self._apply(SpineState(data, features, state.reviewed_sessions), merge_key=merge_key,
                    selected=selected)
        return True

    # ---------------------------------------------------------------------------------------
    # napari's own tools

    def _on_data(self, event) -> None:
        if self._syncing or self.layer is None:
            return
        if event.action == ActionType.ADDED:
            self._on_points_added(len(event.data_indices))
        elif event.action == ActionType.REMOVED:
            self.history.push(self.state)
            self._sync_tracks(self.state)
            self.changed.emit()
        elif event.action == ActionType.CHANGED:
            indices = tuple(int(i) for i in event.data_indices if 0 <= int(i) < len(self.layer.data))
            if indices:
                self._edit(edits.mark_edited, indices, merge_key=("move", indices))

    def _on_points_added(self, count: int) -> None:
        layer = self.layer
        n_before = len(layer.data) - count
        data = np.asarray(layer.data[:n_before], float)
        features = edits.typed_features(layer.features.iloc[:n_before])
        link = None
        selected = [i for i in layer.selected_data if i < n_before]
        if self.link_new_points and len(selected) == 1:
            link = int(features["track_id"].iloc[selected[0]])
        for point in np.asarray(layer.data[n_before:], float):
            try:
                data, features = edits.add_spine(data, features, point, track_id=link)
            except InputError as exc:
                show_warning(f"{exc} It gets a new id.")
                data, features = edits.add_spine(data, features, point)
        self._apply(SpineState(data, features, self.reviewed_sessions))

    def _on_selection(self, *_) -> None:
        if self._syncing or self.layer is None:
            return
        selected = sorted(self.layer.selected_data)
        if len(selected) != 1:
            return
        track_id = int(self.layer.features["track_id"].iloc[selected[0]])
        if track_id != self._current_track_id:
            self.previous_track_id, self._current_track_id = self._current_track_id, track_id

    # ---------------------------------------------------------------------------------------
    # corrections (bound to keys and buttons)

    def _selection(self) -> list[int]:
        return sorted(self.layer.selected_data) if self.layer is not None else []

    def confirm_selected(self) -> None:
        self._edit(edits.confirm_spines, self._selection())

    def delete_selected(self) -> None:
        self._edit(edits.delete_spines, self._selection(), selected=set())

    def assign_selected(self, track_id: int | None = None) -> None:
        """Selected point -> track ``track_id`` (default: the spine selected before it)."""
        track_id = track_id or self.previous_track_id
        selected = self._selection()
        if len(selected) != 1 or not track_id:
            show_warning("select the spine to re-link first, then the point to give its id (or set N).")
            return
        self._edit(edits.assign_track, selected[0], int(track_id))

    def merge_selected(self, track_id: int | None = None) -> None:
        """The selected spine joins track ``track_id``; or two selected spines join (lower id kept)."""
        if self.layer is None:
            return
        ids = sorted({int(self.layer.features["track_id"].iloc[i]) for i in self._selection()})
        if len(ids) == 2:
            keep, other = ids
        elif len(ids) == 1 and (track_id or self.previous_track_id):
            keep, other = int(track_id or self.previous_track_id), ids[0]
        else:
            show_warning("select a point of the spine to merge (and set N), or points of two spines.")
            return
        self._edit(edits.merge_tracks, keep, other)

    def split_selected(self) -> None:
        selected = self._selection()
        if len(selected) != 1:
            show_warning("select one point: its track is split from that point's session on.")
            return
        track_id = int(self.layer.features["track_id"].iloc[selected[0]])
        session = round(float(self.layer.data[selected[0], 0]))
        self._edit(edits.split_track, track_id, session)

    def toggle_reviewed(self, session: int | None = None) -> None:
        if self.layer is None:
            return
        session = self.current_session() if session is None else session
        state = self.state
        reviewed = state.reviewed_sessions ^ {session}
        self._apply(SpineState(state.data, state.features, frozenset(reviewed)))
        show_info(f"session {session} {'marked reviewed' if session in reviewed else 'no longer reviewed'}")

    def toggle_link(self) -> None:
        self.link_new_points = not self.link_new_points
        self.changed.emit()

    def jump_to_next(self) -> int | None:
        """Select the next unconfirmed prediction and move time, z and camera to it."""
        if self.layer is None:
            return None
        index = edits.next_unconfirmed(self.layer.features, after=self._last_jump)
        if index is None:
            show_info("no unconfirmed prediction left.")
            return None
        self._last_jump = (float(self.layer.features["score"].iloc[index]), index)
        self._count_visit("N", index)
        return self._go_to(index)

    def jump_to_next_link(self) -> int | None:
        """Select the predicted spine whose link to its track is the next most doubtful (found
        farthest from where the track was expected) and move time, z and camera to it."""
        if self.layer is None:
            return None
        features = self.layer.features
        index = edits.next_doubtful_link(features, after=self._last_link)
        if index is None:
            show_info("no predicted link left to check." if LINK_COLUMN in features.columns
                      else "these spines carry no link distances (link_um): run detection to get them.")
            return None
        self._last_link = (float(features[LINK_COLUMN].iloc[index]), index)
        self._count_visit("J", index)
        return self._go_to(index)

    def _go_to(self, index: int) -> int:
        """Select point ``index`` and move time, z and camera to it."""
        self._look_at(self.layer.data[index])
        self.layer.selected_data = {index}
        self.viewer.layers.selection.active = self.layer
        self.visited.emit()
        return index

    def _look_at(self, point) -> None:
        """Move time, z and camera to ``point`` (t, z, y, x in the spines layer's voxels)."""
        world = np.asarray(self.layer.data_to_world(np.asarray(point, float)), float)
        ndim = self.viewer.dims.ndim
        self.viewer.dims.set_point(list(range(ndim - 4, ndim)), list(world))
        self.viewer.camera.center = tuple(world[-3:]) if self.viewer.dims.ndisplay == 3 else tuple(world[-2:])

    def copy_selected(self) -> None:
        selected = self._selection()
        if selected:
            self._clipboard = (np.array(self.layer.data[selected], float),
                               self.layer.features.iloc[selected].reset_index(drop=True))
            show_info(f"copied {len(selected)} spine(s)")

    def paste(self) -> None:
        if self._clipboard is None:
            show_warning("nothing copied: select spines and press Control-C first.")
            return
        n = len(self.layer.data)
        copied_data, copied_features = self._clipboard
        if self._edit(edits.paste_spines, copied_data, copied_features, self.current_session()):
            self.layer.selected_data = set(range(n, len(self.layer.data)))

    def undo(self) -> None:
        state = self.history.undo()
        if state is None:
            show_info("nothing to undo")
            return
        self._apply(state, record=False)
        self.changed.emit()

    def redo(self) -> None:
        state = self.history.redo()
        if state is None:
            show_info("nothing to redo")
            return
        self._apply(state, record=False)
        self.changed.emit()


class ReviewPanel(QWidget):
    """Buttons for the corrections of :class:`SpineEditor`; each tooltip names its key."""

    def __init__(self, editor: SpineEditor, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.editor = editor
        helps = {method: (key, text) for key, method, text in KEYS}
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.status = QLabel()
        self.status.setWordWrap(True)
        layout.addWidget(self.status)
        grid = QGridLayout()
        layout.addLayout(grid)
        self.buttons: dict[str, QPushButton] = {}

        def button(label: str, method: str, row: int, col: int, call: Callable | None = None, span: int = 1) -> None:
            key, text = helps.get(method, ("Delete", "Delete the selected spine(s) (napari: Delete, 1)"))
            widget = QPushButton(f"{label} ({key.replace('Control-', 'Ctrl+').replace('Shift-', 'Shift+')})")
            widget.setToolTip(text)
            widget.clicked.connect(call or getattr(editor, method))
            grid.addWidget(widget, row, col, 1, span)
            self.buttons[method] = widget

        button("Next", "jump_to_next", 0, 0)
        button("Next link", "jump_to_next_link", 0, 1)
        button("Suggestion", "jump_to_next_suggestion", 1, 0)
        button("Accept", "accept_suggestion", 1, 1)
        button("Confirm", "confirm_selected", 2, 0)
        button("Delete", "delete_selected", 2, 1)
        button("Split", "split_selected", 3, 0)
        button("Merge", "merge_selected", 3, 1, lambda: editor.merge_selected(self.track.value() or None))
        button("Assign", "assign_selected", 4, 0, lambda: editor.assign_selected(self.track.value() or None))
        self.track = QSpinBox()
        self.track.setRange(0, 10**9)
        self.track.setSpecialValueText("N: previous")
        self.track.setToolTip("N for Assign and Merge; 'previous' means the spine selected before the "
                              "current one")
        grid.addWidget(self.track, 4, 1)
        button("Undo", "undo", 5, 0)
        button("Redo", "redo", 5, 1)
        button("Reviewed", "toggle_reviewed", 6, 0, lambda: editor.toggle_reviewed(), span=2)
        self.link = QCheckBox("Link new points to the selected spine (L)")
        self.link.setToolTip(helps["toggle_link"][1])
        self.link.toggled.connect(self._on_link_toggled)
        layout.addWidget(self.link)
        keys = QToolButton()
        keys.setText("Keys…")
        keys.setToolTip("\n".join(f"{key:>16}  {text}" for key, _, text in KEYS))
        keys.clicked.connect(lambda: show_info("; ".join(f"{k}: {t}" for k, _, t in KEYS)))
        layout.addWidget(keys)
        editor.changed.connect(self.refresh)
        editor.visited.connect(self.refresh)
        self.refresh()

    def _on_link_toggled(self, checked: bool) -> None:
        if self.editor.link_new_points != checked:
            self.editor.link_new_points = checked

    def refresh(self) -> None:
        """Update the status line and the enabled buttons from the editor."""
        editor = self.editor
        state = editor.state
        for widget in self.buttons.values():
            widget.setEnabled(state is not None)
        self.link.setChecked(editor.link_new_points)
        if state is None:
            self.status.setText("No spines yet: run detection, or open a spine table.")
            return
        self.buttons["undo"].setEnabled(editor.history.can_undo)
        self.buttons["redo"].setEnabled(editor.history.can_redo)
        statuses = state.features["status"]
        session = editor.current_session()
        reviewed = sorted(state.reviewed_sessions)
        layers = editor.viewer.layers
        offered = len(layers[_layers.SUGGESTIONS_LAYER].data) if _layers.SUGGESTIONS_LAYER in layers else 0
        self.status.setText(
            f"{len(state.data)} spine points in {state.features['track_id'].nunique()} tracks, "
            f"{int((statuses == 'predicted').sum())} unconfirmed"
            f"{f', {offered} suggestions of missed spines (G)' if offered else ''}.\n"
            f"Session {session}: {'reviewed' if session in reviewed else 'not reviewed'}"
            f"{'; reviewed: ' + ', '.join(map(str, reviewed)) if reviewed else ''}."
            + (f"\nRight in a row: {editor.right_in_a_row['N']} with N, {editor.right_in_a_row['J']} with J; "
               f"not spines in a row: {editor.not_spines_in_a_row} with G (a quick pass stops at about 10, "
               "10 and 5)." if any(editor.right_in_a_row.values()) or editor.not_spines_in_a_row else "")
        )
