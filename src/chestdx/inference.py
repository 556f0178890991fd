"""Inference with a model bundle: files or arrays in, each head's probabilities out."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from chestdx.data.io import read_image
from chestdx.data.transforms import build_pipeline, tta_views
from chestdx.errors import ChestDxError, InputError
from chestdx.explain.core import ordered_heads
from chestdx.models.bundle import load_bundle, primary_head, thresholds
from chestdx.tasks import heads_from

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ""}
# Images per forward pass in batch prediction. Per image, 4 to 32 cost the same here (15.5 ms per
# two-member pass on two cores), but the first batch of 32 fills hundreds of MB of fresh memory:
# on 120 images, 14 images/s from a cold start at 32 and 25.7 at 4 (peak memory 3.0 vs 1.3 GB).
BATCH_SIZE = 4
MAX_LOCAL_ZIP_BYTES = 8 * 2**30  # a zipped series on the user's own disk: unpacked size limit


class Predictor:
    """A model bundle (.pt, PyTorch) or an exported model (.onnx + .json, ONNX Runtime)."""

    def __init__(self, bundle_path, threads: int | None = None, batch: int | None = None):
        """`threads`: ONNX Runtime threads per call (None: all cores), for a service answering many at once;
        `batch`: the batch size most calls will have (ONNX Runtime fixes it in its graphs, `OnnxModel`)."""
        self.path = Path(bundle_path)
        if self.path.suffix == ".onnx":
            from chestdx.export import load_onnx

            self.model, self.bundle = load_onnx(self.path, threads=threads, batch=batch)
            self.backend = "onnxruntime"
        else:
            self.model, self.bundle = load_bundle(bundle_path)
            self.backend = "pytorch"
        self.heads = heads_from(self.bundle)
        self.primary = primary_head(self.bundle)
        self.spatial_dims = int(self.bundle.get("spatial_dims", 2))
        self.sample = self.bundle.get("sample", "image")
        # The CT window the model was trained with, for DICOM CT input in HU (None: the file's VOI).
        self.hu_window = self.bundle["preprocess"].get("hu_window")
        self.load_steps, self.sample_steps = build_pipeline(self.bundle["preprocess"], train=False,
                                                            spatial_dims=self.spatial_dims)
        self.thresholds = {h.name: thresholds(self.bundle, h) for h in self.heads}
        self.tta = bool(self.bundle.get("tta", False))
        self.modality = self.bundle.get("modality")
        self.input_reference = self.bundle.get("input_reference")  # training images' statistics, if recorded
        self.tta_scales = [float(s) for s in self.bundle.get("tta_scales", [1.0])]
        # Temperature fitted on validation (chestdx.evaluate.calibration); bundles without one: T = 1.
        calibration = self.bundle.get("calibration") or {}
        self.temperature = {calibration["head"]: float(calibration["temperature"])} if calibration else {}

    @property
    def takes_series(self) -> bool:
        """True for a model whose input is a whole series (a slice sequence or a 3D volume)."""
        return self.sample in ("sequence", "volume")

    @property
    def explain_heads(self) -> list:
        """The heads in score-column order for the explainer: the primary head first."""
        return ordered_heads(self.heads, self.primary.name)

    @property
    def threshold(self) -> float | None:
        """The primary head's operating threshold (binary heads; None otherwise)."""
        return self.thresholds[self.primary.name][0] if self.primary.task == "binary" else None

    def prepare(self, gray: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        """(the image on the model's grid in [0, 1], for overlays; the model input (1, 1, H, W))."""
        shown = self.load_steps({"image": gray[None]})["image"]
        x = self.sample_steps({"image": shown})["image"]
        return shown[0], torch.from_numpy(np.ascontiguousarray(x))[None]

    def preprocess(self, gray: np.ndarray) -> torch.Tensor:
        return self.prepare(gray)[1]

    @torch.no_grad()
    def predict_tensor(self, x: torch.Tensor, with_boxes: bool = False, features: bool = False):
        """x: a preprocessed batch. Returns numpy probabilities per head name: (B,) of the positive class
        for a binary head, (B, K) over the classes of a multi-class head, (B, L) for a multi-label head.
        `with_boxes`: also the model's attention crop boxes of the unmirrored view ((B, 4) x0, y0, x1, y1
        on the model's grid; None for a model without them): returns (probabilities, boxes).
        `features` (an ONNX export with closed-form CAM): also the unmirrored view's outputs with its
        feature maps, so its heat map needs no second pass: returns (probabilities, boxes, outputs)."""
        per_head = {h.name: [] for h in self.heads}
        boxes = first = None
        for k, view in enumerate(tta_views(x, self.tta, self.tta_scales)):
            out = self.model(view, features=True) if features and k == 0 else self.model(view)
            if features and k == 0:
                first = out
            if k == 0 and "boxes" in out:
                boxes = out["boxes"].numpy()
            for h in self.heads:
                per_head[h.name].append(h.kind.probabilities(out[h.output]))
        probs = self.calibrated({name: torch.stack(p).mean(0).numpy() for name, p in per_head.items()})
        if features:
            return probs, boxes, first
        return (probs, boxes) if with_boxes else probs

    def calibrated(self, probs: dict) -> dict:
        """Each head's probabilities with the bundle's validation temperature applied where it has one."""
        from chestdx.evaluate.calibration import apply_temperature

        return {name: apply_temperature(p, self.temperature[name]) if name in self.temperature else p
                for name, p in probs.items()}

    def predict_source(self, source, name: str | None = None, refuse_unfamiliar: bool = True) -> dict:
        """One input's result (`describe`); an image's also says how far it lies from the training
        images (`with_distance`). `refuse_unfamiliar=False`: an image over the input check's distance
        limit is predicted, marked, instead of refused (`check_input`)."""
        if self.sample == "sequence":
            return self.predict_series(source)[0]
        if self.sample == "volume":
            return self.predict_volume(source)[0]
        image = read_image(source, name=name, hu_window=self.hu_window)
        if image.meta.get("frames", 1) > 1:
            raise InputError(name or source, f"{image.meta['frames']}-frame DICOM given to a 2D model; send one slice")
        check = self.check_input(image, refuse_unfamiliar)
        out = self.predict_tensor(self.preprocess(image.to_gray()))
        return with_distance(self.describe({k: v[0] for k, v in out.items()}), check)

    def predict_files(self, paths, batch_size: int = BATCH_SIZE, workers: int = 0, refuse_unfamiliar: bool = True):
        """Yield (path, result or None, error message or None) for image files, in order: decoded and
        checked in `workers` processes, predicted in batches (the same result as `predict_source`, with
        the input check's distance; `refuse_unfamiliar=False` predicts images over its limit, marked)."""
        loader = decode_loader(_FileInputs(list(paths), self, refuse_unfamiliar), workers)
        pending = []

        def flush():
            ready = [k for k, (_, x, _, _) in enumerate(pending) if x is not None]
            results = [None] * len(pending)
            if ready:
                out = self.predict_tensor(torch.cat([pending[k][1] for k in ready]))
                for j, k in enumerate(ready):
                    results[k] = with_distance(self.describe({name: v[j] for name, v in out.items()}), pending[k][3])
            batch = [(path, result, error) for (path, _, error, _), result in zip(pending, results)]
            pending.clear()
            return batch

        for item in loader:
            pending.append(item)
            if len(pending) >= batch_size:
                yield from flush()
        yield from flush()

    def check_input(self, image, refuse_unfamiliar: bool = True) -> dict | None:
        """Refuse (InputError) an image this model does not read: blank, a photograph, another modality,
        or far from its training images unless `refuse_unfamiliar` is False (`chestdx.data.input_check`).
        Returns its distance from the training images (None for a bundle without an input reference)."""
        from chestdx.data.input_check import check_input

        return check_input(image, self.input_reference, self.modality, refuse_unfamiliar)

    def read_series(self, source):
        """A series (DICOM folder, NIfTI file, slice folder) as the model's sequence: the drawn slices
        (a `Volume` in [0, 1], meta["slice_indices"] their place in the series) and the input (1, S, H, W)."""
        from chestdx.data.dataset import reader_for

        seq = reader_for("sequence", self.bundle["preprocess"]).volume(source)
        shown = self.load_steps({"image": seq.array})["image"]
        x = self.sample_steps({"image": shown})["image"]
        return seq, shown, torch.from_numpy(np.ascontiguousarray(x))[None]

    def _verdict(self, x: torch.Tensor) -> tuple[dict, dict]:
        """The model's outputs on one input, and the verdict from them (with TTA where the bundle asks)."""
        with torch.no_grad():
            out = self.model(x)
        probs = self.predict_tensor(x) if self.tta else \
            self.calibrated({h.name: h.kind.probabilities(out[h.output]).numpy() for h in self.heads})
        return out, self.describe({k: v[0] for k, v in probs.items()})

    def predict_series(self, source) -> tuple[dict, np.ndarray, torch.Tensor]:
        """One series' verdict with the sequence attention per drawn slice (`slices`: index in the
        series sorted along its axis, file, attention), the slices shown and the model input."""
        seq, shown, x = self.read_series(source)
        out, result = self._verdict(x)
        attention = out.get("slice_attention")
        files = seq.meta.get("files") or [None] * seq.n_slices
        result["slices"] = []
        for k, (index, name) in enumerate(zip(seq.meta["slice_indices"], files)):
            entry = {"index": int(index), "file": name}
            if attention is not None:
                entry["attention"] = float(attention[0, k])
            result["slices"].append(entry)
        return result, shown, x

    def read_volume(self, source):
        """A volume (DICOM series folder, NIfTI file, slice folder) as the 3D model's input: the volume
        on the model's grid in [0, 1] (D, H, W), for overlays, the input (1, 1, D, H, W), and the model
        grid's index -> world affine (for NIfTI heat maps in the patient's coordinates)."""
        from chestdx.data.dataset import model_grid_affine, reader_for

        pre = self.bundle["preprocess"]
        loaded, vol = reader_for("volume", pre).read(source)
        shown = self.load_steps({"image": loaded})["image"]
        x = self.sample_steps({"image": shown})["image"]
        affine = model_grid_affine(vol.affine, vol.array.shape, vol.spacing, pre)
        return shown[0], torch.from_numpy(np.ascontiguousarray(x))[None], affine

    def predict_volume(self, source) -> tuple[dict, np.ndarray, dict]:
        """One volume's verdict, the volume as the model saw it (D, H, W) and the model's outputs (numpy,
        batch axis dropped: `attention` T(A) on the model's grid, and for the dual-sampling ensemble the
        infection ratio it weighed the two models by; `grid_affine` the grid's index -> world affine;
        `input` the model's input tensor (1, 1, D, H, W)).
        The verdict adds `infection_ratio` (with `infection_ratio_source`) where the model gives one, and
        `attention_in_lungs`: the share of the attention inside the lungs (the input is masked to them)."""
        shown, x, affine = self.read_volume(source)
        out, result = self._verdict(x)
        out = {k: np.asarray(v)[0] for k, v in out.items()}
        out["grid_affine"] = affine
        out["input"] = x  # the model's input tensor, so an explainer need not read the volume again
        if "infection_ratio" in out:
            result["infection_ratio"] = float(out["infection_ratio"])
            result["infection_ratio_source"] = "attention" if float(out.get("ratio_from_attention", 1)) else "given"
        if "attention" in out:
            attention = out["attention"][0]
            total = float(attention.sum())
            result["attention_in_lungs"] = float(attention[shown > 0].sum() / total) if total > 0 else None
        return result, shown, out

    def describe(self, probs: dict) -> dict:
        """One image's head probabilities as a verdict: the primary head's probabilities and decision
        (at its validation threshold), and each other head's probabilities under its name."""
        head = self.primary
        p = np.asarray(probs[head.name])
        if head.task == "binary":
            p = float(p)
            result = {"probabilities": {head.labels[0]: 1 - p, head.labels[1]: p},
                      "prediction": head.labels[int(p >= self.threshold)], "threshold": self.threshold}
        elif head.task == "multiclass":
            result = {"probabilities": {n: float(v) for n, v in zip(head.labels, p)},
                      "prediction": head.labels[int(p.argmax())], "threshold": None}
        else:
            t = self.thresholds[head.name]
            result = {"probabilities": {n: float(v) for n, v in zip(head.labels, p)},
                      "prediction": [n for n, v, tj in zip(head.labels, p, t) if v >= tj],
                      "threshold": dict(zip(head.labels, t))}
        for other in self.heads:
            if other.name != head.name:
                values = np.atleast_1d(np.asarray(probs[other.name], dtype=float))
                labels = other.labels if other.task != "binary" else other.labels[1:]
                result[other.name] = {n: float(v) for n, v in zip(labels, values)}
        return result


def with_distance(result: dict, check: dict | None) -> dict:
    """A result with the input check's distance from the training images and its limit, and whether the
    image lies beyond it ("unfamiliar": predicted only when asked to be); as given without a reference."""
    if check is None:
        return result
    return {**result, "input_distance": check["distance"], "input_limit": check["limit"],
            "unfamiliar": bool(check["unfamiliar"])}


@contextmanager
def series_source(path):
    """A series as a path the volume readers take: a .zip of the series' files is unpacked to a
    temporary folder (removed afterwards) with the service's checks; anything else is as given."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".zip":
        from chestdx.serve.series import unpacked_series

        with unpacked_series(path.read_bytes(), str(path), max_bytes=MAX_LOCAL_ZIP_BYTES) as inner:
            yield inner
    else:
        yield path


def expand_inputs(inputs, series: bool = False) -> list[Path]:
    """Files as given; folders expanded to the image files inside them (sorted). With `series` (a
    sequence or 3D model), each input is one series as it is: a folder, a NIfTI file or a zip."""
    if series:
        return [Path(item) for item in inputs]
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(item)
    return files


def single_threaded_worker(_worker_id=None) -> None:
    """A decoding worker uses one thread (OpenCV, torch): the model's forward pass in the main
    process has the cores; otherwise their thread pools fight over them (seen: sys time > user time)."""
    import cv2

    cv2.setNumThreads(1)


def as_is(item):
    """The DataLoader's collate step for items that are already whole (picklable, for spawned workers)."""
    return item


def decode_loader(dataset, workers: int):
    """Items of `dataset` decoded in `workers` processes (0: in this one). Workers are spawned, not
    forked: a fork after this process has run a forward pass inherits the math libraries' thread
    pools mid-state and can hang."""
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=as_is,
                      worker_init_fn=single_threaded_worker, multiprocessing_context="spawn" if workers else None)


