"""npe2 hooks: reader (spine tables, session folders), writer (Points -> spine table), sample data."""

import numpy as np
import pandas as pd
import pytest

from napari_spine_tracker import _napari
from napari_spine_tracker.errors import InputError
from napari_spine_tracker.io.series import write_series_tiff
from napari_spine_tracker.io.tables import read_spine_table, write_spine_table, write_suggestions

VOXEL = (0.5, 0.1, 0.1)


def _spine_table():
    return pd.DataFrame(dict(track_id=[1, 1, 2], t=[0, 1, 0], z=[1.0, 1.5, 2.0], y=[3.0, 4.0, 5.0],
                             x=[6.0, 7.0, 8.0], score=[0.9, 0.8, 1.0], status=["predicted", "edited", "added"],
                             head_radius_um=[0.3, 0.35, 0.4]))


@pytest.fixture
def session_folder(tmp_path):
    folder = tmp_path / "dendrite3"
    rng = np.random.default_rng(0)
    for day in (1, 2, 10):  # natural order: day10 after day2
        write_series_tiff(folder / f"day{day}.tif", rng.integers(0, 100, (4, 8, 9), dtype=np.uint16) + day,
                          VOXEL)
    return folder


def test_get_reader_declines_what_it_cannot_read(tmp_path):
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    (tmp_path / "binary.csv").write_bytes(b"\xff\xfe\x00garbage")
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("track_id,t,z,y,x\n")
    for path in ["other.csv", "binary.csv", "empty", "notes.txt", "missing.csv", "missing_folder"]:
        assert _napari.get_reader(str(tmp_path / path)) is None, path
    assert _napari.get_reader([str(tmp_path / "other.csv"), str(tmp_path / "notes.txt")]) is None
    assert _napari.get_reader(None) is None


def test_reads_a_spine_table_by_its_header(tmp_path):
    path = tmp_path / "predictions.txt.csv"
    write_spine_table(_spine_table(), path)
    reader = _napari.get_reader(str(path))
    assert reader is not None
    ((data, kwargs, kind),) = reader(str(path))
    assert kind == "points" and kwargs["name"] == "predictions.txt" and kwargs["ndim"] == 4
    assert data.tolist()[0] == [0, 1.0, 3.0, 6.0]
    assert list(kwargs["features"].columns) == ["track_id", "score", "status", "head_radius_um"]
    assert kwargs["features"]["status"].tolist() == ["predicted", "added", "edited"]
    # a NAME.spines.csv opens as the layer the widget corrects
    write_spine_table(_spine_table(), tmp_path / "m1.spines.csv")
    ((_, kwargs, _),) = _napari.get_reader([str(tmp_path / "m1.spines.csv")])(str(tmp_path / "m1.spines.csv"))
    assert kwargs["name"] == "spines"


def test_a_table_brings_the_suggestions_saved_beside_it(tmp_path, caplog):
    path = write_spine_table(_spine_table(), tmp_path / "m1.spines.csv")
    suggestions = pd.DataFrame({"t": [1, 0], "z": [2.0, 1.0], "y": [5.0, 9.0], "x": [6.0, 2.0],
                                "score": [0.3, 0.35], "track_id": [2, 0]})
    write_suggestions(suggestions, tmp_path / "m1.suggestions.csv")
    ((_, kwargs, _),) = _napari.get_reader(str(path))(str(path))
    stored = pd.DataFrame(kwargs["metadata"]["spine_tracker"]["suggestions"])
    assert stored["score"].tolist() == [0.35, 0.3] and stored["track_id"].tolist() == [0, 2]
    # a broken suggestions file costs only the suggestions, with a warning
    (tmp_path / "m1.suggestions.csv").write_text("t,z\n0,1\n")
    ((data, kwargs, _),) = _napari.get_reader(str(path))(str(path))
    assert len(data) == 3 and "suggestions" not in kwargs["metadata"]["spine_tracker"]
    assert "suggestions not opened" in caplog.text and "expected_track_id" in caplog.text


