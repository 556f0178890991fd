import io

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from chestdx.data.io import read_image, sniff_format
from chestdx.errors import InputError


def make_dicom(path, pixels: np.ndarray, photometric="MONOCHROME2", slope=1.0, intercept=0.0, window=None,
               modality="CT"):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName, ds.PatientID = modality, "Test^Patient", "P001"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def ramp(h=32, w=40, hi=4000):
    return np.tile(np.linspace(0, hi, w), (h, 1)).astype(np.uint16)


def test_dicom_monochrome2_is_scaled_to_unit_range(tmp_path):
    img = read_image(make_dicom(tmp_path / "a.dcm", ramp()))
    assert img.meta["format"] == "dicom" and img.pixels.shape == (32, 40)
    assert img.pixels[0, 0] == pytest.approx(0) and img.pixels[0, -1] == pytest.approx(1)
    assert np.all(np.diff(img.pixels[0]) >= 0)  # brightness increases left to right


def test_dicom_monochrome1_is_inverted(tmp_path):
    m2 = read_image(make_dicom(tmp_path / "m2.dcm", ramp())).pixels
    m1 = read_image(make_dicom(tmp_path / "m1.dcm", ramp(), photometric="MONOCHROME1")).pixels
    np.testing.assert_allclose(m1, 1 - m2, atol=1e-6)


def test_dicom_window_clips_to_the_window(tmp_path):
    # Rescale to HU (-1024 offset) and a lung-ish window centred at 0 HU, width 1000: values
    # below -500 HU map to 0, above +500 to 1.
    raw = ramp(hi=2048)
    img = read_image(make_dicom(tmp_path / "w.dcm", raw, intercept=-1024, window=(0, 1000))).pixels
    hu = raw.astype(float) - 1024
    assert np.all(img[:, hu[0] < -510] == pytest.approx(0, abs=1e-6))
    assert np.all(img[:, hu[0] > 510] == pytest.approx(1, abs=1e-6))
    mid = (hu[0] > -400) & (hu[0] < 400)
    assert np.all((img[0, mid] > 0.05) & (img[0, mid] < 0.95))


def test_dicom_without_pixel_data_is_a_clear_error(tmp_path):
    path = make_dicom(tmp_path / "n.dcm", ramp())
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    with pytest.raises(InputError, match="no pixel data"):
        read_image(path)


def test_16bit_png_keeps_its_dynamic_range(tmp_path):
    data = (np.arange(32 * 40).reshape(32, 40) * 46).astype(np.uint16)  # 1280 levels up to 58834
    path = tmp_path / "x16.png"
    import cv2

    assert cv2.imwrite(str(path), data)  # OpenCV writes genuine 16-bit greyscale PNGs
    img = read_image(path)
    assert img.meta["bits"] == 16
    assert img.pixels.min() == 0 and img.pixels.max() == pytest.approx(1)
    assert len(np.unique(img.pixels)) > 256  # more levels than 8 bits could hold


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P"])
def test_8bit_modes_read_as_grey_with_the_same_content(tmp_path, mode):
    grey = (ramp(hi=255)).astype(np.uint8)
    base = Image.fromarray(grey)
    img = base.convert(mode)
    path = tmp_path / f"x_{mode}.png"
    img.save(path)
    out = read_image(path).to_gray()
    np.testing.assert_allclose(out, grey / 255.0, atol=2 / 255)


def test_format_is_chosen_by_content_not_extension(tmp_path):
    path = tmp_path / "really_a_png.dcm"
    Image.fromarray(ramp(hi=255).astype(np.uint8)).save(path, format="PNG")
    assert read_image(path).meta["format"] == "png"
    assert sniff_format(b"\xff\xd8\xff\xe0") == "jpeg"


@pytest.mark.parametrize("content,message", [
    (b"", "empty file"),
    (b"patient_id,label\n1,covid\n", "not a supported image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20, "corrupt"),
])
def test_bad_files_raise_input_error_naming_the_file(tmp_path, content, message):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message) as info:
        read_image(path)
    assert str(path) in str(info.value)


