"""Removing what identifies a person from an uploaded image before anything is stored.

DICOM follows the Basic Application Level Confidentiality Profile of DICOM PS3.15 Annex E, table
E.1-1, without its options (no dates, descriptions or patient characteristics retained):

* the table itself comes from `dicom-anonymizer` (Kitware's machine-read copy of E.1-1, release 2026c),
  not retyped here; its own `anonymize_dataset` is not used because it applies the table to the top
  level only and draws random UIDs, where the profile needs every sequence item cleaned and
  references kept consistent.
* U (UIDs) are replaced by a keyed hash, the same UID in giving the same UID out: see `_new_uid`.
* every other attribute the table names (D, Z, X and their mixes) is removed: the stored copy is for
  this service, and removal carries no information where Z/D keep an empty or dummy value.
  The two X/Z/U* reference sequences (Referenced / Source Image Sequence) are kept and cleaned, so
  the references still resolve to the new UIDs.
* beyond the table: private attributes, curve (50xx) and overlay (60xx) groups, every date, time and
  person name wherever it is (the table lists them by name; a newer or misplaced one still goes) and
  elements of unknown VR (UN: their content cannot be checked) are removed; the 128-byte preamble
  is zeroed and the file meta rebuilt from the SOP Class, SOP Instance (new) and Transfer Syntax.
* what the image needs is not in the table and is kept: pixel data, Modality, Rows/Columns,
  Photometric Interpretation, Bits*, Rescale*, Window*, Pixel Spacing, Image Position/Orientation,
  Slice Thickness, SOP Class UID, Transfer Syntax. Text burned into the pixels is out of scope.

PNG and JPEG lose their metadata by lossless filtering of chunks and segments (never re-encoded).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import secrets
import struct
import zlib

import pydicom
from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from chestdx.errors import InputError

UID_KEY_ENV = "CHESTDX_DEID_KEY"
# Without a key given or in the environment, UIDs are consistent within this process only (one service
# run); set CHESTDX_DEID_KEY so that restarts and replicas map a UID the same way.
_PROCESS_KEY = secrets.token_bytes(32)

_TABLE = dicom_anonymization_database_selector("dicomfields_2026c")  # PS3.15 E.1-1, Basic Profile column
_REPLACE_UID = frozenset(_TABLE["U_TAGS"])
_CLEAN_SEQUENCE = frozenset(_TABLE["X_Z_U_STAR_TAGS"])
_REMOVE = frozenset(t for t in _TABLE["ALL_TAGS"] if len(t) == 2) - _REPLACE_UID - _CLEAN_SEQUENCE
_REMOVE_VRS = frozenset({"DA", "DT", "TM", "PN", "UN"})

BASIC_PROFILE = ("113100", "DCM", "Basic Application Confidentiality Profile")  # PS3.16 CID 7050


def deidentify(data: bytes, fmt: str, *, uid_key: bytes | None = None, label: str = "upload") -> bytes:
    """`data` ("dicom", "png" or "jpeg") without what identifies the patient, ready to store."""
    if fmt == "dicom":
        return deidentify_dicom(data, uid_key, label=label)
    if fmt == "png":
        return strip_png_metadata(data, label=label)
    if fmt == "jpeg":
        return strip_jpeg_metadata(data, label=label)
    raise InputError(label, f"cannot de-identify a {fmt!r} image (only DICOM, PNG and JPEG)")


def deidentify_dicom(data: bytes, uid_key: bytes | None = None, *, label: str = "upload") -> bytes:
    """The DICOM file de-identified by the Basic Profile as described above."""
    key = uid_key or os.environ.get(UID_KEY_ENV, "").encode() or _PROCESS_KEY
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            raise InputError(label, "not a DICOM image (no pixel data), nothing to store")
        syntax = ds.file_meta.get("TransferSyntaxUID") or _syntax_of(ds)
        _clean(ds, key)
        ds.PatientIdentityRemoved = "YES"
        ds.LongitudinalTemporalInformationModified = "REMOVED"
        ds.DeidentificationMethod = "DICOM PS3.15 Annex E Basic Profile (chestdx)"
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = BASIC_PROFILE
        ds.DeidentificationMethodCodeSequence = Sequence([code])
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = syntax
        for meta, own in (("MediaStorageSOPClassUID", "SOPClassUID"), ("MediaStorageSOPInstanceUID", "SOPInstanceUID")):
            if own in ds:
                setattr(ds.file_meta, meta, ds[own].value)
        ds.preamble = b"\0" * 128  # the preamble is free for applications and can hold a name
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format="MediaStorageSOPInstanceUID" in ds.file_meta
                   and "MediaStorageSOPClassUID" in ds.file_meta)
        return out.getvalue()
    except InputError:
        raise
    except Exception as err:  # pydicom's error on a malformed element, whatever its type; its message
        # can quote the element's value, so only its type is told
        raise InputError(label, f"DICOM cannot be de-identified ({type(err).__name__} in its header)") from None


def _clean(ds: Dataset, key: bytes) -> None:
    """Apply the profile to `ds` and, recursively, to every sequence item in it."""
    for elem in list(ds):
        tag = (elem.tag.group, elem.tag.element)
        if (elem.tag.is_private or tag in _REMOVE or elem.VR in _REMOVE_VRS
                or elem.tag.group & 0xFF00 in (0x5000, 0x6000)):
            del ds[elem.tag]
        elif tag in _REPLACE_UID:
            if elem.VM > 1:
                elem.value = [_new_uid(v, key) for v in elem.value]
            elif elem.value:
                elem.value = _new_uid(elem.value, key)
        elif elem.VR == "SQ":  # K or X/Z/U*: keep the sequence, clean its items
            for item in elem.value:
                _clean(item, key)


def _new_uid(uid: str, key: bytes) -> str:
    """A UID under the 2.25 (UUID) root derived from HMAC-SHA256(key, uid): stable for one key, not
    reversible or guessable without it. The hash is made a version-8 (RFC 9562 custom) UUID, since the
    2.25 root is for UUIDs (PS3.5 B.2)."""
    n = int.from_bytes(hmac.new(key, str(uid).strip().encode(), hashlib.sha256).digest()[:16], "big")
    n = (n & ~(0xF << 76) | 8 << 76) & ~(0x3 << 62) | 0x2 << 62  # version 8, RFC variant
    return f"2.25.{n}"


def _syntax_of(ds: Dataset) -> str:
    """The transfer syntax of a file without file meta, from how it was read."""
    implicit, little = ds.original_encoding
    return ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The critical chunks, transparency, and the fixed-size numeric ones that change how the samples are
# shown (gamma, chromaticities, sRGB intent, significant bits) and cannot hold text. Everything else
# goes: text (tEXt zTXt iTXt), eXIf, tIME, iCCP (its name and profile are free text), pHYs, animation,
# private chunks.
PNG_KEEP = frozenset({b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"IEND", b"gAMA", b"cHRM", b"sRGB", b"sBIT"})


def strip_png_metadata(data: bytes, *, label: str = "upload") -> bytes:
    """The PNG with only the chunks in `PNG_KEEP`, byte for byte as they were; nothing after IEND."""
    if not data.startswith(PNG_SIGNATURE):
        raise InputError(label, "not a PNG file (no PNG signature)")
    out, i = [PNG_SIGNATURE], len(PNG_SIGNATURE)
    while True:
        if i + 12 > len(data):
            raise InputError(label, "truncated PNG (no IEND chunk)")
        length, kind = struct.unpack(">I4s", data[i:i + 8])
        end = i + 12 + length
        if end > len(data):
            raise InputError(label, f"truncated PNG ({kind!r} chunk runs past the end)")
        if zlib.crc32(data[i + 4:end - 4]) != int.from_bytes(data[end - 4:end], "big"):
            raise InputError(label, f"corrupt PNG ({kind!r} chunk fails its CRC)")
        if kind in PNG_KEEP:
            out.append(data[i:end])
        i = end
        if kind == b"IEND":
            return b"".join(out)


_EOI, _SOS, _APP0, _APP14, _COM = 0xD9, 0xDA, 0xE0, 0xEE, 0xFE


def strip_jpeg_metadata(data: bytes, *, label: str = "upload") -> bytes:
    """The JPEG without APP1-APP13, APP15 (EXIF, XMP, ICC, IPTC, ...), COM segments, the JFIF thumbnail
    and anything after EOI. Kept: JFIF APP0 and Adobe APP14 (they say how to convert the colours), all
    coding segments and the entropy-coded data, copied unchanged."""
    if not data.startswith(b"\xff\xd8"):
        raise InputError(label, "not a JPEG file (no SOI marker)")
    out, i, n = [b"\xff\xd8"], 2, len(data)
    while True:
        if i >= n or data[i] != 0xFF:
            raise InputError(label, "corrupt or truncated JPEG (a marker was expected)")
        while i < n and data[i] == 0xFF:  # fill bytes may precede a marker
            i += 1
        if i >= n:
            raise InputError(label, "truncated JPEG (no EOI marker)")
        marker, start = data[i], i - 1
        i += 1
        if marker == _EOI:
            out.append(b"\xff\xd9")
            return b"".join(out)
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, RSTn: no length
            out.append(data[start:i])
            continue
        if i + 2 > n or (length := int.from_bytes(data[i:i + 2], "big")) < 2 or i + length > n:
            raise InputError(label, f"truncated JPEG (segment FF{marker:02X} runs past the end)")
        i += length
        if marker == _SOS:
            i = _scan_end(data, i, label)
        segment = data[start:i]
        if marker == _APP0 and segment[4:9] == b"JFIF\0" and length >= 16:
            # JFIF header only: the thumbnail after it is a small copy of the image, or anything else
            out.append(b"\xff\xe0\x00\x10" + segment[4:16] + b"\0\0")
        elif marker == _APP14 and segment[4:9] == b"Adobe":
            out.append(segment)
        elif not (0xE0 <= marker <= 0xEF or marker == _COM):
            out.append(segment)


def _scan_end(data: bytes, i: int, label: str) -> int:
    """Where the entropy-coded data from `i` ends: the first marker other than a stuffed 0xFF00 or RSTn."""
    while True:
        i = data.find(b"\xff", i)
        if i < 0 or i + 1 >= len(data):
            raise InputError(label, "truncated JPEG (scan data without an end)")
        nxt = data[i + 1]
        if nxt == 0xFF:  # a fill byte before the marker
            i += 1
        elif nxt == 0x00 or 0xD0 <= nxt <= 0xD7:
            i += 2
        else:
            return i
