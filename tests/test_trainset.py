import json
import logging

import numpy as np
import pandas as pd
import pytest
import tifffile

from napari_spine_tracker.errors import InputError
from napari_spine_tracker.io.trainset import (
    MANIFEST,
    SCHEMA,
    append_training_item,
    read_training_set,
)

VOXEL = (0.5, 0.1, 0.1)


def _image(rng, shape=(3, 4, 12, 14), dtype=np.uint16):
    return rng.integers(0, 3000, size=shape).astype(dtype)


def _spines(n_sessions=3):
    rows = [dict(track_id=k, t=t, z=1.0 + k / 2, y=2.0 + k, x=3.5 + t, score=1.0, status="confirmed",
                 head_radius_um=0.3)
            for k in (1, 2) for t in range(n_sessions)]
    return pd.DataFrame(rows)


def _manifest(folder):
    return json.loads((folder / MANIFEST).read_text())


def _write_manifest(folder, manifest):
    (folder / MANIFEST).write_text(json.dumps(manifest))


def test_round_trip(tmp_path, rng):
    image, spines = _image(rng), _spines()
    item = append_training_item(tmp_path / "set", "m1_d3", image, spines, VOXEL, [2, 0])
    folder = tmp_path / "set"
    assert _manifest(folder) == {"schema": SCHEMA, "items": [{
        "name": "m1_d3", "image": "images/m1_d3.tif", "spines": "spines/m1_d3.csv",
        "voxel_size_um": list(VOXEL), "reviewed_sessions": [0, 2]}]}
    with tifffile.TiffFile(folder / "images" / "m1_d3.tif") as tf:
        assert tf.is_imagej and tf.series[0].dtype == np.uint16
    (back,) = read_training_set(folder)
    assert back == item
    assert back.voxel_size_um == VOXEL and back.reviewed_sessions == [0, 2]
    np.testing.assert_array_equal(np.asarray(back.load_image()), image)
    table = back.load_spines().sort_values(["track_id", "t"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(table[spines.columns], spines, check_dtype=False)


def test_append_two_items_and_replace_one(tmp_path, rng):
    folder = tmp_path / "set"
    first = _image(rng)
    append_training_item(folder, "a", first, _spines(), VOXEL, [0])
    append_training_item(folder, "b", _image(rng, (2, 4, 12, 14)), _spines(2), (1.0, 0.2, 0.2), [1])
    assert [i.name for i in read_training_set(folder)] == ["a", "b"]

    replacement = _image(rng, (2, 5, 12, 14))
    append_training_item(folder, "a", replacement, _spines(2).iloc[:3], VOXEL, [0, 1])
    items = read_training_set(folder)
    assert [i.name for i in items] == ["b", "a"]  # replaced, not duplicated
    assert len(_manifest(folder)["items"]) == 2
    a = items[1]
    assert a.reviewed_sessions == [0, 1] and len(a.load_spines()) == 3
    np.testing.assert_array_equal(np.asarray(a.load_image()), replacement)
    assert items[0].voxel_size_um == (1.0, 0.2, 0.2)
    assert sorted(p.name for p in (folder / "images").iterdir()) == ["a.tif", "b.tif"]


def test_3d_image_is_one_session_and_series_are_accepted(tmp_path, rng):
    from napari_spine_tracker.io.series import Series

    volume = _image(rng, (4, 12, 14))
    item = append_training_item(tmp_path, "single", Series.from_array(volume, VOXEL), _spines(1), VOXEL, [0])
    assert item.load_image().shape == (1, 4, 12, 14)


def test_uint16_conversion_rule(tmp_path, rng, caplog):
    exact = _image(rng).astype(np.float32)  # integer values that fit: kept exactly
    item = append_training_item(tmp_path, "exact", exact, _spines(), VOXEL, [0])
    np.testing.assert_array_equal(np.asarray(item.load_image()), exact.astype(np.uint16))

    scaled = rng.normal(0, 1, size=(3, 4, 12, 14)).astype(np.float32)  # negative, fractional: rescaled
    with caplog.at_level(logging.WARNING):
        item = append_training_item(tmp_path, "scaled", scaled, _spines(), VOXEL, [0])
    back = np.asarray(item.load_image())
    assert back.min() == 0 and back.max() == 65535 and "rescaled" in caplog.text
    assert np.corrcoef(back.ravel(), scaled.ravel())[0, 1] > 0.9999

    with pytest.raises(InputError, match="NaN"):
        append_training_item(tmp_path, "nan", np.full((1, 2, 3, 4), np.nan), _spines(1).iloc[:0], VOXEL, [0])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"name": "../escape"}, "name"),
    ({"name": ""}, "name"),
    ({"name": ".hidden"}, "name"),
    ({"voxel_size_um": (0.5, 0.1)}, "voxel size"),
    ({"voxel_size_um": (0.5, -0.1, 0.1)}, "voxel size"),
    ({"reviewed_sessions": [3]}, "reviewed session 3 does not exist"),
    ({"reviewed_sessions": "0"}, "list of session indices"),
    ({"spines": _spines(4)}, "t=3"),
    ({"spines": _spines().assign(x=50.0)}, "coordinates are in voxels"),
    ({"spines": _spines().drop(columns="z")}, "z"),
    ({"image": np.zeros((12, 14), np.uint16)}, r"\(T, Z, Y, X\)"),
])
def test_append_rejects_bad_input_and_leaves_the_set_alone(tmp_path, rng, kwargs, message):
    folder = tmp_path / "set"
    append_training_item(folder, "good", _image(rng), _spines(), VOXEL, [0])
    before = (folder / MANIFEST).read_text()
    args = dict(folder=folder, name="new", image=_image(rng), spines=_spines(), voxel_size_um=VOXEL,
                reviewed_sessions=[0])
    args.update(kwargs)
    with pytest.raises(InputError, match=message):
        append_training_item(**args)
    assert (folder / MANIFEST).read_text() == before
    assert not (folder / "images" / "new.tif").exists()


