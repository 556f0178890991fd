"""De-identification before storing: DICOM by the PS3.15 Annex E basic profile, PNG and JPEG metadata.

Each DICOM test plants identifiers in the places the profile must reach (top level, nested sequences,
file meta, preamble, private tags, overlays) and a checker that reads every element and the raw bytes
says none is left."""

import io
import struct
import uuid
import zlib

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageCms
from PIL.PngImagePlugin import PngInfo
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, CTImageStorage, generate_uid

from chestdx.data.io import decode_image
from chestdx.errors import InputError
from chestdx.serve.deid import UID_KEY_ENV, deidentify, deidentify_dicom, strip_jpeg_metadata, strip_png_metadata
from tests.test_io import make_dicom, ramp

NAME, MRN, BIRTH, DAY, TIME = "Doe^Jane", "MRN12345", "19700101", "20240315", "101530"
HOSPITAL, STATION, ACCESSION, DOCTOR = "Mercy General", "MERCYCT1", "ACC998877", "House^Greg"
PLANTED = [NAME, "Jane", MRN, BIRTH, DAY, TIME, HOSPITAL, STATION, ACCESSION, DOCTOR]
KEY = b"test key"


def planted_dicom(path, study_uid=None, frame_uid=None, ref_uid=None) -> tuple[bytes, list[str]]:
    """A CT slice carrying the planted identifiers everywhere; returns its bytes and all of its UIDs."""
    make_dicom(path, ramp(), window=(2000, 4000), modality="CT")
    ds = pydicom.dcmread(path)
    ds.preamble = f"{NAME} {MRN}".encode().ljust(128, b"\0")
    ds.file_meta.SourceApplicationEntityTitle = STATION
    ds.PatientName, ds.PatientID, ds.OtherPatientIDs, ds.PatientBirthDate = NAME, MRN, [f"{MRN}-B", "H7"], BIRTH
    ds.OtherPatientIDsSequence = Sequence([Dataset()])
    ds.OtherPatientIDsSequence[0].PatientID = MRN
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid or generate_uid(), generate_uid()
    ds.FrameOfReferenceUID = frame_uid or generate_uid()
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = DAY
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = TIME
    ds.AcquisitionDateTime = DAY + TIME
    ds.StudyDescription, ds.SeriesDescription = f"CT chest {NAME}", f"axial {MRN}"
    ds.RequestedProcedureDescription, ds.ImageComments = f"for {NAME}", f"{MRN} follow-up"
    ds.InstitutionName, ds.StationName, ds.AccessionNumber = HOSPITAL, STATION, ACCESSION
    ds.ReferringPhysicianName = DOCTOR
    ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 1.25
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [-100, -120, 35.5], [1, 0, 0, 0, 1, 0]
    ds.private_block(0x0009, "ACME 1.0", create=True).add_new(0x10, "LO", f"{NAME} {MRN}")
    # 2 levels of kept reference sequences, and table attributes inside a sequence the table doesn't name
    source = Dataset()
    source.ReferencedSOPClassUID, source.ReferencedSOPInstanceUID = CTImageStorage, generate_uid()
    source.PatientID, source.InstitutionName, source.StudyDescription, source.ContentDate = MRN, HOSPITAL, NAME, DAY
    region = Dataset()
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = "51185008", "SCT", "Thorax"
    region.OperatorsName, region.InstitutionName, region.StudyDescription = NAME, HOSPITAL, f"{MRN}"
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = CTImageStorage, ref_uid or generate_uid()
    ref.PatientName, ref.PatientID = NAME, MRN
    ref.SourceImageSequence, ref.AnatomicRegionSequence = Sequence([source]), Sequence([region])
    ds.ReferencedImageSequence = Sequence([ref])
    ds.add_new(0x60000010, "US", 4)  # an overlay plane, with the name in its description and comments
    ds.add_new(0x60000011, "US", 4)
    ds.add_new(0x60000022, "LO", NAME)
    ds.add_new(0x60003000, "OW", b"\xff\x00")
    ds.add_new(0x60004000, "LT", f"{NAME} {MRN}")
    ds.add_new(0x50002500, "LO", NAME)  # a (retired) curve label
    ds.save_as(path)
    uids = [ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.FrameOfReferenceUID,
            ds.file_meta.MediaStorageSOPInstanceUID, ref.ReferencedSOPInstanceUID, source.ReferencedSOPInstanceUID]
    return path.read_bytes(), uids


