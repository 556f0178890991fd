"""Series uploads for sequence models (chestdx.serve.series): every hostile zip gets one clear error,
no client name reaches the file system, and slice order survives."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image

from chestdx.errors import InputError
from chestdx.serve.series import MAX_MEMBERS, unpacked_series

LIMIT = 20 * 2**20


def _png(value: int = 0, size=(20, 24)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full(size, value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _zip(files: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, content in files.items():
            z.writestr(name, content)
    return buf.getvalue()


def _refused(data: bytes, words: str) -> None:
    with pytest.raises(InputError, match=words):
        with unpacked_series(data, "s.zip", LIMIT):
            pass


def test_members_get_new_names_in_natural_order_inside_the_folder(tmp_path):
    files = {"../../../../tmp/escape/slice_10.png": _png(10), "a/b/slice_2.png": _png(2), ".DS_Store": b"x",
             "__MACOSX/._slice_2.png": b"x", "x" * 300 + ".png": _png(99)}
    with unpacked_series(_zip(files), "s.zip", LIMIT) as folder:
        written = sorted(p.name for p in folder.iterdir())
        assert written == ["00000.png", "00001.png", "00002.png"]  # slice_2, slice_10, then the long name
        values = [int(np.asarray(Image.open(folder / n))[0, 0]) for n in written]
        assert values == [2, 10, 99]
        assert all(p.parent == folder for p in folder.iterdir())
    assert not (tmp_path.parents[len(tmp_path.parents) - 1] / "tmp" / "escape").exists()
    assert not folder.exists()  # removed afterwards


def test_nifti_upload_and_a_zip_holding_one_nifti():
    with unpacked_series(b"\x5c\x01\x00\x00" + b"\0" * 400, "v.nii", LIMIT) as path:
        assert path.name == "volume.nii" and path.is_file()
    with unpacked_series(_zip({"scan/ct.nii.gz": b"gz"}), "s.zip", LIMIT) as path:
        assert path.name.endswith(".nii.gz") and path.is_file()


def test_hostile_archives_are_refused_with_a_reason():
    _refused(b"PK\x03\x04" + b"\x00" * 50, "not a readable zip")
    _refused(_zip({"a/x.png": _png(), "b/x.png": _png()}), "same name")
    _refused(_zip({"big.dcm": b"\0" * (LIMIT + 1)}), "too large")
    _refused(_zip({f".hidden{k}": b"" for k in range(2 * MAX_MEMBERS + 1)}), "entries")
    _refused(_zip({"only/": b""}), "no files")
    enc = bytearray(_zip({"x.png": _png()}))
    central = enc.find(b"PK\x01\x02")
    enc[central + 8] |= 1  # the encryption flag
    _refused(bytes(enc), "encrypted")
    bad = _zip({"\u00e9.png": _png()}).replace(b"\xc3\xa9", b"\xc3\x28")  # a name flagged UTF-8 that is not
    _refused(bad, "not a readable zip")


def test_an_image_bomb_inside_the_zip_is_refused_from_its_header():
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    _refused(_zip({"slice.png": bomb}), "declares.*pixels")
