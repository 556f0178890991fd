"""Reading chest images: PNG, JPEG (8-bit baseline and progressive; grey, RGB, CMYK, palette) and DICOM.

`read_image` chooses the reader from the file's first bytes, not its extension, and returns
float32 pixels scaled to [0, 1] with metadata. Every failure is an `InputError` that names
the file and what is wrong, so the CLI and the service can print one clear line.

Files come from anyone, so the cost of decoding is bounded before anything decodes: the
structure of a PNG (its chunks and their checksums) or a JPEG (its markers) is checked and its
size read from the header, and images over `MAX_PIXELS` are refused before Pillow sees them.
Other formats (TIFF, BMP, GIF, WebP, JPEG 2000, ...) are refused by name. DICOM: `dicom_io`.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from chestdx.errors import InputError

MIN_SIDE = 16  # smaller images carry no diagnostic content and break the CNN's strides
MAX_PIXELS = 50_000_000  # ~7k x 7k: THE limit, for the command line and the service (its default)
MAX_PNG_CHUNKS = 100_000  # bounds the time spent walking a PNG's chunks
SUPPORTED = "expected PNG, JPEG or DICOM"


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
    """'png', 'jpeg' or 'dicom' from the first 132 bytes of a file; None for anything else."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    return None


_MAGIC = [  # (offset, bytes, what the file is) for formats refused by name
    (0, b"II*\x00", "a TIFF file"), (0, b"MM\x00*", "a TIFF file"), (0, b"II+\x00", "a BigTIFF file"),
    (0, b"MM\x00+", "a BigTIFF file"), (0, b"GIF87a", "a GIF file"), (0, b"GIF89a", "a GIF file"),
    (0, b"\xffO\xffQ", "a JPEG 2000 codestream"), (0, b"\x00\x00\x00\x0cjP  \r\n\x87\n", "a JPEG 2000 (JP2) file"),
    (0, b"\xff\x0a", "a JPEG XL file"), (0, b"\x00\x00\x00\x0cJXL \r\n\x87\n", "a JPEG XL file"),
    (0, b"8BPS", "a Photoshop (PSD) file"), (0, b"v/1\x01", "an OpenEXR file"), (0, b"%PDF-", "a PDF document"),
    (0, b"PK\x03\x04", "a ZIP archive"), (0, b"PK\x05\x06", "a ZIP archive"), (0, b"\x1f\x8b", "a gzip archive"),
    (0, b"BZh", "a bzip2 archive"), (0, b"\xfd7zXZ\x00", "an xz archive"),
    (0, b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (0, b"Rar!\x1a\x07", "a RAR archive"), (0, b"(\xb5/\xfd", "a zstd archive"), (0, b"\x7fELF", "an ELF executable"),
    (0, b"MZ", "a Windows executable"), (0, b"\xcf\xfa\xed\xfe", "a Mach-O executable"),
    (0, b"\xce\xfa\xed\xfe", "a Mach-O executable"), (0, b"\xca\xfe\xba\xbe", "a Mach-O or Java class file"),
    (0, b"#!", "a script"), (0, b"DICM", "a DICOM file without its 128-byte preamble"),
    (344, b"n+1\x00", "a NIfTI volume (a sequence model reads it)"),
    (344, b"ni1\x00", "a NIfTI volume (a sequence model reads it)"),
    (4, b"n+2\x00", "a NIfTI-2 volume (a sequence model reads it)"), (257, b"ustar", "a tar archive"),
]
_TEXT_KINDS = [(b"<?xml", "an XML document"), (b"<svg", "an SVG drawing"), (b"<!doctype html", "an HTML page"),
               (b"<html", "an HTML page"), (b"{", "a JSON or text file"), (b"[", "a JSON or text file")]


def describe_format(head: bytes) -> str | None:
    """What an unsupported file is ('a TIFF file', 'an HTML page', ...), from its first bytes; None if unknown."""
    for offset, magic, what in _MAGIC:
        if head[offset:offset + len(magic)] == magic:
            return "an SVG drawing" if what == "an XML document" and b"<svg" in head.lower() else what
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP file"
    if head[:4] == b"RIFF":
        return "a RIFF (audio or video) file"
    if head[4:8] == b"ftyp":
        return "a HEIF/AVIF image" if head[8:12] in (b"heic", b"heix", b"mif1", b"msf1", b"avif", b"avis") \
            else "an MP4 or QuickTime file"
    if head[:2] == b"BM" and int.from_bytes(head[14:18], "little") in (12, 40, 52, 56, 64, 108, 124):  # DIB size
        return "a BMP file"
    if re.match(rb"P[1-7]\s", head):
        return "a PNM (PGM/PPM) image"
    from chestdx.data.dicom_io import describe_raw_dicom

    raw = describe_raw_dicom(head)
    if raw:
        return raw
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return "a UTF-16 text file"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    for start, what in _TEXT_KINDS:
        if text.startswith(start):
            return "an SVG drawing" if what == "an XML document" and b"<svg" in text else what
    try:
        decoded = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return "a text file" if decoded and sum(c.isprintable() or c.isspace() for c in decoded) > 0.95 * len(decoded) \
        else None


def unsupported(label: str, what: str | None) -> InputError:
    """The refusal for a format chestdx does not read (the service answers 415)."""
    return InputError(label, f"not a supported image: {SUPPORTED}" + (f" (this is {what})" if what else " content"))


def read_image(source, name: str | None = None, hu_window=None, max_pixels: int = MAX_PIXELS) -> LoadedImage:
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
    return decode_image(data, label, max_pixels=max_pixels, hu_window=hu_window)


def decode_image(data: bytes, label: str, max_pixels: int = MAX_PIXELS, hu_window=None) -> LoadedImage:
    """Decode bytes; images over `max_pixels` are refused from their header, before decoding.
    Raises only `InputError`. `hu_window`: see `read_image`."""
    if len(data) == 0:
        raise InputError(label, "empty file (0 bytes)")
    kind = sniff_format(data[:132])
    if kind is None:
        raise unsupported(label, describe_format(data[:1024]))
    try:
        with quiet():
            if kind == "dicom":
                from chestdx.data.dicom_io import decode_dicom

                image = decode_dicom(data, label, max_pixels, hu_window)
            else:
                image = _decode_raster(data, label, kind, max_pixels)
    except InputError:
        raise
    except MemoryError:
        raise InputError(label, f"{kind.upper()} image too large to decode in the memory available") from None
    except Exception as err:  # a decoder's own error on damaged data, whatever its type
        raise InputError(label, f"corrupt {kind.upper()} data ({brief(err)})") from None
    image.meta.setdefault("path", label)
    _check_pixels(image, label)
    return image


@contextmanager
def quiet():
    """Decoders' warnings about a damaged file are not printed: the file is refused or read, in one line.
    (Warning filters are process-wide: while a decode runs, other threads' warnings are hidden too.)"""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def brief(err: Exception) -> str:
    """A library's error as a short phrase, without object addresses."""
    text = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(err)).strip() or type(err).__name__
    return text if len(text) <= 200 else text[:199] + "…"


