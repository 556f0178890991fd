"""DICOM decoding for `chestdx.data.io`: the header is checked against the pixel limit and for
consistency before `pixel_array` decodes anything, then rescale, VOI window and photometric.

What is refused, and why it is refused before decoding: an executable in the 128-byte preamble
(a PE/ELF polyglot), a deflated data set that inflates past what the pixel limit allows, objects
without pixels (DICOMDIR, structured reports), Rows x Columns x NumberOfFrames over the limit,
header values that contradict each other or the pixel data (BitsAllocated, SamplesPerPixel,
photometric interpretation, PixelData shorter than declared), video transfer syntaxes, compressed
frames whose own header claims other dimensions, RLE segments that decode past their frame,
PALETTE COLOR without its lookup table, and a RescaleSlope of 0, NaN or infinity.

A window that cannot be applied (WindowWidth <= 0, below 1 for LINEAR, NaN) is ignored, as
viewers do: the image is scaled by its value range and `meta["window"]` says why.
"""

from __future__ import annotations

import io
import math
import re
import struct
import zlib

import numpy as np

from chestdx.data.io import LoadedImage, brief, check_size, stretch
from chestdx.errors import InputError

DEFLATED = "1.2.840.10008.1.2.1.99"
_VIDEO = re.compile(r"1\.2\.840\.10008\.1\.2\.4\.10[0-8](\.1)?")
_NO_PIXELS = {"1.2.840.10008.1.3.10": "a DICOMDIR media directory",
              "1.2.840.10008.5.1.4.1.1.104.1": "an encapsulated PDF"}
_NO_PIXEL_PREFIXES = {"1.2.840.10008.5.1.4.1.1.88.": "a structured report", "1.2.840.10008.5.1.4.1.1.11.":
                      "a presentation state", "1.2.840.10008.5.1.4.1.1.481.": "a radiotherapy object"}
_EXECUTABLES = {b"MZ": "a Windows executable", b"\x7fELF": "an ELF executable", b"#!": "a script",
                b"\xcf\xfa\xed\xfe": "a Mach-O executable", b"\xce\xfa\xed\xfe": "a Mach-O executable"}
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "PALETTE COLOR")
_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN", b"SH", b"SL",
        b"SS", b"ST", b"TM", b"UI", b"UL", b"US"} | _LONG_VRS


def describe_raw_dicom(head: bytes) -> str | None:
    """'a DICOM data set without ...' for a file that starts with a plausible group 0002/0008 element."""
    if len(head) >= 8 and struct.unpack_from("<H", head)[0] in (0x0002, 0x0008) and (
            head[4:6] in _VRS or struct.unpack_from("<I", head, 4)[0] < 256):
        return "a DICOM data set without the DICOM file header (128-byte preamble and DICM prefix)"
    return None


