"""3D readers: DICOM series sorted by geometry, NIfTI affines, slice folders, slice sequences."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import pytest

from chestdx.data.volumes import (
    Volume,
    draw_sequence,
    read_dicom_series,
    read_nifti,
    read_slice_folder,
    read_volume,
    sequence_indices,
)
from chestdx.errors import ChestDxError, InputError
from tests.conftest import _real_dataset

# ---------------------------------------------------------------- a synthetic oblique series

N, ROWS, COLS = 8, 32, 24  # non-square, so a transposed pixel array cannot pass
PIXEL_SPACING = (0.7, 0.9)  # (row spacing, column spacing): unequal, so a swap cannot pass
STEP = 2.5
ANGLE = np.deg2rad(30)  # rotated 30 degrees about the patient x axis
ROW_DIR = np.array([1.0, 0.0, 0.0])
COL_DIR = np.array([0.0, np.cos(ANGLE), np.sin(ANGLE)])
NORMAL = np.cross(ROW_DIR, COL_DIR)
ORIGIN = np.array([-12.0, 30.0, -100.0])


def true_hu(k: int) -> np.ndarray:
    """HU of slice k: 100 k marks the slice, + h - w marks the pixel layout."""
    h, w = np.mgrid[0:ROWS, 0:COLS]
    return (100 * k + h - w).astype(np.float32)


def write_series(folder: Path, n: int = N, seed: int = 0, edit=None) -> list[str]:
    """Write slices 0..n-1 under shuffled names and InstanceNumbers; return names in true order.

    `edit(k, ds)` may change slice k's dataset before it is written (or return False to skip it).
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"IM{v:04d}.dcm" for v in rng.permutation(n)]
    instance = rng.permutation(n) + 1
    if n >= 4:
        assert sorted(names) != names and list(instance) != sorted(instance)  # shuffled for real
    series_uid = generate_uid()
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series_uid
        ds.InstanceNumber = int(instance[k])
        ds.ImageOrientationPatient = [float(v) for v in (*ROW_DIR, *COL_DIR)]
        ds.ImagePositionPatient = [float(v) for v in ORIGIN + k * STEP * NORMAL]
        ds.PixelSpacing = list(PIXEL_SPACING)
        ds.Rows, ds.Columns = ROWS, COLS
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.WindowCenter, ds.WindowWidth = -600, 1500
        ds.PixelData = (true_hu(k) + 1024).astype(np.uint16).tobytes()
        if edit is not None and edit(k, ds) is False:
            continue
        ds.save_as(folder / names[k], enforce_file_format=True)
    return names


def test_dicom_series_sorted_by_geometry_in_hu(tmp_path):
    names = write_series(tmp_path / "s")
    (tmp_path / "s" / "README.txt").write_text("not a slice")
    vol = read_dicom_series(tmp_path / "s")
    assert vol.array.shape == (N, ROWS, COLS) and vol.array.dtype == np.float32
    for k in range(N):
        np.testing.assert_array_equal(vol.array[k], true_hu(k))  # order, layout, HU, no window
    assert vol.meta["files"] == names
    assert vol.meta["format"] == "dicom-series" and vol.meta["units"] == "HU"
    assert vol.meta["modality"] == "CT" and vol.meta["voi"] == {"center": -600.0, "width": 1500.0}
    np.testing.assert_allclose(vol.meta["orientation"], [*ROW_DIR, *COL_DIR])
    assert vol.meta["ignored"] == ["README.txt"]
    np.testing.assert_allclose(vol.spacing, (STEP, *PIXEL_SPACING))
    for k in range(N):
        np.testing.assert_allclose(vol.affine @ [k, 0, 0, 1], [*(ORIGIN + k * STEP * NORMAL), 1], atol=1e-6)
    # pixel (h, w) of slice k sits h row spacings down the column direction, w column spacings along the row
    k, h, w = 3, 5, 7
    expected = ORIGIN + k * STEP * NORMAL + h * PIXEL_SPACING[0] * COL_DIR + w * PIXEL_SPACING[1] * ROW_DIR
    np.testing.assert_allclose((vol.affine @ [k, h, w, 1])[:3], expected, atol=1e-6)
    assert read_volume(tmp_path / "s").meta["files"] == names  # dispatch