def check_size(label: str, what: str, w: int, h: int, max_pixels: int, frames: int = 1) -> None:
    """Refuse, from a header, an image with no pixels, over `max_pixels` (all frames) or under `MIN_SIDE`."""
    if w <= 0 or h <= 0 or frames <= 0:
        raise InputError(label, f"corrupt {what} header: it declares {w}x{h} pixels"
                                + (f" x {frames} frames" if frames != 1 else ""))
    if w * h * frames > max_pixels:
        shape = f"{w}x{h} pixels" + (f" x {frames} frames" if frames > 1 else "")
        raise InputError(label, f"{what} image is {shape}, too large (limit {max_pixels:,} pixels)")
    if min(w, h) < MIN_SIDE:
        raise InputError(label, f"image is {w}x{h} pixels, too small (at least {MIN_SIDE}x{MIN_SIDE} needed)")


def _check_pixels(image: LoadedImage, label: str) -> None:
    px = image.pixels
    frames = image.meta.get("frames", 1) > 1
    h, w = px.shape[1:3] if frames else px.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise InputError(label, f"image is {w}x{h} pixels, too small (at least {MIN_SIDE}x{MIN_SIDE} needed)")
    if not np.isfinite(px).all():
        raise InputError(label, "pixel data contains NaN or infinite values")


_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}


