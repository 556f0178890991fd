"""Hostile and broken input files (tests/hostile.py) are refused in one clear line: by the reader
(`decode_image` raises only `InputError`, quickly, from headers), by the service's status mapping,
and by `chestdx predict` (one line per file, no traceback)."""

import inspect
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from chestdx.data.io import MAX_PIXELS, MIN_SIDE, check_size, decode_image, read_image
from chestdx.errors import InputError, printable
from chestdx.serve.app import ServiceSettings, _input_status
from tests.hostile import dicom, hostile_corpus, raw_png, tolerated_corpus

CORPUS = hostile_corpus()
TOLERATED = tolerated_corpus()
TRACEBACK_TEXT = re.compile(r"Traceback|File \"|line \d+, in |<module>|\b\w+(Error|Exception): ")


def test_corpus_is_large_varied_and_small():
    kinds = [c.kind for c in CORPUS]
    assert len(CORPUS) >= 60
    assert len(set(kinds)) == len(kinds), "kinds must be unique"
    assert {c.expect for c in CORPUS} == {400, 413, 415, 422}
    assert all(re.fullmatch(r"[a-z0-9-]+", k) for k in kinds)
    assert all(c.probe for c in CORPUS)
    bombs = [c for c in CORPUS if c.expect == 413]
    assert len(bombs) >= 10 and max(len(c.data) for c in bombs) < 2 << 20  # bombs are small on disk
    assert sum(len(c.data) for c in CORPUS) < 24 << 20


@pytest.mark.parametrize("case", CORPUS, ids=[c.kind for c in CORPUS])
def test_hostile_input_is_refused_in_one_clear_line(case):
    started = time.perf_counter()
    with pytest.raises(InputError) as info:  # any other exception type fails the test
        decode_image(case.data, case.filename)
    assert time.perf_counter() - started < 1.5, "refused from the header, not after decoding"
    err = info.value
    message = str(err)
    assert message.isprintable() and "\n" not in message, "one printable line"
    assert not TRACEBACK_TEXT.search(message), message
    assert len(message) < 600
    assert message == f"{err.shown_path}: {err.reason}"
    assert err.shown_path == (printable(case.filename, 240) if case.filename else "<unnamed file>")
    assert _input_status(err) == case.expect, f"{case.kind} ({case.probe}): {err.reason}"


@pytest.mark.parametrize("kind", ["name-nul-byte", "name-newline", "name-ansi-escape", "name-rtl-override",
                                  "name-5000-chars", "name-unicode"])
def test_a_hostile_file_name_is_shown_safely(kind):
    case = next(c for c in CORPUS if c.kind == kind)
    with pytest.raises(InputError) as info:
        decode_image(case.data, case.filename)
    shown = info.value.shown_path
    assert shown.isprintable() and len(shown) <= 240 and "\x1b" not in shown and "\u202e" not in shown
    assert info.value.path == case.filename  # the name itself is kept as given, for whoever needs it
    if kind == "name-unicode":
        assert shown == case.filename  # printable unicode is not escaped
    if kind == "name-rtl-override":
        assert shown == "scan\\u202egnp.exe"


def test_a_file_without_a_name_is_still_named():
    with pytest.raises(InputError) as info:  # an empty label (HTTP cannot carry filename="" as an upload)
        decode_image(b"\x89PNG\r\n\x1a\n", "")
    assert str(info.value).startswith("<unnamed file>: corrupt")


@pytest.mark.parametrize("case", TOLERATED, ids=[c.kind for c in TOLERATED])
def test_odd_but_usable_input_decodes(case):
    image = decode_image(case.data, case.filename)
    assert image.pixels.dtype == np.float32 and np.isfinite(image.pixels).all()
    assert 0 <= image.pixels.min() and image.pixels.max() <= 1 and image.pixels.std() > 0.01
    assert min(image.pixels.shape[:2]) >= MIN_SIDE


@pytest.mark.parametrize("width", ["0", "-400", "0.5"])
def test_an_invalid_dicom_window_is_ignored_like_a_viewer_does(width):
    """WindowWidth must be >= 1 (PS3.3 C.11.2.1.2); a file that breaks this is shown by its value range,
    exactly as if it had no window, and the result says why."""
    plain = decode_image(dicom(), "plain.dcm")
    odd = decode_image(dicom(WindowCenter="2000", WindowWidth=width), "odd.dcm")
    np.testing.assert_array_equal(odd.pixels, plain.pixels)
    assert plain.meta["window"] == "value range"
    assert odd.meta["window"].startswith("value range (the file's VOI is unusable: window width")
    valid = decode_image(dicom(WindowCenter="2000", WindowWidth="1000"), "valid.dcm")
    assert valid.meta["window"] == "file VOI" and float(valid.pixels[0, 0]) == 0.0  # a valid window still applies


