import pandas as pd
import pytest

from napari_spine_tracker.errors import InputError
from napari_spine_tracker.io.tables import (
    REQUIRED_COLUMNS,
    default_table_path,
    looks_like_spine_table,
    read_spine_table,
    read_suggestions,
    suggestions_path,
    write_spine_table,
    write_suggestions,
)


def _table(**extra):
    data = dict(track_id=[1, 2, 1], t=[0, 0, 1], z=[1.5, 2, 3], y=[3, 4, 5], x=[5, 6, 7],
                score=[0.9, 0.8, 1.0], status=["predicted", "confirmed", "added"])
    data.update(extra)
    return pd.DataFrame(data)


def test_round_trip_keeps_unknown_columns(tmp_path):
    table = _table(head_radius_um=[0.31, 0.42, 0.5], note=["a", "b", "c"])
    path = write_spine_table(table, tmp_path / "s.csv")
    back = read_spine_table(path)
    assert list(back.columns) == [*REQUIRED_COLUMNS, "head_radius_um", "note"]
    back = back.sort_values(["track_id", "t"]).reset_index(drop=True)
    expected = table.sort_values(["track_id", "t"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(back, expected, check_dtype=False)


def test_status_written_by_hand_is_read_stripped_and_a_missing_one_as_predicted():
    from napari_spine_tracker.io.tables import validate_spine_table

    table = validate_spine_table(_table(status=[" confirmed", None, "added "]))
    assert table["status"].tolist() == ["confirmed", "predicted", "added"]
    assert table["status"].dtype == object
    with pytest.raises(InputError, match=r"unknown status \['1'\]"):
        validate_spine_table(_table(status=[1, "added", "added"]))


@pytest.mark.parametrize("column", ["track_id", "t", "x"])
def test_missing_column_is_named(tmp_path, column):
    path = tmp_path / "bad.csv"
    _table().drop(columns=[column]).to_csv(path, index=False)
    with pytest.raises(InputError, match=column):
        read_spine_table(path)


def test_truth_without_score_and_status_gets_defaults(tmp_path):
    path = tmp_path / "truth.csv"
    _table().drop(columns=["score", "status"]).to_csv(path, index=False)
    table = read_spine_table(path)
    assert (table["score"] == 1.0).all() and (table["status"] == "confirmed").all()


@pytest.mark.parametrize(("column", "value", "message"), [
    ("status", "maybe", "unknown status"),
    ("track_id", 0, "track_id must be >= 1"),
    ("score", 1.5, "score must lie"),
    ("x", "abc", "must hold numbers"),
])
def test_bad_values_rejected(column, value, message, tmp_path):
    table = _table()
    table[column] = table[column].astype(object)
    table.loc[1, column] = value
    path = tmp_path / "bad.csv"
    table.to_csv(path, index=False)
    with pytest.raises(InputError, match=message):
        read_spine_table(path)


def test_duplicate_spine_in_session_rejected(tmp_path):
    table = _table(track_id=[1, 1, 1], t=[0, 0, 1])
    with pytest.raises(InputError, match="twice"):
        write_spine_table(table, tmp_path / "dup.csv")


def test_empty_table_round_trips(tmp_path):
    path = write_spine_table(_table().iloc[:0], tmp_path / "empty.csv")
    assert read_spine_table(path).empty


def test_failed_write_leaves_previous_file(tmp_path):
    path = write_spine_table(_table(), tmp_path / "s.csv")
    before = path.read_text()
    with pytest.raises(InputError):
        write_spine_table(_table(status=["bogus"] * 3), path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.csv"]


def test_sniffing_and_default_path(tmp_path):
    good = write_spine_table(_table(), tmp_path / "a.csv")
    other = tmp_path / "b.csv"
    other.write_text("a,b\n1,2\n")
    assert looks_like_spine_table(good) and not looks_like_spine_table(other)
    assert not looks_like_spine_table(tmp_path / "missing.csv")
    assert default_table_path("/d/mouse1.ome.tif").name == "mouse1.spines.csv"
    assert default_table_path("/d/sessions").name == "sessions.spines.csv"


def test_written_files_get_normal_permissions(tmp_path):
    import os
    import stat

    path = write_spine_table(_table(), tmp_path / "s.csv")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def test_suggestions_round_trip_most_likely_first_with_empty_for_a_new_spine(tmp_path):
    suggestions = pd.DataFrame({"t": [0, 2, 1], "z": [1.5, 2.0, 3.0], "y": [3.0, 4.0, 5.0], "x": [5.0, 6.0, 7.0],
                                "score": [0.25, 0.38, 0.3], "track_id": [4, 0, 2]})
    path = write_suggestions(suggestions, tmp_path / "m.suggestions.csv")
    lines = path.read_text().splitlines()
    assert lines[0] == "t,z,y,x,score,expected_track_id"
    assert lines[1].startswith("2,") and lines[1].endswith(",")  # no track expected: left empty
    back = read_suggestions(path)
    expected = suggestions.sort_values("score", ascending=False).reset_index(drop=True)
    pd.testing.assert_frame_equal(back, expected, check_dtype=False)
    assert back["t"].dtype == "int64" and back["track_id"].dtype == "int64"
    assert not looks_like_spine_table(path)  # the reader never opens it as spines
    # without an expected track anywhere
    write_suggestions(suggestions.drop(columns="track_id"), path)
    assert (read_suggestions(path)["track_id"] == 0).all()


@pytest.mark.parametrize("text, message", [
    ("t,z,y,x,score\n0,1,2,3,0.3\n", "lacks the column\\(s\\) expected_track_id"),
    ("t,z,y,x,score,expected_track_id\n0.5,1,2,3,0.3,\n", "'t' row 0 holds 0.5"),
    ("t,z,y,x,score,expected_track_id\n0,1,2,x,0.3,\n", "'x' row 0 holds 'x'"),
    ("", "not a readable CSV"),
])
def test_a_bad_suggestions_file_is_refused_with_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "m.suggestions.csv"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        read_suggestions(path)
    with pytest.raises(InputError, match="no suggestions file"):
        read_suggestions(tmp_path / "missing.suggestions.csv")


def test_suggestions_sit_beside_their_table(tmp_path):
    assert suggestions_path(tmp_path / "m1.spines.csv") == tmp_path / "m1.suggestions.csv"
    assert suggestions_path(tmp_path / "m1.spines.autosave.csv") == tmp_path / "m1.suggestions.csv"
    assert suggestions_path(tmp_path / "result.csv") == tmp_path / "result.suggestions.csv"
