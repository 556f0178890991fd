"""Reading chest images: PNG, JPEG (8- and 16-bit; L, RGB, RGBA, palette) and DICOM.

`read_image` chooses the reader from the file's first bytes, not its extension, and returns
float32 pixels scaled to [0, 1] with metadata. Every failure is an `InputError` that names
the file and what is wrong, so the CLI and the service can print one clear line.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from chestdx.errors import InputError

MIN_SIDE = 16  # smaller images carry no diagnostic content and break the CNN's strides
MAX_PIXELS = 100_000_000  # ~10k x 10k; larger files are refused before decoding


@dataclass
class LoadedImage:
    """Pixels in [0, 1], shape (H, W) for grey or (H, W, 3) for colour, plus metadata."""

    pixels: np.ndarray
    meta: dict = field(default_factory=dict)

    def to_gray(self) -> np.ndarray:
        """(H, W) float32: colour images are averaged with ITU-R 601 luma weights."""
        if self.pixels.ndim == 2:
            return self.pixels
        if self.pixels.ndim == 3 and self.pixels.shape[-1] == 3:
            return (self.pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32)).astype(np.float32)
        raise InputError(self.meta.get("path", "<image>"), f"expected a 2D image, got shape {self.pixels.shape}")


def sniff_format(head: bytes) -> str | None:
    """Name the format from the first 132 bytes of a file."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head.startswith(b"BM"):
        return "bmp"
    return None


def read_image(source, name: str | None = None, hu_window=None) -> LoadedImage:
    """Read an image from a path or from bytes (`name` labels bytes in error messages).

    `hu_window` [center, width]: a CT DICOM image is windowed by it from Hounsfield units, not by
    the file's own VOI window (a model carries the window it was trained with); other images and
    DICOM without HU are read as before."""
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
        label = name or "<upload>"
    else:
        path = Path(source)
        label = name or str(path)
        if not path.exists():
            raise InputError(label, "file not found")
        if path.is_dir():
            raise InputError(label, "is a folder, not an image file")
        try:
            data = path.read_bytes()
        except OSError as err:
            raise InputError(label, f"cannot be read ({err.strerror or err})") from None
    return decode_image(data, label, hu_window=hu_window)


def decode_image(data: bytes, label: str, max_pixels: int = MAX_PIXELS, hu_window=None) -> LoadedImage:
    """Decode bytes; images over `max_pixels` are refused from their header, before decoding.
    `hu_window`: see `read_image`."""
    if len(data) == 0:
        raise InputError(label, "empty file (0 bytes)")
    kind = sniff_format(data[:132])
    if kind is None:
        raise InputError(label, "not a supported image: expected PNG, JPEG or DICOM content")
    if kind == "dicom":
        image = _decode_dicom(data, label, max_pixels, hu_window)
    else:
        image = _decode_raster(data, label, kind, max_pixels)
    image.meta.setdefault("path", label)
    _check_pixels(image, label)
    return image


def _check_pixels(image: LoadedImage, label: str) -> None:
    px = image.pixels
    frames = image.meta.get("frames", 1) > 1
    h, w = px.shape[1:3] if frames else px.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise InputError(label, f"image is {w}x{h} pixels, too small (at least {MIN_SIDE}x{MIN_SIDE} needed)")
    if not np.isfinite(px).all():
        raise InputError(label, "pixel data contains NaN or infinite values")


def _decode_raster(data: bytes, label: str, kind: str, max_pixels: int) -> LoadedImage:
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise InputError(label, f"corrupt {kind.upper()} header ({err})") from None
    w, h = img.size
    if w * h > max_pixels:
        raise InputError(label, f"image is {w}x{h} pixels, too large (limit {max_pixels:,} pixels)")
    try:
        img.load()
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error on damaged data
        raise InputError(label, f"corrupt or truncated {kind.upper()} data ({err})") from None
    meta = {"format": kind, "mode": img.mode, "original_size": (w, h)}
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA"):
        # Transparent pixels count as black, the background of a radiograph.
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img.convert("RGBA")).convert("RGB" if mode == "RGBA" else "L")
        mode = img.mode
    if mode == "CMYK" or mode == "YCbCr":
        img = img.convert("RGB")
        mode = "RGB"
    arr = np.asarray(img)
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = arr.astype(np.float32)
        meta["bits"] = 16 if mode.startswith("I;16") else 32
        pixels = _stretch(arr)
    elif mode == "1":
        meta["bits"] = 1
        pixels = arr.astype(np.float32)
    elif mode in ("L", "RGB"):
        meta["bits"] = 8
        pixels = arr.astype(np.float32) / 255.0
    else:
        raise InputError(label, f"unsupported {kind.upper()} pixel mode {mode!r}")
    return LoadedImage(np.ascontiguousarray(pixels, dtype=np.float32), meta)


