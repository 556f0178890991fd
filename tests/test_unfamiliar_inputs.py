"""`chestdx predict` on images unlike the model's training images (the input check's distance over its
limit, as most slices of a hospital's DICOM series are for a model trained on covid-ct): refused by
default with a reason that does not call a chest CT "not a chest image", or predicted and marked when
asked; every image's row says how far it lies."""

import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from chestdx.cli import app
from chestdx.data.input_check import NOT_CHEST, UNFAMILIAR


@pytest.fixture(scope="module")
def model_and_inputs(covid_ct_dir, tiny_models_dir, tmp_path_factory):
    """The tiny LA-DNN with an input reference of 40 covid-ct training images; four of those images and
    a grey photograph (far from every CT slice: refused by the distance rule, not by colour or blank)."""
    import skimage.data

    from chestdx.data.input_check import add_input_reference, manifest_images
    from chestdx.data.manifest import Manifest

    root = tmp_path_factory.mktemp("unfamiliar")
    model = root / "model.pt"
    shutil.copy(tiny_models_dir / "ladnn-tiny.pt", model)
    images, patients = manifest_images(Manifest.from_csv(covid_ct_dir / "manifest.csv"), "train", max_images=40)
    add_input_reference(model, images, groups=patients)
    photo = root / "astronaut.png"
    Image.fromarray(skimage.data.astronaut()).convert("L").save(photo)
    return model, [str(image.meta["path"]) for image in images[:4]], str(photo)


def _predict(args, out):
    run = CliRunner().invoke(app, ["predict", *args, "--out", str(out)])
    return run, pd.read_csv(out) if out.exists() else None


def test_unfamiliar_image_refused_by_default_and_marked_when_asked(model_and_inputs, tmp_path):
    model, ct, photo = model_and_inputs
    refused, rows = _predict([*ct, photo, "--checkpoint", str(model)], tmp_path / "refused.csv")
    assert refused.exit_code == 2
    errors = [line for line in refused.output.splitlines() if line.startswith("error: ")]
    photo_error = [line for line in errors if photo in line]
    assert len(photo_error) == 1 and UNFAMILIAR in photo_error[0] and NOT_CHEST not in photo_error[0]
    assert f"{len(errors)} of 5 image(s) refused as unlike the model's training images" in refused.output
    assert "--unfamiliar predict" in refused.output
    assert photo not in set(rows["path"]) and len(rows) == 5 - len(errors) >= 3
    assert not rows["unfamiliar"].any() and (rows["input_distance"] <= rows["input_limit"]).all()

    marked, all_rows = _predict([*ct, photo, "--checkpoint", str(model), "--unfamiliar", "predict"],
                                tmp_path / "marked.csv")
    assert marked.exit_code == 0, marked.output
    assert list(all_rows["path"]) == [*ct, photo]
    # marked exactly the images the default run refused
    assert set(all_rows.loc[~all_rows["unfamiliar"], "path"]) == set(rows["path"])
    row = all_rows.set_index("path").loc[photo]
    assert row["unfamiliar"] and row["input_distance"] > row["input_limit"]
    assert f"{int(all_rows['unfamiliar'].sum())} of 5 prediction(s) are of images unlike" in marked.output
    # marking changes no answer: the familiar images' rows are those of the default run
    same = all_rows.set_index("path").loc[rows["path"]]
    np.testing.assert_array_equal(same["p_covid"].to_numpy(), rows["p_covid"].to_numpy())
    # and the photograph's answer is the model's own (one image on its own, unbatched)
    from chestdx.inference import Predictor

    alone = Predictor(model).predict_source(photo, refuse_unfamiliar=False)
    assert alone["unfamiliar"] and row["p_covid"] == pytest.approx(alone["probabilities"]["covid"], abs=1e-5)
    assert row["input_distance"] == pytest.approx(alone["input_distance"], abs=1e-5)


def test_unfamiliar_option_rejects_other_values(model_and_inputs, tmp_path):
    model, ct, _ = model_and_inputs
    run = CliRunner().invoke(app, ["predict", ct[0], "--checkpoint", str(model), "--unfamiliar", "allow"])
    assert run.exit_code != 0 and "--unfamiliar 'allow': use refuse or predict" in str(run.exception)