def decode_dicom(data: bytes, label: str, max_pixels: int, hu_window=None) -> LoadedImage:
    import pydicom

    for magic, what in _EXECUTABLES.items():
        if data.startswith(magic):
            raise InputError(label, f"corrupt DICOM (its preamble holds {what}: a polyglot file)")
    start, syntax = _file_meta(data, label)
    if syntax == DEFLATED:
        _check_inflated_size(data[start:], label, max_pixels)
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as err:
        raise InputError(label, f"corrupt DICOM ({brief(err)})") from None
    _check_last_element(ds, label)
    pixel_kw = next((k for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData") if k in ds), None)
    if pixel_kw is None:
        sop = str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", ""))
        what = _NO_PIXELS.get(sop) or next((v for k, v in _NO_PIXEL_PREFIXES.items() if sop.startswith(k)), None)
        raise InputError(label, "DICOM has no pixel data (" + (f"{what}, " if what else "") + "not an image object)")
    syntax = _transfer_syntax(ds, label)
    h = _header(ds, label, pixel_kw, syntax, max_pixels)
    if syntax.is_compressed:
        _check_fragments(ds, label, h, syntax)
    try:
        arr = ds.pixel_array
    except Exception as err:
        raise InputError(label, _pixel_error(syntax, err)) from None
    expected = ((h["frames"],) if h["frames"] > 1 else ()) + (h["rows"], h["cols"]) + ((3,) if h["spp"] == 3 else ())
    if arr.shape != expected:
        raise InputError(label, f"corrupt DICOM pixel data (decoded {arr.shape}, the header declares {expected})")
    photometric = h["photometric"]
    meta = {"format": "dicom", "transfer_syntax": str(syntax), "photometric": photometric,
            "modality": str(ds.get("Modality", "")), "body_part": str(ds.get("BodyPartExamined", "") or ""),
            "bits": h["bits_stored"], "frames": h["frames"],
            "original_size": (h["cols"], h["rows"])}
    if photometric.startswith("MONOCHROME"):
        pixels, meta["window"] = _dicom_grey(ds, arr, photometric, label, hu_window)
    else:
        from pydicom.pixels import apply_color_lut, convert_color_space

        if photometric == "PALETTE COLOR":
            try:
                arr = apply_color_lut(arr, ds)
            except Exception as err:
                raise InputError(label, f"corrupt DICOM palette colour lookup table ({brief(err)})") from None
        elif photometric.startswith("YBR") and not syntax.is_compressed:
            arr = convert_color_space(arr, photometric, "RGB")
        pixels = stretch(arr.astype(np.float32))
    if h["frames"] > 1:
        meta["note"] = f"multi-frame DICOM with {h['frames']} frames"
    return LoadedImage(np.ascontiguousarray(pixels, dtype=np.float32), meta)


def _file_meta(data: bytes, label: str) -> tuple[int, str | None]:
    """Walk the file meta group (0002, always explicit VR little endian): where the data set starts and
    the transfer syntax UID."""
    n, pos, syntax = len(data), 132, None
    if data[132:140] == b"\x02\x00\x00\x00UL\x04\x00" and 144 + struct.unpack_from("<I", data, 140)[0] > n:
        raise InputError(label, "corrupt or truncated DICOM (the file ends inside its file meta information)")
    while pos + 8 <= n and struct.unpack_from("<H", data, pos)[0] == 0x0002:
        element, vr = struct.unpack_from("<H", data, pos + 2)[0], data[pos + 4:pos + 6]
        if vr in _LONG_VRS:
            length, value = (struct.unpack_from("<I", data, pos + 8)[0] if pos + 12 <= n else n), pos + 12
        else:
            length, value = struct.unpack_from("<H", data, pos + 6)[0], pos + 8
        if value + length > n:
            raise InputError(label, "corrupt DICOM (the file meta information is truncated)")
        if element == 0x0010:
            syntax = data[value:value + length].rstrip(b"\x00 ").decode("ascii", "replace")
        pos = value + length
    if pos == 132:
        raise InputError(label, "corrupt DICOM (no file meta information after the DICM prefix)")
    return pos, syntax


def _check_last_element(ds, label: str) -> None:
    """pydicom reads a value cut short by the end of the file without a word: the last element holds less
    than its length says (a truncated file, or a length field claiming gigabytes)."""
    if not len(ds):
        raise InputError(label, "corrupt DICOM (no data elements after the file meta information)")
    raw = ds.get_item(list(ds.keys())[-1])
    length, value = getattr(raw, "length", 0), getattr(raw, "value", None)
    if isinstance(value, (bytes, bytearray)) and length != 0xFFFFFFFF and len(value) < length:
        raise InputError(label, f"corrupt or truncated DICOM (element {raw.tag} declares {length:,} bytes, "
                                f"the file holds {len(value):,})")


def _check_inflated_size(deflated: bytes, label: str, max_pixels: int) -> None:
    """A deflated data set may be a zip bomb: inflate it in pieces, counting, and stop at the most that
    `max_pixels` 16-bit RGB pixels and their attributes can need."""
    limit, total, chunk = max_pixels * 6 + (16 << 20), 0, 4 << 20
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    pending = deflated
    try:
        while pending and not inflater.eof:
            total += len(inflater.decompress(pending, chunk))
            pending = inflater.unconsumed_tail
            if total > limit:
                raise InputError(label, f"deflated DICOM inflates to more than {limit >> 20:,} MB, too large "
                                        f"for an image of at most {max_pixels:,} pixels")
    except zlib.error as err:
        raise InputError(label, f"corrupt DICOM (deflated data set: {err})") from None


def _transfer_syntax(ds, label: str):
    from pydicom.uid import UID, ImplicitVRLittleEndian

    syntax = UID(str(ds.file_meta.get("TransferSyntaxUID", "") or ImplicitVRLittleEndian).strip())
    if _VIDEO.fullmatch(str(syntax)):
        raise InputError(label, f"not a supported image: expected PNG, JPEG or DICOM (this is a DICOM video, "
                                f"transfer syntax {syntax.name})")
    if not syntax.is_transfer_syntax:
        raise InputError(label, f"corrupt DICOM (unknown transfer syntax {str(syntax)[:64]!r})")
    return syntax


def _int(ds, keyword: str, label: str, default=None):
    value = ds.get(keyword, default)
    if value is None or value == "":
        if default is None:
            raise InputError(label, f"corrupt DICOM (no {keyword})")
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InputError(label, f"corrupt DICOM (invalid {keyword} {str(value)[:40]!r})") from None


def _header(ds, label: str, pixel_kw: str, syntax, max_pixels: int) -> dict:
    """Image Pixel attributes, checked against each other and the pixel limit; nothing decoded yet."""
    rows, cols = _int(ds, "Rows", label), _int(ds, "Columns", label)
    frames = _int(ds, "NumberOfFrames", label, 1) or 1
    check_size(label, "DICOM", cols, rows, max_pixels, frames)
    spp = _int(ds, "SamplesPerPixel", label, 1)
    bits = _int(ds, "BitsAllocated", label, {"FloatPixelData": 32, "DoubleFloatPixelData": 64}.get(pixel_kw))
    stored = _int(ds, "BitsStored", label, bits)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    corrupt = f"corrupt DICOM ({{}}; Rows {rows}, Columns {cols}, BitsAllocated {bits}, SamplesPerPixel {spp})"
    allowed = {"PixelData": (8, 16, 32), "FloatPixelData": (32,), "DoubleFloatPixelData": (64,)}[pixel_kw]
    if bits == 1:
        raise InputError(label, "DICOM pixel data is 1-bit (a segmentation or overlay, not a grey-scale image)")
    if bits not in allowed:
        raise InputError(label, corrupt.format(f"BitsAllocated {bits} is not valid for {pixel_kw}"))
    if not 1 <= stored <= bits:
        raise InputError(label, corrupt.format(f"BitsStored {stored} does not fit in BitsAllocated {bits}"))
    if _int(ds, "PixelRepresentation", label, 0) not in (0, 1):
        raise InputError(label, corrupt.format("PixelRepresentation is neither 0 nor 1"))
    if not photometric:
        raise InputError(label, "corrupt DICOM (no PhotometricInterpretation)")
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        if spp != 1:
            raise InputError(label, corrupt.format(f"{photometric} with {spp} samples per pixel"))
    elif photometric in _COLOUR:
        if spp != (1 if photometric == "PALETTE COLOR" else 3):
            raise InputError(label, corrupt.format(f"{photometric} with {spp} samples per pixel"))
        if spp == 3 and _int(ds, "PlanarConfiguration", label, 0) not in (0, 1):
            raise InputError(label, corrupt.format("PlanarConfiguration is neither 0 nor 1"))
        if photometric == "PALETTE COLOR" and not all(
                f"{c}PaletteColorLookupTableDescriptor" in ds and (f"{c}PaletteColorLookupTableData" in ds or
                                                                   f"Segmented{c}PaletteColorLookupTableData" in ds)
                for c in ("Red", "Green", "Blue")):
            raise InputError(label, "corrupt DICOM (PALETTE COLOR image without its colour lookup table: Red, "
                                    "Green and Blue Palette Color Lookup Table Descriptor and Data)")
    else:
        raise InputError(label, f"unsupported DICOM photometric interpretation {photometric[:32]!r}")
    if not syntax.is_compressed:
        samples = 2 if photometric == "YBR_FULL_422" else spp  # 4:2:2: two chroma samples per two pixels
        expected = rows * cols * frames * samples * bits // 8
        have = len(ds[pixel_kw].value or b"")
        if have < expected:
            raise InputError(label, f"corrupt or truncated DICOM pixel data ({have:,} bytes; the header declares "
                                    f"{cols}x{rows} x {frames} frame(s) x {spp} sample(s) of {bits} bits: "
                                    f"{expected:,})")
    elif not ds[pixel_kw].is_undefined_length:
        raise InputError(label, f"corrupt DICOM (compressed transfer syntax {syntax.name} but the pixel data "
                                "is not encapsulated)")
    return {"rows": rows, "cols": cols, "frames": frames, "spp": spp, "bits": bits, "bits_stored": stored,
            "photometric": photometric}


def _check_fragments(ds, label: str, h: dict, syntax) -> None:
    """Compressed frames: the dimensions in each JPEG / JPEG 2000 codestream must be the header's (a frame
    that claims more would make the decoder allocate it), and RLE segments must not decode past the frame."""
    from pydicom.encaps import generate_frames

    rle = str(syntax) == "1.2.840.10008.1.2.5"
    for count, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=h["frames"])):
        if count >= h["frames"]:
            break
        size = _codestream_size(frame)
        if size is not None and size != (h["cols"], h["rows"]):
            raise InputError(label, f"corrupt DICOM pixel data (a compressed frame declares {size[0]}x{size[1]} "
                                    f"pixels, the header {h['cols']}x{h['rows']})")
        if rle:
            _check_rle(frame, label, h["rows"] * h["cols"])


