"""Reading 3D CT: DICOM series, NIfTI files and folders of ordered slice images.

Every reader returns a `Volume`: float32 voxels (D, H, W) with D along the slice normal, the
voxel spacing in mm and a 4x4 affine from (d, h, w) indices to patient/world mm, so that a
sequence model, a 3D model and an overlay all agree on which slice is which. DICOM slices are
sorted by geometry (position along the slice normal), never by file name or InstanceNumber,
because neither is reliable. Every failure is an `InputError` that names the file or folder
and what is wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from chestdx.data.io import read_image, sniff_format
from chestdx.errors import ChestDxError, InputError

SPACING_TOLERANCE = 0.10  # a slice step off the median by more than this share is a gap (or overlap)
SAME_POSITION_MM = 0.01  # slices closer than this along the normal are duplicates
MAX_VOXELS = 1024**3 // 2  # 2 GiB of float32; larger volumes are refused from their headers
SEQUENCE_LENGTH = 16  # ResNet50-ATT2 draws 16 slices per scan


@dataclass
class Volume:
    """A CT volume (D, H, W) with spacing (mm), a (d, h, w) -> world affine and metadata.

    `array` is float32: Hounsfield units for CT DICOM (rescale slope/intercept applied, no VOI
    window), the image intensities in [0, 1] for slice-image folders, the stored values for NIfTI.
    `spacing` is (slice spacing along the normal, row spacing, column spacing), 1.0 where unknown.
    `mask`, when read alongside, is uint8 (D, H, W) on the same grid.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    meta: dict = field(default_factory=dict)
    mask: np.ndarray | None = None

    @property
    def n_slices(self) -> int:
        return int(self.array.shape[0])


# ---------------------------------------------------------------- choosing a reader


def read_volume(source, mask=None, size: tuple[int, int] | None = None, keep_aspect: bool = False) -> Volume:
    """Read a volume from a DICOM series folder, a .nii/.nii.gz file or a folder of slice images.

    The reader is chosen from what `source` is (a folder's files are recognised by their first
    bytes). `mask` is a NIfTI file (for NIfTI) or a folder of mask images (for slice folders);
    `size` (H, W) resizes slice images that differ in size (see `read_slice_folder`), padded to keep
    their aspect ratio when `keep_aspect`.
    """
    path = Path(source)
    if not path.exists():
        raise InputError(path, "not found")
    if path.is_file():
        if _is_nifti_name(path):
            return read_nifti(path, mask_path=mask)
        if _sniff(path) == "dicom":
            return read_dicom_series(path)  # explains why a single file is not a series
        raise InputError(path, "not a volume: expected a DICOM series folder, a .nii/.nii.gz file "
                               "or a folder of slice images")
    kinds = {_sniff(p) for p in _files(path)}
    if "dicom" in kinds:
        if mask is not None:
            raise InputError(path, "masks are read for NIfTI files and slice-image folders, "
                                   "not for DICOM series")
        return read_dicom_series(path)
    if kinds - {None}:
        return read_slice_folder(path, mask_folder=mask, size=size, keep_aspect=keep_aspect)
    niftis = [p.name for p in _files(path) if _is_nifti_name(p)]
    subfolders = [p for p in path.iterdir() if p.is_dir()]
    hint = f" (it holds NIfTI files: pass one of them, e.g. {niftis[0]})" if niftis else ""
    if subfolders and not hint:
        hint = f" (it has {len(subfolders)} sub-folders: pass the folder of one series)"
    raise InputError(path, f"folder holds no DICOM files and no slice images{hint}")


