import logging
import pickle
import tracemalloc
from importlib import resources

import numpy as np
import pytest
import tifffile

from napari_spine_tracker.errors import InputError
from napari_spine_tracker.io.series import (
    Series,
    SeriesArray,
    list_session_files,
    load_series,
    read_voxel_size,
    validate_voxel_size,
    write_series_tiff,
)

VOXEL = (0.5, 0.094, 0.1)


def _series(rng, shape=(3, 4, 10, 12)) -> np.ndarray:
    return rng.integers(0, 4000, size=shape, dtype=np.uint16)


def _imagej(path, data, axes, unit="micron", spacing=0.5, pixel_um=0.1, **kwargs):
    metadata = {"axes": axes, "unit": unit}
    if spacing is not None:
        metadata["spacing"] = spacing
    tifffile.imwrite(path, data, imagej=True, resolution=(1 / pixel_um, 1 / pixel_um), metadata=metadata,
                     **kwargs)
    return path


# ------------------------------------------------------------------ round trip and metadata


def test_write_then_load_round_trip(tmp_path, rng):
    image = _series(rng)
    path = write_series_tiff(tmp_path / "out" / "s.tif", image, VOXEL)
    assert sorted(p.name for p in path.parent.iterdir()) == ["s.tif"]  # no temporary file left
    with tifffile.TiffFile(path) as tf:
        meta = tf.imagej_metadata
        assert tf.series[0].axes == "TZYX"
        assert meta["spacing"] == pytest.approx(0.5) and meta["unit"] == "micron"
    series = load_series(path)
    assert series.data.shape == image.shape and series.data.dtype == np.uint16
    np.testing.assert_array_equal(np.asarray(series.data), image)
    assert series.voxel_size_um == pytest.approx(VOXEL, rel=1e-9)
    assert series.name == "s" and series.sources == [path]
    assert series.session_shapes == [image.shape[1:]] * 3
    assert read_voxel_size(path) == pytest.approx(VOXEL, rel=1e-9)


def test_write_3d_and_lazy_array(tmp_path, rng):
    image = _series(rng, (4, 10, 12))
    src = write_series_tiff(tmp_path / "a.tif", image, VOXEL)
    series = load_series(src)
    assert series.data.shape == (1, *image.shape)
    copy = write_series_tiff(tmp_path / "b.tif", series.data, VOXEL)  # written session by session
    np.testing.assert_array_equal(load_series(copy).session(0), image)


def test_write_rejects_types_imagej_cannot_hold(tmp_path):
    with pytest.raises(InputError, match="uint16"):
        write_series_tiff(tmp_path / "x.tif", np.zeros((2, 3, 4), np.int32), VOXEL)
    with pytest.raises(InputError, match=r"\(T, Z, Y, X\)"):
        write_series_tiff(tmp_path / "x.tif", np.zeros((3, 4), np.uint16), VOXEL)


@pytest.mark.parametrize(("unit", "factor"), [("micron", 1.0), ("\\u00B5m", 1.0), ("um", 1.0),
                                              ("nm", 1e-3), ("mm", 1e3)])
def test_imagej_units(tmp_path, rng, unit, factor):
    path = _imagej(tmp_path / "u.tif", _series(rng), "TZYX", unit=unit, spacing=2.0, pixel_um=0.25)
    assert load_series(path).voxel_size_um == pytest.approx((2.0 * factor, 0.25 * factor, 0.25 * factor))


def test_imagej_without_spacing_means_one_unit(tmp_path, rng):
    # ImageJ omits `spacing` when the pixel depth is 1 (its default)
    path = _imagej(tmp_path / "u.tif", _series(rng), "TZYX", unit="micron", spacing=None, pixel_um=0.2)
    assert load_series(path).voxel_size_um == pytest.approx((1.0, 0.2, 0.2))


def test_ome_physical_sizes_with_units(tmp_path, rng):
    image = _series(rng)
    path = tmp_path / "o.ome.tif"
    tifffile.imwrite(path, image, ome=True, metadata={
        "axes": "TZYX", "PhysicalSizeX": 0.1, "PhysicalSizeY": 0.12, "PhysicalSizeZ": 800,
        "PhysicalSizeZUnit": "nm"})
    series = load_series(path)
    assert series.voxel_size_um == pytest.approx((0.8, 0.12, 0.1))
    assert series.name == "o"
    np.testing.assert_array_equal(series.data[2], image[2])