def _png_header(data: bytes, label: str, max_pixels: int) -> tuple[tuple[int, int], int]:
    """Walk a PNG's chunks (lengths, checksums, order); refuse a bomb as soon as IHDR is read.
    Returns (width, height) and the palette's size (0 without one)."""
    def corrupt(why):
        return InputError(label, f"corrupt PNG ({why})")

    view, n, pos, size, palette, idat, frames = memoryview(data), len(data), 8, None, 0, False, 0
    for count in range(MAX_PNG_CHUNKS):
        if pos + 8 > n:
            raise InputError(label, "corrupt or truncated PNG data (the file ends before its IEND chunk)")
        length, ctype = struct.unpack_from(">I4s", data, pos)
        name = ctype.decode("latin-1")
        end = pos + 12 + length
        if length > 2**31 - 1:
            raise corrupt(f"chunk {name!r} declares {length:,} bytes")
        if size is None and ctype != b"IHDR":
            raise corrupt(f"the first chunk is {name!r}, not IHDR")
        if end > n:
            raise InputError(label, f"corrupt or truncated PNG data (chunk {name!r} declares {length:,} bytes, "
                                    f"only {max(n - pos - 12, 0):,} follow)")
        if zlib.crc32(view[pos + 4:pos + 8 + length]) != int.from_bytes(view[end - 4:end], "big"):
            raise corrupt(f"bad checksum in chunk {name!r}")
        body = view[pos + 8:pos + 8 + length]
        if ctype == b"IHDR":
            if size is not None or length != 13:
                raise corrupt("a second or malformed IHDR chunk")
            w, h, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", body)
            if w > 2**31 - 1 or h > 2**31 - 1:
                raise corrupt(f"IHDR declares {w}x{h} pixels")
            if depth not in _PNG_DEPTHS.get(colour, ()):
                raise corrupt(f"bit depth {depth} with colour type {colour}")
            if compression or filtering or interlace > 1:
                raise corrupt("unknown compression, filter or interlace method")
            check_size(label, "PNG", w, h, max_pixels)
            size = (w, h)
        elif ctype == b"PLTE":
            if length == 0 or length % 3 or length > 768:
                raise corrupt(f"a PLTE palette of {length} bytes")
            palette = length // 3
        elif ctype == b"acTL" and length >= 4:
            frames = int.from_bytes(body[:4], "big")
        elif ctype == b"IDAT":
            idat = True
        elif ctype == b"IEND":
            pos = end
            break
        pos = end
    else:
        raise corrupt(f"more than {MAX_PNG_CHUNKS:,} chunks")
    if not idat:
        raise corrupt("no image data (IDAT chunk)")
    if colour == 3 and not palette:
        raise corrupt("a palette image without its PLTE palette")
    if frames > 1:
        raise unsupported(label, f"an animated PNG (APNG) with {frames} frames")
    if pos < n:
        raise corrupt(f"{n - pos:,} bytes of other data after the image's end (IEND): a polyglot or damaged file")
    return size, palette


_SOF = {0xC0: None, 0xC1: None, 0xC2: None, 0xC3: "a lossless JPEG (SOF3)",
        **{m: "a hierarchical JPEG" for m in (0xC5, 0xC6, 0xC7)},
        **{m: "an arithmetic-coded JPEG" for m in (0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)},
        0xF7: "a JPEG-LS file"}
_SCAN_END = re.compile(rb"\xff+[^\x00\xd0-\xd7\xff]")  # the marker after a scan's entropy-coded data


def _jpeg_header(data: bytes, label: str, max_pixels: int) -> tuple[int, int]:
    """Walk a JPEG's markers to its end-of-image; refuse what Pillow would not read (or would read
    wrongly) and a bomb as soon as the frame header (SOF) is read. Returns (width, height)."""
    def corrupt(why, truncated=False):
        return InputError(label, f"corrupt or truncated JPEG data ({why})" if truncated else f"corrupt JPEG ({why})")

    n, pos, size, scans = len(data), 2, None, 0
    while True:
        if pos >= n or data[pos] != 0xFF:
            raise corrupt("the file ends before its end-of-image marker" if pos >= n else
                          f"no marker at byte {pos:,}", truncated=pos >= n)
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            raise corrupt("the file ends before its end-of-image marker", truncated=True)
        marker, pos = data[pos], pos + 1
        if marker == 0xD9:
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            continue
        if marker in (0x00, 0xD8):
            raise corrupt(f"unexpected marker FF{marker:02X} at byte {pos - 2:,}")
        if pos + 2 > n:
            raise corrupt("the file ends inside a segment", truncated=True)
        length = int.from_bytes(data[pos:pos + 2], "big")
        if length < 2 or pos + length > n:
            raise corrupt(f"segment FF{marker:02X} declares {length:,} bytes, "
                          f"{'past the end of the file' if length >= 2 else 'too few'}", truncated=length >= 2)
        if marker in _SOF:
            if _SOF[marker]:
                raise unsupported(label, f"{_SOF[marker]}; baseline and progressive JPEG are read")
            if size is not None or length < 8:
                raise corrupt("a second or malformed frame header (SOF)")
            precision, h, w, components = struct.unpack_from(">BHHB", data, pos + 2)
            if precision != 8:
                raise unsupported(label, f"a {precision}-bit JPEG; 8-bit JPEG is read, use PNG or DICOM for more bits")
            check_size(label, "JPEG", w, h, max_pixels)
            if components not in (1, 3, 4) or length != 8 + 3 * components:
                raise corrupt(f"a frame header with {components} colour components")
            size = (w, h)
        elif marker == 0xDD and length != 4:
            raise corrupt(f"a restart-interval segment (DRI) of {length} bytes")
        elif marker == 0xDA:
            if size is None:
                raise corrupt("image data (SOS) before the frame header (SOF)")
            scans += 1
            found = _SCAN_END.search(data, pos + length)
            if found is None:
                raise corrupt("the image data has no end-of-image marker", truncated=True)
            pos = found.end() - 2
            continue
        pos += length
    if size is None or not scans:
        raise corrupt("no frame header (SOF)" if size is None else "no image data (SOS)")
    if data[pos:].strip(b"\x00\xff"):
        raise corrupt(f"{n - pos:,} bytes of other data after the end-of-image marker: a polyglot or damaged file")
    return size


