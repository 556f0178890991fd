"""Patient-level splits: a patient in two splits is an error, never a warning."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from chestdx.errors import ChestDxError, DataLeakageError


def check_no_leakage(patients, splits) -> None:
    """Raise DataLeakageError naming the patients that appear in more than one split."""
    frame = pd.DataFrame({"patient": np.asarray(patients, dtype=str), "split": np.asarray(splits)})
    frame = frame.dropna()
    counts = frame.groupby("patient")["split"].nunique()
    leaked = counts[counts > 1]
    if len(leaked):
        names = ", ".join(leaked.index[:5])
        more = f" and {len(leaked) - 5} more" if len(leaked) > 5 else ""
        raise DataLeakageError(f"{len(leaked)} patient(s) appear in more than one split: {names}{more}")


def stratified_group_kfold(labels, patients, n_splits: int = 5, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train_idx, test_idx) per fold; folds are disjoint in patients and close in class balance."""
    labels = np.asarray(labels)
    patients = np.asarray(patients, dtype=str)
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    folds = list(splitter.split(np.zeros(len(labels)), labels, patients))
    for train_idx, test_idx in folds:
        tags = np.empty(len(labels), dtype=object)
        tags[train_idx], tags[test_idx] = "train", "test"
        check_no_leakage(patients, tags)
    return folds


def kfold_split_tags(labels, patients, n_splits: int = 5, seed: int = 0) -> list[np.ndarray]:
    """Per fold k, a split tag per image: fold k is `test`, fold k+1 `val` (for model selection),
    the other folds `train`. Patient-level and stratified, like `stratified_group_kfold`."""
    folds = [test for _, test in stratified_group_kfold(labels, patients, n_splits, seed)]
    out = []
    for k in range(n_splits):
        tags = np.full(len(labels), "train", dtype=object)
        tags[folds[(k + 1) % n_splits]] = "val"
        tags[folds[k]] = "test"
        check_no_leakage(patients, tags)
        out.append(tags)
    return out


def train_val_test_split(labels, patients, val: float = 0.15, test: float = 0.25, seed: int = 0) -> np.ndarray:
    """Assign 'train'/'val'/'test' per row by patient (the LA-DNN paper's 60/15/25)."""
    labels = np.asarray(labels)
    patients = np.asarray(patients, dtype=str)
    out = np.full(len(labels), "train", dtype=object)
    n_test = max(2, round(1 / test))
    _, test_idx = stratified_group_kfold(labels, patients, n_splits=n_test, seed=seed)[0]
    out[test_idx] = "test"
    rest = np.flatnonzero(out == "train")
    n_val = max(2, round((1 - test) / val))
    _, val_rel = stratified_group_kfold(labels[rest], patients[rest], n_splits=n_val, seed=seed)[0]
    out[rest[val_rel]] = "val"
    check_no_leakage(patients, out)
    return out


def leave_source_out_tags(labels, patients, sources, val: float = 0.2, seed: int = 0) -> dict:
    """Per source S, a split tag per row: every row of S is `test`; of the other sources' rows a
    patient-level stratified share `val` (by label and source) selects, the rest trains. The
    honest estimate when no external set exists: the model never sees the tested source's
    hospital, scanner or file habits. A patient found in two sources is refused (it would leak)."""
    labels, sources = np.asarray(labels, dtype=str), np.asarray(sources, dtype=str)
    patients = np.asarray(patients, dtype=str)
    shared = {p for p in set(patients) if len(set(sources[patients == p])) > 1}
    if shared:
        raise ChestDxError(f"patients in more than one source ({', '.join(sorted(shared)[:3])}): leave-one-source-"
                           f"out would train and test on one patient")
    out = {}
    for source in sorted(set(sources)):
        tags = np.full(len(labels), "test", dtype=object)
        rest = np.flatnonzero(sources != source)
        if len(rest) == 0:
            raise ChestDxError(f"only one source ({source}): nothing left to train on")
        tags[rest] = "train"
        strata = np.char.add(np.char.add(labels[rest], "/"), sources[rest])
        _, val_rel = stratified_group_kfold(strata, patients[rest], n_splits=max(2, round(1 / val)), seed=seed)[0]
        tags[rest[val_rel]] = "val"
        check_no_leakage(patients, tags)
        out[source] = tags
    return out


# Figures cut from papers are named <paper>-p<page>-<figure...>.<ext> (COVID-CT's Images-processed).
# or <article id>[_<figure>][%<crop>] (journal articles, e.g. PIIS0140673620301549_0%1).
_FIGURE_NAME = re.compile(r"^(?P<paper>.+?)-p\d+-|^(?P<article>[A-Za-z][^%_]*)[%_]")


def _paper(stem: str) -> str | None:
    match = _FIGURE_NAME.match(stem)
    return (match.group("paper") or match.group("article")) if match else None


def publication_groups(paths, patients) -> np.ndarray:
    """A group per row for source-held-out folds on figures from papers: the publication a file comes
    from (its name up to -p<page>-<figure>), else the row's patient; merged so that no patient is split
    across two groups (a patient shown in two papers joins them). The honest grouping for covid-ct,
    whose images of one preprint share a hospital, a scanner and a figure style."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    patients = np.asarray(patients, dtype=str)
    papers = np.array([_paper(Path(str(p)).stem) or f"patient:{q}" for p, q in zip(paths, patients)])
    # Rows are joined through their paper and their patient: the connected components are the groups.
    codes_paper = pd.factorize(papers)[0]
    codes_patient = pd.factorize(patients)[0] + codes_paper.max() + 1
    n = int(codes_patient.max()) + 1
    graph = coo_matrix((np.ones(len(papers)), (codes_paper, codes_patient)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    names = {}
    for c, paper in zip(component[codes_paper], papers):
        names.setdefault(c, paper)  # a group is named by its first row's paper
    return np.array([names[c] for c in component[codes_paper]], dtype=object)