def _files(folder: Path) -> list[Path]:
    """Regular, non-hidden files directly in `folder` (sub-folders are other series)."""
    try:
        return [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    except OSError as err:
        raise InputError(folder, f"cannot be listed ({err.strerror or err})") from None


def _sniff(path: Path) -> str | None:
    try:
        with path.open("rb") as fh:
            return sniff_format(fh.read(132))
    except OSError:
        return None


def _is_nifti_name(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def _existing_folder(folder) -> Path:
    path = Path(folder)
    if not path.exists():
        raise InputError(path, "folder not found")
    if not path.is_dir():
        raise InputError(path, "is a file, not a folder of slices")
    return path


# ---------------------------------------------------------------- DICOM series


def read_dicom_series(folder) -> Volume:
    """Read one single-frame DICOM series from a folder, sorted along the slice normal, in HU.

    pydicom's warnings about values that break their VR's rules (e.g. a UUID as a UID, as in
    COVID-CT-MD) are not shown: the values are only compared, and a warning per file buries the output."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Invalid value for VR")
        return _read_dicom_series(folder)


def _read_dicom_series(folder) -> Volume:
    path = Path(folder)
    if path.is_file():
        _refuse_single_file(path)
    path = _existing_folder(path)
    slices, ignored = _read_dicom_files(path)
    _check_same_series(path, slices)
    orientation, normal = _orientation(path, slices)
    slices, positions = _sort_along_normal(path, slices, normal)
    slice_spacing = _slice_spacing(path, slices, positions)
    first = slices[0][1]
    row_spacing, col_spacing = _pixel_spacing(first)
    _refuse_too_large(path, len(slices) * int(first.Rows) * int(first.Columns))
    array = np.stack([_slice_hu(path / name, ds) for name, ds in slices])
    affine = _dicom_affine(slices, orientation, (row_spacing, col_spacing), normal * slice_spacing)
    meta = {
        "path": str(path),
        "format": "dicom-series",
        "units": "HU" if str(first.get("Modality", "")).upper() == "CT" else "modality",
        "series_uid": str(first.get("SeriesInstanceUID", "")),
        "modality": str(first.get("Modality", "")),
        "orientation": tuple(float(v) for v in orientation),
        "files": [name for name, _ in slices],
        "voi": _first_window(first),
        "ignored": sorted(ignored),
    }
    return Volume(array, (slice_spacing, row_spacing, col_spacing), affine, meta)


def _refuse_single_file(path: Path) -> None:
    ds = _dcmread(path)
    frames = int(ds.get("NumberOfFrames", 1) or 1) if ds is not None else 1
    if frames > 1:
        raise InputError(path, f"multi-frame DICOM ({frames} frames in one file) is not supported; "
                               "export the series as one file per slice")
    raise InputError(path, "is one DICOM file, not a series: pass the folder that holds all its slices")


def _dcmread(path: Path):
    """The dataset, or None when the file is not DICOM; a damaged DICOM file is an InputError."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        return None
    except Exception as err:  # truncated or damaged files raise many kinds of errors
        raise InputError(path, f"corrupt DICOM ({err})") from None


def _read_dicom_files(folder: Path) -> tuple[list, list[str]]:
    """(name, dataset) of every DICOM image in the folder; non-DICOM and non-image files are ignored."""
    slices, ignored = [], []
    for p in sorted(_files(folder)):
        ds = _dcmread(p) if _sniff(p) == "dicom" else None
        if ds is None or "PixelData" not in ds:
            ignored.append(p.name)  # README, DICOMDIR, reports: not slices
            continue
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1:
            raise InputError(p, f"multi-frame DICOM ({frames} frames in one file) is not supported; "
                                "export the series as one file per slice")
        slices.append((p.name, ds))
    if not slices:
        what = f"{len(ignored)} files, none of them a DICOM image" if ignored else "the folder is empty"
        raise InputError(folder, f"no DICOM slices found ({what})")
    return slices, ignored


def _check_same_series(folder: Path, slices: list) -> None:
    """One series, one grid: a mixed folder would silently interleave two scans."""
    uids = {str(ds.get("SeriesInstanceUID", "")) for _, ds in slices}
    if len(uids) > 1:
        raise InputError(folder, f"{len(uids)} series in one folder (SeriesInstanceUID differs "
                                 "between files); put each series in its own folder")
    name0, ds0 = slices[0]
    for name, ds in slices:
        for tag, n in (("ImagePositionPatient", 3), ("ImageOrientationPatient", 6)):
            if len(_floats(ds, tag)) != n:
                raise InputError(folder / name, f"missing or invalid {tag}: the slice cannot be placed")
        if _grid(ds) != _grid(ds0):
            raise InputError(folder / name, f"slice is {ds.get('Columns')}x{ds.get('Rows')} pixels "
                                            f"but {name0} is {ds0.get('Columns')}x{ds0.get('Rows')}")
        if not np.allclose(_floats(ds, "PixelSpacing"), _floats(ds0, "PixelSpacing"), atol=1e-4):
            raise InputError(folder / name, f"PixelSpacing {_floats(ds, 'PixelSpacing')} differs from "
                                            f"{_floats(ds0, 'PixelSpacing')} in {name0}")
        if not np.allclose(_floats(ds, "ImageOrientationPatient"), _floats(ds0, "ImageOrientationPatient"), atol=1e-4):
            raise InputError(folder / name, "ImageOrientationPatient differs from that of "
                                            f"{name0}: slices are not parallel")


def _grid(ds) -> tuple[int, int]:
    return int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)


def _floats(ds, tag: str) -> list[float]:
    value = ds.get(tag)
    if value is None:
        return []
    return [float(v) for v in (value if hasattr(value, "__len__") and not isinstance(value, str) else [value])]


def _orientation(folder: Path, slices: list) -> tuple[np.ndarray, np.ndarray]:
    """(the 6 direction cosines, the unit slice normal = row direction x column direction)."""
    name, ds = slices[0]
    iop = np.array(_floats(ds, "ImageOrientationPatient"), dtype=np.float64)
    row, col = iop[:3], iop[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        raise InputError(folder / name, f"invalid ImageOrientationPatient {list(iop)}: "
                                        "expected two orthogonal unit vectors")
    normal = np.cross(row, col)
    return iop, normal / np.linalg.norm(normal)


def _sort_along_normal(folder: Path, slices: list, normal: np.ndarray) -> tuple[list, np.ndarray]:
    """Slices in increasing position along the normal; duplicates refused."""
    positions = np.array([np.dot(_floats(ds, "ImagePositionPatient"), normal) for _, ds in slices])
    order = np.argsort(positions, kind="stable")
    slices = [slices[i] for i in order]
    positions = positions[order]
    for i in np.flatnonzero(np.diff(positions) < SAME_POSITION_MM):
        raise InputError(folder, f"{slices[i][0]} and {slices[i + 1][0]} are at the same position "
                                 f"({positions[i]:.2f} mm along the slice normal): duplicate slices "
                                 "or two acquisitions in one series")
    return slices, positions


def _slice_spacing(folder: Path, slices: list, positions: np.ndarray) -> float:
    """Median step along the normal; a step off it by more than 10% is a gap or an overlap."""
    if len(positions) < 2:
        ds = slices[0][1]
        for tag in ("SpacingBetweenSlices", "SliceThickness"):
            if ds.get(tag) not in (None, "") and float(ds.get(tag)) > 0:
                return float(ds.get(tag))
        return 1.0
    steps = np.diff(positions)
    median = float(np.median(steps))
    for i in np.flatnonzero(np.abs(steps - median) > SPACING_TOLERANCE * median):
        where = (f"between {slices[i][0]} and {slices[i + 1][0]} (at {positions[i]:.2f} and "
                 f"{positions[i + 1]:.2f} mm along the slice normal)")
        usual = f"where the median spacing is {median:.2f} mm"
        if steps[i] > median:
            what = f"a gap of {steps[i]:.2f} mm {where} {usual} (missing slices?)"
        else:
            what = f"slices only {steps[i]:.2f} mm apart {where} {usual} (extra slices?)"
        raise InputError(folder, f"uneven slice spacing: {what}")
    return median


def _pixel_spacing(ds) -> tuple[float, float]:
    """(row spacing, column spacing) in mm from PixelSpacing; 1.0 where the file does not say."""
    values = _floats(ds, "PixelSpacing")
    return (values[0], values[1]) if len(values) == 2 and min(values) > 0 else (1.0, 1.0)


def _refuse_too_large(path: Path, voxels: int) -> None:
    if voxels > MAX_VOXELS:
        raise InputError(path, f"volume has {voxels:,} voxels, too large (limit {MAX_VOXELS:,})")


def _slice_hu(path: Path, ds) -> np.ndarray:
    """Decoded pixels with the modality LUT (slope/intercept) applied; the VOI window is not."""
    from pydicom.pixels import apply_modality_lut

    try:
        arr = ds.pixel_array
    except Exception as err:
        syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        raise InputError(path, f"cannot decode DICOM pixel data with transfer syntax "
                               f"{getattr(syntax, 'name', syntax)} ({err}); for compressed syntaxes "
                               "install pylibjpeg, pylibjpeg-libjpeg and pylibjpeg-openjpeg") from None
    if arr.ndim != 2:
        raise InputError(path, f"expected a grey slice, got pixel data of shape {arr.shape} "
                               f"({ds.get('PhotometricInterpretation', '?')})")
    values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
    if not np.isfinite(values).all():
        raise InputError(path, "pixel data contains NaN or infinite values")
    return values


def _dicom_affine(slices: list, orientation: np.ndarray, pixel_spacing, slice_step: np.ndarray) -> np.ndarray:
    """The standard DICOM LPS affine, columns in (d, h, w) order.

    h runs down the columns (column direction x row spacing), w along the rows (row direction x
    column spacing); the d column is (last position - first position) / (n - 1), which equals
    normal x slice spacing for an even series and also keeps a tilted-gantry series in place.
    """
    row_dir, col_dir = orientation[:3], orientation[3:]
    first = np.array(_floats(slices[0][1], "ImagePositionPatient"))
    if len(slices) > 1:
        last = np.array(_floats(slices[-1][1], "ImagePositionPatient"))
        slice_step = (last - first) / (len(slices) - 1)
    affine = np.eye(4)
    affine[:3, 0] = slice_step
    affine[:3, 1] = col_dir * pixel_spacing[0]
    affine[:3, 2] = row_dir * pixel_spacing[1]
    affine[:3, 3] = first
    return affine


def _first_window(ds) -> dict | None:
    """The first WindowCenter/WindowWidth pair, kept for display; it is not applied."""
    centers, widths = _floats(ds, "WindowCenter"), _floats(ds, "WindowWidth")
    if not centers or not widths:
        return None
    return {"center": centers[0], "width": widths[0]}


# ---------------------------------------------------------------- NIfTI


def read_nifti(path, mask_path=None) -> Volume:
    """Read a .nii/.nii.gz volume as (D, H, W) = (Z, Y, X), keeping the file's world affine."""
    path = Path(path)
    values, affine = _load_nifti(path)
    array = np.ascontiguousarray(values.transpose(2, 1, 0), dtype=np.float32)
    if not np.isfinite(array).all():
        raise InputError(path, "voxel data contains NaN or infinite values")
    dhw_affine = affine[:, [2, 1, 0, 3]]  # index (d, h, w) = voxel (k, j, i)
    spacing = tuple(float(s) for s in np.linalg.norm(dhw_affine[:3, :3], axis=0))
    meta = {"path": str(path), "format": "nifti", "units": "as-stored"}
    mask = None
    if mask_path is not None:
        mask = _nifti_mask(Path(mask_path), values.shape, affine)
        meta["mask_path"] = str(mask_path)
    return Volume(array, spacing, dhw_affine, meta, mask)


def _load_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(voxels as stored, (X, Y, Z) float64; the 4x4 voxel (i, j, k) -> world affine)."""
    import nibabel as nib

    if not path.exists():
        raise InputError(path, "file not found")
    if path.is_dir():
        raise InputError(path, "is a folder, not a NIfTI file")
    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
        if len(shape) == 4 and shape[3] == 1:
            shape = shape[:3]
        if len(shape) != 3:
            raise InputError(path, f"expected a 3D volume, got shape {tuple(img.shape)}")
        _refuse_too_large(path, int(np.prod(shape)))
        values = np.asarray(img.dataobj, dtype=np.float64).reshape(shape)
        affine = np.asarray(img.affine, dtype=np.float64)
    except InputError:
        raise
    except Exception as err:  # nibabel, gzip and numpy raise many kinds of errors on damaged files
        raise InputError(path, f"corrupt or truncated NIfTI file ({type(err).__name__}: {err})") from None
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(path, "NIfTI affine is degenerate (zero or non-finite voxel size)")
    return values, affine


def _nifti_mask(path: Path, shape: tuple, affine: np.ndarray) -> np.ndarray:
    """A label mask on the image's grid, as uint8 (D, H, W); other grids are refused, not resampled."""
    values, mask_affine = _load_nifti(path)
    if values.shape != shape:
        raise InputError(path, f"mask shape {values.shape} differs from the image's {shape}")
    if not np.allclose(mask_affine, affine, rtol=1e-3, atol=1e-2):
        raise InputError(path, "mask affine differs from the image's: the mask is on another grid")
    rounded = np.rint(values)
    if np.abs(values - rounded).max(initial=0) > 1e-3 or rounded.min(initial=0) < 0 or rounded.max(initial=0) > 255:
        raise InputError(path, "mask must hold integer labels 0-255")
    return np.ascontiguousarray(rounded.transpose(2, 1, 0), dtype=np.uint8)


def write_nifti(array: np.ndarray, affine: np.ndarray, path, dtype=np.float32) -> Path:
    """Write a (D, H, W) array as .nii/.nii.gz, atomically, so that `read_nifti` gives it back.

    `read_nifti` reads voxels (X, Y, Z) as (D, H, W) = (Z, Y, X) and takes the affine's columns in
    (k, j, i) order; this writes the inverse (voxels transposed, the (d, h, w) affine's columns
    reordered (w, h, d)). Both sform and qform are set (code 1, scanner)."""
    import gzip

    import nibabel as nib

    from chestdx.utils import atomic_path

    path = Path(path)
    xyz_affine = np.asarray(affine, dtype=np.float64)[:, [2, 1, 0, 3]]  # voxel (i, j, k) = index (w, h, d)
    img = nib.Nifti1Image(np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0).astype(dtype)), xyz_affine)
    img.header.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm")
    img.set_sform(xyz_affine, code=1)
    img.set_qform(xyz_affine, code=1)
    data = img.to_bytes()  # serialised here: nibabel picks the format from a name the temp file lacks
    if path.name.lower().endswith(".gz"):
        data = gzip.compress(data, compresslevel=6, mtime=0)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