def every_element(ds: Dataset, where="ds"):
    """Every element of `ds` and, recursively, of its sequence items, with a path for messages."""
    for elem in ds:
        yield f"{where}.{elem.keyword or elem.tag}", elem
        if elem.VR == "SQ":
            for n, item in enumerate(elem.value):
                yield from every_element(item, f"{where}.{elem.keyword}[{n}]")


def assert_clean(data: bytes, planted: list[str]) -> Dataset:
    """None of `planted` is in the raw bytes, the preamble or any element (file meta and sequences
    included); no private tag, date, time or person name is left. Returns the dataset."""
    for text in planted:
        assert text.encode() not in data, f"{text!r} is still in the bytes"
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.preamble == b"\0" * 128
    for where, elem in [*every_element(ds.file_meta, "meta"), *every_element(ds)]:
        assert not elem.tag.is_private, where
        assert elem.VR not in ("DA", "DT", "TM", "PN"), where
        assert elem.tag.group & 0xFF00 not in (0x5000, 0x6000), f"{where}: curve or overlay"
        if elem.VR != "SQ":
            value = elem.value if isinstance(elem.value, bytes) else str(elem.value).encode()
            for text in planted:
                assert text.encode().lower() not in value.lower(), f"{where} holds {text!r}"
    return ds


def test_planted_identifiers_are_gone_everywhere(tmp_path):
    data, uids = planted_dicom(tmp_path / "a.dcm")
    with pytest.raises(AssertionError):  # the checker sees what was planted
        assert_clean(data, PLANTED + uids)
    ds = assert_clean(deidentify_dicom(data, KEY), PLANTED + uids)
    for gone in ("PatientName", "PatientID", "OtherPatientIDs", "OtherPatientIDsSequence", "PatientBirthDate",
                 "StudyDescription", "SeriesDescription", "RequestedProcedureDescription", "ImageComments",
                 "InstitutionName", "StationName", "AccessionNumber", "ReferringPhysicianName", "StudyDate"):
        assert gone not in ds, gone
    ref = ds.ReferencedImageSequence[0]  # the reference sequences are kept, cleaned
    assert "PatientName" not in ref and "PatientID" not in ref
    assert set(ref.SourceImageSequence[0].keys()) == {pydicom.tag.Tag("ReferencedSOPClassUID"),
                                                      pydicom.tag.Tag("ReferencedSOPInstanceUID")}
    region = ref.AnatomicRegionSequence[0]
    assert region.CodeMeaning == "Thorax" and "InstitutionName" not in region and "StudyDescription" not in region
    assert ds.PatientIdentityRemoved == "YES" and "Basic" in ds.DeidentificationMethod
    code = ds.DeidentificationMethodCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator) == ("113100", "DCM")
    assert "SourceApplicationEntityTitle" not in ds.file_meta


def test_the_image_and_its_geometry_are_kept(tmp_path):
    data, _ = planted_dicom(tmp_path / "a.dcm")
    before, after = pydicom.dcmread(io.BytesIO(data)), pydicom.dcmread(io.BytesIO(deidentify_dicom(data, KEY)))
    np.testing.assert_array_equal(after.pixel_array, before.pixel_array)
    for kept in ("Modality", "Rows", "Columns", "PhotometricInterpretation", "BitsAllocated", "BitsStored",
                 "PixelRepresentation", "RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth",
                 "PixelSpacing", "SliceThickness", "ImagePositionPatient", "ImageOrientationPatient", "SOPClassUID"):
        assert after[kept].value == before[kept].value, kept
    assert after.file_meta.TransferSyntaxUID == before.file_meta.TransferSyntaxUID
    assert after.ReferencedImageSequence[0].ReferencedSOPClassUID == CTImageStorage
    # and the service reads it as it read the original
    ours, theirs = decode_image(deidentify_dicom(data, KEY), "out"), decode_image(data, "in")
    np.testing.assert_array_equal(ours.pixels, theirs.pixels)
    assert ours.meta["window"] == theirs.meta["window"] and ours.meta["modality"] == "CT"