def test_dicom_gap_refused(tmp_path):
    write_series(tmp_path / "s", edit=lambda k, ds: k != 4)
    with pytest.raises(InputError, match="gap of 5.00 mm"):
        read_dicom_series(tmp_path / "s")


def test_dicom_two_series_refused(tmp_path):
    from pydicom.uid import generate_uid

    other = generate_uid()

    def second_series(k, ds):
        if k >= 5:
            ds.SeriesInstanceUID = other

    write_series(tmp_path / "s", edit=second_series)
    with pytest.raises(InputError, match="2 series in one folder"):
        read_dicom_series(tmp_path / "s")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda k, ds: setattr(ds, "ImagePositionPatient", list(ORIGIN)) if k == 6 else None, "same position"),
        (lambda k, ds: delattr(ds, "ImagePositionPatient") if k == 2 else None,
         "missing or invalid ImagePositionPatient"),
        (lambda k, ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 1, 0]) if k == 2 else None,
         "ImageOrientationPatient differs"),
        (lambda k, ds: setattr(ds, "PixelSpacing", [0.8, 0.9]) if k == 2 else None, "PixelSpacing"),
        (lambda k, ds: (setattr(ds, "Rows", ROWS - 2), setattr(ds, "PixelData", ds.PixelData[: 2 * (ROWS - 2) * COLS]))
         if k == 2 else None, "pixels but"),
    ],
    ids=["duplicate", "no-position", "orientation", "pixel-spacing", "rows"],
)
def test_dicom_inconsistent_series_refused(tmp_path, edit, message):
    write_series(tmp_path / "s", edit=edit)
    with pytest.raises(InputError, match=message):
        read_dicom_series(tmp_path / "s")


def test_dicom_empty_or_not_dicom_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no DICOM slices"):
        read_dicom_series(tmp_path / "empty")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "notes.dcm").write_text("hello")
    with pytest.raises(InputError, match="no DICOM slices"):
        read_dicom_series(tmp_path / "text")
    with pytest.raises(InputError, match="no DICOM files and no slice images"):
        read_volume(tmp_path / "text")


def test_multiframe_refused(tmp_path):
    def multiframe(k, ds):
        ds.NumberOfFrames = 2
        ds.PixelData = np.concatenate([true_hu(0), true_hu(1)]).astype(np.uint16).tobytes()

    names = write_series(tmp_path / "s", n=2, edit=multiframe)
    with pytest.raises(InputError, match="multi-frame"):
        read_dicom_series(tmp_path / "s")
    with pytest.raises(InputError, match="multi-frame"):
        read_volume(tmp_path / "s" / names[0])


# ---------------------------------------------------------------- covid-ct-md (real, JPEG-LS)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # this copy keeps upstream's UUID-style UIDs
def test_covid_ct_md_series_in_slices_csv_order():
    root = _real_dataset("covid-ct-md")
    with open(root / "manifest.csv", newline="") as fh:
        series = list(csv.DictReader(fh))
    with open(root / "slices.csv", newline="") as fh:
        slices = list(csv.DictReader(fh))
    start = time.perf_counter()
    for row in series:
        vol = read_volume(root / row["path"])
        rows = sorted((r for r in slices if r["series"] == row["path"]), key=lambda r: int(r["slice_index"]))
        assert vol.meta["files"] == [r["file"] for r in rows], row["path"]
        assert vol.array.shape == (int(row["n_slices"]), int(row["rows"]), int(row["columns"]))
        # slice 0 is the most inferior: its z (affine) equals slices.csv's z_mm
        z = (vol.affine @ np.c_[np.arange(vol.n_slices), np.zeros((vol.n_slices, 2)), np.ones(vol.n_slices)].T)[2]
        np.testing.assert_allclose(z, [float(r["z_mm"]) for r in rows], atol=0.06)
        assert -3000 <= vol.array.min() <= -1000 and vol.array.max() > 200
        assert np.median(vol.array[:, :8, :8]) < -900  # corner = air
        # this copy is downsampled to 256 px: in-plane 1.18-1.5 mm, not the scanner's 0.6-0.75 mm
        assert vol.spacing[0] == pytest.approx(float(row["slice_spacing_mm"]), abs=1e-3)
        assert vol.spacing[1:] == pytest.approx((float(row["pixel_spacing_mm"]),) * 2, abs=1e-6)
        assert 0.5 <= vol.spacing[0] <= 10 and all(0.3 <= s <= 2 for s in vol.spacing[1:])
        assert vol.meta["units"] == "HU" and vol.meta["modality"] == "CT" and vol.meta["voi"] is not None
    assert time.perf_counter() - start < 60  # about 5 s for all 6 series (901 JPEG-LS slices)