def test_argument_overrides_metadata(tmp_path, rng):
    path = _imagej(tmp_path / "m.tif", _series(rng), "TZYX")
    assert load_series(path, voxel_size_um=[1, 0.2, 0.3]).voxel_size_um == (1.0, 0.2, 0.3)


def test_plain_tiffs_3d_is_one_session_and_4d_is_t_z(tmp_path, rng):
    image = _series(rng)
    tifffile.imwrite(tmp_path / "p4.tif", image, photometric="minisblack")
    tifffile.imwrite(tmp_path / "p3.tif", image[1], photometric="minisblack")
    four = load_series(tmp_path / "p4.tif", VOXEL)
    three = load_series(tmp_path / "p3.tif", VOXEL)
    assert four.data.shape == image.shape and three.data.shape == (1, *image.shape[1:])
    np.testing.assert_array_equal(four.session(2), image[2])
    np.testing.assert_array_equal(three.session(0), image[1])


def test_real_sample_is_bundled_and_needs_a_voxel_size():
    path = resources.files("napari_spine_tracker") / "data" / "deepd3_crop_dendrite.tif"
    with pytest.raises(InputError, match="--voxel-size"):
        load_series(path)
    series = load_series(path, (0.5, 0.094, 0.094))
    assert series.data.shape == (1, 23, 178, 308) and series.data.dtype == np.uint16
    assert series.data[0, 11, 80:90, 100:110].max() > 0


# ------------------------------------------------------------------ indexing and laziness


_KEYS = [0, -1, (1, 2), (slice(None), 1, slice(2, 9, 3)), (..., 3), (2, slice(None, None, -1), 0),
         (slice(1, 3), slice(None), slice(None, None, 2), slice(11, 2, -4)), (np.int64(1), ..., 0, 5)]


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_indexing_matches_numpy(tmp_path, rng, compression):
    image = _series(rng)
    path = _imagej(tmp_path / "i.tif", image, "TZYX", compression=compression)
    data = load_series(path).data
    for key in _KEYS:
        np.testing.assert_array_equal(data[key], image[key], err_msg=str(key))
    assert len(data) == 3 and data.ndim == 4
    with pytest.raises(IndexError):
        data[3]
    with pytest.raises(IndexError):
        data[[0, 1]]


def test_pagewise_read_decodes_only_the_asked_planes(tmp_path, rng, monkeypatch):
    image = _series(rng)
    path = _imagej(tmp_path / "c.tif", image, "TZYX", compression="zlib")
    data = load_series(path).data
    requested = []
    original = tifffile.TiffFile.asarray

    def spy(self, key=None, **kwargs):
        requested.append(key)
        return original(self, key=key, **kwargs)

    monkeypatch.setattr(tifffile.TiffFile, "asarray", spy)
    tile = data[1, 2, 3:7, 4:9]
    np.testing.assert_array_equal(tile, image[1, 2, 3:7, 4:9])
    assert requested == [[1 * 4 + 2]]  # page (t=1, z=2) of 12, and nothing else
    data[2, 1:3, :2, :2]
    assert requested[-1] == [2 * 4 + 1, 2 * 4 + 2]


def test_memmapped_tile_read_does_not_copy_the_file(tmp_path, rng):
    image = rng.integers(0, 4000, size=(2, 8, 256, 256), dtype=np.uint16)  # 2 MB
    path = _imagej(tmp_path / "big.tif", image, "TZYX")
    data = load_series(path).data
    tracemalloc.start()
    tile = data[1, 3, 100:132, 50:82]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    np.testing.assert_array_equal(tile, image[1, 3, 100:132, 50:82])
    assert peak < 100_000, f"reading a 2 kB tile allocated {peak} bytes"


def test_series_array_pickles_without_its_open_file(tmp_path, rng):
    image = _series(rng)
    data = load_series(_imagej(tmp_path / "p.tif", image, "TZYX")).data
    data[0, 0, 0, 0]  # opens the memory map
    clone = pickle.loads(pickle.dumps(data))
    assert len(pickle.dumps(data)) < image.nbytes
    np.testing.assert_array_equal(clone[2, 1], image[2, 1])


# ------------------------------------------------------------------ folders


def _folder(tmp_path, rng, shapes, names):
    folder = tmp_path / "sessions"
    folder.mkdir()
    images = []
    for name, shape in zip(names, shapes, strict=True):
        images.append(rng.integers(1, 4000, size=shape, dtype=np.uint16))
        _imagej(folder / name, images[-1], "ZYX")
    (folder / "notes.csv").write_text("a,b\n1,2\n")
    (folder / "._s1.tif").write_bytes(b"resource fork")
    return folder, images