def _stretch(arr: np.ndarray) -> np.ndarray:
    """Min-max scale to [0, 1]. High-bit-depth files store anything from 10 to 16 bits."""
    arr = arr.astype(np.float32)
    lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
    if hi <= lo:
        return np.zeros_like(arr, dtype=np.float32)
    return (arr - lo) / (hi - lo)


def _decode_dicom(data: bytes, label: str, max_pixels: int, hu_window=None) -> LoadedImage:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, Exception) as err:
        raise InputError(label, f"corrupt DICOM ({err})") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise InputError(label, "DICOM has no pixel data (not an image object)")
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    if rows * cols > max_pixels:
        raise InputError(label, f"DICOM image is {cols}x{rows} pixels, too large (limit {max_pixels:,} pixels)")
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    try:
        arr = ds.pixel_array
    except Exception as err:
        name = getattr(syntax, "name", str(syntax))
        raise InputError(
            label,
            f"cannot decode DICOM pixel data with transfer syntax {name} ({err}); "
            "for compressed syntaxes install pylibjpeg, pylibjpeg-libjpeg and pylibjpeg-openjpeg",
        ) from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    meta = {
        "format": "dicom",
        "transfer_syntax": str(syntax) if syntax else None,
        "photometric": photometric,
        "modality": str(ds.get("Modality", "")),
        "bits": int(ds.get("BitsStored", 8) or 8),
        "frames": frames,
        "original_size": (cols, rows),
    }
    if photometric.startswith("MONOCHROME"):
        pixels, meta["window"] = _dicom_grey(ds, arr, photometric, hu_window)
    elif photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "PALETTE COLOR"):
        from pydicom.pixels import apply_color_lut, convert_color_space

        if photometric == "PALETTE COLOR":
            arr = apply_color_lut(arr, ds)
        elif photometric.startswith("YBR") and not ds.file_meta.TransferSyntaxUID.is_compressed:
            arr = convert_color_space(arr, photometric, "RGB")
        pixels = _stretch(arr.astype(np.float32))
    else:
        raise InputError(label, f"unsupported DICOM photometric interpretation {photometric!r}")
    if frames > 1:
        meta["note"] = f"multi-frame DICOM with {frames} frames"
    return LoadedImage(np.ascontiguousarray(pixels, dtype=np.float32), meta)


def is_hu(ds) -> bool:
    """CT pixel data rescaled to Hounsfield units (RescaleType, where present, says HU)."""
    kind = str(ds.get("RescaleType", "HU") or "HU").strip().upper()
    return str(ds.get("Modality", "")).strip().upper() == "CT" and kind in ("HU", "")


def _dicom_grey(ds, arr: np.ndarray, photometric: str, hu_window=None) -> tuple[np.ndarray, str]:
    """Rescale slope/intercept, then the model's HU window (CT), or the file's VOI LUT or window, or the
    value range; MONOCHROME1 inverted. Returns the pixels and which window was used."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(arr, ds).astype(np.float32)
    if not np.isfinite(values).all():
        return values, "none"  # the caller's NaN check names the file
    if hu_window is not None and is_hu(ds):
        center, width = float(hu_window[0]), float(hu_window[1])
        lo = center - width / 2
        return np.clip((values - lo) / width, 0.0, 1.0).astype(np.float32), f"model HU window {center:g}/{width:g}"
    has_voi = "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)
    used = "value range"
    if has_voi:
        values = np.asarray(apply_voi_lut(values, ds, index=0), dtype=np.float32)
        used = "file VOI"
    pixels = _stretch(values)
    if photometric == "MONOCHROME1":
        pixels = 1.0 - pixels  # MONOCHROME1 stores bright air as low values
    return pixels, used