# ---------------------------------------------------------------- NIfTI


def nifti_image(shape=(5, 6, 7)):
    import nibabel as nib

    rng = np.random.default_rng(1)
    data = rng.normal(size=shape).astype(np.float32) * 100
    # x flipped, spacing 0.8 x 0.6 x 2.4 mm, y/z rotated (cos 0.8, sin 0.6) about x, translated
    affine = np.array([[-0.8, 0.0, 0.0, 10.0],
                       [0.0, 0.6 * 0.8, 2.4 * 0.6, -20.0],
                       [0.0, -0.6 * 0.6, 2.4 * 0.8, 30.0],
                       [0.0, 0.0, 0.0, 1.0]])
    return nib.Nifti1Image(data, affine), data, affine


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_array_and_affine_consistent(tmp_path, suffix):
    import nibabel as nib

    img, data, affine = nifti_image()
    labels = (data > 50).astype(np.uint8) + (data > 150)
    nib.save(img, tmp_path / f"ct{suffix}")
    nib.save(nib.Nifti1Image(labels, affine), tmp_path / f"mask{suffix}")
    vol = read_volume(tmp_path / f"ct{suffix}", mask=tmp_path / f"mask{suffix}")
    assert vol.meta["format"] == "nifti" and vol.array.shape == (7, 6, 5)
    for i, j, k in [(0, 0, 0), (4, 5, 6), (1, 3, 2), (3, 0, 5)]:
        assert vol.array[k, j, i] == pytest.approx(data[i, j, k])
        assert vol.mask[k, j, i] == labels[i, j, k]
        np.testing.assert_allclose(vol.affine @ [k, j, i, 1], img.affine @ [i, j, k, 1], atol=1e-6)
    np.testing.assert_allclose(vol.spacing, (2.4, 0.6, 0.8), rtol=1e-6)
    assert vol.mask.dtype == np.uint8 and vol.mask.shape == vol.array.shape


def test_nifti_corrupt_refused(tmp_path):
    import nibabel as nib

    img, _, _ = nifti_image((20, 20, 20))
    nib.save(img, tmp_path / "ct.nii.gz")
    data = (tmp_path / "ct.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cut.nii.gz: corrupt or truncated NIfTI"):
        read_nifti(tmp_path / "cut.nii.gz")
    (tmp_path / "text.nii").write_text("not a nifti file at all" * 20)
    with pytest.raises(InputError, match="text.nii: corrupt or truncated NIfTI"):
        read_volume(tmp_path / "text.nii")
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 19), np.uint8), img.affine), tmp_path / "small.nii.gz")
    with pytest.raises(InputError, match="mask shape"):
        read_nifti(tmp_path / "ct.nii.gz", mask_path=tmp_path / "small.nii.gz")


# ---------------------------------------------------------------- slice folders


def write_png(path: Path, value: int, size=(20, 24)) -> None:
    from PIL import Image

    px = np.full(size, value, np.uint8)
    px[0, 0] = 0
    px[-1, -1] = 255  # 8-bit grey is scaled by 1/255, not stretched
    Image.fromarray(px).save(path)


def test_slice_folder_natural_order_and_masks(tmp_path):
    numbers = [10, 2, 1, 33, 3]
    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    for n in numbers:
        write_png(tmp_path / "img" / f"slice_{n}.png", 5 * n)
        write_png(tmp_path / "msk" / f"slice_{n}.png", 140 if n % 2 else 115)  # soft: binarised at 0.5
    (tmp_path / "img" / "notes.txt").write_text("ignored")
    vol = read_volume(tmp_path / "img", mask=tmp_path / "msk")
    order = sorted(numbers)
    assert vol.meta["files"] == [f"slice_{n}.png" for n in order]  # slice_2 before slice_10
    assert vol.meta["format"] == "slice-folder" and vol.meta["units"] == "intensity"
    np.testing.assert_allclose(vol.array[:, 5, 5], [5 * n / 255 for n in order], atol=1e-6)
    assert vol.mask.dtype == np.uint8
    assert vol.mask[:, 5, 5].tolist() == [n % 2 for n in order]
    assert vol.spacing == (1.0, 1.0, 1.0) and np.array_equal(vol.affine, np.eye(4))


