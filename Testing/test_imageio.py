import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from CLIPSegLib.errors import InputError
from CLIPSegLib.io.geometry import Geometry
from CLIPSegLib.io.outputs import (check_output_path, read_probabilities, read_segment_masks, write_probabilities,
                                   write_segmentation, write_volume)
from CLIPSegLib.io.read import read_image

from conftest import OBLIQUE, assert_no_partial_files


def test_geometry_round_trip_through_nrrd_and_nifti(tmp_path):
    g = Geometry((0.6, 0.7, 1.5), (10.0, -20.0, 5.0), OBLIQUE)
    arr = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    for name in ("v.nrrd", "v.nii.gz", "v.mha"):
        write_volume(tmp_path / name, arr, g)
        back, g2 = read_image(tmp_path / name)
        assert np.array_equal(back, arr)
        np.testing.assert_allclose(g2.ijk_to_lps(), g.ijk_to_lps(), atol=1e-5)


def test_ras_and_lps_differ_by_x_y_flip():
    g = Geometry((1.0, 2.0, 3.0), (1.0, 2.0, 3.0), ((1, 0, 0), (0, 1, 0), (0, 0, 1)))
    ras = g.ijk_to_ras()
    np.testing.assert_allclose(ras[:3, 3], [-1, -2, 3])
    np.testing.assert_allclose(np.diag(ras)[:3], [-1, -2, 3])
    np.testing.assert_allclose(Geometry.from_ijk_to_ras(ras).ijk_to_lps(), g.ijk_to_lps())


def test_seg_nrrd_has_one_named_segment_per_prompt_and_input_geometry(tmp_path):
    g = Geometry((0.6, 0.7, 1.5), (10.0, -20.0, 5.0), OBLIQUE)
    a = np.zeros((4, 5, 6), bool)
    a[1:3, 1:3, 2:5] = True
    b = np.zeros_like(a)
    b[2, 2:4, 3] = True  # overlaps a: needs a second layer
    out = write_segmentation(tmp_path / "x.seg.nrrd", {"thyroid nodule": a, "calcification": b, "cyst": a & False}, g)
    seg = slicerio.read_segmentation(str(out))
    assert [s["name"] for s in seg["segments"]] == ["thyroid nodule", "calcification", "cyst"]
    np.testing.assert_allclose(seg["ijkToLPS"], g.ijk_to_lps(), atol=1e-6)
    for name, mask in (("thyroid nodule", a), ("calcification", b), ("cyst", a & False)):
        got = slicerio.extract_segments(seg, [(name, 1)])["voxels"]
        assert np.array_equal(got.transpose(2, 1, 0) > 0, mask), name
    assert np.array_equal(read_segment_masks(out, ["calcification"])["calcification"], b)
    assert_no_partial_files(tmp_path)


def test_labelmap_output_and_probabilities(tmp_path):
    g = Geometry((1.0, 1.0, 2.0), (0.0, 0.0, 0.0), OBLIQUE)
    a = np.zeros((3, 4, 5), bool)
    a[1, 1:3, 1:3] = True
    write_segmentation(tmp_path / "l.nii.gz", {"nodule": a}, g)
    lab = sitk.ReadImage(str(tmp_path / "l.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(lab) == 1, a)
    assert lab.GetDirection() == pytest.approx(sum(OBLIQUE, ()))
    p = np.random.default_rng(0).random((2, 3, 4, 5)).astype(np.float32)
    write_probabilities(tmp_path / "p.nrrd", p, g)
    back = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "p.nrrd")))
    np.testing.assert_allclose(np.moveaxis(back, -1, 0), p)
    np.testing.assert_allclose(read_probabilities(tmp_path / "p.nrrd", 2), p)


def test_png_becomes_one_slice_and_rgb_is_converted(tmp_path):
    from PIL import Image

    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[5:10, 5:10] = 200
    Image.fromarray(rgb).save(tmp_path / "us.png")
    arr, g = read_image(tmp_path / "us.png")
    assert arr.shape == (1, 20, 30)
    assert arr[0, 7, 7] == pytest.approx(200, abs=1) and arr[0, 0, 0] == 0


@pytest.mark.parametrize("case,match", [
    ("missing", "does not exist"),
    ("text", "not an image"),
    ("nan", "NaN or infinite"),
    ("rgbvol", "Vector to Scalar"),
    ("4d", "extract one 3D frame"),
    ("emptydir", "no DICOM series"),
])
def test_bad_inputs_name_the_problem_and_the_fix(tmp_path, case, match):
    path = tmp_path / "in.nrrd"
    if case == "text":
        path = tmp_path / "notes.nii.gz"
        path.write_text("this is not an image")
    elif case == "nan":
        a = np.ones((3, 4, 5), np.float32)
        a[1, 1, 1] = np.nan
        sitk.WriteImage(sitk.GetImageFromArray(a), str(path))
    elif case == "rgbvol":
        sitk.WriteImage(sitk.GetImageFromArray(np.ones((3, 4, 5, 3), np.uint8), isVector=True), str(path))
    elif case == "4d":
        frame = sitk.GetImageFromArray(np.ones((3, 4, 5), np.float32))
        sitk.WriteImage(sitk.JoinSeries([frame, frame]), str(path))
    elif case == "emptydir":
        path = tmp_path / "dicom"
        path.mkdir()
    with pytest.raises(InputError, match=match):
        read_image(path)


