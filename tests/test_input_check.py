"""The check before the model: blank, colour, wrong-modality and far-from-training inputs are
refused with a reason; real chest images pass."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from chestdx.data.input_check import (NOT_CHEST, REFERENCE_KEY, UNFAMILIAR, NotAChestImage, add_input_reference,
                                      check_input, fit_reference, input_reference, manifest_images, measure,
                                      reference_distance)
from chestdx.data.io import LoadedImage, decode_image, read_image
from chestdx.errors import InputError


def _png(arr: np.ndarray, name: str) -> LoadedImage:
    """An array through a PNG file and chestdx's reader, as an upload would arrive."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return decode_image(buf.getvalue(), name)


def _photo(name: str, grey: bool = False) -> LoadedImage:
    import skimage.data

    arr = getattr(skimage.data, name)()
    if grey:
        arr = np.asarray(Image.fromarray(arr).convert("L"))
    return _png(arr, f"{name}{' (grey)' if grey else ''}.png")


def _refused(image, reference=None, modality="CT") -> NotAChestImage:
    with pytest.raises(NotAChestImage) as info:
        check_input(image, reference, modality)
    # far from the training images is not "not a chest image": a chest CT of another hospital can be
    assert (UNFAMILIAR if info.value.rule == "statistics" else NOT_CHEST) in info.value.reason
    assert (NOT_CHEST in info.value.reason) == (info.value.rule != "statistics")
    return info.value


@pytest.fixture(scope="module")
def ct_manifest():
    from chestdx.data.datasets import get_dataset

    info = get_dataset("covid-ct")
    if not info.present():
        pytest.skip("covid-ct not found (set CHESTDX_DATA)")
    return info.manifest()


@pytest.fixture(scope="module")
def ct_reference(ct_manifest) -> dict:
    """A reference of 40 covid-ct training images (a fixed random draw; folds by patient)."""
    images, patients = manifest_images(ct_manifest, "train", max_images=40, seed=0)
    return fit_reference(images, modality="CT", groups=patients)


@pytest.fixture(scope="module")
def ct_test_images(ct_manifest) -> list:
    return manifest_images(ct_manifest, "test", max_images=20, seed=0)[0]


BLANKS = {
    "all-black 16-bit": np.zeros((256, 256), np.uint16),
    "all-black 8-bit": np.zeros((256, 256), np.uint8),
    "constant grey": np.full((256, 256), 128, np.uint8),
    "white": np.full((256, 256), 255, np.uint8),
    "constant 16-bit": np.full((256, 256), 1000, np.uint16),
}


def test_reference_accepts_real_ct_test_images(ct_reference, ct_test_images):
    accepted = 0
    for image in ct_test_images:
        try:
            check_input(image, ct_reference, "CT")
            accepted += 1
        except NotAChestImage:
            pass
    assert len(ct_test_images) == 20
    assert accepted >= 19


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
def test_reference_refuses_photographs_in_colour_and_in_grey(ct_reference, name):
    assert _refused(_photo(name), ct_reference).rule == "colour"
    grey = _refused(_photo(name, grey=True), ct_reference)
    assert grey.rule == "statistics"
    assert grey.details["distance"] > grey.details["limit"]
    assert "far outside the CT slices this model was trained on" in grey.reason


def test_unfamiliar_images_measured_instead_of_refused_when_asked(ct_reference, ct_test_images):
    grey = _refused(_photo("astronaut", grey=True), ct_reference)
    measured = check_input(_photo("astronaut", grey=True), ct_reference, "CT", refuse_unfamiliar=False)
    assert measured["unfamiliar"] and measured["distance"] == pytest.approx(grey.details["distance"])
    assert measured["distance"] > measured["limit"] == pytest.approx(ct_reference["limit"])
    passed = [check_input(image, ct_reference, "CT", refuse_unfamiliar=False) for image in ct_test_images]
    assert all(d["limit"] == pytest.approx(ct_reference["limit"]) for d in passed)
    assert sum(d["unfamiliar"] for d in passed) <= 1  # as the refusals of the test above
    for image, d in zip(ct_test_images, passed):  # marked exactly where the default check refuses
        try:
            check_input(image, ct_reference, "CT")
            assert not d["unfamiliar"]
        except NotAChestImage as err:
            assert d["unfamiliar"] and err.details["distance"] == pytest.approx(d["distance"])
    # the rules that need only the image still refuse, and without a reference nothing is measured
    with pytest.raises(NotAChestImage, match="looks blank"):
        check_input(_png(BLANKS["white"], "white.png"), ct_reference, "CT", refuse_unfamiliar=False)
    assert check_input(ct_test_images[0], None, "CT") is None


