"""A corpus of bad and hostile input files, generated in code: what an attacker (or a broken scanner
export) sends to `chestdx predict` and the service.

`hostile_corpus()` holds only files that must be refused: each `Case` says what it probes and the
HTTP status the service answers (413 too large, 415 not a supported image, 422 damaged, 400 empty).
Bombs are small: their headers claim what their bytes do not hold, or their data is a few kilobytes
of deflate that would inflate to gigabytes. `tolerated_corpus()` holds odd but usable files that must
decode (a DICOM window of width 0 is ignored, as viewers do).
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np

MIB = 1 << 20


@dataclass(frozen=True)
class Case:
    kind: str  # unique slug
    filename: str
    data: bytes
    expect: int  # the service's status: 413, 415, 422 or 400 (200 in the tolerated corpus)
    probe: str = ""  # what the case tries


# ----------------------------------------------------------------------------- building blocks


def _zero_deflate(n_bytes: int) -> bytes:
    """A raw deflate stream of `n_bytes` zeros (n_bytes a multiple of 1 MiB), ~1 KB per MiB, built
    by repeating one byte-aligned block instead of compressing gigabytes."""
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = comp.compress(b"\0" * MIB) + comp.flush(zlib.Z_SYNC_FLUSH)
    return block * (n_bytes // MIB) + b"\x03\x00"  # an empty final block ends the stream


def _zero_zlib(n_bytes: int) -> bytes:
    adler, zero = 1, b"\0" * MIB
    for _ in range(n_bytes // MIB):
        adler = zlib.adler32(zero, adler)
    return b"\x78\xda" + _zero_deflate(n_bytes) + struct.pack(">I", adler)


def chunk(ctype: bytes, body: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(ctype + body) if crc is None else crc
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", crc)


PNG_SIG = b"\x89PNG\r\n\x1a\n"


def ihdr(w, h, depth=8, colour=0, interlace=0) -> bytes:
    return chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, interlace))


def raw_png(w, h, idat: bytes | None = None, depth=8, colour=0, interlace=0, before=b"", trailer=b"") -> bytes:
    """A PNG written by hand: any header, any IDAT (default: the zeros the header asks for)."""
    if idat is None:
        idat = zlib.compress(b"\0" * (h * (1 + w * max(depth // 8, 1))))
    return (PNG_SIG + ihdr(w, h, depth, colour, interlace) + before + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
            + trailer)


def png(arr: np.ndarray | None = None, **save) -> bytes:
    from PIL import Image

    img = Image.fromarray(_ramp() if arr is None else arr)
    buf = io.BytesIO()
    img.save(buf, format="PNG", **save)
    return buf.getvalue()


def jpeg(mode="L", size=(64, 48), **save) -> bytes:
    from PIL import Image

    img = Image.fromarray(_ramp(size[1], size[0])).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **save)
    return buf.getvalue()


def _ramp(h=48, w=64) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (np.tile(np.linspace(0, 255, w), (h, 1)) * 0.8 + rng.integers(0, 50, (h, w))).astype(np.uint8)


def segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, offset of its FF, offset after the segment) for the JPEG header segments up to SOS."""
    out, pos = [], 2
    while pos < len(data):
        marker = data[pos + 1]
        length = struct.unpack_from(">H", data, pos + 2)[0]
        out.append((marker, pos, pos + 2 + length))
        if marker == 0xDA:
            break
        pos += 2 + length
    return out


def with_sof(data: bytes, marker=None, precision=None, h=None, w=None) -> bytes:
    """A JPEG with its frame header (SOF) changed: type, precision, height, width."""
    for m, start, _end in segments(data):
        if m in (0xC0, 0xC1, 0xC2):
            b = bytearray(data)
            if marker is not None:
                b[start + 1] = marker
            if precision is not None:
                b[start + 4] = precision
            if h is not None:
                b[start + 5:start + 7] = struct.pack(">H", h)
            if w is not None:
                b[start + 7:start + 9] = struct.pack(">H", w)
            return bytes(b)
    raise AssertionError("no SOF")


def insert_after_soi(data: bytes, segment: bytes) -> bytes:
    return data[:2] + segment + data[2:]


def cut_at(data: bytes, marker: int, extra: int = 0) -> bytes:
    start = next(s for m, s, _ in segments(data) if m == marker)
    return data[:start + extra]