def _write_series(folder, uid, positions, description="", shape=(4, 5), name="s"):
    """One DICOM file per slice position (mm along the normal), as SimpleITK's series-writing example tags them."""
    for k, z in enumerate(positions):
        image = sitk.GetImageFromArray(np.full(shape, k, np.int16))
        for tag, value in (("0020|000e", uid), ("0020|0013", str(k + 1)), ("0008|0060", "US"),
                           ("0008|103e", description), ("0020|0032", f"0\\0\\{z}"),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0028|0030", "0.5\\0.5")):
            image.SetMetaData(tag, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / f"{name}_{k}.dcm"))
        writer.Execute(image)


def test_dicom_folder_with_two_series_is_refused_listing_what_each_is(tmp_path):
    folder = tmp_path / "dicom"
    folder.mkdir()
    _write_series(folder, "1.2.826.0.1.3680043.2.1125.1", [0, 1], "T2 axial", (4, 5), "1")
    _write_series(folder, "1.2.826.0.1.3680043.2.1125.2", [0, 1, 2], "doppler", (6, 7), "2")
    with pytest.raises(InputError) as e:
        read_image(folder)
    message = str(e.value)
    assert "holds 2 DICOM series" in message and "folder of its own" in message
    assert "'T2 axial' 4x5x2 (rows x columns x slices), 2 file(s), UID 1.2.826.0.1.3680043.2.1125.1" in message
    assert "'doppler' 6x7x3 (rows x columns x slices), 3 file(s), UID 1.2.826.0.1.3680043.2.1125.2" in message
    for f in folder.glob("2_*.dcm"):
        f.unlink()
    volume, _ = read_image(folder)  # one series left: read as a volume, slices in order
    assert volume.shape == (2, 4, 5) and volume[0].max() == 0 and volume[1].min() == 1


def test_a_dicom_series_with_a_missing_slice_is_refused_without_itk_noise(tmp_path, capfd):
    folder = tmp_path / "dicom"
    folder.mkdir()
    _write_series(folder, "1.2.826.0.1.3680043.2.1125.3", [0, 1, 2, 4, 5])
    with pytest.raises(InputError, match=r"uneven slice spacing: 1 to 2 mm.*2 mm between s_2.dcm and s_3.dcm.*"
                                         r"1 mm elsewhere.*resample"):
        read_image(folder)
    assert capfd.readouterr().err == ""  # ITK's own 'Non uniform sampling' warning is not printed
    (folder / "s_3.dcm").unlink()
    (folder / "s_4.dcm").unlink()
    volume, geometry = read_image(folder)  # evenly spaced: read
    assert volume.shape == (3, 4, 5) and geometry.spacing == pytest.approx((0.5, 0.5, 1.0))


def test_zero_sized_axis_is_refused():
    from CLIPSegLib.io.geometry import check_volume

    with pytest.raises(InputError, match="empty axis"):
        check_volume(np.zeros((0, 4, 5)))


def test_output_path_checks(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        check_output_path(tmp_path / "nope" / "x.seg.nrrd")
    with pytest.raises(InputError, match="unknown file type"):
        check_output_path(tmp_path / "x.txt")
    with pytest.raises(InputError, match="unknown file type"):  # detached header: two files, not atomic
        check_output_path(tmp_path / "x.mhd")
    assert check_output_path(tmp_path / "x.seg.nrrd") == tmp_path / "x.seg.nrrd"


def test_a_mask_on_another_grid_is_refused_with_the_fix():
    from CLIPSegLib.io.geometry import Geometry, check_same_grid

    image = np.zeros((4, 5, 6))
    grid = Geometry((0.5, 0.5, 2.0), (10.0, 20.0, 30.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    check_same_grid(image, grid, image, grid, "m.nrrd", "i.nrrd")  # same grid: accepted
    flipped = Geometry((0.5, 0.5, 2.0), (12.5, 20.0, 30.0), (-1, 0, 0, 0, 1, 0, 0, 0, 1))
    with pytest.raises(InputError, match="m.nrrd is on another grid.*2.50 mm apart.*resample the mask"):
        check_same_grid(image, flipped, image, grid, "m.nrrd", "i.nrrd")
    with pytest.raises(InputError, match=r"has shape \(4, 5, 5\)"):
        check_same_grid(np.zeros((4, 5, 5)), grid, image, grid, "m.nrrd", "i.nrrd")


def test_damaged_compressed_data_is_a_corrupt_file_not_zeros(tmp_path):
    from CLIPSegLib.errors import CorruptFileError

    arr = np.random.default_rng(0).integers(0, 1000, (6, 40, 48)).astype(np.int16)
    for name in ("v.nii.gz", "v.nrrd", "v.mha"):
        path = tmp_path / name
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(path), useCompression=True)
        data = bytearray(path.read_bytes())
        data[len(data) * 2 // 3] ^= 0xFF  # one flipped byte inside the compressed voxels
        path.write_bytes(bytes(data))
        with pytest.raises(CorruptFileError, match=f"{name} cannot be read in full"):
            read_image(path)


def test_a_refused_write_names_the_output_not_a_temporary_file(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where a folder should be: every write below fails, even as root")
    g = Geometry.axis_aligned((1.0, 1.0, 1.0))
    mask = np.ones((2, 3, 4), bool)
    for name, write in (("x.seg.nrrd", lambda p: write_segmentation(p, {"a": mask}, g)),
                        ("x.nii.gz", lambda p: write_segmentation(p, {"a": mask}, g)),
                        ("p.nrrd", lambda p: write_probabilities(p, np.zeros((2, 2, 3, 4), np.float32), g)),
                        ("v.mha", lambda p: write_volume(p, mask.astype(np.float32), g))):
        with pytest.raises(OSError) as e:
            write(blocker / name)
        assert e.value.filename == str(blocker / name), (name, e.value)
        assert "partial" not in str(e.value)