def _codestream_size(fragment: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG (any SOF, JPEG-LS included) or JPEG 2000 codestream's header."""
    if fragment.startswith(b"\xffO\xffQ") and len(fragment) >= 24:  # SIZ: Xsiz Ysiz XOsiz YOsiz
        xs, ys, xo, yo = struct.unpack_from(">IIII", fragment, 8)
        return xs - xo, ys - yo
    if not fragment.startswith(b"\xff\xd8"):
        return None
    pos = 2
    while pos + 4 <= len(fragment) and fragment[pos] == 0xFF:
        marker, length = fragment[pos + 1], struct.unpack_from(">H", fragment, pos + 2)[0]
        if (0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)) or marker == 0xF7:
            if pos + 9 > len(fragment):
                return None
            height, width = struct.unpack_from(">HH", fragment, pos + 5)
            return width, height
        if marker == 0xDA or length < 2:
            return None
        pos += 2 + length
    return None


def _check_rle(fragment: bytes, label: str, segment_bytes: int) -> None:
    """Count what each RLE segment decodes to, stopping as soon as it passes the frame's size (pydicom's
    decoder would first build the whole, possibly 64 times larger, result)."""
    if len(fragment) < 64:
        raise InputError(label, "corrupt DICOM RLE data (no RLE header)")
    count = struct.unpack_from("<I", fragment)[0]
    offsets = list(struct.unpack_from("<15I", fragment, 4))[:count] + [len(fragment)]
    if not 1 <= count <= 15 or any(not 64 <= a <= b <= len(fragment) for a, b in zip(offsets, offsets[1:])):
        raise InputError(label, "corrupt DICOM RLE data (invalid segment offsets)")
    for a, b in zip(offsets, offsets[1:]):
        pos, out = a, 0
        while pos < b and out <= segment_bytes + 128:  # one run of slack: some encoders pad a segment
            n = fragment[pos]  # < 128: n + 1 literal bytes follow; > 128: the next byte 257 - n times; 128: nothing
            if n < 128:
                out, pos = out + n + 1, pos + n + 2
            else:
                out, pos = (out + 257 - n, pos + 2) if n > 128 else (out, pos + 1)
        if out > segment_bytes + 128:
            raise InputError(label, f"corrupt DICOM RLE data (a segment decodes to more than the frame's "
                                    f"{segment_bytes:,} bytes)")