def test_truncated_jpeg_and_tiny_image(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(buf, format="JPEG")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    with pytest.raises(InputError, match="corrupt or truncated"):
        read_image(truncated)
    tiny = tmp_path / "tiny.png"
    Image.new("L", (1, 1)).save(tiny)
    with pytest.raises(InputError, match="1x1 pixels, too small"):
        read_image(tiny)


@pytest.mark.parametrize("stem", ["RG1", "RG3"])
def test_real_radiographs_decode_the_same_across_transfer_syntaxes(pydicom_data_dir, stem):
    """pydicom-data's CR radiographs (MONOCHROME1): uncompressed, J2K lossless, J2K lossy."""
    ref = read_image(pydicom_data_dir / f"{stem}_UNCR.dcm")
    assert ref.meta["photometric"] == "MONOCHROME1"
    lossless = read_image(pydicom_data_dir / f"{stem}_J2KR.dcm")
    np.testing.assert_allclose(lossless.pixels, ref.pixels, atol=1e-6)
    lossy = read_image(pydicom_data_dir / f"{stem}_J2KI.dcm")
    assert np.corrcoef(lossy.pixels.ravel(), ref.pixels.ravel())[0, 1] > 0.99
    assert "JPEG 2000" not in str(ref.meta["transfer_syntax"])


def test_monochrome1_radiograph_has_dark_lungs(pydicom_data_dir):
    """After inversion a chest radiograph shows bone and mediastinum brighter than the air outside."""
    raw = pydicom.dcmread(pydicom_data_dir / "RG1_UNCR.dcm").pixel_array.astype(float)
    img = read_image(pydicom_data_dir / "RG1_UNCR.dcm").pixels
    # MONOCHROME1: high stored values are dark, so the correlation with the raw values is negative.
    assert np.corrcoef(img.ravel()[::97], raw.ravel()[::97])[0, 1] < -0.99


@pytest.mark.parametrize("name", ["693_J2KR.dcm", "JPEG-LL.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm",
                                  "emri_small_jpeg_ls_lossless.dcm", "OBXXXX1A_rle.dcm", "SC_rgb.dcm",
                                  "US1_J2KR.dcm", "SC_ybr_full_uncompressed.dcm"])
def test_transfer_syntaxes_decode(pydicom_data_dir, name):
    img = read_image(pydicom_data_dir / name)
    assert img.pixels.dtype == np.float32
    assert 0 <= img.pixels.min() and img.pixels.max() <= 1 and img.pixels.std() > 0.01


def test_lossless_ct_matches_uncompressed(pydicom_data_dir):
    a = read_image(pydicom_data_dir / "693_UNCR.dcm").pixels
    b = read_image(pydicom_data_dir / "693_J2KR.dcm").pixels
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_ct_dicom_takes_the_models_hu_window_not_the_files_voi(tmp_path, tiny_models_dir):
    # Lung tissue (-800 HU) with the file's mediastinal VOI (50 / 350) is black; the model's lung
    # window (-600 / 1500) puts it at (-800 + 1350) / 1500, whatever the file says.
    hu = np.full((32, 40), -800.0)
    hu[:, 20:] = 40.0  # soft tissue
    path = make_dicom(tmp_path / "m.dcm", (hu + 1024).astype(np.uint16), intercept=-1024, window=(50, 350))
    voi = read_image(path)
    assert voi.meta["window"] == "file VOI" and float(voi.pixels[:, :20].max()) == pytest.approx(0, abs=1e-6)
    lung = read_image(path, hu_window=(-600, 1500))
    assert lung.meta["window"] == "model HU window -600/1500"
    np.testing.assert_allclose(lung.pixels[:, :20], 550 / 1500, atol=1e-6)
    np.testing.assert_allclose(lung.pixels[:, 20:], 1390 / 1500, atol=1e-6)
    cr = tmp_path / "cr.dcm"  # not CT: no Hounsfield units, so the file's own window stays
    make_dicom(cr, (hu + 1024).astype(np.uint16), intercept=-1024, window=(50, 350))
    import pydicom

    ds = pydicom.dcmread(cr)
    ds.Modality = "CR"
    ds.save_as(cr)
    assert read_image(cr, hu_window=(-600, 1500)).meta["window"] == "file VOI"
    # The model's bundle carries the window: prediction from the DICOM = prediction from its lung-windowed pixels.
    from chestdx.inference import Predictor

    predictor = Predictor(tiny_models_dir / "ladnn-tiny.pt")
    assert predictor.hu_window == [-600, 1500]
    # With texture: two flat regions alone are refused before the model as a posterised picture.
    textured = hu + np.random.default_rng(0).normal(0, 40, hu.shape)
    path = make_dicom(tmp_path / "t.dcm", np.clip(textured + 1024, 0, None).astype(np.uint16), intercept=-1024,
                      window=(50, 350))
    voi, lung = read_image(path), read_image(path, hu_window=(-600, 1500))
    from_file = predictor.predict_source(path)["probabilities"]["covid"]
    direct = predictor.predict_tensor(predictor.preprocess(lung.pixels))["diagnosis"][0]
    assert from_file == pytest.approx(float(direct), abs=1e-6)
    assert from_file != pytest.approx(float(predictor.predict_tensor(predictor.preprocess(voi.pixels))["diagnosis"][0]),
                                      abs=1e-6)


def test_covid_ct_md_lung_parenchyma_is_mid_range_in_the_lung_window():
    import pandas as pd
    import pydicom
    from pydicom.pixels import apply_modality_lut

    from tests.conftest import _real_dataset

    folder = _real_dataset("covid-ct-md")
    slices = pd.read_csv(folder / "slices.csv")
    row = slices[(slices["series"] == "images/covid/P001") & (slices["slice_index"] == 74)].iloc[0]
    path = folder / row["series"] / row["file"]
    ds = pydicom.dcmread(path)
    hu = apply_modality_lut(ds.pixel_array, ds)
    lung = (hu > -950) & (hu < -700)  # aerated parenchyma
    assert lung.mean() > 0.1
    voi = read_image(path).pixels  # the file's mediastinal window: the lungs are black
    assert float(np.median(voi[lung])) < 0.01
    windowed = read_image(path, hu_window=(-600, 1500)).pixels
    assert 0.25 < float(np.median(windowed[lung])) < 0.45  # (-850 + 1350) / 1500 = 0.33