# ---------------------------------------------------------------- folders of slice images


def read_slice_folder(folder, mask_folder=None, size: tuple[int, int] | None = None,
                      keep_aspect: bool = False) -> Volume:
    """Read a folder of ordered slice images (PNG, JPEG, DICOM) as a volume of grey [0, 1].

    Slice order is the natural sort of the file names (slice_2 before slice_10); files that are
    not images are ignored. `mask_folder` holds one mask per slice with the same name stem (any
    image format, e.g. 000.jpg -> 000.png), binarised at 0.5. All slices must share one size,
    unless `size` (H, W) is given: then every slice (and mask) is resized to it, which
    lung-cropped data such as Inf-Net's needs (its crop size changes from slice to slice);
    `keep_aspect` pads each slice with its border intensity instead of stretching it.
    """
    path = _existing_folder(folder)
    files = _slice_files(path)
    slices = [read_image(p).to_gray() for p in files]
    masks = None
    if mask_folder is not None:
        mask_files = _matching_masks(_existing_folder(mask_folder), files)
        masks = [_read_mask(m, s.shape) for m, s in zip(mask_files, slices)]
    if size is None:
        _check_same_size(files, slices)
    else:
        size = (int(size[0]), int(size[1]))
        slices = [_resize(s, size, keep_aspect) for s in slices]
        masks = None if masks is None else [_resize(m, size, keep_aspect, nearest=True) for m in masks]
    array = np.stack(slices).astype(np.float32)
    mask = None if masks is None else (np.stack(masks) >= 0.5).astype(np.uint8)
    meta = {"path": str(path), "format": "slice-folder", "units": "intensity",
            "files": [p.name for p in files]}
    if mask_folder is not None:
        meta["mask_path"] = str(mask_folder)
    if size is not None:
        meta["resized_to"] = size
    return Volume(array, (1.0, 1.0, 1.0), np.eye(4), meta, mask)