def test_uids_map_consistently_within_a_study(tmp_path):
    study, frame = generate_uid(), generate_uid()
    a_bytes, a_uids = planted_dicom(tmp_path / "a.dcm", study, frame)
    a_sop = pydicom.dcmread(io.BytesIO(a_bytes)).SOPInstanceUID
    b_bytes, b_uids = planted_dicom(tmp_path / "b.dcm", study, frame, ref_uid=a_sop)  # b refers to a
    a = pydicom.dcmread(io.BytesIO(deidentify_dicom(a_bytes, KEY)))
    b = pydicom.dcmread(io.BytesIO(deidentify_dicom(b_bytes, KEY)))
    assert a.StudyInstanceUID == b.StudyInstanceUID != study
    assert a.FrameOfReferenceUID == b.FrameOfReferenceUID != frame
    assert a.SOPInstanceUID != b.SOPInstanceUID and a.SeriesInstanceUID != b.SeriesInstanceUID
    assert b.ReferencedImageSequence[0].ReferencedSOPInstanceUID == a.SOPInstanceUID
    assert a.file_meta.MediaStorageSOPInstanceUID == a.SOPInstanceUID
    new = [e.value for ds in (a, b) for _, e in [*every_element(ds.file_meta), *every_element(ds)]
           if e.VR == "UI" and "ClassUID" not in e.keyword and e.keyword != "TransferSyntaxUID"]
    assert len(new) == 2 * 7 and not set(new) & set(a_uids + b_uids)
    for u in new:  # UUID-derived UIDs under 2.25, as PS3.5 B.2 says
        assert u.startswith("2.25.") and UID(u).is_valid and uuid.UUID(int=int(u[5:])).version == 8
    assert deidentify_dicom(a_bytes, KEY) == deidentify_dicom(a_bytes, KEY)  # deterministic for one key
    other = pydicom.dcmread(io.BytesIO(deidentify_dicom(a_bytes, b"another key")))
    assert other.StudyInstanceUID != a.StudyInstanceUID


def test_the_uid_key_comes_from_the_environment_or_the_process(tmp_path, monkeypatch):
    data, _ = planted_dicom(tmp_path / "a.dcm")
    monkeypatch.setenv(UID_KEY_ENV, "from env")
    assert deidentify_dicom(data) == deidentify_dicom(data, b"from env")
    monkeypatch.delenv(UID_KEY_ENV)
    process = deidentify_dicom(data)
    assert process == deidentify_dicom(data) != deidentify_dicom(data, b"from env")


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_bigendian.dcm", "JPEG2000.dcm",
                                  "SC_rgb_jpeg_dcmtk.dcm", "US1_J2KR.dcm"])
