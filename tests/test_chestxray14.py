"""The full NIH ChestX-ray14 release, on a tiny fake release written with the real file formats."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chestdx.data.chestxray14 import ChestXray14Release, data_entry_csv, find_images
from chestdx.data.cxr14_labels import CXR14_LABELS, NIH_LABELS, NO_FINDING
from chestdx.errors import ChestDxError
from chestdx.tasks import Head

HEADER_2017 = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
               "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
HEADER_V2020 = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                "OriginalImageWidth,OriginalImageHeight,OriginalImagePixelSpacing_x,OriginalImagePixelSpacing_y")
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"

N_TRAIN_VAL_PATIENTS = 24  # patients 1..24: train_val_list.txt; 25..28: test_list.txt
N_PATIENTS = 28
FINDINGS = {  # hand-written findings of a few images; the rest cycle through _CYCLE
    "00000001_000.png": "Cardiomegaly|Effusion",
    "00000001_001.png": "No Finding",
    "00000002_000.png": "Infiltration|Mass|Nodule",
    "00000025_000.png": "Hernia",
}
_CYCLE = ["No Finding", "Atelectasis", "Pneumothorax|Edema", "No Finding", "Pleural_Thickening"]


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16), 128, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _rows():
    """(image, findings, patient) for 2 images per patient."""
    rows, k = [], 0
    for patient in range(1, N_PATIENTS + 1):
        for follow in range(2):
            image = f"{patient:08d}_{follow:03d}.png"
            if image not in FINDINGS:
                FINDINGS.setdefault(image, _CYCLE[k % len(_CYCLE)])
                k += 1
            rows.append((image, FINDINGS[image], patient, follow))
    return rows


def write_fake_release(root: Path, variant: str = "2017", layout: str = "nested", rows=None,
                       train_val=None, test=None, images=None, bbox: bool = True) -> Path:
    """A ChestX-ray14 folder under `root` as NIH ships it; returns the folder."""
    folder = root / "chestx-ray14"
    folder.mkdir(parents=True, exist_ok=True)
    rows = _rows() if rows is None else rows
    if variant == "2017":
        lines = [HEADER_2017] + [f"{im},{f},{fu},{p},{40 + p:03d}Y,M,PA,2500,2048,0.168,0.168,"
                                 for im, f, p, fu in rows]
        name = "Data_Entry_2017.csv"
    else:
        lines = [HEADER_V2020] + [f"{im},{f},{fu},{p},{40 + p},F,AP,2500,2048,0.168,0.168"
                                  for im, f, p, fu in rows]
        name = "Data_Entry_2017_v2020.csv"
    (folder / name).write_text("\n".join(lines) + "\n")
    tv = [im for im, _, p, _ in rows if p <= N_TRAIN_VAL_PATIENTS] if train_val is None else train_val
    te = [im for im, _, p, _ in rows if p > N_TRAIN_VAL_PATIENTS] if test is None else test
    (folder / "train_val_list.txt").write_text("\n".join(tv) + "\n")
    (folder / "test_list.txt").write_text("\n".join(te) + "\n")
    if bbox:
        (folder / "BBox_List_2017.csv").write_text("\n".join([
            BBOX_HEADER,
            "00000001_000.png,Cardiomegaly,225.084745762712,547.019216763771,86.7796610169491,79.1864406779661,,,",
            "00000002_000.png,Infiltrate,10.5,20,300,400.25,,,",
            "00000025_000.png,Hernia,1,2,3,4,,,",
        ]) + "\n")
    png = _png_bytes()
    names = [im for im, *_ in rows] if images is None else images
    for i, im in enumerate(names):
        if layout == "nested":  # images_001.tar.gz extracts to images_001/images/
            sub = folder / f"images_{1 + i % 2:03d}" / "images"
        elif layout == "flat":
            sub = folder / "images"
        else:
            sub = folder / f"images_{1 + i % 2:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / im).write_bytes(png)
    return folder


@pytest.fixture
def release(tmp_path, monkeypatch):
    monkeypatch.setenv("CHESTDX_DATA", str(tmp_path))
    return write_fake_release(tmp_path)


def _by_image(m):
    frame = m.frame.copy()
    frame.index = frame["path"].str.rsplit("/", n=1).str[-1]
    return frame


def test_official_split_is_kept_and_val_is_whole_patients(release):
    m = ChestXray14Release().manifest()
    frame = _by_image(m)
    assert len(m) == 2 * N_PATIENTS
    test_list = set((release / "test_list.txt").read_text().split())
    train_val = set((release / "train_val_list.txt").read_text().split())
    assert set(frame.index[frame["split"] == "test"]) == test_list
    assert set(frame.loc[sorted(train_val), "split"]) == {"train", "val"}
    assert frame.groupby("patient_id")["split"].nunique().max() == 1
    val_patients = set(frame.loc[frame["split"] == "val", "patient_id"])
    assert len(val_patients) == round(N_TRAIN_VAL_PATIENTS / 8) == 3
    assert val_patients <= {str(p) for p in range(1, N_TRAIN_VAL_PATIENTS + 1)}
    # deterministic (seed 0), and another seed picks other patients
    again = _by_image(ChestXray14Release().manifest())
    assert (again["split"] == frame["split"]).all()
    other = _by_image(ChestXray14Release(seed=1).manifest())
    assert set(other.loc[other["split"] == "val", "patient_id"]) != val_patients


def test_manifest_columns_and_labels(release):
    m = ChestXray14Release().manifest()
    assert m.classes == ("normal", "abnormal")
    assert m.extra_labels == CXR14_LABELS
    assert m.root == release
    frame = _by_image(m)
    assert frame.loc["00000001_000.png", "path"] == "images_001/images/00000001_000.png"
    assert frame.loc["00000001_001.png", "path"] == "images_002/images/00000001_001.png"
    assert all((release / p).is_file() for p in frame["path"])
    assert frame.loc["00000001_000.png", "patient_id"] == "1"
    assert frame.loc["00000025_000.png", "patient_id"] == "25"
    assert set(frame["source"]) == {"nih"}
    assert set(frame["view"]) == {"PA"}
    assert frame.loc["00000001_000.png", "orig_width"] == 2500
    assert frame.loc["00000003_000.png", "age"] == 43

    multi = frame.loc["00000001_000.png"]
    assert multi["Cardiomegaly"] == 1 and multi["Effusion"] == 1 and multi[NO_FINDING] == 0
    assert sum(multi[c] for c in NIH_LABELS) == 2
    assert multi["label"] == "abnormal"
    normal = frame.loc["00000001_001.png"]
    assert all(normal[c] == 0 for c in NIH_LABELS) and normal[NO_FINDING] == 1
    assert normal["label"] == "normal"
    three = frame.loc["00000002_000.png"]
    assert {c for c in NIH_LABELS if three[c] == 1} == {"Infiltration", "Mass", "Nodule"}
    assert frame.loc["00000025_000.png", "Hernia"] == 1
    # every row: No Finding iff no disease, label agrees, values are ints 0/1
    diseases = frame[list(NIH_LABELS)].to_numpy()
    assert set(np.unique(frame[list(CXR14_LABELS)].to_numpy())) == {0, 1}
    assert ((diseases.sum(1) == 0) == (frame[NO_FINDING] == 1)).all()
    assert ((frame["label"] == "normal") == (frame[NO_FINDING] == 1)).all()
    expected_normal = sum(f == "No Finding" for f in FINDINGS.values())
    assert (frame["label"] == "normal").sum() == expected_normal


def test_head_targets_multilabel(release):
    m = ChestXray14Release().manifest()
    values, known = m.head_targets(Head("x", "multilabel", CXR14_LABELS, output="x"))
    assert values.shape == known.shape == (len(m), 15)
    assert known.all()
    row = m.frame.index[m.frame["path"].str.endswith("00000001_000.png")][0]
    expected = np.zeros(15, np.float32)
    expected[[CXR14_LABELS.index("Cardiomegaly"), CXR14_LABELS.index("Effusion")]] = 1
    np.testing.assert_array_equal(values[row], expected)


def test_v2020_header_flat_layout_and_preference(tmp_path, monkeypatch):
    monkeypatch.setenv("CHESTDX_DATA", str(tmp_path))
    old = write_fake_release(tmp_path / "old")
    folder = write_fake_release(tmp_path, variant="v2020", layout="flat")
    # a stale 2017 file next to the v2020 one: the v2020 one wins (its views are AP)
    (folder / "Data_Entry_2017.csv").write_text((old / "Data_Entry_2017.csv").read_text().replace(",PA,", ",LL,"))
    assert data_entry_csv(folder).name == "Data_Entry_2017_v2020.csv"
    m = ChestXray14Release().manifest()
    assert set(m.frame["view"]) == {"AP"}
    assert set(m.frame["path"].str.split("/").str[0]) == {"images"}
    assert m.frame.loc[m.frame["path"] == "images/00000001_000.png", "orig_height"].item() == 2048
    # same data, other header: same splits as the 2017 release
    monkeypatch.setenv("CHESTDX_DATA", str(tmp_path / "old"))
    old_frame = _by_image(ChestXray14Release().manifest())
    new_frame = _by_image(m)
    assert (old_frame["split"] == new_frame.loc[old_frame.index, "split"]).all()
    assert (old_frame[list(CXR14_LABELS)] == new_frame.loc[old_frame.index, list(CXR14_LABELS)]).all().all()


def test_images_star_layout_found(tmp_path):
    folder = write_fake_release(tmp_path, layout="shallow")
    found = find_images(folder)
    assert len(found) == 2 * N_PATIENTS
    assert found["00000001_000.png"] == "images_001/00000001_000.png"
    (folder / "notes").mkdir()
    (folder / "notes" / "stray.png").write_bytes(b"")
    assert "stray.png" not in find_images(folder)


def test_boxes(release):
    boxes = ChestXray14Release().boxes()
    assert list(boxes.columns) == ["path", "source", "finding", "x", "y", "w", "h"]
    assert len(boxes) == 3
    assert set(boxes["source"]) == {"nih"}
    infil = boxes[boxes["path"].str.endswith("00000002_000.png")].iloc[0]
    assert infil["finding"] == "Infiltration"
    assert infil["path"] == "images_001/images/00000002_000.png"
    assert (infil["x"], infil["y"], infil["w"], infil["h"]) == (10.5, 20.0, 300.0, 400.25)
    card = boxes.iloc[0]
    assert card["finding"] == "Cardiomegaly"
    assert card["x"] == pytest.approx(225.084745762712)
    assert set(boxes["finding"]) <= set(NIH_LABELS)
    manifest_paths = set(ChestXray14Release().manifest().frame["path"])
    assert set(boxes["path"]) <= manifest_paths


def test_no_boxes_file(tmp_path, monkeypatch):
    monkeypatch.setenv("CHESTDX_DATA", str(tmp_path))
    write_fake_release(tmp_path, bbox=False)
    assert ChestXray14Release().boxes() is None


def test_missing_release_names_folder_and_download(tmp_path, monkeypatch):
    monkeypatch.setenv("CHESTDX_DATA", str(tmp_path))
    ds = ChestXray14Release()
    assert ds.name == "chestx-ray14" and ds.modality == "CXR"
    assert ds.folder() == tmp_path / "chestx-ray14"
    assert not ds.present()
    with pytest.raises(ChestDxError) as err:
        ds.manifest()
    msg = str(err.value)
    assert str(tmp_path / "chestx-ray14") in msg
    assert "https://nihcc.app.box.com/v/ChestXray-NIHCC" in msg and "Download" in msg
    # folder with images but no Data_Entry csv: same error
    folder = write_fake_release(tmp_path)
    assert ds.present()
    (folder / "Data_Entry_2017.csv").unlink()
    assert not ds.present()
    with pytest.raises(ChestDxError, match="not found at"):
        ds.manifest()


def test_missing_split_list(release):
    (release / "test_list.txt").unlink()
    with pytest.raises(ChestDxError, match="test_list.txt"):
        ChestXray14Release().manifest()


def test_patient_in_both_official_lists(tmp_path, monkeypatch):
    monkeypatch.setenv("CHESTDX_DATA", str(tmp_path))
    rows = _rows()
    train_val = [im for im, _, p, _ in rows if p <= N_TRAIN_VAL_PATIENTS] + ["00000025_000.png"]
    test = [im for im, _, p, _ in rows if p > N_TRAIN_VAL_PATIENTS and im != "00000025_000.png"]
    write_fake_release(tmp_path, train_val=train_val, test=test)
    with pytest.raises(ChestDxError, match=r"patient.*25"):
        ChestXray14Release().manifest()


def test_image_in_neither_list(tmp_path, monkeypatch):
    monkeypatch.setenv("CHESTDX_DATA", str(tmp_path))
    rows = _rows()
    train_val = [im for im, _, p, _ in rows if p <= N_TRAIN_VAL_PATIENTS and im != "00000007_001.png"]
    write_fake_release(tmp_path, train_val=train_val)
    with pytest.raises(ChestDxError, match="00000007_001.png"):
        ChestXray14Release().manifest()


def test_unknown_finding_names_image(tmp_path, monkeypatch):
    monkeypatch.setenv("CHESTDX_DATA", str(tmp_path))
    rows = _rows()
    rows[5] = (rows[5][0], "Effusion|Pneumonitis", rows[5][2], rows[5][3])
    write_fake_release(tmp_path, rows=rows)
    with pytest.raises(ChestDxError, match=rf"{rows[5][0]}.*Pneumonitis"):
        ChestXray14Release().manifest()


def test_all_images_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("CHESTDX_DATA", str(tmp_path))
    folder = write_fake_release(tmp_path, images=[])
    with pytest.raises(ChestDxError) as err:
        ChestXray14Release().manifest()
    assert str(folder) in str(err.value) and "images_*.tar.gz" in str(err.value)


def test_some_images_missing_warns_once_and_drops(tmp_path, monkeypatch):
    monkeypatch.setenv("CHESTDX_DATA", str(tmp_path))
    names = [im for im, *_ in _rows()]
    write_fake_release(tmp_path, images=names[5:])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = ChestXray14Release().manifest()
    mine = [w for w in caught if "missing" in str(w.message)]
    assert len(mine) == 1 and "5 of the 56" in str(mine[0].message)
    assert len(m) == len(names) - 5
    assert not m.frame["path"].str.endswith(names[0]).any()
    # the splits of the images present do not change when images are missing
    monkeypatch.setenv("CHESTDX_DATA", str(tmp_path / "full"))
    write_fake_release(tmp_path / "full")
    full = _by_image(ChestXray14Release().manifest())
    part = _by_image(m)
    assert (part["split"] == full.loc[part.index, "split"]).all()


def test_agcnn_trains_and_evaluates_on_the_release_streaming_from_disk(release, tmp_path):
    """configs/agcnn_chestxray14.yaml end to end on the fake release: three stages, the disk cache
    (no image held in memory between epochs), and the per-branch evaluation of the official test split."""
    from chestdx.evaluate.run import evaluate_bundle
    from chestdx.train.config import apply_override, read_config_file, validate
    from chestdx.train.run import fit

    raw = read_config_file(Path(__file__).resolve().parents[1] / "configs" / "agcnn_chestxray14.yaml")
    for stage in raw["stages"]:
        stage["train"]["batch_size"] = 4
    for item in ("model.backbone=resnet18", "model.pretrained=null", "preprocess.size=32", "train.epochs=1",
                 "train.num_workers=0", f"data.cache_dir={tmp_path / 'cache'}", "evaluate.bootstrap=20"):
        apply_override(raw, item)
    cfg = validate(raw)
    assert cfg["dataset"] == "chestx-ray14" and cfg["data"]["cache"] == "disk"
    model_path = fit(cfg, tmp_path / "run", progress=False)
    assert len(list((tmp_path / "cache").rglob("*.npy"))) > 0  # images went to the disk cache
    metrics = evaluate_bundle(model_path, tmp_path / "eval", n_boot=20, shortcut_probe=False)
    official_test = (release / "test_list.txt").read_text().split()
    assert metrics["n_test"] == len(official_test)
    assert set(metrics["test_heads"]) == {"global", "local"} and metrics["primary"] == "fusion"