def test_reference_refuses_blanks_and_noise(ct_reference):
    for name, arr in BLANKS.items():
        assert _refused(_png(arr, name), ct_reference).rule == "blank", name
    noise = np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8)
    assert _refused(_png(noise, "noise.png"), ct_reference).rule == "statistics"
    noise16 = np.random.default_rng(1).integers(0, 65536, (256, 256), dtype=np.uint16)
    assert _refused(_png(noise16, "noise16.png"), ct_reference).rule == "statistics"


def test_all_black_16_bit_reason_is_clear():
    err = _refused(_png(BLANKS["all-black 16-bit"], "black16.png"))
    assert err.reason == f"looks blank (constant intensity): {NOT_CHEST}"
    assert isinstance(err, InputError)  # callers that handle InputError keep working
    assert str(err).startswith("black16.png: ")


def test_rules_without_reference_refuse_blanks_and_photos(ct_test_images):
    for name, arr in BLANKS.items():
        assert _refused(_png(arr, name)).rule == "blank", name
    near = (128 + np.random.default_rng(0).integers(-1, 2, (256, 256))).astype(np.uint8)
    assert _refused(_png(near, "near.png")).rule == "near_constant"
    dot = np.zeros((256, 256), np.uint8)
    dot[120:130, 120:130] = 255
    assert _refused(_png(dot, "dot.png")).rule == "near_constant"
    board = (((np.arange(256)[:, None] // 32 + np.arange(256) // 32) % 2) * 255).astype(np.uint8)
    assert _refused(_png(board, "board.png")).rule == "levels"
    ramp = np.tile(np.linspace(0, 255, 256), (256, 1)).round().astype(np.uint8)
    assert _refused(_png(ramp, "ramp.png")).rule == "smooth"
    for name in ("astronaut", "coffee", "chelsea"):
        err = _refused(_photo(name))
        assert err.rule == "colour" and "not a CT slice" in err.reason
    assert "not a radiograph" in _refused(_photo("coffee"), modality="CXR").reason
    for image in ct_test_images[:5]:
        check_input(image, None, "CT")  # real CT slices pass


def test_grey_stored_as_rgb_and_small_coloured_marks_pass(ct_test_images):
    grey = np.round(ct_test_images[0].to_gray() * 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    check_input(_png(rgb, "rgb.png"), None, "CT")  # RGB with equal channels
    marked = rgb.copy()
    h, w = grey.shape
    marked[h // 4:h // 4 + 4, w // 4:3 * w // 4] = (255, 0, 0)  # a red arrow-like bar and a box outline
    marked[h // 2:h // 2 + 3 * h // 10, w // 2:w // 2 + 3] = (0, 255, 255)
    check_input(_png(marked, "marked.png"), None, "CT")


def test_real_ct_figure_with_coloured_boxes_passes(ct_manifest):
    """The covid-ct image with the most colour: boxes drawn by the source paper's authors."""
    path = ct_manifest.root / "images/covid/2020.02.25.20021568-p24-111%0.png"
    if not path.exists():
        pytest.skip("image not in this copy of covid-ct")
    image = read_image(path)
    assert 0.1 < measure(image.pixels, image.meta)["colour_fraction"] < 0.3
    check_input(image, None, "CT")


def _dicom_like(image: LoadedImage, modality: str) -> LoadedImage:
    return LoadedImage(image.pixels, {**image.meta, "format": "dicom", "modality": modality, "path": "x.dcm"})


def test_dicom_modality_rule(ct_test_images):
    ct = ct_test_images[0]
    err = _refused(_dicom_like(ct, "MR"), modality="CT")
    assert err.rule == "modality"
    assert err.reason.startswith("DICOM modality MR; this model reads CT")
    for ok in ("CT", "", "OT", "SC"):
        check_input(_dicom_like(ct, ok), None, "CT")
    for ok in ("CR", "DX"):
        check_input(_dicom_like(ct, ok), None, "CXR")
    assert "this model reads CR/DX" in _refused(_dicom_like(ct, "CT"), modality="CXR").reason
    assert _refused(_dicom_like(ct, "US"), modality="CXR").rule == "modality"
    check_input(_dicom_like(ct, "MR"), None, None)  # a model of unknown modality: no modality rule
    # PNG files carry no modality
    check_input(LoadedImage(ct.pixels, {**ct.meta, "modality": "MR"}), None, "CT")


def test_real_dicom_files(pydicom_data_dir):
    mr = read_image(pydicom_data_dir / "MR2_UNCR.dcm")
    assert _refused(mr, modality="CT").rule == "modality"
    us = read_image(pydicom_data_dir / "US1_UNCR.dcm")
    assert _refused(us, modality="CXR").rule == "modality"
    cr = read_image(pydicom_data_dir / "RG1_UNCR.dcm")  # a chest CR (MONOCHROME1)
    check_input(cr, None, "CXR")
    assert _refused(cr, modality="CT").rule == "modality"
    # A head CT: Modality CT, no BodyPartExamined; the rules without a reference cannot tell.
    head = read_image(pydicom_data_dir / "693_UNCR.dcm", hu_window=[-600, 1500])
    check_input(head, None, "CT")


def test_dicom_body_part_rule(ct_test_images):
    ct = ct_test_images[0]
    for part in ("EXTREMITY", "HEAD", "KNEE"):
        image = LoadedImage(ct.pixels, {**ct.meta, "format": "dicom", "modality": "CT", "body_part": part})
        err = _refused(image)
        assert err.rule == "body_part" and f"DICOM body part {part}" in err.reason
    for part in ("CHEST", "THORAX", "PORT CHEST", "LUNG", "", None):
        check_input(LoadedImage(ct.pixels, {**ct.meta, "format": "dicom", "modality": "CT", "body_part": part}),
                    None, "CT")


def test_reference_is_small_json_and_refuses_few_training_images(ct_reference):
    text = json.dumps(ct_reference)
    assert json.loads(text) == ct_reference
    assert len(text) < 60_000
    assert ct_reference["modality"] == "CT" and ct_reference["n_images"] == 40 and ct_reference["grouped"]
    assert ct_reference["limit"] <= ct_reference["limit_empirical"]
    assert ct_reference["oof_refused"] <= 1  # out of fold, 1 of 40 at most


def test_reference_survives_bundle_round_trip(ct_reference, tiny_models_dir, tmp_path, ct_test_images):
    import shutil

    from chestdx.models.bundle import load_bundle

    path = tmp_path / "model.pt"
    shutil.copy(tiny_models_dir / "ladnn-tiny.pt", path)
    _, before = load_bundle(path)
    assert input_reference(before) is None
    add_input_reference(path, reference=ct_reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temporary file left
    _, bundle = load_bundle(path)
    assert bundle[REFERENCE_KEY] == ct_reference
    assert input_reference(bundle) == ct_reference
    assert bundle["modality"] == "CT"
    assert bundle["thresholds"] == before["thresholds"]
    image = ct_test_images[0]
    assert reference_distance(image, input_reference(bundle)) == reference_distance(image, ct_reference)
    _refused(_photo("astronaut", grey=True), input_reference(bundle), bundle["modality"])


def test_fit_reference_from_images_in_bundle(tiny_models_dir, tmp_path, ct_manifest):
    import shutil

    from chestdx.models.bundle import load_bundle

    path = tmp_path / "model.pt"
    shutil.copy(tiny_models_dir / "ladnn-tiny.pt", path)
    images, patients = manifest_images(ct_manifest, "train", max_images=12, seed=1)
    ref = add_input_reference(path, images, groups=patients)
    assert ref["modality"] == "CT" and ref["n_images"] == 12  # the bundle's modality
    assert load_bundle(path)[1][REFERENCE_KEY] == ref
    with pytest.raises(ValueError, match="at least 10 images"):
        fit_reference(images[:5])
