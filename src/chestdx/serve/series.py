"""A whole series as one upload, for sequence models: a zip of the series' files or one NIfTI file.

The archive is unpacked into a temporary folder that is removed afterwards. Every member is
written under its base name only (no folders, so `../` cannot escape), and the member count and
the declared uncompressed size are checked before anything is extracted, so a zip bomb is
refused from its directory alone.
"""

from __future__ import annotations

import io
import tempfile
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from chestdx.errors import InputError

MAX_MEMBERS = 2000  # slices in one series
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_series_upload(name: str, data: bytes) -> bool:
    return data[:4] == b"PK\x03\x04" or name.lower().endswith(NIFTI_SUFFIXES)


@contextmanager
def unpacked_series(data: bytes, name: str, max_bytes: int):
    """A path to the series (a folder of its files, or the NIfTI file) for `read_volume`."""
    with tempfile.TemporaryDirectory(prefix="chestdx-series-") as tmp:
        folder = Path(tmp)
        if name.lower().endswith(NIFTI_SUFFIXES):
            path = folder / ("volume.nii.gz" if name.lower().endswith(".gz") else "volume.nii")
            path.write_bytes(data)
            yield path
            return
        try:
            archive = zipfile.ZipFile(io.BytesIO(data))
        except zipfile.BadZipFile as err:
            raise InputError(name, f"not a readable zip archive ({err})") from None
        with archive:
            members = [m for m in archive.infolist() if not m.is_dir()
                       and not PurePosixPath(m.filename).name.startswith((".", "__MACOSX"))
                       and "__MACOSX" not in m.filename]
            if not members:
                raise InputError(name, "the zip archive holds no files")
            if len(members) > MAX_MEMBERS:
                raise InputError(name, f"the zip archive holds {len(members)} files; a series has at most "
                                       f"{MAX_MEMBERS}")
            total = sum(m.file_size for m in members)
            if total > max_bytes:
                raise InputError(name, f"the zip archive unpacks to {total / 2**20:.0f} MB, too large "
                                       f"(limit {max_bytes / 2**20:.0f} MB)")
            names = [PurePosixPath(m.filename).name for m in members]
            if len(set(names)) != len(names):
                raise InputError(name, "the zip archive holds two files of the same name in different folders: "
                                       "zip one series at a time")
            nifti = [n for n in names if n.lower().endswith(NIFTI_SUFFIXES)]
            written = 0
            for member, base in zip(members, names):
                try:
                    with archive.open(member) as src:
                        chunk = src.read(max_bytes - written + 1)  # the declared size may lie
                except (zipfile.BadZipFile, NotImplementedError, RuntimeError, EOFError, OSError, zlib.error) as err:
                    raise InputError(name, f"cannot unpack {base} from the zip archive ({err})") from None
                written += len(chunk)
                if written > max_bytes:
                    raise InputError(name, f"the zip archive unpacks to more than {max_bytes / 2**20:.0f} MB")
                (folder / base).write_bytes(chunk)
        if len(nifti) == 1 and len(names) == 1:
            yield folder / nifti[0]
        else:
            yield folder