def test_reader_raises_a_clear_error_for_a_broken_table(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("track_id,t,z,y,x\n1,0,1,2,x\n")
    reader = _napari.get_reader(str(path))
    assert reader is not None
    with pytest.raises(InputError, match="'x' must hold numbers"):
        reader(str(path))


def test_reads_a_session_folder_as_4d_with_scale(session_folder):
    reader = _napari.get_reader(str(session_folder))
    ((data, kwargs, kind),) = reader(str(session_folder))
    assert kind == "image" and data.shape == (3, 4, 8, 9)
    assert kwargs["scale"] == pytest.approx((1.0, *VOXEL))
    assert [int(np.asarray(data[t]).min()) for t in range(3)] == [1, 2, 10], "natural sort order"
    assert kwargs["name"] == "dendrite3"


def test_reads_a_tiff_with_its_scale_and_the_table_detection_wrote_beside_it(tmp_path, caplog):
    import tifffile

    image = np.random.default_rng(1).integers(0, 100, (2, 4, 8, 9), dtype=np.uint16)
    path = write_series_tiff(tmp_path / "m1.tif", image, VOXEL)
    ((data, kwargs, kind),) = _napari.get_reader(str(path))(str(path))
    assert kind == "image" and kwargs["scale"] == pytest.approx((1.0, *VOXEL)) and kwargs["name"] == "m1"
    np.testing.assert_array_equal(np.asarray(data), image)
    # with m1.spines.csv beside it: the table too, in the image's scale, its suggestions in tow
    write_spine_table(_spine_table(), tmp_path / "m1.spines.csv")
    write_suggestions(pd.DataFrame({"t": [1], "z": [2.0], "y": [5.0], "x": [6.0], "score": [0.3]}),
                      tmp_path / "m1.suggestions.csv")
    (_, (points, kwargs, kind)) = _napari.get_reader(str(path))(str(path))
    assert kind == "points" and kwargs["name"] == "spines" and len(points) == 3
    assert kwargs["scale"] == pytest.approx((1.0, *VOXEL))
    assert kwargs["metadata"]["spine_tracker"]["suggestions"]["score"] == [0.3]
    # a broken table beside it: the image still opens, and the log says why the table did not
    (tmp_path / "m1.spines.csv").write_text("track_id,t,z,y,x\n1,0,1,2,x\n")
    ((_, _, kind),) = _napari.get_reader(str(path))(str(path))
    assert kind == "image" and "m1.spines.csv not opened with m1.tif" in caplog.text
    # several channels need a choice this reader cannot ask for: napari's own reader takes them
    tifffile.imwrite(tmp_path / "two.tif", np.zeros((2, 4, 2, 8, 9), np.uint16), imagej=True,
                     metadata={"axes": "TZCYX"})
    assert _napari.get_reader(str(tmp_path / "two.tif")) is None
    (tmp_path / "corrupt.tif").write_bytes(b"II*\x00" + b"\xff" * 50)
    assert _napari.get_reader(str(tmp_path / "corrupt.tif")) is None


def test_writer_round_trip(tmp_path):
    from napari_spine_tracker.core.edits import points_from_table

    data, features = points_from_table(_spine_table())
    (written,) = _napari.write_points(str(tmp_path / "out.csv"), data, {"features": features})
    back = read_spine_table(written).sort_values(["track_id", "t"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(back, _spine_table(), check_dtype=False)
    # a plain 3D points layer (clicked by hand) becomes session 0, ids 1..N, added
    (written,) = _napari.write_points(str(tmp_path / "hand.csv"), np.array([[1, 2, 3], [4, 5, 6.0]]), {})
    hand = read_spine_table(written)
    assert hand[["track_id", "t", "status"]].values.tolist() == [[1, 0, "added"], [2, 0, "added"]]
    with pytest.raises(InputError, match=r"3D .* or 4D"):
        _napari.write_points(str(tmp_path / "x.csv"), np.zeros((2, 2)), {})


def test_sample_synthetic_series():
    image, truth = _napari.make_sample_series()
    data, kwargs, kind = image
    assert kind == "image" and data.ndim == 4 and data.dtype == np.uint16
    assert kwargs["name"] == "synthetic series" and len(kwargs["scale"]) == 4 and kwargs["scale"][0] == 1
    points, pkwargs, pkind = truth
    assert pkind == "points" and pkwargs["name"] == "truth" and points.shape[1] == 4
    assert {"track_id", "score", "status"} <= set(pkwargs["features"].columns)
    assert tuple(pkwargs["scale"]) == tuple(kwargs["scale"])
    assert points[:, 0].max() < data.shape[0] and (points[:, 1:] < np.array(data.shape[1:])).all()


def test_sample_real_dendrite():
    ((data, kwargs, kind),) = _napari.make_real_dendrite()
    assert kind == "image" and data.shape == (23, 178, 308) and data.dtype == np.uint16
    assert kwargs["scale"] == (0.5, 0.094, 0.094)
    assert "DeepD3" in kwargs["metadata"]["attribution"] and "8428849" in kwargs["metadata"]["attribution"]


def test_npe2_manifest_is_valid_and_importable():
    """What `npe2 validate napari-spine-tracker --imports` checks, in process."""
    import npe2

    manifest = npe2.PluginManifest.from_distribution("napari-spine-tracker")
    manifest.validate_imports()  # raises if a python_name does not resolve
    contributions = manifest.contributions
    assert {s.key for s in contributions.sample_data} == {"synthetic_series", "real_dendrite"}
    assert [w.display_name for w in contributions.widgets] == ["Spine Tracker"]
    assert contributions.readers[0].accepts_directories


@pytest.mark.gui
def test_open_and_save_through_napari(make_napari_viewer, tmp_path, session_folder):
    viewer = make_napari_viewer()
    path = tmp_path / "m1.spines.csv"
    write_spine_table(_spine_table(), path)
    (layer,) = viewer.open(path, plugin="napari-spine-tracker")
    assert layer.name == "spines" and layer.features["track_id"].tolist() == [1, 2, 1]
    out = tmp_path / "saved.csv"
    viewer.layers.save(str(out), selected=False, plugin="napari-spine-tracker")
    assert read_spine_table(out).shape == (3, 8)
    (image,) = viewer.open(session_folder, plugin="napari-spine-tracker")
    assert image.data.shape == (3, 4, 8, 9) and tuple(image.scale) == pytest.approx((1.0, *VOXEL))