# ------------------------------------------------------------------ malformed sets


@pytest.fixture
def good_set(tmp_path, rng):
    folder = tmp_path / "set"
    append_training_item(folder, "a", _image(rng), _spines(), VOXEL, [0, 1])
    append_training_item(folder, "b", _image(rng), _spines(), VOXEL, [2])
    return folder


def _edit_item(folder, index, **changes):
    manifest = _manifest(folder)
    manifest["items"][index].update(changes)
    for key, value in changes.items():
        if value is None:
            del manifest["items"][index][key]
    _write_manifest(folder, manifest)


def test_missing_folder_and_manifest(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_training_set(tmp_path / "nowhere")
    with pytest.raises(InputError, match=r"no manifest\.json"):
        read_training_set(tmp_path)


def test_invalid_json(good_set):
    (good_set / MANIFEST).write_text('{"schema": "spine-trainset/1", "items": [')
    with pytest.raises(InputError, match="not valid JSON"):
        read_training_set(good_set)


@pytest.mark.parametrize("manifest", [{"items": []}, {"schema": "spine-trainset/9", "items": []}, [1, 2]])
def test_wrong_schema(good_set, manifest):
    _write_manifest(good_set, manifest)
    with pytest.raises(InputError, match="schema"):
        read_training_set(good_set)


def test_empty_set(good_set):
    _write_manifest(good_set, {"schema": SCHEMA, "items": []})
    with pytest.raises(InputError, match="no items"):
        read_training_set(good_set)


@pytest.mark.parametrize(("changes", "message"), [
    ({"image": "images/missing.tif"}, r"item 1 \('b'\): image file .*missing"),
    ({"spines": None}, r"item 1 \('b'\): 'spines' must be a path"),
    ({"voxel_size_um": [0.5, 0, 0.1]}, r"item 1 \('b'\).*positive"),
    ({"voxel_size_um": [0.5, 0.1]}, r"item 1 \('b'\).*Z Y X"),
    ({"voxel_size_um": "0.5 0.1 0.1"}, r"item 1 \('b'\).*list \[z, y, x\]"),
    ({"reviewed_sessions": [0, 3]}, r"item 1 \('b'\): reviewed session 3 does not exist.*3 session"),
    ({"reviewed_sessions": [1.5]}, r"item 1 \('b'\): reviewed session 1.5 is not an integer"),
    ({"reviewed_sessions": None}, r"item 1 \('b'\): reviewed_sessions must be a list"),
    ({"name": "a"}, r"item 1 repeats the name 'a'"),
])
def test_malformed_item_names_the_item(good_set, changes, message):
    _edit_item(good_set, 1, **changes)
    with pytest.raises(InputError, match=message):
        read_training_set(good_set)


def test_item_that_is_not_an_object(good_set):
    manifest = _manifest(good_set)
    manifest["items"].append("images/c.tif")
    _write_manifest(good_set, manifest)
    with pytest.raises(InputError, match="item 2: must be an object"):
        read_training_set(good_set)


def test_broken_files_of_an_item(good_set):
    (good_set / "spines" / "a.csv").write_text("track_id,t,z\n1,0,1\n")
    with pytest.raises(InputError, match=r"item 0 \('a'\).*lacks the required column"):
        read_training_set(good_set)
    _spines().to_csv(good_set / "spines" / "a.csv", index=False)
    raw = (good_set / "images" / "b.tif").read_bytes()
    (good_set / "images" / "b.tif").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match=r"item 1 \('b'\).*truncated"):
        read_training_set(good_set)


def test_name_defaults_to_image_stem_for_foreign_manifests(good_set):
    _edit_item(good_set, 0, name=None)
    assert [i.name for i in read_training_set(good_set)] == ["a", "b"]


def _append_several(folder, prefix, count):
    rng = np.random.default_rng(len(prefix))
    for i in range(count):
        append_training_item(folder, f"{prefix}{i}", _image(rng), _spines(), VOXEL, [0])


def test_concurrent_appends_from_two_processes_keep_every_item(tmp_path):
    """Two writers (two napari windows exporting to one set) each add items; none is lost from
    the manifest, which each writer reads, extends and replaces under the set's lock file."""
    import multiprocessing

    folder = tmp_path / "set"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append_several, args=(folder, prefix, 6)) for prefix in ("a", "b")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [worker.exitcode for worker in workers] == [0, 0]
    names = sorted(item.name for item in read_training_set(folder))
    assert names == sorted(f"{p}{i}" for p in "ab" for i in range(6))