def test_real_files_lose_names_dates_and_instance_uids(name):
    """pydicom's sample files, real scanners' headers in several transfer syntaxes (compressed too)."""
    data = open(get_testdata_file(name), "rb").read()
    before = pydicom.dcmread(io.BytesIO(data))
    names = [str(e.value) for _, e in every_element(before) if e.VR == "PN" and str(e.value)]
    uids = [str(before[k].value) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID") if k in before]
    after = assert_clean(deidentify_dicom(data, KEY), names + uids)
    assert after.PixelData == before.PixelData  # compressed pixel data is copied, not re-encoded
    assert after.file_meta.TransferSyntaxUID == before.file_meta.TransferSyntaxUID


def test_dates_names_and_unknown_elements_the_table_does_not_name_go_too(tmp_path):
    """E.1-1 names dates and names one by one; newer ones (and elements of unknown VR) still go."""
    data, _ = planted_dicom(tmp_path / "a.dcm")
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.SecondaryReviewerName, ds.StudyUpdateDateTime, ds.DateOfGainCalibration = NAME, DAY + TIME, DAY
    ds.add_new(0x00089FF0, "UN", f"{NAME} {MRN}".encode())  # a public tag no dictionary knows
    raw = io.BytesIO()
    ds.save_as(raw)
    out = assert_clean(deidentify_dicom(raw.getvalue(), KEY), PLANTED)
    assert not {"SecondaryReviewerName", "StudyUpdateDateTime", "DateOfGainCalibration"} & set(out.dir())
    assert 0x00089FF0 not in out


def test_a_dicom_without_preamble_or_file_meta_gets_a_clean_preamble(tmp_path):
    data, uids = planted_dicom(tmp_path / "a.dcm")
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.preamble, ds.file_meta = None, pydicom.dataset.FileMetaDataset()
    raw = io.BytesIO()
    ds.save_as(raw, implicit_vr=True, little_endian=True, enforce_file_format=False)
    out = assert_clean(deidentify_dicom(raw.getvalue(), KEY), PLANTED + uids)
    assert out.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian
    np.testing.assert_array_equal(out.pixel_array, pydicom.dcmread(io.BytesIO(data)).pixel_array)


# PNG ---------------------------------------------------------------------------------------------------

def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, i = [], 8
    while i < len(data):
        length, kind = struct.unpack(">I4s", data[i:i + 8])
        chunks.append((kind, data[i + 8:i + 8 + length]))
        i += 12 + length
    return chunks


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def planted_png(pixels: np.ndarray) -> bytes:
    info = PngInfo()
    info.add_text("Patient", f"Patient: {NAME}")  # tEXt
    info.add_text("Comment", f"{MRN} compressed", zip=True)  # zTXt
    info.add_itxt("Author", f"{DOCTOR} for {NAME}", lang="en", tkey="Autor")  # iTXt
    exif = Image.Exif()
    exif[0x013B] = NAME  # Artist
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", pnginfo=info, exif=exif.tobytes())
    data = buf.getvalue()
    ihdr_end = 8 + 25
    extra = chunk(b"tIME", b"\x07\xe8\x03\x0f\x0a\x0f\x1e") + chunk(b"prIv", f"{NAME} {MRN}".encode())
    return data[:ihdr_end] + chunk(b"gAMA", struct.pack(">I", 45455)) + data[ihdr_end:-12] + extra + data[-12:]


@pytest.mark.parametrize("pixels", [
    (np.arange(32 * 40).reshape(32, 40) % 251).astype(np.uint8),
    (np.arange(32 * 40 * 3).reshape(32, 40, 3) % 253).astype(np.uint8),
    (np.arange(32 * 40).reshape(32, 40) * 46).astype(np.uint16),  # 16-bit greyscale
], ids=["grey8", "rgb8", "grey16"])
def test_png_loses_its_metadata_and_keeps_its_pixels(pixels):
    data = planted_png(pixels)
    assert {b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"tIME", b"prIv"} <= {k for k, _ in png_chunks(data)}
    out = strip_png_metadata(data)
    assert [k for k, _ in png_chunks(out)] == [b"IHDR", b"gAMA", b"IDAT", b"IEND"]
    for text in PLANTED:
        assert text.encode() not in out, text
    assert [c for c in png_chunks(out) if c[0] == b"IDAT"] == [c for c in png_chunks(data) if c[0] == b"IDAT"]
    decoded = np.array(Image.open(io.BytesIO(out)))
    assert decoded.dtype == np.array(Image.open(io.BytesIO(data))).dtype
    np.testing.assert_array_equal(decoded, pixels)
    assert deidentify(data, "png") == out
    if pixels.dtype == np.uint16:
        assert decode_image(out, "out").meta["bits"] == 16


# JPEG --------------------------------------------------------------------------------------------------

def segments(data: bytes) -> list[tuple[int, bytes]]:
    """(marker, payload) of each header segment up to the first SOS, and the SOS itself."""
    out, i = [], 2
    while True:
        marker, length = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
        out.append((marker, data[i + 4:i + 2 + length]))
        if marker == 0xDA:
            return out
        i += 2 + length


def scan_data(data: bytes) -> bytes:
    """From the first SOS through EOI: the coded image, which must come through unchanged."""
    i = 2
    while data[i + 1] != 0xDA:
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return data[i:data.rindex(b"\xff\xd9") + 2]


def planted_jpeg(image: Image.Image, **options) -> bytes:
    exif = Image.Exif()
    exif[0x013B], exif[0x010E] = NAME, f"{MRN} {HOSPITAL}"  # Artist, ImageDescription
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90, exif=exif.tobytes(), comment=f"{NAME} {MRN}".encode(), **options)
    data = buf.getvalue()
    jfif_thumb = b"\xff\xe0" + struct.pack(">H", 16 + 6) + b"JFIF\0\x01\x01\0\0\x01\0\x01" + b"\x02\x01" + b"Doe^Ja"
    xmp = b"http://ns.adobe.com/xap/1.0/\0<x:xmpmeta>" + NAME.encode() + b"</x:xmpmeta>"
    iptc = b"Photoshop 3.0\0" + DOCTOR.encode()
    extra = jfif_thumb + b"\xff\xe1" + struct.pack(">H", 2 + len(xmp)) + xmp + \
        b"\xff\xed" + struct.pack(">H", 2 + len(iptc)) + iptc
    if data[2:4] == b"\xff\xe0":  # swap Pillow's JFIF header for one with a thumbnail
        data = data[:2] + data[4 + int.from_bytes(data[4:6], "big"):]
    return data[:2] + extra + data[2:] + f"trailing {MRN}".encode()