def test_folder_sessions_in_natural_order_padded_at_far_edges(tmp_path, rng):
    shapes = [(4, 10, 12), (5, 9, 12), (4, 10, 14)]
    folder, images = _folder(tmp_path, rng, shapes, ["s10.tif", "s2.TIF", "s1.tiff"])
    assert [p.name for p in list_session_files(folder)] == ["s1.tiff", "s2.TIF", "s10.tif"]
    series = load_series(folder)
    order = [2, 1, 0]  # s1, s2, s10
    assert series.data.shape == (3, 5, 10, 14) and series.name == "sessions"
    assert series.session_shapes == [shapes[i] for i in order]
    assert series.voxel_size_um == pytest.approx((0.5, 0.1, 0.1))
    for t, i in enumerate(order):
        np.testing.assert_array_equal(series.session(t), images[i])
        z, y, x = shapes[i]
        padded = np.asarray(series.data[t])
        assert padded[z:].max(initial=0) == 0 and padded[:, y:].max(initial=0) == 0
        assert padded[:, :, x:].max(initial=0) == 0
    np.testing.assert_array_equal(series.data[1, 4, 8, 11:], [images[1][4, 8, 11], 0, 0])


def test_folder_reads_a_session_only_when_indexed(tmp_path, rng):
    folder, images = _folder(tmp_path, rng, [(3, 8, 8)] * 3, ["a1.tif", "a2.tif", "a3.tif"])
    series = load_series(folder)
    (folder / "a1.tif").unlink()
    (folder / "a3.tif").write_bytes(b"gone")
    np.testing.assert_array_equal(series.data[1, 2, :4, :4], images[1][2, :4, :4])
    with pytest.raises(InputError, match=r"a1\.tif"):
        series.session(0)


def test_folder_warns_when_voxel_sizes_disagree(tmp_path, rng, caplog):
    folder = tmp_path / "f"
    folder.mkdir()
    _imagej(folder / "t1.tif", _series(rng, (3, 8, 8)), "ZYX", pixel_um=0.1)
    _imagej(folder / "t2.tif", _series(rng, (3, 8, 8)), "ZYX", pixel_um=0.2)
    with caplog.at_level(logging.WARNING):
        series = load_series(folder)
    assert series.voxel_size_um == pytest.approx((0.5, 0.1, 0.1))
    assert "disagree" in caplog.text


def test_folder_with_a_4d_file_is_rejected(tmp_path, rng):
    folder, _ = _folder(tmp_path, rng, [(3, 8, 8)], ["a.tif"])
    _imagej(folder / "b.tif", _series(rng, (2, 3, 8, 8)), "TZYX")
    with pytest.raises(InputError, match=r"b.tif .*2 time points"):
        load_series(folder)


# ------------------------------------------------------------------ channels


def test_multichannel_needs_a_channel_choice(tmp_path, rng):
    image = rng.integers(0, 4000, size=(2, 3, 2, 8, 9), dtype=np.uint16)
    path = _imagej(tmp_path / "c.tif", image, "TZCYX")
    with pytest.raises(InputError, match=r"2 channels.*0\.\.1"):
        load_series(path)
    series = load_series(path, channel=1)
    assert series.data.shape == (2, 3, 8, 9)
    np.testing.assert_array_equal(np.asarray(series.data), image[:, :, 1])
    with pytest.raises(InputError, match="channel 2 is out of range"):
        load_series(path, channel=2)


def test_rgb_needs_a_channel_choice(tmp_path, rng):
    image = rng.integers(0, 255, size=(3, 8, 9, 3), dtype=np.uint8)
    path = tmp_path / "rgb.tif"
    tifffile.imwrite(path, image, photometric="rgb")
    with pytest.raises(InputError, match="RGB"):
        load_series(path, VOXEL)
    np.testing.assert_array_equal(load_series(path, VOXEL, channel=2).session(0), image[..., 2])


def test_channel_out_of_range_on_a_single_channel_image(tmp_path, rng):
    path = _imagej(tmp_path / "g.tif", _series(rng), "TZYX")
    assert load_series(path, channel=0).data.shape == (3, 4, 10, 12)
    with pytest.raises(InputError, match="out of range"):
        load_series(path, channel=1)


# ------------------------------------------------------------------ errors