def _decode_raster(data: bytes, label: str, kind: str, max_pixels: int) -> LoadedImage:
    from PIL import Image

    if kind == "png":
        (w, h), palette = _png_header(data, label, max_pixels)
    else:
        (w, h), palette = _jpeg_header(data, label, max_pixels), 0
    stage = "header"
    try:
        img = Image.open(io.BytesIO(data), formats=["PNG"] if kind == "png" else ["JPEG"])
        if img.size != (w, h):
            raise InputError(label, f"corrupt {kind.upper()} header ({img.size} read, {(w, h)} declared)")
        stage = "data"
        img.load()
    except InputError:
        raise
    except Image.DecompressionBombError:  # only when max_pixels is set above Pillow's own limit
        raise InputError(label, f"image is {w}x{h} pixels, too large (Pillow's limit "
                                f"{2 * Image.MAX_IMAGE_PIXELS:,} pixels)") from None
    except ValueError as err:
        if "Decompressed" in str(err):  # Pillow's cap on zTXt, iTXt and iCCP chunks
            raise InputError(label, "a compressed text or ICC profile chunk inflates past 1 MB, too large "
                                    "(a decompression bomb)") from None
        raise InputError(label, _pil_error(kind, stage, err)) from None
    except Exception as err:  # PIL raises OSError, SyntaxError, struct.error on damaged data
        raise InputError(label, _pil_error(kind, stage, err)) from None
    if getattr(img, "n_frames", 1) > 1:
        raise unsupported(label, f"a {img.format} file with {img.n_frames} images")
    meta = {"format": kind, "mode": img.mode, "original_size": (w, h)}
    mode = img.mode
    if mode == "P":
        top = int(np.asarray(img).max())
        if palette and top >= palette:
            raise InputError(label, f"corrupt PNG (palette index {top} in a palette of {palette} colours)")
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
        pixels = stretch(arr)
    elif mode == "1":
        meta["bits"] = 1
        pixels = arr.astype(np.float32)
    elif mode in ("L", "RGB"):
        meta["bits"] = 8
        pixels = arr.astype(np.float32) / 255.0
    else:
        raise InputError(label, f"unsupported {kind.upper()} pixel mode {mode!r}")
    return LoadedImage(np.ascontiguousarray(pixels, dtype=np.float32), meta)


def _pil_error(kind: str, stage: str, err: Exception) -> str:
    if stage == "header":
        return f"corrupt {kind.upper()} header ({brief(err)})"
    return f"corrupt or truncated {kind.upper()} data ({brief(err)})"


def stretch(arr: np.ndarray) -> np.ndarray:
    """Min-max scale to [0, 1]. High-bit-depth files store anything from 10 to 16 bits."""
    arr = arr.astype(np.float32)
    lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
    if hi <= lo:
        return np.zeros_like(arr, dtype=np.float32)
    return (arr - lo) / (hi - lo)


_stretch = stretch  # the earlier private name


def is_hu(ds) -> bool:
    """CT pixel data rescaled to Hounsfield units (RescaleType, where present, says HU)."""
    from chestdx.data.dicom_io import is_hu as _is_hu

    return _is_hu(ds)
