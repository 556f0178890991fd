"""A report a person can open: Markdown and HTML with our numbers beside the paper's."""

from __future__ import annotations

import html
from pathlib import Path

from chestdx.utils import write_text_atomic

ROWS = ("sensitivity", "specificity", "auc", "f1", "accuracy")


def _fmt(metrics: dict, key: str) -> str:
    value = metrics.get(key)
    if value is None:
        return "-"
    ci = metrics.get(f"{key}_ci")
    text = f"{100 * value:.1f}"
    return f"{text} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci and ci[0] is not None else text


def report_markdown(metrics: dict, config: dict) -> str:
    test = metrics["test"]
    paper = config.get("paper", {}).get("results", {})
    lines = [
        f"# {config.get('name', 'chestdx')}: {metrics['model']} ({metrics['backbone']}) on {metrics['dataset']}",
        "",
        f"Test split: {metrics['n_test']} images of {metrics['n_test_patients']} patients. "
        f"Model selected on validation AUC only; test set reported once. 95% CIs by bootstrap over patients.",
        "",
        "| metric (%) | ours, threshold 0.5 | ours, validation threshold "
        f"{metrics['threshold_from_validation']:.3f} | paper |",
        "| --- | --- | --- | --- |",
    ]
    for key in ROWS:
        paper_value = paper.get(key)
        lines.append(f"| {key} | {_fmt(test['at_0.5'], key)} | {_fmt(test['at_val_threshold'], key)} | "
                     f"{'-' if paper_value is None else f'{paper_value:.1f}'} |")
    if config.get("paper", {}).get("source"):
        lines += ["", f"Paper figures: {config['paper']['source']}."]
    for key in (k for k in metrics if k.startswith("test_") and "lesion_n" in (metrics[k] or {})):
        les = metrics[key]
        lines += ["", f"Lesion head on the {les['lesion_n']} test images with known lesion labels: "
                      f"accuracy {100 * les['lesion_accuracy']:.1f}%, Hamming loss {les['hamming_loss']:.3f}."]
    if "test_precision_recall_f1" in metrics:
        lines += ["", f"## Per class, at the validation threshold {metrics['threshold_from_validation']:.3f}", "",
                  *_prf_table(metrics["test_precision_recall_f1"])]
    if "shortcut_probe" in metrics:
        sp = metrics["shortcut_probe"]
        lines += ["", "## Shortcut check", "",
                  "In covid-ct the COVID images are .png files (34 of 349 hold JPEG data) while about half of the "
                  "negatives are .jpg, so a model can learn compression artefacts instead of disease.", "",
                  f"- test AUC on the images as stored: {sp['auc_original']:.3f}",
                  f"- test AUC with every test image re-encoded as JPEG (q75): {sp['auc_all_jpeg']:.3f}"]
        if "auc_trained_with_jpeg_aug" in sp:
            lines.append(f"- test AUC of a model trained with random JPEG re-compression: "
                         f"{sp['auc_trained_with_jpeg_aug']:.3f}")
    t = test["at_0.5"]
    lines += trust_section(metrics, t["auc"], f"AUC {_ci_text(t, 'auc')} on {metrics['n_test']} images")
    lines += ["", "## Figures", "", "![ROC](roc.png) ![Precision-recall](pr.png) ![Confusion](confusion.png) "
              "![Reliability](reliability.png)", "",
              "Per-image predictions: `predictions_test.csv`; all numbers: `metrics.json`.", "",
              "Research use only; not for diagnosis."]
    return "\n".join(lines) + "\n"


def _ci_text(values: dict, key: str) -> str:
    ci = values.get(f"{key}_ci")
    return f"{values[key]:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and ci[0] is not None else "")


MULTICLASS_ROWS = ("accuracy", "macro_sensitivity", "macro_specificity", "macro_f1", "macro_auc")