def _pixel_error(syntax, err: Exception) -> str:
    try:
        from pydicom.pixels import get_decoder

        available = get_decoder(syntax).is_available
    except Exception:
        available = False
    if available or not syntax.is_compressed:
        return f"corrupt DICOM pixel data ({syntax.name}: {brief(err)})"
    return (f"cannot decode DICOM pixel data with transfer syntax {syntax.name} ({brief(err)}); "
            "for compressed syntaxes install pylibjpeg, pylibjpeg-libjpeg and pylibjpeg-openjpeg")


def is_hu(ds) -> bool:
    """CT pixel data rescaled to Hounsfield units (RescaleType, where present, says HU)."""
    kind = str(ds.get("RescaleType", "HU") or "HU").strip().upper()
    return str(ds.get("Modality", "")).strip().upper() == "CT" and kind in ("HU", "")


def _number(value) -> float:
    return float(value[0] if hasattr(value, "__len__") and not isinstance(value, str) else value)


def _dicom_grey(ds, arr: np.ndarray, photometric: str, label: str, hu_window=None) -> tuple[np.ndarray, str]:
    """Rescale slope/intercept, then the model's HU window (CT), or the file's VOI LUT or window, or the
    value range; MONOCHROME1 inverted. Returns the pixels and which window was used."""
    from pydicom.pixels import apply_modality_lut

    for keyword in ("RescaleSlope", "RescaleIntercept"):
        if keyword in ds and "ModalityLUTSequence" not in ds:
            try:
                value = _number(ds.get(keyword))
            except (TypeError, ValueError, IndexError):
                raise InputError(label, f"corrupt DICOM (invalid {keyword} {str(ds.get(keyword))[:40]!r})") from None
            if not math.isfinite(value) or (keyword == "RescaleSlope" and value == 0):
                why = "not a number" if not math.isfinite(value) else "every pixel would be equal"
                raise InputError(label, f"corrupt DICOM ({keyword} is {value:g}: {why})")
    values = apply_modality_lut(arr, ds).astype(np.float32)
    if not np.isfinite(values).all():
        return values, "none"  # the caller's NaN check names the file
    if hu_window is not None and is_hu(ds):
        center, width = float(hu_window[0]), float(hu_window[1])
        lo = center - width / 2
        return np.clip((values - lo) / width, 0.0, 1.0).astype(np.float32), f"model HU window {center:g}/{width:g}"
    values, used = _file_voi(ds, values)
    pixels = stretch(values)
    if photometric == "MONOCHROME1":
        pixels = 1.0 - pixels  # MONOCHROME1 stores bright air as low values
    return pixels, used