def sample_image(mode: str) -> Image.Image:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    return rgb.convert(mode)


@pytest.mark.parametrize("mode,options", [
    ("RGB", {"icc_profile": ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()}),
    ("L", {"progressive": True}),
    ("RGB", {"restart_marker_blocks": 2, "subsampling": 0}),
    ("CMYK", {}),  # Pillow marks CMYK with an Adobe APP14, which must stay
], ids=["rgb-icc", "grey-progressive", "rgb-restart", "cmyk-adobe"])
def test_jpeg_loses_its_metadata_and_keeps_its_pixels(mode, options):
    data = planted_jpeg(sample_image(mode), **options)
    found = {m for m, _ in segments(data)}
    assert {0xE0, 0xE1, 0xED, 0xFE} <= found
    out = strip_jpeg_metadata(data)
    for text in PLANTED:
        assert text.encode() not in out, text
    kept = [(m, p) for m, p in segments(out) if 0xE0 <= m <= 0xEF or m == 0xFE]
    assert all((m, p[:5]) in ((0xE0, b"JFIF\0"), (0xEE, b"Adobe")) for m, p in kept), kept
    assert all(p[12:14] == b"\0\0" for m, p in kept if m == 0xE0)  # no thumbnail
    assert (0xEE in {m for m, _ in kept}) == (mode == "CMYK")
    assert scan_data(out) == scan_data(data)  # byte-level filtering, no re-encoding
    assert out.endswith(b"\xff\xd9")
    decoded = Image.open(io.BytesIO(out))
    assert not {"exif", "comment", "icc_profile"} & set(decoded.info)
    np.testing.assert_array_equal(np.array(decoded), np.array(Image.open(io.BytesIO(data))))
    assert deidentify(data, "jpeg") == out


# Bad input ---------------------------------------------------------------------------------------------

def _png() -> bytes:
    return planted_png(np.zeros((8, 8), np.uint8))


def _jpeg() -> bytes:
    return planted_jpeg(sample_image("RGB"))


def _bad_crc() -> bytes:
    data = bytearray(_png())
    data[data.index(b"IDAT") + 6] ^= 0xFF
    return bytes(data)


@pytest.mark.parametrize("fmt,make,words", [
    ("dicom", lambda: b"this is not a DICOM file at all", "DICOM"),
    ("dicom", lambda: b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\x7f", "DICOM"),
    ("png", lambda: b"GIF89a" + b"\0" * 20, "not a PNG"),
    ("png", lambda: _png()[:-30], "truncated PNG"),
    ("png", _bad_crc, "CRC"),
    ("jpeg", lambda: _png(), "not a JPEG"),
    ("jpeg", lambda: _jpeg()[:300], "truncated JPEG"),
    ("jpeg", lambda: _jpeg()[:_jpeg().rindex(b"\xff\xd9")], "truncated JPEG"),
    ("tiff", lambda: b"II*\0", "cannot de-identify"),
])
def test_bad_input_is_an_input_error(fmt, make, words):
    with pytest.raises(InputError, match=words) as err:
        deidentify(make(), fmt, label="scan.bin")
    assert err.value.path == "scan.bin"