def test_2d_image_is_rejected(tmp_path):
    tifffile.imwrite(tmp_path / "flat.tif", np.zeros((8, 9), np.uint16))
    with pytest.raises(InputError, match="2D image"):
        load_series(tmp_path / "flat.tif", VOXEL)


def test_5d_without_meaning_is_rejected(tmp_path):
    tifffile.imwrite(tmp_path / "5d.tif", np.zeros((2, 2, 2, 8, 9), np.uint16), photometric="minisblack")
    with pytest.raises(InputError, match="cannot tell which axes"):
        load_series(tmp_path / "5d.tif", VOXEL)


def test_missing_voxel_size_says_how_to_give_it(tmp_path, rng):
    tifffile.imwrite(tmp_path / "n.tif", _series(rng), photometric="minisblack")
    with pytest.raises(InputError, match=r"--voxel-size Z Y X.*voxel_size_um="):
        load_series(tmp_path / "n.tif")
    assert load_series(tmp_path / "n.tif", require_voxel_size=False).voxel_size_um is None
    assert read_voxel_size(tmp_path / "n.tif") is None


@pytest.mark.parametrize("compression", [None, "zlib"])
@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.95])
def test_truncated_tiff_is_reported_when_opened(tmp_path, rng, compression, fraction):
    path = _imagej(tmp_path / "t.tif", _series(rng), "TZYX", compression=compression)
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * fraction)])
    with pytest.raises(InputError, match=r"truncated|corrupt"):
        load_series(path)


def test_non_tiff_file_is_rejected(tmp_path):
    (tmp_path / "spines.csv").write_text("track_id,t,z,y,x\n1,0,1,2,3\n")
    with pytest.raises(InputError, match="not a TIFF"):
        load_series(tmp_path / "spines.csv", VOXEL)


def test_empty_folder_and_missing_path(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(InputError, match="no TIFF files"):
        load_series(tmp_path / "empty", VOXEL)
    with pytest.raises(InputError, match="does not exist"):
        load_series(tmp_path / "nowhere.tif", VOXEL)


@pytest.mark.parametrize("bad", [(0.5, 0.1), (0.5, 0.1, 0.1, 1), (0.5, 0, 0.1), (-1, 0.1, 0.1),
                                 (float("nan"), 0.1, 0.1), ("a", 1, 1)])
def test_bad_voxel_size_argument(tmp_path, rng, bad):
    path = _imagej(tmp_path / "v.tif", _series(rng), "TZYX")
    with pytest.raises(InputError, match="Z Y X"):
        load_series(path, bad)
    with pytest.raises(InputError):
        validate_voxel_size(bad)


def test_series_array_is_the_lazy_type(tmp_path, rng):
    series = load_series(_imagej(tmp_path / "l.tif", _series(rng), "TZYX"))
    assert isinstance(series.data, SeriesArray)
    assert series.data.nbytes == 3 * 4 * 10 * 12 * 2


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_ome_axes_in_any_order_and_dask(tmp_path, rng, compression):
    image = rng.integers(0, 1000, size=(4, 3, 2, 10, 12), dtype=np.uint16)  # Z, T, C, Y, X
    path = tmp_path / "ztc.ome.tif"
    tifffile.imwrite(path, image, ome=True, compression=compression, metadata={
        "axes": "ZTCYX", "PhysicalSizeX": 0.1, "PhysicalSizeY": 0.1, "PhysicalSizeZ": 0.5})
    series = load_series(path, channel=1)
    expected = image[:, :, 1].transpose(1, 0, 2, 3)
    assert series.data.shape == (3, 4, 10, 12)
    np.testing.assert_array_equal(series.data[2, 1:3, ::3, 5], expected[2, 1:3, ::3, 5])
    da = pytest.importorskip("dask.array")
    lazy = da.from_array(series.data, chunks=(1, -1, 5, 6))
    assert int(lazy[1].sum().compute()) == int(expected[1].sum())


def test_from_array_and_read_voxel_size_of_a_folder(tmp_path, rng):
    folder, _ = _folder(tmp_path, rng, [(3, 8, 8)], ["a.tif"])
    assert read_voxel_size(folder) == pytest.approx((0.5, 0.1, 0.1))
    series = Series.from_array(_series(rng, (3, 8, 8)), VOXEL, name="synthetic")
    assert series.data.shape == (1, 3, 8, 8) and series.session_shapes == [(3, 8, 8)]
    with pytest.raises(InputError, match=r"\(T, Z, Y, X\)"):
        Series.from_array(np.zeros((8, 8)), VOXEL)