def _file_voi(ds, values: np.ndarray) -> tuple[np.ndarray, str]:
    """The file's VOI LUT or window; one that cannot be applied is ignored (as viewers do) and said so."""
    from pydicom.pixels import apply_voi_lut

    lut = bool(ds.get("VOILUTSequence")) and all(k in ds.VOILUTSequence[0] for k in ("LUTDescriptor", "LUTData"))
    window = "WindowCenter" in ds and "WindowWidth" in ds
    if not lut and not window:
        return values, "value range"
    problem = None
    if not lut:
        try:
            center, width = _number(ds.WindowCenter), _number(ds.WindowWidth)
            function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
            if not (math.isfinite(center) and math.isfinite(width)):
                problem = f"window {center:g}/{width:g}"
            elif width < (1 if function == "LINEAR" else 1e-6):
                problem = f"window width {width:g}"
        except (TypeError, ValueError, IndexError):
            problem = "window values are not numbers"
    if problem is None:
        try:
            out = np.asarray(apply_voi_lut(values, ds, index=0), dtype=np.float32)
            if np.isfinite(out).all():
                return out, "file VOI"
            problem = "it gives non-finite values"
        except Exception as err:  # pydicom: ValueError for an invalid window or LUT, others for malformed items
            problem = brief(err)
    return values, f"value range (the file's VOI is unusable: {problem})"