def test_one_pixel_limit_for_the_command_line_and_the_service():
    assert MAX_PIXELS == 50_000_000
    assert inspect.signature(decode_image).parameters["max_pixels"].default == MAX_PIXELS
    assert inspect.signature(read_image).parameters["max_pixels"].default == MAX_PIXELS
    # The service's default is the same constant (chestdx.serve.app imports it).
    assert ServiceSettings.__dataclass_fields__["max_pixels"].default == MAX_PIXELS


def test_the_pixel_limit_is_exact_and_read_from_the_header():
    check_size("x.png", "PNG", 10_000, 5_000, MAX_PIXELS)  # exactly the limit: accepted
    with pytest.raises(InputError, match="too large"):
        check_size("x.png", "PNG", 10_000, 5_001, MAX_PIXELS)
    # 50 Mpx declared, 1 kB of pixel data: refused from IHDR under a lower limit, before anything inflates.
    with pytest.raises(InputError, match=r"10000x5000 pixels, too large \(limit 49,999,999 pixels\)"):
        decode_image(raw_png(10_000, 5_000, idat=b"x" * 1000), "big.png", max_pixels=MAX_PIXELS - 1)


def test_unsupported_formats_are_named_and_documented_ones_are_not_refused():
    for kind, what in [("tiff-small-valid", "a TIFF file"), ("bmp-small-valid", "a BMP file"), ("gif", "a GIF file"),
                       ("webp", "a WebP file"), ("jpeg2000-codestream", "a JPEG 2000 codestream")]:
        case = next(c for c in CORPUS if c.kind == kind)
        with pytest.raises(InputError) as info:
            decode_image(case.data, case.filename)
        assert info.value.reason == f"not a supported image: expected PNG, JPEG or DICOM (this is {what})"


# ----------------------------------------------------------------------------- the command line

CHESTDX = [sys.executable, "-m", "chestdx.cli"]
MARKUP_KINDS = {"name-rich-markup"}  # see test_cli_survives_console_markup_in_a_file_name


def _disk_name(index: int, case) -> str:
    """The case's own name where a file system can hold it, else one made from its kind."""
    name = case.filename
    suffix = os.path.splitext(name)[1] if "/" not in name and "\0" not in name else ".png"
    if case.kind.startswith("name-") and name and "/" not in name and "\0" not in name:
        return name if len(name.encode()) <= 200 else name[:200] + suffix
    return f"{index:03d}-{case.kind}{suffix if len(suffix) <= 8 else ''}"


def _run_predict(args, home, timeout=600):
    env = dict(os.environ, CHESTDX_HOME=str(home))
    return subprocess.run(CHESTDX + ["predict", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_cli_predict_reports_each_hostile_file_in_one_line(tmp_path, tiny_models_dir):
    from chestdx.inference import IMAGE_SUFFIXES

    folder = tmp_path / "hostile"
    folder.mkdir()
    files = {}
    for i, case in enumerate(CORPUS):
        if case.kind in MARKUP_KINDS:
            continue
        path = folder / _disk_name(i, case)
        assert path.parent == folder and path not in files
        path.write_bytes(case.data)
        files[path] = case
    # A folder is scanned for image extensions; files with others are named on the command line.
    others = sorted(p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES)
    proc = _run_predict([folder, *others, "--checkpoint", tiny_models_dir / "ladnn-tiny.pt"], tmp_path / "home")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]  # the CLI's status when any input failed
    assert "Traceback" not in output
    assert proc.stdout.strip() == ""  # no predictions: every file was refused
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == len(files), "\n".join(lines[:20])
    for path, case in files.items():
        shown = InputError(str(path), "").shown_path
        mine = [line for line in lines if line.startswith(f"error: {shown}: ")]
        assert len(mine) == 1, (case.kind, mine)
        with pytest.raises(InputError) as info:
            decode_image(case.data, str(path))
        assert mine[0] == f"error: {shown}: {info.value.reason}"  # what the reader said, nothing more


def test_cli_survives_console_markup_in_a_file_name(tmp_path, tiny_models_dir):
    case = next(c for c in CORPUS if c.kind == "name-rich-markup")
    folder = tmp_path / "["  # a folder '[' holding 'red]scan.png': the path reads '.../[/red]scan.png'
    folder.mkdir()
    paths = [folder / "red][bold]scan.png", tmp_path / "[bold]scan.png"]
    for path in paths:
        path.write_bytes(case.data)
    proc = _run_predict([*paths, "--checkpoint", tiny_models_dir / "ladnn-tiny.pt"], tmp_path / "home")
    assert "Traceback" not in proc.stderr and proc.returncode == 2
    reason = _reason(case.data)
    assert proc.stderr.splitlines() == [f"error: {path}: {reason}" for path in paths]


def _reason(data: bytes) -> str:
    with pytest.raises(InputError) as info:
        decode_image(data, "x")
    return info.value.reason