def report_multiclass_markdown(metrics: dict, config: dict) -> str:
    test, classes = metrics["test"], metrics["classes"]
    paper = config.get("paper", {}).get("results", {})
    lines = [
        f"# {config.get('name', 'chestdx')}: {metrics['model']} ({metrics['backbone']}) on {metrics['dataset']}",
        "",
        f"Test split: {metrics['n_test']} images of {metrics['n_test_patients']} patients, classes "
        f"{', '.join(classes)}. Model selected on validation AUC only; test set reported once; predicted class = "
        "arg max. 95% CIs by bootstrap over patients.",
        "",
        "| metric (%) | ours | paper |",
        "| --- | --- | --- |",
    ]
    for key in MULTICLASS_ROWS:
        value = paper.get(key)
        lines.append(f"| {key} | {_fmt(test, key)} | {'-' if value is None else f'{value:.1f}'} |")
    if config.get("paper", {}).get("source"):
        lines += ["", f"Paper figures: {config['paper']['source']}."]
    lines += ["", "## Per class (one vs rest)", "", "| class | sensitivity | specificity | F1 | AUC |",
              "| --- | --- | --- | --- | --- |"]
    for name in classes:
        c = test["per_class"][name]
        lines.append(f"| {name} | {100 * c['sensitivity']:.1f} | {100 * c['specificity']:.1f} | "
                     f"{100 * c['f1']:.1f} | {100 * c['auc']:.1f} |")
    if "precision_recall_f1" in test:
        lines += ["", "## Precision, recall, F1 (arg max)", "", *_prf_table(test["precision_recall_f1"])]
    if "test_by_source" in metrics:
        lines += ["", "## Per source", "",
                  "Label and source are confounded in this dataset (every COVID image comes from publications or "
                  "Hannover, nearly every other image from NIH), so a model can score well by recognising the "
                  "source. Recall of each class within each source:", "",
                  "| source | images | accuracy | recall by class |", "| --- | --- | --- | --- |"]
        for source, s in metrics["test_by_source"].items():
            recalls = ", ".join(f"{k} {100 * v['recall']:.0f}% (n={v['n']})" for k, v in s["by_class"].items())
            lines.append(f"| {source} | {s['n']} | {100 * s['accuracy']:.1f} | {recalls} |")
    macro = test.get("macro_auc")
    lines += trust_section(metrics, macro, f"accuracy {_ci_text(test, 'accuracy')}, macro AUC {_ci_text(test, 'macro_auc')} "
                                          f"on {metrics['n_test']} images")
    lines += ["", "## Figures", "", "![ROC](roc.png) ![Precision-recall](pr.png) ![Confusion](confusion.png) "
              "![Reliability](reliability.png)", "",
              "Per-image predictions: `predictions_test.csv`; all numbers: `metrics.json`.", "",
              "Research use only; not for diagnosis."]
    return "\n".join(lines) + "\n"