def natural_key(name: str) -> tuple:
    """Sort key in which digit runs compare as numbers: slice_2 < slice_10."""
    parts = re.split(r"(\d+)", name)
    return tuple(int(p) if i % 2 else p.lower() for i, p in enumerate(parts)) + (name,)


def _slice_files(folder: Path) -> list[Path]:
    files = sorted((p for p in _files(folder) if _sniff(p) is not None), key=lambda p: natural_key(p.name))
    if not files:
        raise InputError(folder, "no slice images found (expected PNG, JPEG or DICOM files)")
    return files


def _matching_masks(mask_folder: Path, files: list[Path]) -> list[Path]:
    """One mask per slice, matched by file name stem; a missing or extra mask is an error."""
    by_stem = {}
    for p in _slice_files(mask_folder):
        by_stem.setdefault(_stem(p), p)
    masks = []
    for p in files:
        if _stem(p) not in by_stem:
            raise InputError(mask_folder, f"no mask for slice {p.name} (expected a file named {_stem(p)}.*)")
        masks.append(by_stem.pop(_stem(p)))
    if by_stem:
        extra = sorted(by_stem.values(), key=lambda p: natural_key(p.name))[0]
        raise InputError(extra, f"mask has no matching slice in {files[0].parent}")
    return masks


def _stem(path: Path) -> str:
    return path.stem