def model_input(load_steps, sample_steps, gray: np.ndarray) -> np.ndarray:
    """A (H, W) grey image through a model's load-time and per-sample steps: (C, H', W') float32."""
    shown = load_steps({"image": gray[None]})["image"]
    return np.ascontiguousarray(sample_steps({"image": shown})["image"], dtype=np.float32)


class _FileInputs:
    """Image files as (path, model input (1, C, H, W), None, input check's distance or None), read and
    checked as `Predictor.predict_source` does; a file that cannot be used gives (path, None, its error
    message, None) (DataLoader workers, picklable)."""

    def __init__(self, paths, predictor: Predictor, refuse_unfamiliar: bool = True):
        self.paths, self.hu_window = paths, predictor.hu_window
        self.reference, self.modality = predictor.input_reference, predictor.modality
        self.load, self.sample = predictor.load_steps, predictor.sample_steps
        self.refuse_unfamiliar = refuse_unfamiliar

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from chestdx.data.input_check import check_input

        path = self.paths[i]
        try:
            image = read_image(path, hu_window=self.hu_window)
            if image.meta.get("frames", 1) > 1:
                raise InputError(path, f"{image.meta['frames']}-frame DICOM given to a 2D model; send one slice")
            check = check_input(image, self.reference, self.modality, self.refuse_unfamiliar)
            return path, torch.from_numpy(model_input(self.load, self.sample, image.to_gray()))[None], None, check
        except ChestDxError as err:  # InputError and the pipeline's own refusals
            return path, None, str(err), None


def predictor_for(bundle_path, backend: str = "auto", threads: int | None = None,
                  batch: int | None = None) -> Predictor:
    """A Predictor on ONNX Runtime when `backend` is onnx, or auto and a current export of the bundle
    lies beside it (`chestdx export`; chestdx.export.current_export); on PyTorch otherwise. `batch`:
    the batch size of most calls, fixed in the ONNX graphs (29% faster per image than dynamic graphs here)."""
    from chestdx.errors import ChestDxError
    from chestdx.export import current_export

    path = Path(bundle_path)
    if backend not in ("auto", "onnx", "pytorch"):
        raise ChestDxError(f"--backend {backend!r}: use auto, onnx or pytorch")
    if path.suffix == ".onnx" or backend == "pytorch":
        return Predictor(path, threads=threads, batch=batch)
    export = current_export(path)
    if export is None and backend == "onnx":
        raise ChestDxError(f"{path}: no current ONNX export beside it; run chestdx export {path}")
    return Predictor(export or path, threads=threads, batch=batch)