def report_multilabel_markdown(metrics: dict, config: dict) -> str:
    test = metrics["test"]
    paper = config.get("paper", {}).get("results", {})
    lines = [
        f"# {config.get('name', 'chestdx')}: {metrics['model']} ({metrics['backbone']}) on {metrics['dataset']}",
        "",
        f"Test split: {metrics['n_test']} images of {metrics['n_test_patients']} patients; one sigmoid per label, "
        "each decided at its threshold chosen on validation (Youden's J). Model selected on validation only; test set "
        "reported once. 95% CIs by bootstrap over patients. A label with fewer than 10 test positives is not "
        "estimable and is left out of the mean.",
        "",
        f"Mean AUC over the {len(test['estimable_labels'])} estimable labels{_averaged(metrics, test)}: "
        f"{_fmt(test, 'macro_auc')}",
        "",
        "| label | test positives | AUC (%) [95% CI] | sensitivity | specificity | F1 | paper AUC |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, m in test["per_label"].items():
        auc = _fmt(m, "auc") if m["estimable"] and m.get("auc_ci", [None])[0] is not None else (
            "not estimable" if not m["estimable"] else _fmt({"auc": m["auc"]}, "auc"))
        paper_value = paper.get(name)
        lines.append(f"| {name} | {m['positives']} | {auc} | {_pct(m['sensitivity'])} | {_pct(m['specificity'])} | "
                     f"{_pct(m['f1'])} | {'-' if paper_value is None else f'{paper_value:.1f}'} |")
    heads = metrics.get("test_heads") or {}
    if heads:  # e.g. AG-CNN's global and local branches beside the fusion
        tests = {metrics["primary"]: test, **heads}
        lines += ["", "## Every head on the test split", "",
                  "| label | test positives | " + " | ".join(f"{h} AUC (%)" for h in tests) + " |",
                  "| --- | --- |" + " --- |" * len(tests)]
        for name, m in test["per_label"].items():
            cells = [_fmt(t["per_label"][name], "auc") if t["per_label"][name]["estimable"] else "not estimable"
                     for t in tests.values()]
            lines.append(f"| {name} | {m['positives']} | " + " | ".join(cells) + " |")
        lines.append("| mean, estimable | | " + " | ".join(_fmt(t, "macro_auc") for t in tests.values()) + " |")
    if config.get("paper", {}).get("source"):
        lines += ["", f"Paper figures: {config['paper']['source']}."]
    lines += ["", "## Figures", "", "![ROC](roc.png)", "",
              "Per-image predictions: `predictions_test.csv`; all numbers: `metrics.json`.", "",
              "Research use only; not for diagnosis."]
    return "\n".join(lines) + "\n"


def _prf_table(prf: dict) -> list[str]:
    """Per class precision / recall / F1 / support, then the support-weighted and the unweighted means."""
    rows = ["| class | precision | recall | F1 | support |", "| --- | --- | --- | --- | --- |"]
    named = [*prf["per_class"].items(), ("weighted average", prf["weighted"]), ("macro average", prf["macro"])]
    for name, c in named:
        rows.append(f"| {name} | {100 * c['precision']:.1f} | {100 * c['recall']:.1f} | {100 * c['f1']:.1f} | "
                    f"{c['support']} |")
    return rows


def _averaged(metrics: dict, test: dict) -> str:
    """Which labels the mean is over, where the head averages only some (AG-CNN: the 14 diseases)."""
    over = metrics.get("mean_over") or []
    return "" if not over or len(over) == len(test["per_label"]) else f" of the {len(over)} the mean is over"


def _pct(value) -> str:
    return "-" if value is None or value != value else f"{100 * value:.1f}"


def verdict(internal: float | None, external: list, jpeg_drop: float | None = None, ece: float | None = None) -> str:
    """One line that does not oversell: what the measurements support, worst case first."""
    if not external:
        line = (f"Internal test only (AUC {internal:.2f}): no evidence yet that it holds at another hospital."
                if internal is not None else "Internal test only: no evidence yet that it holds at another hospital.")
    else:
        worst = min(external, key=lambda e: e["auc"])
        low = (worst.get("auc_ci") or [worst["auc"]])[0]
        if worst["auc"] < 0.6 or low < 0.5:
            line = (f"Does not hold outside its training sources ({worst['name']}: AUC {worst['auc']:.2f}, CI from "
                    f"{low:.2f}): research use only.")
        elif internal is not None and internal - worst["auc"] > 0.1:
            line = (f"Weaker outside its training sources (internal {internal:.2f}, {worst['name']} "
                    f"{worst['auc']:.2f}): check on local data before any use.")
        else:
            line = (f"Holds on the external set(s) measured (worst {worst['name']}: AUC {worst['auc']:.2f}); "
                    f"the sets are small, so still research use only.")
    if jpeg_drop is not None and jpeg_drop > 0.05:
        line += f" It keys partly on file format (AUC -{jpeg_drop:.2f} when all images are JPEG)."
    if ece is not None and ece > 0.1:
        line += f" Its probabilities are not calibrated (ECE {ece:.2f})."
    return line


def trust_section(metrics: dict, internal: float | None, internal_text: str) -> list[str]:
    """Internal test, external tests, calibration, shortcut probe, attention, and the verdict."""
    external = metrics.get("external_results") or []
    cal = metrics.get("calibration") or {}
    probe = metrics.get("shortcut_probe") or {}
    drop = probe["auc_original"] - probe["auc_all_jpeg"] if probe else None
    lines = ["", "## Trust", "", f"- Internal test: {internal_text}."]
    if external:
        lines += [f"- External, {e['name']}: AUC {e['auc']:.3f}" + (f" [{e['auc_ci'][0]:.3f}, {e['auc_ci'][1]:.3f}]"
                                                                   if e.get("auc_ci") else "") for e in external]
    else:
        lines.append("- External test: none measured. Run `chestdx evaluate --manifest` on a set from another "
                     "hospital before trusting this model there.")
    if "test" in cal:
        t = cal.get("temperature")
        lines.append(f"- Calibration on the test split: ECE {cal['test']['ece']:.3f}, Brier {cal['test']['brier']:.3f}"
                     + (f" (temperature {t:.2f} fitted on validation)." if t else " (no temperature fitted)."))
    if probe:
        lines.append(f"- JPEG shortcut probe: AUC {probe['auc_original']:.3f} as stored, {probe['auc_all_jpeg']:.3f} "
                     f"with every image JPEG.")
    if metrics.get("attention_in_lungs") is not None:
        lines.append(f"- Share of attention inside the lungs: {metrics['attention_in_lungs']:.2f}.")
    else:
        lines.append("- Share of attention inside the lungs: see `chestdx explain` (its gallery scores each map).")
    lines += ["", f"**Verdict:** {verdict(internal, external, drop, cal.get('test', {}).get('ece'))}"]
    return lines


def _auc_cell(entry: dict | None) -> str:
    if not entry or entry.get("auc") is None:
        return "-" if not entry else entry.get("why", "-")
    ci = entry.get("auc_ci") or [float("nan")] * 2
    return f"{entry['auc']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] (n {entry['n']}, {entry['n_positive']} positive)"


def external_report_markdown(metrics: dict, figures=()) -> str:
    """The external report: what was scored and how, slice / series / patient AUCs with CIs, calibration."""
    agg = metrics["aggregation"]
    lines = [f"# External evaluation: {metrics['model']} on {metrics['manifest']}", "",
             f"**This is {metrics['statement']}.** Model trained on {metrics.get('trained_on') or '?'}; "
             f"positive class `{metrics['positive']}`; labels mapped {metrics['label_map']}; backend "
             f"{metrics['backend']}. 95% CIs by bootstrap over patients.", "",
             f"Slice rule: {metrics['slice_rule']}. Series score: `{agg['used']}` of the slice probabilities "
             f"(top-k k = {agg['top_k']}); patient: {agg['patient']}.", ""]
    if "slices" in metrics:
        lines += ["## Slices (or images)", "", "| positives against | AUC [95% CI] |", "| --- | --- |"]
        lines += [f"| {k.replace('vs_', '').replace('_', ' ')} | {_auc_cell(v)} |" for k, v in metrics["slices"].items()
                  if k == "all_negatives" or k.startswith("vs_")]
        cal = metrics["slices"].get("calibration")
        if cal:
            lines += ["", f"Calibration of the slice probabilities: ECE {cal['ece']:.3f}, Brier {cal['brier']:.3f}."]
        by_source = metrics["slices"].get("by_source") or {}
        if len(by_source) > 1:
            lines += ["", "Per source:", ""] + [f"- {s}: {_auc_cell(v)}" for s, v in by_source.items()]
    if "series" in metrics:
        lines += ["", "## Series", "", "| aggregation | AUC [95% CI] |", "| --- | --- |"]
        lines += [f"| {how}{' (used)' if how == agg['used'] else ''} | {_auc_cell(v['all_negatives'])} |"
                  for how, v in metrics["series"].items()]
        lines += ["", "| series | label | slices | mean | max | top-k |", "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['series']} | {r['label']} | {r['n_slices']} | {r['mean']:.3f} | {r['max']:.3f} | "
                  f"{r['topk']:.3f} |" for r in metrics["series_rows"]]
        lines += ["", f"Patients ({metrics['patients']['n']}): AUC {_auc_cell(metrics['patients']['all_negatives'])}."]
    lines += _external_trust_lines(metrics)
    main = (metrics.get("slices") or {}).get("all_negatives") or {}
    if main.get("auc") is not None:
        lines += ["", f"**Verdict:** {verdict(None, [{'name': 'this external set', **main}], None, (metrics['slices'].get('calibration') or {}).get('ece'))}"]
    if metrics["errors"]:
        lines += ["", f"## Not scored ({len(metrics['errors'])})", ""]
        lines += [f"- {e['path']}: {e['error']}" for e in metrics["errors"]]
    if figures:
        lines += ["", "## Figures", "", " ".join(f"![{f[:-4]}]({f})" for f in figures)]
    lines += ["", "Per-slice and per-series predictions: `predictions_slices.csv`, `predictions_series.csv`; "
                  "all numbers: `metrics.json`.", "", "Research use only; not for diagnosis."]
    return "\n".join(lines) + "\n"


def _external_trust_lines(metrics: dict) -> list[str]:
    """How far the set lies from the training images, and where the model looks."""
    lines = []
    dist = metrics.get("input_distance") or {}
    if dist.get("measured"):
        by_label = ", ".join(f"{k} {v:.0%}" for k, v in dist["share_beyond_limit_by_label"].items())
        lines += ["", "## Trust", "",
                  f"- Input check: {dist['share_beyond_limit']:.0%} of the scored slices lie beyond the limit the "
                  f"check refuses at (distance > {dist['limit']:.2f}; median {dist['median_distance']:.2f}); by "
                  f"label: {by_label}. `chestdx predict` would refuse those; here they are scored."]
        within = (dist.get("within_limit") or {}).get("all_negatives")
        if within and within.get("auc") is not None:
            lines.append(f"- On the slices the check lets through only: AUC {_auc_cell(within)}.")
    att = metrics.get("attention") or {}
    if att.get("share_in_lungs") is not None:
        lines += ([] if lines else ["", "## Trust", ""]) + [
            f"- Share of the {att['method']} map for `{att['target']}` inside the lungs: {att['share_in_lungs']:.2f} "
            f"on {att['n']} slices (positives {_maybe(att['share_in_lungs_positives'])}, negatives "
            f"{_maybe(att['share_in_lungs_negatives'])}; the lungs cover {_maybe(att.get('lung_area_share'))} of "
            f"the slice, the share a uniform map would give; {att['no_lungs_found']} slices without lungs found "
            f"left out)."]
    return lines


def _maybe(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def write_external_report(metrics: dict, out_dir, figures=()) -> None:
    out_dir = Path(out_dir)
    md = external_report_markdown(metrics, figures)
    write_text_atomic(out_dir / "report.md", md)
    write_text_atomic(out_dir / "report.html", markdown_to_html(md))


REPORTS = {"binary": report_markdown, "multiclass": report_multiclass_markdown, "multilabel": report_multilabel_markdown}


def write_report(metrics: dict, config: dict, out_dir) -> None:
    out_dir = Path(out_dir)
    md = REPORTS[metrics["task"]](metrics, config)
    write_text_atomic(out_dir / "report.md", md)
    write_text_atomic(out_dir / "report.html", markdown_to_html(md))


def markdown_to_html(md: str) -> str:
    """Just enough Markdown for our reports: headings, tables, lists, images, paragraphs."""
    import re

    body, table = [], []

    def flush_table():
        if table:
            rows = [r for r in table if not set(r.replace("|", "").strip()) <= set("- ")]
            cells = [[html.escape(c.strip()) for c in r.strip("|").split("|")] for r in rows]
            head = "".join(f"<th>{c}</th>" for c in cells[0])
            rest = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in cells[1:])
            body.append(f"<table><tr>{head}</tr>{rest}</table>")
            table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush_table()
        text = html.escape(line)
        text = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", r'<img alt="\1" src="\2" style="max-width:32%">', text)
        text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
        if line.startswith("# "):
            body.append(f"<h1>{text[2:]}</h1>")
        elif line.startswith("## "):
            body.append(f"<h2>{text[3:]}</h2>")
        elif line.startswith("- "):
            body.append(f"<li>{text[2:]}</li>")
        elif line.strip():
            body.append(f"<p>{text}</p>")
    flush_table()
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}")
    return f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style></head><body>" + \
        "\n".join(body) + "</body></html>\n"
