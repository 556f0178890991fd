"""A whole series as one upload, for sequence and volume models: a zip of the series' files or one
NIfTI file.

The archive is unpacked into a temporary folder that is removed afterwards. Before anything is
parsed or extracted: the entry count of the zip's end record is checked (a directory of millions
of entries is refused unread). Then the members' count and declared unpacked size, and every
image's declared dimensions (PNG/JPEG from their headers, DICOM Rows x Columns), are checked
against the limits, so neither a zip bomb nor an image bomb inside it is decoded. Members are
written under new names (`00000.png`, ... in the natural order of their own names, which a
folder of slice images relies on), so no name from the client reaches the file system. A NIfTI
file (uploaded, or alone in a zip) is held to the same voxel limit from its header's dimensions,
before anything reads its data.
"""

from __future__ import annotations

import gzip
import io
import math
import re
import struct
import tempfile
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from chestdx.errors import InputError

MAX_MEMBERS = 2000  # slices in one series
MAX_SLICE_PIXELS = 2048 * 2048  # one CT slice is 512 x 512, sometimes 1024 x 1024
MAX_SERIES_PIXELS = 100_000_000  # all slices together (400 MB as float32): 380 slices of 512 x 512
NIFTI_SUFFIXES = (".nii", ".nii.gz")
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, EOFError, OSError,
               ValueError, UnicodeDecodeError, zlib.error, struct.error)


def is_series_upload(name: str, data: bytes) -> bool:
    return data[:4] == b"PK\x03\x04" or name.lower().endswith(NIFTI_SUFFIXES)


def declared_entries(data: bytes) -> int | None:
    """The entry count in the zip's end-of-central-directory record (None if there is none)."""
    end = data.rfind(b"PK\x05\x06", max(0, len(data) - 65_557))
    if end < 0 or end + 22 > len(data):
        return None
    return struct.unpack("<H", data[end + 10:end + 12])[0]


@contextmanager
def unpacked_series(data: bytes, name: str, max_bytes: int):
    """A path to the series (a folder of its files, or the NIfTI file) for `read_volume`."""
    with tempfile.TemporaryDirectory(prefix="chestdx-series-") as tmp:
        folder = Path(tmp)
        if name.lower().endswith(NIFTI_SUFFIXES):
            path = folder / ("volume.nii.gz" if name.lower().endswith(".gz") else "volume.nii")
            _check_nifti(data, PurePosixPath(name).name, name)
            path.write_bytes(data)
            yield path
            return
        entries = declared_entries(data)
        if entries is None:
            raise InputError(name, "not a readable zip archive (no end-of-archive record)")
        if entries == 0xFFFF or entries > 2 * MAX_MEMBERS:  # 0xFFFF: more, in a ZIP64 record
            raise InputError(name, f"the zip archive lists more than {2 * MAX_MEMBERS} entries; a series has at "
                                   f"most {MAX_MEMBERS} files")
        try:
            archive = zipfile.ZipFile(io.BytesIO(data))
        except _ZIP_ERRORS as err:
            raise InputError(name, f"not a readable zip archive ({err})") from None
        with archive:
            members = _members(archive, name, max_bytes)
            nifti = [m for m in members if m.filename.lower().endswith(NIFTI_SUFFIXES)]
            pixels = 0
            for k, member in enumerate(members):
                base = PurePosixPath(member.filename).name
                try:
                    content = archive.read(member)
                except _ZIP_ERRORS as err:
                    raise InputError(name, f"cannot unpack {base[:80]} from the zip archive ({err})") from None
                pixels += _declared_pixels(content, base, name)
                if base.lower().endswith(NIFTI_SUFFIXES):
                    _check_nifti(content, base, name)
                if pixels > MAX_SERIES_PIXELS:
                    raise InputError(name, f"the series' slices hold more than {MAX_SERIES_PIXELS:,} pixels, too "
                                           "large for one request")
                (folder / f"{k:05d}{_suffix(base)}").write_bytes(content)
        if len(nifti) == 1 and len(members) == 1:
            yield next(folder.iterdir())
        else:
            yield folder