def test_slice_folder_size_mismatch_and_missing_mask(tmp_path):
    (tmp_path / "img").mkdir()
    for n in range(4):
        write_png(tmp_path / "img" / f"{n:03d}.png", 100, size=(20, 24) if n != 2 else (22, 24))
    with pytest.raises(InputError, match=r"002\.png: slice is 24x22 pixels but 000\.png is 24x20"):
        read_slice_folder(tmp_path / "img")
    vol = read_slice_folder(tmp_path / "img", size=(16, 18))
    assert vol.array.shape == (4, 16, 18) and vol.meta["resized_to"] == (16, 18)
    (tmp_path / "msk").mkdir()
    for n in (0, 1, 3):
        write_png(tmp_path / "msk" / f"{n:03d}.png", 255)
    with pytest.raises(InputError, match="no mask for slice 002.png"):
        read_slice_folder(tmp_path / "img", mask_folder=tmp_path / "msk", size=(16, 18))


def test_infnet_volume_with_mask():
    root = _real_dataset("infnet-ct-volumes")
    vid = "radiopaedia_4_85506_1"  # 13 slices, the smallest volume
    with pytest.raises(InputError, match="all slices of a volume must share one size"):
        read_volume(root / "volumes" / vid)  # lung crops change size from slice to slice
    vol = read_volume(root / "volumes" / vid, mask=root / "masks" / vid, size=(256, 256))
    assert vol.array.shape == vol.mask.shape == (13, 256, 256)
    assert vol.meta["files"] == [f"{k:03d}.jpg" for k in range(13)]
    assert 0.0 <= vol.array.min() and vol.array.max() <= 1.0 and vol.array.std() > 0.05
    assert vol.mask.sum() > 0 and set(np.unique(vol.mask)) <= {0, 1}
    assert all(vol.mask[k].any() for k in range(13))  # README: every slice has predicted infection


# ---------------------------------------------------------------- slice sequences


def test_sequence_indices():
    idx = sequence_indices(40, 16)
    assert idx.tolist() == [0, 3, 5, 8, 10, 13, 16, 18, 21, 23, 26, 29, 31, 34, 36, 39]
    assert set(np.diff(idx).tolist()) <= {2, 3}  # evenly spread
    np.testing.assert_array_equal(sequence_indices(16, 16), np.arange(16))
    assert sequence_indices(6, 5).tolist() == [0, 1, 3, 4, 5]  # 1.25, 2.5, 3.75: halves round up
    for n in range(16, 200):
        idx = sequence_indices(n)
        assert len(set(idx.tolist())) == 16 and idx[0] == 0 and idx[-1] == n - 1
    with pytest.raises(ChestDxError, match="13 slices, a 16-slice sequence needs at least 16"):
        sequence_indices(13, 16)


def test_draw_sequence_keeps_mask_aligned():
    n = 40
    array = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None], (n, 4, 4)).copy()
    mask = (np.arange(n) % 3 == 0).astype(np.uint8)[:, None, None].repeat(4, 1).repeat(4, 2)
    affine = np.diag([2.0, 0.5, 0.5, 1.0])
    affine[:3, 3] = (5.0, 0.0, 0.0)
    vol = Volume(array, (2.0, 0.5, 0.5), affine, {"path": "scan", "files": [f"{k}.png" for k in range(n)]}, mask)
    seq = draw_sequence(vol, 16)
    idx = sequence_indices(n, 16)
    assert seq.meta["slice_indices"] == idx.tolist()
    assert seq.array[:, 0, 0].tolist() == idx.tolist()
    assert seq.mask[:, 0, 0].tolist() == (idx % 3 == 0).astype(int).tolist()
    assert seq.meta["files"] == [f"{k}.png" for k in idx]
    assert seq.spacing == pytest.approx((2.0 * 39 / 15, 0.5, 0.5))
    np.testing.assert_allclose(seq.affine @ [15, 0, 0, 1], affine @ [39, 0, 0, 1])  # ends stay in place
    assert vol.array.shape == (n, 4, 4)  # the source volume is untouched
    short = Volume(array[:13], (2.0, 0.5, 0.5), affine, {"path": "short-scan"})
    with pytest.raises(InputError, match="short-scan: the scan has too few slices: 13 slices"):
        draw_sequence(short)