def _read_mask(path: Path, shape: tuple) -> np.ndarray:
    mask = read_image(path).to_gray()
    if mask.shape != shape:
        raise InputError(path, f"mask is {mask.shape[1]}x{mask.shape[0]} pixels but its slice is "
                               f"{shape[1]}x{shape[0]}")
    return mask


def _check_same_size(files: list[Path], slices: list[np.ndarray]) -> None:
    h0, w0 = slices[0].shape
    for p, s in zip(files, slices):
        if s.shape != (h0, w0):
            raise InputError(p, f"slice is {s.shape[1]}x{s.shape[0]} pixels but {files[0].name} is "
                                f"{w0}x{h0}: all slices of a volume must share one size "
                                "(or pass size=(H, W) to resize them)")


def _resize(image: np.ndarray, size: tuple[int, int], keep_aspect: bool = False, nearest: bool = False) -> np.ndarray:
    import cv2

    if keep_aspect:  # the training pipeline's letterbox (pad with the border median; masks with 0)
        from chestdx.data.transforms import Resize

        key = "mask" if nearest else "image"
        out = Resize(size, keep_aspect=True, keys=(key,))({"image": image[None], key: image[None]})[key][0]
        return np.clip(out.astype(np.float32), 0.0, 1.0)
    h, w = image.shape
    if (h, w) == size:
        return image
    shrink = size[0] < h or size[1] < w
    out = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return np.clip(out, 0.0, 1.0)  # interpolation rounding can step just outside [0, 1]