def _members(archive: zipfile.ZipFile, name: str, max_bytes: int) -> list:
    """The files of the archive (not folders, dot-files or macOS resource forks), in natural name order."""
    from chestdx.data.volumes import natural_key

    members = [m for m in archive.infolist() if not m.is_dir()
               and not PurePosixPath(m.filename).name.startswith(".") and "__MACOSX" not in m.filename]
    if not members:
        raise InputError(name, "the zip archive holds no files")
    if len(members) > MAX_MEMBERS:
        raise InputError(name, f"the zip archive holds {len(members)} files; a series has at most {MAX_MEMBERS}")
    if any(m.flag_bits & 0x1 for m in members):
        raise InputError(name, "the zip archive is encrypted; upload it without a password")
    total = sum(m.file_size for m in members)
    if total > max_bytes:
        raise InputError(name, f"the zip archive unpacks to {total / 2**20:.0f} MB, too large "
                               f"(limit {max_bytes / 2**20:.0f} MB)")
    names = [PurePosixPath(m.filename).name for m in members]
    if len(set(names)) != len(names):
        raise InputError(name, "the zip archive holds two files of the same name in different folders: "
                               "zip one series at a time")
    return sorted(members, key=lambda m: natural_key(PurePosixPath(m.filename).name))


def _suffix(base: str) -> str:
    """The member's extension if it is a plain one (.png, .dcm, .nii.gz), else none."""
    lower = base.lower()
    if lower.endswith(".nii.gz"):
        return ".nii.gz"
    suffix = PurePosixPath(lower).suffix
    return suffix if re.fullmatch(r"\.[a-z0-9]{1,8}", suffix or "") else ""


def _declared_pixels(content: bytes, base: str, name: str) -> int:
    """Pixels one member declares (0 for what is not a PNG, JPEG or DICOM image), refusing an image
    bomb from its header before anything decodes it."""
    from chestdx.data.io import sniff_format

    kind = sniff_format(content[:132])
    if kind in ("png", "jpeg"):
        from PIL import Image

        try:
            with Image.open(io.BytesIO(content)) as im:  # reads the header only
                w, h = im.size
        except Image.DecompressionBombError:
            raise InputError(name, f"{base[:80]} declares too many pixels for a CT slice "
                                   f"(limit {MAX_SLICE_PIXELS:,})") from None
        except Exception:
            return 0  # not decodable: the series reader names it
    elif kind == "dicom":
        import pydicom

        try:
            ds = pydicom.dcmread(io.BytesIO(content), stop_before_pixels=True)
            w, h = int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0)
            w *= int(ds.get("NumberOfFrames", 1) or 1)
        except Exception:
            return 0
    else:
        return 0
    if w * h > MAX_SLICE_PIXELS:
        raise InputError(name, f"{base[:80]} declares {w}x{h} pixels, too large for a CT slice "
                               f"(limit {MAX_SLICE_PIXELS:,})")
    return w * h


def nifti_voxels(content: bytes) -> int | None:
    """The voxels a NIfTI-1 or NIfTI-2 file declares in its header (None where there is no readable
    header: the volume reader names the problem). Only the header is decompressed."""
    try:
        head = gzip.GzipFile(fileobj=io.BytesIO(content)).read(544) if content[:2] == b"\x1f\x8b" else content[:544]
    except (OSError, EOFError, zlib.error, ValueError):
        return None
    for order in "<>":
        if len(head) >= 348 and struct.unpack(order + "i", head[:4])[0] == 348:
            dims = struct.unpack(order + "8h", head[40:56])
            break
        if len(head) >= 540 and struct.unpack(order + "i", head[:4])[0] == 540:
            dims = struct.unpack(order + "8q", head[16:80])
            break
    else:
        return None
    if not 1 <= dims[0] <= 7:
        return None
    return math.prod(max(1, int(d)) for d in dims[1:1 + dims[0]])


def _check_nifti(content: bytes, base: str, name: str) -> None:
    voxels = nifti_voxels(content)
    if voxels is not None and voxels > MAX_SERIES_PIXELS:
        raise InputError(name, f"{base[:80]} declares {voxels:,} voxels, too large for one request "
                               f"(limit {MAX_SERIES_PIXELS:,})")