def zip_bytes(members: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, content in members.items():
            zf.writestr(name, content)
    return buf.getvalue()


def dicom(pixels: np.ndarray | None = None, *, photometric="MONOCHROME2", syntax="1.2.840.10008.1.2.1",
          modality="CR", preamble=b"\0" * 128, sop="1.2.840.10008.5.1.4.1.1.7", pixel_data=None, drop=(),
          **attrs) -> bytes:
    """A DICOM file in memory: 16-bit MONOCHROME2 by default; `attrs` set or override any attribute
    (value validation is off, so invalid values are written as given); `drop` removes attributes."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import UID

    pixels = np.tile(np.linspace(0, 4000, 40), (32, 1)).astype(np.uint16) if pixels is None else pixels
    with pydicom.config.disable_value_validation():
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop
        meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
        encaps = isinstance(pixel_data, bytes) and pixel_data.startswith(b"\xfe\xff\x00\xe0")
        writable = UID(syntax).is_transfer_syntax and syntax != "1.2.840.10008.1.2.1.99" and (
            encaps or not UID(syntax).is_compressed)  # else written explicit VR LE, then retagged
        meta.TransferSyntaxUID = UID(syntax if writable else "1.2.840.10008.1.2.1")
        ds = FileDataset("hostile", {}, file_meta=meta, preamble=preamble)
        ds.SOPClassUID, ds.SOPInstanceUID = sop, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientName, ds.PatientID = modality, "Hostile^Input", "H001"
        ds.Rows, ds.Columns = pixels.shape[:2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        bits = pixels.dtype.itemsize * 8
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
        ds.PixelData = pixels.tobytes() if pixel_data is None else pixel_data
        for key, value in attrs.items():
            setattr(ds, key, value)
        for key in drop:
            delattr(ds, key)
        if encaps:
            ds["PixelData"].VR = "OB"
            ds["PixelData"].is_undefined_length = True
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    return data if writable else with_syntax(data, syntax)


def with_syntax(data: bytes, uid: str) -> bytes:
    """The file with (0002,0010) TransferSyntaxUID replaced by `uid` (any UID, known or not), the data set
    unchanged (all compressed syntaxes encode it as explicit VR little endian)."""
    end = 144 + struct.unpack_from("<I", data, 140)[0]  # (0002,0000) group length: where group 0002 ends
    pos, out = 144, []
    while pos < end:
        vr = data[pos + 4:pos + 6]
        long_vr = vr in (b"OB", b"OW", b"UN", b"UT", b"SQ")
        length = struct.unpack_from("<I" if long_vr else "<H", data, pos + (8 if long_vr else 6))[0]
        head, nxt = (12 if long_vr else 8), pos + (12 if long_vr else 8) + length
        if data[pos:pos + 4] == b"\x02\x00\x10\x00":
            value = uid.encode() + (b"\0" if len(uid) % 2 else b"")
            out.append(data[pos:pos + 6] + struct.pack("<H", len(value)) + value)
        else:
            out.append(data[pos:nxt])
        pos = nxt
    group = b"".join(out)
    return data[:140] + struct.pack("<I", len(group)) + group + data[end:]


def encapsulated(*frames: bytes) -> bytes:
    from pydicom.encaps import encapsulate

    return encapsulate(list(frames))


def patch(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.count(old) == 1, old
    return data.replace(old, new)


def private_blob(size: int, declared: int | None = None) -> bytes:
    """An explicit-VR OB private element (0009,1010) of `size` bytes, its length field `declared`."""
    return struct.pack("<HH", 0x0009, 0x1010) + b"OB\0\0" + struct.pack("<I", size if declared is None else declared) \
        + b"\0" * size


# ----------------------------------------------------------------------------- the corpus


def hostile_corpus(tmp_dir=None) -> list[Case]:
    """Every case must be refused with one clear line; `tmp_dir` is not needed (all is built in memory)."""
    cases: list[Case] = []

    def add(kind, filename, data, expect, probe):
        cases.append(Case(kind, filename, data, expect, probe))

    good_png, good_jpeg = png(), jpeg()
    prog_jpeg = jpeg(progressive=True)

    # --- PNG: bombs refused from IHDR
    add("png-bomb-huge-dims", "bomb.png", raw_png(100_000, 100_000, idat=zlib.compress(b"\0" * 1000)), 413,
        "IHDR claims 10 Gpx, the IDAT holds 1 kB: Pillow's DecompressionBombError must not escape")
    add("png-pillow-bomb-threshold", "pillow_bomb.png", raw_png(20_000, 20_000, idat=zlib.compress(b"\0" * 100)), 413,
        "400 Mpx: over Pillow's own bomb limit (179 Mpx), which raised an uncaught exception type")
    add("png-zlib-bomb-zeros", "zeros.png", raw_png(8192, 8192, idat=_zero_zlib(64 * MIB)), 413,
        "64 Mpx of zeros in 66 kB of deflate: just over the 50 Mpx limit")
    add("png-just-over-limit", "7072sq.png", raw_png(7072, 7072, idat=zlib.compress(b"\0" * 1000)), 413,
        "7072x7072 = 50,013,184 pixels: the limit is exact")
    add("png-interlaced-bomb", "adam7.png", raw_png(30_000, 30_000, interlace=1, idat=zlib.compress(b"\0" * 99)), 413,
        "an Adam7-interlaced bomb (interlaced decoding holds the whole image)")
    add("png-16bit-rgba-bomb", "rgba16.png", raw_png(12_000, 12_000, depth=16, colour=6,
                                                     idat=zlib.compress(b"\0" * 99)), 413,
        "144 Mpx of 64-bit pixels (1.1 GB decoded)")
    # --- PNG: damaged structure
    add("png-zero-width", "zero_width.png", raw_png(0, 64, idat=zlib.compress(b"")), 422, "IHDR with width 0")
    add("png-width-over-2-31", "negative.png", raw_png(2**31 + 5, 64, idat=zlib.compress(b"")), 422,
        "IHDR width beyond the PNG maximum (negative as a signed int)")
    add("png-1x1", "dot.png", png(np.zeros((1, 1), np.uint8)), 422, "a valid 1x1 image: no diagnostic content")
    add("png-strip-100000x1", "strip.png", raw_png(100_000, 1), 422, "a 100000x1 strip: too thin for the model")
    add("png-bad-ihdr-crc", "bad_crc.png", PNG_SIG + chunk(b"IHDR", good_png[16:29], crc=0xDEADBEEF)
        + good_png[33:], 422, "IHDR checksum wrong")
    add("png-bad-idat-crc", "bad_idat_crc.png", _bad_idat_crc(good_png), 422,
        "IDAT checksum wrong (Pillow does not check it)")
    add("png-signature-only", "sig.png", PNG_SIG, 422, "the 8-byte signature and nothing else")
    add("png-truncated-in-ihdr", "cut_ihdr.png", good_png[:20], 422, "truncated inside IHDR")
    add("png-truncated-in-idat", "cut_idat.png", good_png[:len(good_png) // 2], 422, "truncated inside IDAT")
    add("png-truncated-before-iend", "no_iend.png", good_png[:-12], 422, "all pixel data but no IEND")
    add("png-no-idat", "no_idat.png", PNG_SIG + ihdr(64, 64) + chunk(b"IEND", b""), 422, "a header and no pixels")
    add("png-ihdr-not-first", "text_first.png", PNG_SIG + chunk(b"tEXt", b"a\0b") + good_png[8:], 422,
        "a tEXt chunk before IHDR")
    add("png-bad-bit-depth", "depth7.png", raw_png(64, 64, depth=7), 422, "bit depth 7 does not exist")
    add("png-bad-colour-type", "colour5.png", raw_png(64, 64, colour=5), 422, "colour type 5 does not exist")
    add("png-idat-not-zlib", "garbage_idat.png", raw_png(64, 64, idat=b"\x13\x37" * 200), 422,
        "IDAT that is not a zlib stream")
    add("png-idat-short", "short_idat.png", raw_png(64, 64, idat=zlib.compress(b"\0" * 100)), 422,
        "a valid zlib stream with fewer rows than IHDR declares")
    add("png-palette-missing-plte", "no_plte.png", raw_png(64, 64, colour=3), 422, "a palette image without PLTE")
    add("png-palette-index-out-of-range", "palette_index.png",
        raw_png(64, 64, colour=3, before=chunk(b"PLTE", b"\0\0\0\xff\xff\xff"),
                idat=zlib.compress((b"\0" + b"\xc8" * 64) * 64)), 422,
        "pixel indices 200 in a 2-colour palette")
    add("png-plte-bad-length", "plte_len.png", raw_png(64, 64, colour=3, before=chunk(b"PLTE", b"\0" * 7)), 422,
        "a PLTE chunk that is not a whole number of colours")
    add("png-itxt-declares-1gb", "itxt_1gb.png", good_png[:33] + struct.pack(">I", 1 << 30) + b"iTXt" + b"x" * 64,
        422, "an iTXt chunk whose length field claims 1 GiB")
    add("png-ztxt-bomb", "ztxt_bomb.png", good_png[:33] + chunk(b"zTXt", b"Comment\0\0" + _zero_zlib(64 * MIB))
        + good_png[33:], 413, "a zTXt text chunk inflating to 64 MiB (Pillow's text limit is 1 MiB)")
    add("png-iccp-bomb", "iccp_bomb.png", good_png[:33] + chunk(b"iCCP", b"icc\0\0" + _zero_zlib(64 * MIB))
        + good_png[33:], 413, "an ICC profile inflating to 64 MiB")
    add("apng-animated", "animated.png", _apng(), 415, "an animated PNG: which frame is the radiograph?")
    add("png-zip-polyglot", "polyglot_zip.png", good_png + zip_bytes({"payload.sh": "echo owned\n"}), 422,
        "a valid PNG with a ZIP archive appended (a PNG/ZIP polyglot)")
    add("png-html-polyglot", "polyglot_html.png", good_png + b"<script>alert(document.cookie)</script>", 422,
        "a valid PNG with HTML after IEND")
    add("png-lowercase-signature", "sig_lower.png", b"\x89png\r\n\x1a\n" + good_png[8:], 415,
        "a signature that is almost PNG's")

    # --- JPEG
    add("jpeg-sof-65500x65500", "huge.jpg", with_sof(good_jpeg, h=65500, w=65500), 413,
        "a JPEG header claiming 65500 x 65500 (4.3 Gpx)")
    add("jpeg-sof-65500x65500-header-only", "huge_header.jpg",
        cut_at(with_sof(good_jpeg, h=65500, w=65500), 0xDA), 413, "the same bomb with no image data at all")
    add("jpeg-sof-zero-height", "zero_height.jpg", with_sof(good_jpeg, h=0), 422,
        "SOF with height 0 (a DNL marker would give it; never in a radiograph)")
    add("jpeg-strip-60000x8", "strip.jpg", with_sof(good_jpeg, h=8, w=60000), 422, "a strip 8 pixels high")
    add("jpeg-soi-only", "soi.jpg", b"\xff\xd8\xff", 422, "the start-of-image marker and nothing else")
    add("jpeg-truncated-in-header", "cut_header.jpg", cut_at(good_jpeg, 0xC0, 5), 422, "truncated inside SOF")
    add("jpeg-truncated-half", "cut_half.jpg", good_jpeg[:len(good_jpeg) // 2], 422, "truncated in the image data")
    add("jpeg-truncated-before-eoi", "no_eoi.jpg", good_jpeg[:-2], 422, "all data but the end-of-image marker")
    add("jpeg-progressive-truncated", "cut_progressive.jpg", prog_jpeg[:int(len(prog_jpeg) * 0.6)], 422,
        "a progressive JPEG cut after a few scans (it would show as a blurred image)")
    add("jpeg-no-sof", "no_sof.jpg", b"\xff\xd8" + b"".join(good_jpeg[s:e] for m, s, e in segments(good_jpeg)
                                                            if m not in (0xC0, 0xDA)) + b"\xff\xd9", 422,
        "tables but no frame header or scan")
    add("jpeg-segment-length-1", "seglen.jpg", insert_after_soi(good_jpeg, b"\xff\xfe\x00\x01"), 422,
        "a comment segment with length 1")
    add("jpeg-segment-past-end", "seg_past_end.jpg", insert_after_soi(good_jpeg[:200], b"\xff\xe1\xff\xf0"), 422,
        "an APP1 segment claiming 65 kB in a 200-byte file")
    add("jpeg-dri-huge-length", "dri.jpg", insert_after_soi(good_jpeg, b"\xff\xdd\xff\xff" + b"\xff" * 40), 422,
        "a restart-interval segment (DRI) claiming 65535 bytes")
    add("jpeg-bogus-huffman-table", "huffman.jpg", _bogus_huffman(good_jpeg), 422,
        "a Huffman table whose code counts sum past 256")
    add("jpeg-arithmetic-sof9", "arith.jpg", with_sof(good_jpeg, marker=0xC9), 415, "arithmetic-coded JPEG (SOF9)")
    add("jpeg-lossless-sof3", "lossless.jpg", with_sof(good_jpeg, marker=0xC3), 415, "lossless JPEG (SOF3)")
    add("jpeg-hierarchical-sof5", "hier.jpg", with_sof(good_jpeg, marker=0xC5), 415, "hierarchical JPEG (SOF5)")
    add("jpeg-ls-sof55", "jpegls.jpg", with_sof(good_jpeg, marker=0xF7), 415, "JPEG-LS (SOF55)")
    add("jpeg-12bit", "twelve.jpg", with_sof(good_jpeg, marker=0xC1, precision=12), 415,
        "a 12-bit extended JPEG (Pillow reads 8 bits)")
    add("jpeg-2-components", "two_comp.jpg", _two_components(good_jpeg), 422, "a frame header with 2 components")
    add("jpeg-zip-polyglot", "gifar.jpg", good_jpeg + zip_bytes({"Evil.class": b"\xca\xfe\xba\xbe"}), 422,
        "a JPEG with a JAR appended (the GIFAR attack)")
    add("jpeg-html-polyglot", "polyglot.jpg", good_jpeg + b"<html><script>alert(1)</script></html>", 422,
        "HTML after the end-of-image marker")
    add("jpeg-double-soi", "double_soi.jpg", good_jpeg[:2] + good_jpeg, 422, "two start-of-image markers")

    # --- other image formats: refused by name
    add("tiff-40000x40000", "big.tif", _tiff(40_000, 40_000), 415, "a TIFF claiming 40000 x 40000 (was a crash)")
    add("tiff-small-valid", "small.tiff", _pil(_ramp(), "TIFF"), 415, "a valid TIFF: not a documented format")
    add("bigtiff", "big.btf", b"II+\x00\x08\x00\x00\x00" + b"\0" * 64, 415, "a BigTIFF header")
    add("bmp-30000x30000", "big.bmp", _bmp_header(30_000, 30_000), 415, "a BMP header claiming 30000 x 30000")
    add("bmp-small-valid", "small.bmp", _pil(_ramp(), "BMP"), 415, "a valid BMP")
    add("gif", "scan.gif", _pil(_ramp(), "GIF"), 415, "a GIF")
    add("gif-js-polyglot", "polyglot.gif", b"GIF89a/*\x01\x00\x01\x00\x00\x00\x00*/=alert(1);" + b"\0" * 16, 415,
        "a GIF header that is also JavaScript")
    add("webp", "scan.webp", _pil(_ramp(), "WEBP"), 415, "a WebP image")
    add("jpeg2000-codestream", "scan.j2k", b"\xff\x4f\xff\x51\x00\x29" + b"\0" * 64, 415, "a raw JPEG 2000 codestream")
    add("jp2", "scan.jp2", b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\0" * 64, 415, "a JP2 file")
    add("jpeg-xl", "scan.jxl", b"\xff\x0a" + b"\0" * 64, 415, "a JPEG XL codestream")
    add("heic", "scan.heic", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\0" * 32, 415, "a HEIC photo")
    add("psd", "scan.psd", b"8BPS\x00\x01" + b"\0" * 64, 415, "a Photoshop file")
    add("pgm", "scan.pgm", b"P5\n64 48\n255\n" + _ramp().tobytes(), 415, "a binary PGM")
    add("nifti", "volume.nii", _nifti(), 415, "a NIfTI volume sent to a 2D reader")

    # --- not images at all
    add("csv", "labels.csv", b"patient_id,label\n1,covid\n", 415, "a CSV file")
    add("html", "index.html", b"<!DOCTYPE html><html><body><img src=x onerror=alert(1)></body></html>", 415,
        "an HTML page with a script")
    add("svg-script", "scan.svg", b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>', 415,
        "an SVG with a script")
    add("xml-xxe", "scan.xml", b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]><r>&x;</r>',
        415, "an XML external-entity payload")
    add("json", "scan.json", b'{"image": "iVBORw0KGgo="}', 415, "JSON")
    add("utf16-text", "notes.txt", "radiology notes".encode("utf-16"), 415, "UTF-16 text with a BOM")
    add("pdf", "report.pdf", b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n", 415, "a PDF")
    add("pdf-jpeg-polyglot", "report_jpeg.pdf", b"%PDF-1.4\n%" + good_jpeg, 415, "a PDF carrying a JPEG")
    add("zip", "series.zip", zip_bytes({"a.png": good_png}), 415, "a ZIP archive of images")
    add("gzip", "scan.nii.gz", _gzip(b"\0" * 1000), 415, "a gzip file")
    add("gzip-bomb", "bomb.gz", b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03" + _zero_deflate(256 * MIB), 415,
        "a gzip bomb: 256 MiB of zeros in 250 kB (never inflated)")
    add("tar", "series.tar", _tar(), 415, "a tar archive")
    add("elf", "scan", b"\x7fELF\x02\x01\x01\x00" + b"\0" * 120, 415, "a Linux executable without an extension")
    add("windows-exe", "scan.png.exe", b"MZ\x90\x00" + b"\0" * 60 + b"PE\0\0", 415, "a Windows executable")
    add("shell-script", "run.png", b"#!/bin/sh\nrm -rf ~\n", 415, "a shell script named .png")
    add("random-bytes", "noise.dcm", np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(), 415,
        "4 kB of random bytes")
    add("all-zeros", "zeros.dcm", b"\0" * 4096, 415, "4 kB of zeros (a hole in a disk image)")
    add("empty", "empty.png", b"", 400, "an empty file")
    add("whitespace", "blank.jpg", b" \n\t\r\n" * 10, 415, "only white space")

    # --- DICOM
    add("dicom-palette-without-lut", "palette.dcm", dicom(photometric="PALETTE COLOR",
                                                          pixels=np.zeros((32, 40), np.uint8)), 422,
        "PALETTE COLOR without its lookup tables (was a crash)")
    add("dicom-no-preamble", "raw.dcm", dicom()[132:], 415, "meta group with neither preamble nor DICM")
    add("dicom-dicm-without-preamble", "dicm0.dcm", dicom()[128:], 415, "DICM at byte 0, no preamble")
    add("dicom-raw-dataset", "raw_ds.dcm", _raw_dataset(), 415, "an ACR-NEMA style data set, no file header")
    add("dicom-dicm-then-garbage", "garbage.dcm", b"\0" * 128 + b"DICM" + b"\x13\x37\xff\xee" * 64, 422,
        "the DICM prefix followed by garbage")
    add("dicom-meta-truncated", "meta_cut.dcm", dicom()[:150], 422, "truncated in the file meta group")
    add("dicom-truncated-in-dataset", "ds_cut.dcm", _cut_dataset(), 422, "truncated inside an element value")
    add("dicom-rows-0", "rows0.dcm", dicom(Rows=0), 422, "Rows 0")
    add("dicom-rows-huge", "huge.dcm", dicom(Rows=65535, Columns=65535), 413, "65535 x 65535, 4 kB of pixels")
    add("dicom-frames-100000", "frames.dcm", dicom(NumberOfFrames=100_000, Rows=256, Columns=256), 413,
        "256 x 256 x 100000 frames = 6.5 Gpx")
    add("dicom-frames-negative", "frames_neg.dcm", dicom(NumberOfFrames=-3), 422, "NumberOfFrames -3")
    add("dicom-bits-allocated-1", "bits1.dcm", dicom(BitsAllocated=1, BitsStored=1, HighBit=0,
                                                     pixel_data=b"\0" * 160), 422, "a 1-bit image (a mask)")
    add("dicom-bits-allocated-64", "bits64.dcm", dicom(BitsAllocated=64, BitsStored=64, HighBit=63,
                                                       pixel_data=b"\0" * 32 * 40 * 8), 422,
        "BitsAllocated 64 for integer PixelData")
    add("dicom-bits-allocated-0", "bits0.dcm", dicom(BitsAllocated=0), 422, "BitsAllocated 0")
    add("dicom-bits-stored-over-allocated", "bits_stored.dcm", dicom(BitsStored=20), 422, "BitsStored 20 of 16")
    add("dicom-pixel-representation-2", "pixrep.dcm", dicom(PixelRepresentation=2), 422, "PixelRepresentation 2")
    add("dicom-samples-3-monochrome2", "spp3.dcm", dicom(SamplesPerPixel=3), 422,
        "SamplesPerPixel 3 with MONOCHROME2")
    add("dicom-samples-0", "spp0.dcm", dicom(SamplesPerPixel=0), 422, "SamplesPerPixel 0")
    add("dicom-rgb-planar-2", "planar.dcm", dicom(photometric="RGB", SamplesPerPixel=3, PlanarConfiguration=2,
                                                  pixels=np.zeros((32, 40, 3), np.uint8)), 422,
        "PlanarConfiguration 2")
    add("dicom-pixeldata-short", "short.dcm", dicom(pixel_data=b"\0" * 1280), 422, "half the pixel data declared")
    add("dicom-pixeldata-empty", "nopix.dcm", dicom(pixel_data=b""), 422, "a zero-length PixelData")
    add("dicom-pixeldata-length-4gb", "pix_4gb.dcm", _pixel_length(0xFFFFFFF0), 422,
        "a PixelData length claiming 4 GB")
    add("dicom-private-tag-4gb", "private_4gb.dcm", _with_private(private_blob(16, declared=0xFFFFFFF0)), 422,
        "a private element claiming 4 GB")
    add("dicom-private-tag-10mb-no-pixels", "private_10mb.dcm",
        _with_private(private_blob(10 * MIB), drop_pixels=True), 422, "10 MB of private data and no image")
    add("dicom-photometric-unknown", "mono3.dcm", dicom(photometric="MONOCHROME3"), 422,
        "PhotometricInterpretation MONOCHROME3")
    add("dicom-photometric-missing", "nophoto.dcm", dicom(drop=("PhotometricInterpretation",)), 422,
        "no PhotometricInterpretation")
    add("dicom-rescale-slope-nan", "slope_nan.dcm", _ds_value(dicom(RescaleSlope="7.777"), b"7.777", b"NaN  "), 422,
        "RescaleSlope NaN")
    add("dicom-rescale-slope-inf", "slope_inf.dcm", _ds_value(dicom(RescaleSlope="7.777"), b"7.777", b"inf  "), 422,
        "RescaleSlope inf")
    add("dicom-rescale-slope-0", "slope0.dcm", dicom(RescaleSlope="0", RescaleIntercept="-1024"), 422,
        "RescaleSlope 0: every pixel -1024")
    add("dicom-rescale-intercept-text", "intercept.dcm",
        _ds_value(dicom(RescaleSlope="1", RescaleIntercept="7.777"), b"7.777", b"abc  "), 422,
        "RescaleIntercept 'abc'")
    add("dicom-nan-float-pixels", "float_nan.dcm", _float_dicom(), 422, "FloatPixelData full of NaN")
    add("dicom-unknown-transfer-syntax", "syntax.dcm", dicom(syntax="1.2.3.4.5.6.7"), 422,
        "a transfer syntax UID that does not exist")
    add("dicom-video-syntax", "video.dcm", dicom(syntax="1.2.840.10008.1.2.4.102",
                                                 pixel_data=encapsulated(b"\0\0\0\x01" + b"\0" * 60)), 415,
        "an H.264 video")
    add("dicom-jpeg-corrupt-fragment", "jpeg_frag.dcm",
        dicom(syntax="1.2.840.10008.1.2.4.50", BitsAllocated=8, BitsStored=8, HighBit=7,
              pixel_data=encapsulated(b"\xff\xd8" + b"\x13\x37" * 100 + b"\xff\xd9")), 422,
        "JPEG baseline syntax, fragment of garbage")
    add("dicom-jpeg-frame-bomb", "jpeg_bomb.dcm",
        dicom(syntax="1.2.840.10008.1.2.4.50", BitsAllocated=8, BitsStored=8, HighBit=7,
              pixel_data=encapsulated(with_sof(good_jpeg, h=60000, w=60000))), 422,
        "Rows x Columns 32 x 40, the embedded JPEG claims 60000 x 60000")
    add("dicom-j2k-corrupt-fragment", "j2k.dcm",
        dicom(syntax="1.2.840.10008.1.2.4.90", pixel_data=encapsulated(
            b"\xff\x4f\xff\x51\x00\x29\x00\x00" + struct.pack(">IIII", 40, 32, 0, 0) + b"\x13" * 200)), 422,
        "JPEG 2000 syntax: a SIZ marker of the right size, then garbage")
    add("dicom-compressed-not-encapsulated", "not_encaps.dcm", dicom(syntax="1.2.840.10008.1.2.4.50"), 422,
        "a compressed syntax with native pixel data")
    add("dicom-rle-bomb", "rle_bomb.dcm",
        dicom(syntax="1.2.840.10008.1.2.5", BitsAllocated=8, BitsStored=8, HighBit=7,
              pixel_data=encapsulated(struct.pack("<16I", 1, 64, *[0] * 14) + b"\x81\x00" * 65536)), 422,
        "RLE: 128 kB of runs decoding to 8 MB for a 32x40 frame")
    add("dicom-rle-bad-offsets", "rle_offsets.dcm",
        dicom(syntax="1.2.840.10008.1.2.5", BitsAllocated=8, BitsStored=8, HighBit=7,
              pixel_data=encapsulated(struct.pack("<16I", 3, 64, 9999, 99999, *[0] * 12) + b"\0" * 64)), 422,
        "RLE segment offsets past the data")
    add("dicom-deflate-bomb", "deflate_bomb.dcm", _deflate_bomb(), 413,
        "Deflated Explicit VR: 1 MB inflating to 1 GiB")
    add("dicomdir", "DICOMDIR", _dicomdir(), 422, "a DICOMDIR: a media directory, no pixels")
    add("dicom-sr", "report.dcm", _sr(), 422, "a structured report, no pixels")
    add("dicom-pe-preamble", "polyglot_pe.dcm", dicom(preamble=b"MZ\x90\x00" + b"\0" * 124), 422,
        "a Windows executable header in the preamble (PE/DICOM polyglot, CVE-2019-11687)")
    add("dicom-elf-preamble", "polyglot_elf.dcm", dicom(preamble=b"\x7fELF\x02\x01\x01" + b"\0" * 121), 422,
        "an ELF header in the preamble")
    add("dicom-1x1", "dot.dcm", dicom(pixels=np.zeros((1, 1), np.uint16)), 422, "a 1x1 DICOM image")

    # --- hostile file names (the content is bad too; the name must come back printable and short)
    bad = good_png[:40]
    add("name-path-traversal", "../../etc/passwd.png", b"root:x:0:0:root:/root:/bin/bash\n", 415,
        "a path-traversal name")
    add("name-nul-byte", "scan\x00.png", bad, 422, "a NUL byte in the name")
    add("name-newline", "scan\nerror: all good.png", bad, 422, "a newline in the name (a forged second line)")
    add("name-ansi-escape", "\x1b[2J\x1b[31mscan.png", bad, 422, "terminal escape codes in the name")
    add("name-rtl-override", "scan\u202egnp.exe", b"MZ" + b"\0" * 62, 415, "a right-to-left override in the name")
    add("name-5000-chars", "a" * 5000 + ".png", bad, 422, "a 5000-character name")
    add("name-unicode", "胸部X線_صدر_🫁.png", bad, 422, "CJK, Arabic and emoji in the name")
    add("name-rich-markup", "[/red][bold]scan.png", bad, 422, "console markup in the name")
    add("name-windows-reserved", "CON.png", bad, 422, "a Windows reserved device name")
    return cases


def tolerated_corpus(tmp_dir=None) -> list[Case]:
    """Odd but usable files: they must decode (expect 200)."""
    ok = []

    def add(kind, filename, data, probe):
        ok.append(Case(kind, filename, data, 200, probe))

    add("dicom-window-width-0", "ww0.dcm", dicom(WindowCenter="2000", WindowWidth="0"),
        "WindowWidth 0 (was a crash): ignored, the value range is used, as viewers do")
    add("dicom-window-width-negative", "ww_neg.dcm", dicom(WindowCenter="2000", WindowWidth="-400"),
        "WindowWidth -400: ignored")
    add("dicom-window-nan", "ww_nan.dcm", _ds_value(dicom(WindowCenter="7.777", WindowWidth="400"),
                                                    b"7.777", b"NaN  "), "WindowCenter NaN: ignored")
    add("dicom-voi-lut-sequence-empty", "voi_empty.dcm", dicom(VOILUTSequence=[]), "an empty VOI LUT Sequence")
    add("dicom-modality-missing", "no_modality.dcm", dicom(drop=("Modality",)), "no Modality")
    add("dicom-tiff-preamble", "dual.dcm", dicom(preamble=b"II*\x00" + b"\0" * 124),
        "a TIFF header in the preamble (a legitimate dual-personality file)")
    add("jpeg-cmyk", "cmyk.jpg", jpeg("CMYK"), "a CMYK JPEG (Adobe), read as RGB")
    add("jpeg-restart-interval", "restart.jpg", jpeg(restart_marker_blocks=1), "restart markers after every block")
    add("jpeg-progressive", "progressive.jpg", jpeg(progressive=True), "a complete progressive JPEG")
    add("jpeg-trailing-padding", "padded.jpg", jpeg() + b"\0" * 64, "zero padding after the end-of-image marker")
    add("png-html-in-text-chunk", "text_html.png", png(pnginfo=_pnginfo("<script>alert(1)</script>")),
        "HTML in a tEXt chunk: metadata, never interpreted")
    add("png-16bit-grey", "grey16.png", png((np.arange(64 * 48).reshape(48, 64) * 20).astype(np.uint16)),
        "16-bit grey")
    return ok


# ----------------------------------------------------------------------------- helpers for single cases


def _bad_idat_crc(good: bytes) -> bytes:
    i = good.index(b"IDAT") - 4
    length = struct.unpack_from(">I", good, i)[0]
    end = i + 12 + length
    return good[:end - 4] + b"\0\0\0\0" + good[end:]


def _apng() -> bytes:
    good = png()
    actl = chunk(b"acTL", struct.pack(">II", 2, 0))
    fctl = chunk(b"fcTL", struct.pack(">IIIIIHHBB", 0, 64, 48, 0, 0, 1, 10, 0, 0))
    i = good.index(b"IDAT") - 4
    return good[:i] + actl + fctl + good[i:]


def _bogus_huffman(good: bytes) -> bytes:
    for m, start, end in segments(good):
        if m == 0xC4:
            b = bytearray(good)
            b[start + 5:start + 21] = b"\xff" * 16  # 16 code lengths of 255 codes each
            return bytes(b)
    raise AssertionError("no DHT")


def _two_components(good: bytes) -> bytes:
    for m, start, end in segments(good):
        if m == 0xC0:
            body = good[start + 4:start + 9] + b"\x02" + b"\x01\x11\x00\x02\x11\x00"
            return good[:start] + b"\xff\xc0" + struct.pack(">H", len(body) + 2) + body + good[end:]
    raise AssertionError("no SOF")


def _pil(arr, fmt) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _tiff(w, h) -> bytes:
    entries = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1), (273, 4, 1, 8),
               (277, 3, 1, 1), (278, 4, 1, h), (279, 4, 1, w * h)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + b"\0\0\0\0"
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\0" * 256


def _bmp_header(w, h) -> bytes:
    return b"BM" + struct.pack("<IHHI", 54 + w * h * 3, 0, 0, 54) + struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0,
                                                                               w * h * 3, 2835, 2835, 0, 0) + b"\0" * 64


def _nifti() -> bytes:
    header = bytearray(352)
    struct.pack_into("<i", header, 0, 348)
    header[344:348] = b"n+1\x00"
    return bytes(header) + b"\0" * 64


def _gzip(payload: bytes) -> bytes:
    import gzip

    return gzip.compress(payload)


def _tar() -> bytes:
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("a.png")
        data = png()
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _raw_dataset() -> bytes:
    """Implicit VR little endian elements from (0008,0016) on: how ACR-NEMA files begin."""
    uid = b"1.2.840.10008.5.1.4.1.1.7\0"
    return struct.pack("<HHI", 0x0008, 0x0016, len(uid)) + uid + struct.pack("<HHI", 0x0028, 0x0010, 2) + b"\x20\x00"


def _cut_dataset() -> bytes:
    data = dicom(ImageComments="x" * 400)
    at = data.index(b"x" * 400)
    return data[:at + 100]


def _pixel_length(declared: int) -> bytes:
    data = dicom()
    i = data.index(b"\xe0\x7f\x10\x00OW\x00\x00")
    return data[:i + 8] + struct.pack("<I", declared) + data[i + 12:i + 12 + 100]


def _with_private(element: bytes, drop_pixels=False) -> bytes:
    """`element` (group 0009) inserted before (0010,0010) PatientName; with `drop_pixels`, no PixelData."""
    data = dicom()
    i = data.index(b"\x10\x00\x10\x00PN")
    out = data[:i] + element + data[i:]
    if drop_pixels:
        out = out[:out.index(b"\xe0\x7f\x10\x00OW")]
    return out


def _ds_value(data: bytes, placeholder: bytes, value: bytes) -> bytes:
    assert len(placeholder) == len(value)
    return patch(data, placeholder, value)


def _float_dicom() -> bytes:
    values = np.full((32, 40), np.nan, np.float32)
    return dicom(drop=("PixelData", "PixelRepresentation", "BitsStored", "HighBit"), BitsAllocated=32,
                 FloatPixelData=values.tobytes(), sop="1.2.840.10008.5.1.4.1.1.30")


def _deflate_bomb() -> bytes:
    """A valid file meta group saying Deflated Explicit VR Little Endian, then 1 GiB of zeros deflated."""
    data = with_syntax(dicom(), "1.2.840.10008.1.2.1.99")
    end = 144 + struct.unpack_from("<I", data, 140)[0]
    return data[:end] + _zero_deflate(1024 * MIB)


def _dicomdir() -> bytes:
    return _no_pixels("1.2.840.10008.1.3.10")


def _sr() -> bytes:
    return _no_pixels("1.2.840.10008.5.1.4.1.1.88.11")


def _no_pixels(sop: str) -> bytes:
    data = dicom(sop=sop)
    return data[:data.index(b"\xe0\x7f\x10\x00OW")]


def _pnginfo(text: str):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Comment", text)
    return info