# ---------------------------------------------------------------- slice sequences


def sequence_indices(n_slices: int, length: int = SEQUENCE_LENGTH) -> np.ndarray:
    """`length` evenly spaced slice indices from 0 to n_slices - 1 (both ends included).

    Index k is round(k * (n_slices - 1) / (length - 1)), halves rounded up; with at least
    `length` slices the indices are distinct (length 1 gives the middle slice). Fewer slices
    are refused rather than repeated, because a repeated slice would pass for anatomy that is not there.
    """
    n_slices, length = int(n_slices), int(length)
    if length < 1:
        raise ChestDxError(f"a slice sequence needs a length of at least 1, got {length}")
    if n_slices < length:
        raise ChestDxError(f"the scan has too few slices: {n_slices} slices, a {length}-slice "
                           f"sequence needs at least {length}")
    if length == 1:
        return np.array([(n_slices - 1) // 2], dtype=np.int64)
    return np.floor(np.arange(length) * (n_slices - 1) / (length - 1) + 0.5).astype(np.int64)


def draw_sequence(volume: Volume, length: int = SEQUENCE_LENGTH) -> Volume:
    """The volume restricted to `length` evenly spaced slices (mask too).

    meta["slice_indices"] records which slices were drawn. The affine's slice column becomes
    the mean step between drawn slices, exact when that step is a whole number of slices and
    within half a slice otherwise (the exact positions follow from slice_indices and the source affine).
    """
    try:
        idx = sequence_indices(volume.n_slices, length)
    except ChestDxError as err:
        raise InputError(volume.meta.get("path", "<volume>"), str(err)) from None
    step = float(idx[-1] - idx[0]) / (len(idx) - 1) if len(idx) > 1 else 1.0
    affine = volume.affine.copy()
    affine[:3, 3] = volume.affine[:3, :3] @ np.array([idx[0], 0.0, 0.0]) + volume.affine[:3, 3]
    affine[:3, 0] = volume.affine[:3, 0] * step
    meta = dict(volume.meta)
    meta["slice_indices"] = idx.tolist()
    meta["source_affine"] = volume.affine.tolist()
    if isinstance(meta.get("files"), list) and len(meta["files"]) == volume.n_slices:
        meta["files"] = [meta["files"][i] for i in idx]
    spacing = (volume.spacing[0] * step, volume.spacing[1], volume.spacing[2])
    mask = None if volume.mask is None else np.ascontiguousarray(volume.mask[idx])
    return replace(volume, array=np.ascontiguousarray(volume.array[idx]), spacing=spacing,
                   affine=affine, meta=meta, mask=mask)
