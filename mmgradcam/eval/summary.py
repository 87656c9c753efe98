"""Aggregates of scored words and answers: means with bootstrap CIs beside both baselines.

- ``method_table``: method x word class x metric, on the model's own captions (classes "noun",
  "color", "function") and VQA answers ("answer"), with the center and random baselines per class
  (computed once per class: they do not depend on the method) and the sanity flags.
- ``captions`` / ``per_category`` / ``vqa``: the tables per source, word class, category and
  question type, for the FIRST method (the one whose maps a run keeps for its reports). "all" is
  every object word (nouns and colors); function words have no category.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

from .metrics import COMPACT, LEAD, METHOD_TABLE, bootstrap_cis, f1_iou, get_metric, headline_keys, metric_keys

# Which metrics each table shows comes from the metric table (metrics.py), read at call time.
BASELINES = ("model", "center", "random")
TABLE_CLASSES = ("noun", "color", "function", "answer")
CLASS_NAMES = {"noun": "shape nouns / categories", "color": "colors", "function": "function words (vs all objects)",
               "answer": "VQA answers (vs the question's objects)"}
OBJECT_CLASSES = ("noun", "color")


def _cis(rows: list[dict], whos, metrics, seed: int = 0) -> dict:
    """{who: {metric: [mean, low, high]}} from one draw of bootstrap indices for the group."""
    columns = {(who, metric): [r[who][metric] for r in rows] for who in whos for metric in metrics}
    cis = bootstrap_cis(columns, seed=seed)
    return {who: {metric: list(cis[(who, metric)]) for metric in metrics} for who in whos}


def _aggregate(rows: list[dict], seed: int = 0) -> dict:
    """{"n", metric: {who: [mean, low, high]}} for every metric of the table."""
    metrics = metric_keys()
    by_who = _cis(rows, BASELINES, metrics, seed)
    return {"n": len(rows), **{metric: {who: by_who[who][metric] for who in BASELINES} for metric in metrics}}


def methods_in(lines: list[dict], kind: str) -> list[str]:
    """The methods of ``kind`` lines ("word" or "answer"), in the order the run wrote them."""
    return list(dict.fromkeys(line.get("method", "?") for line in lines if line["kind"] == kind))


def method_table(words: list[dict], answers: list[dict], sanity: dict | None = None) -> dict:
    """Method x word class x metric (own captions and VQA answers) with both baselines per class."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for word in words:
        if word["source"] == "generated":
            groups[word["class"]].append(word)
    for answer in answers:
        groups["answer"].append(answer)
    classes = [c for c in TABLE_CLASSES if c in groups] + sorted(set(groups) - set(TABLE_CLASSES))
    # lines written before a metric joined the table (an old run re-summarized) lack its key: leave it out
    everyone = [r for rows in groups.values() for r in rows]
    metrics = tuple(m for m in metric_keys(METHOD_TABLE) if all(m in r["model"] for r in everyone))
    table: dict = {"source": "generated", "metrics": list(metrics), "classes": classes, "methods": {},
                   "baselines": {}}
    for word_class in classes:
        rows = groups[word_class]
        methods = list(dict.fromkeys(r.get("method", "?") for r in rows))
        first = [r for r in rows if r.get("method", "?") == methods[0]]
        table["baselines"][word_class] = {"n": len(first), **_cis(first, ("center", "random"), metrics)}
        for method in methods:
            mine = [r for r in rows if r.get("method", "?") == method]
            table["methods"].setdefault(method, {})[word_class] = {
                "n": len(mine), **_cis(mine, ("model",), metrics)["model"]}
    table["f1_iou"] = f1_iou_table(table)
    if sanity is not None:
        add_sanity_flags(table, sanity)
    return table


def f1_iou_table(table: dict) -> dict:
    """TAM's F1-IoU per method and baseline, from the method table's class means: the harmonic
    mean of the nouns' mean Obj-IoU and 1 - the function words' mean Func-IoU (with their means;
    empty when a run has no nouns, no function words or no such metrics)."""
    if not {"obj_iou", "func_iou"} <= set(table["metrics"]) or not {"noun", "function"} <= set(table["classes"]):
        return {}

    def entry(noun: dict, function: dict) -> dict:
        obj, func = noun["obj_iou"][0], function["func_iou"][0]
        return {"obj_iou": obj, "func_iou": func, "f1_iou": f1_iou(obj, func)}

    out = {method: entry(classes["noun"], classes["function"]) for method, classes in table["methods"].items()
           if "noun" in classes and "function" in classes}
    for who in ("center", "random"):
        out[f"{who} baseline"] = entry(table["baselines"]["noun"][who], table["baselines"]["function"][who])
    return out


def add_sanity_flags(table: dict, sanity: dict) -> None:
    """Copy each method's sanity verdict (mean |rho| at full randomization, flagged) into the table."""
    table["sanity_threshold"] = sanity.get("threshold")
    table["sanity"] = {name: {"final_mean_abs_spearman": entry.get("final_mean_abs_spearman"),
                              "flagged": bool(entry.get("flagged"))}
                       for name, entry in sanity.get("methods", {}).items()}


def summarize(lines: list[dict], data_skipped, images: int, incomplete_batches: int, config=None) -> dict:
    words = [line for line in lines if line["kind"] == "word"]
    answers = [line for line in lines if line["kind"] == "answer"]
    caption_methods, vqa_methods = methods_in(lines, "word"), methods_in(lines, "answer")
    first_words = [w for w in words if w.get("method", "?") == caption_methods[0]] if words else []
    first_answers = [a for a in answers if a.get("method", "?") == vqa_methods[0]] if answers else []
    skips = [s.as_dict() for s in data_skipped]
    skips += [{"kind": line["item"], "id": line["id"], "reason": line["reason"]} for line in lines if line["kind"] == "skip"]
    summary: dict = {"images": images, "incomplete_batches": incomplete_batches, "words_scored": len(first_words),
                     "answers_scored": len(first_answers),
                     "methods": {"captions": caption_methods, "vqa": vqa_methods},
                     "method_table": method_table(words, answers),
                     "captions": {}, "per_category": {}, "skipped": skips}
    if config is not None:
        summary["config"] = asdict(config)
    by_source_class: dict[tuple[str, str], list[dict]] = defaultdict(list)
    by_category: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for word in first_words:
        by_source_class[(word["source"], word["class"])].append(word)
        if word["class"] in OBJECT_CLASSES:
            by_source_class[(word["source"], "all")].append(word)
            by_category[(word["source"], f"{word['class']}:{word['target']}")].append(word)
    for (source, word_class), rows in sorted(by_source_class.items()):
        summary["captions"].setdefault(source, {})[word_class] = _aggregate(rows)
    for (source, key), rows in sorted(by_category.items()):
        summary["per_category"].setdefault(source, {})[key] = _aggregate(rows)
    if first_answers:
        by_type: dict[str, list[dict]] = defaultdict(list)
        for answer in first_answers:
            by_type[answer["question_type"]].append(answer)
            by_type["all"].append(answer)
        summary["vqa"] = {kind: {**_aggregate(rows), "accuracy": sum(r["correct"] for r in rows) / len(rows)}
                          for kind, rows in sorted(by_type.items())}
    return summary


def _cell(stat: list[float], percent: bool = True) -> str:
    mean, low, high = stat
    scale = 100 if percent else 1
    return f"{scale * mean:.1f} [{scale * low:.1f}, {scale * high:.1f}]"


def _number(value, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _method_markdown(summary: dict) -> list[str]:
    table = summary.get("method_table")
    if not table or not table["classes"]:
        return []
    flags = table.get("sanity", {})
    threshold = table.get("sanity_threshold")
    metrics = table["metrics"]
    out = ["\n## Methods × word classes\n",
           "Own captions (and VQA answers); percentages with 95% bootstrap CIs. The baselines do not depend on "
           "the method. Function words are scored against the union of all objects in the image."
           + (f" ⚠ = the maps keep mean |Spearman ρ| ≥ {threshold} with the trained model's maps after every "
              "weight is randomized (they do not depend on the model)." if flags else "") + "\n",
           "| words | method | n | " + " | ".join(metrics) + " |",
           "|---|---|---:|" + "---|" * len(metrics)]
    for word_class in table["classes"]:
        name = CLASS_NAMES.get(word_class, word_class)
        for method, classes in table["methods"].items():
            if word_class not in classes:
                continue
            agg = classes[word_class]
            flag = " ⚠" if flags.get(method, {}).get("flagged") else ""
            out.append(f"| {name} | {method}{flag} | {agg['n']} | " + " | ".join(_cell(agg[m]) for m in metrics) + " |")
        base = table["baselines"][word_class]
        for who in ("center", "random"):
            out.append(f"| {name} | *{who} baseline* | {base['n']} | "
                       + " | ".join(_cell(base[who][m]) for m in metrics) + " |")
    return out


def _f1_markdown(summary: dict) -> list[str]:
    rows = (summary.get("method_table") or {}).get("f1_iou")
    if not rows:
        return []
    out = ["\n## TAM's metrics (Obj-IoU on nouns, Func-IoU on function words, F1-IoU)\n",
           "Obj-IoU: best IoU with the mask of the normalized map binarized at 0.05..0.95 (higher is better); "
           "Func-IoU: mean share of the image above those thresholds (lower is better); F1-IoU: harmonic mean "
           "of Obj-IoU and 1 - Func-IoU. Percentages.\n",
           "| method | Obj-IoU (nouns) | Func-IoU (function words) | F1-IoU |", "|---|---:|---:|---:|"]
    for name, entry in rows.items():
        # not "*center baseline*": that cell marks the method table's baseline rows
        label = name.replace(" baseline", " (baseline)")
        out.append(f"| {label} | " + " | ".join(f"{100 * entry[k]:.1f}" for k in ("obj_iou", "func_iou", "f1_iou"))
                   + " |")
    return out


def _perturbation_markdown(summary: dict) -> list[str]:
    study = summary.get("perturbation")
    if not study or not study.get("methods"):
        return []
    out = ["\n## Perturbation test per method (VQA, Chefer et al.)\n",
           f"On {study['questions']} questions: area under the explained answer's probability as the image's pixels "
           f"are grayed in {study['steps']} steps, most relevant first (positive: lower is better) and least relevant "
           "first (negative: higher is better); a random order beside them.\n",
           "| method | positive AUC (map / random) | negative AUC (map / random) |", "|---|---|---|"]
    for name, entry in study["methods"].items():
        out.append(f"| {name} | {_number(entry['positive_auc_map'])} / {_number(entry['positive_auc_random'])} | "
                   f"{_number(entry['negative_auc_map'])} / {_number(entry['negative_auc_random'])} |")
    return out


def _studies_markdown(summary: dict) -> list[str]:
    sanity, faith = summary.get("sanity"), summary.get("faithfulness")
    if not sanity and not faith:
        return []
    names = list(dict.fromkeys(list((sanity or {}).get("methods", {})) + list((faith or {}).get("methods", {}))))
    out = ["\n## Sanity (model randomization) and faithfulness (deletion / insertion) per method\n"]
    header = "| method |"
    rule = "|---|"
    if sanity:
        out.insert(1, f"Sanity on {sanity['images']} images: mean |Spearman ρ| of each word's map with the trained "
                      f"model's as weights are re-initialized from the top down; flagged when ≥ {sanity['threshold']} "
                      "at 100%." + (f" Faithfulness on {faith['images']} images, {faith['words']} words: area under the "
                                   "word probability as pixels are deleted / inserted in map order (random order "
                                   "beside it; lower deletion and higher insertion are better)." if faith else "") + "\n")
        header += " " + " | ".join(f"mean abs ρ at {int(100 * s['randomized_fraction'])}%" for s in sanity["stages"]) + \
            " | flagged |"
        rule += "---:|" * (len(sanity["stages"]) + 1)
    elif faith:
        out.insert(1, f"Faithfulness on {faith['images']} images, {faith['words']} words.\n")
    if faith:
        header += " deletion AUC (map / random) | insertion AUC (map / random) |"
        rule += "---|---|"
    out += [header, rule]
    for name in names:
        row = f"| {name} |"
        if sanity:
            entry = sanity["methods"].get(name)
            stages = entry["stages"] if entry else []
            row += " " + " | ".join(_number(s["mean_abs_spearman"]) for s in stages) + \
                f" | {'**yes** ⚠' if entry and entry['flagged'] else 'no'} |"
        if faith:
            entry = faith["methods"].get(name, {})
            row += (f" {_number(entry.get('deletion_auc_map'))} / {_number(entry.get('deletion_auc_random'))} |"
                    f" {_number(entry.get('insertion_auc_map'))} / {_number(entry.get('insertion_auc_random'))} |")
        out.append(row)
    return out


def study_markdown(summary: dict) -> list[str]:
    """TAM's metrics, the perturbation test and the sanity / faithfulness studies as markdown
    lines (summary.md; the HTML report renders the same lines)."""
    return _f1_markdown(summary) + _perturbation_markdown(summary) + _studies_markdown(summary)


def markdown_tables(summary: dict) -> str:
    """The method table, then tables per word class and per category (first method): model
    against both baselines, 95% bootstrap CIs."""
    methods = summary.get("methods", {})
    first = methods["captions"][0] if methods.get("captions") else ""
    out = [f"# Evaluation summary\n\n{summary['images']} images, {summary['words_scored']} scored words, "
           f"{summary['answers_scored']} scored answers, {len(summary['skipped'])} skipped items. "
           "Percentages with 95% bootstrap CIs.\n"]
    out += _method_markdown(summary)
    out += study_markdown(summary)
    for source, classes in summary["captions"].items():
        out.append(f"\n## Caption words ({source}{', ' + first if first else ''})\n")
        out.append("| words | n | metric | model | center baseline | random baseline |\n|---|---:|---|---|---|---|")
        for word_class, agg in classes.items():
            for metric in headline_keys():
                out.append(f"| {word_class} | {agg['n']} | {metric} | " +
                           " | ".join(_cell(agg[metric][who]) for who in BASELINES) + " |")
    compact = [get_metric(key) for key in metric_keys(COMPACT)]  # model and center columns
    for source, categories in summary["per_category"].items():
        out.append(f"\n## Per category ({source}{', ' + first if first else ''})\n")
        out.append("| category | n | " + " | ".join(m.label for m in compact) + " | "
                   + " | ".join(f"center {m.short_label()}" for m in compact) + " |\n|---|---:|"
                   + "---|" * (2 * len(compact)))
        for key, agg in categories.items():
            out.append(f"| {key} | {agg['n']} | " + " | ".join(_cell(agg[m.key]['model']) for m in compact) + " | "
                       + " | ".join(_cell(agg[m.key]['center']) for m in compact) + " |")
    if "vqa" in summary:
        out.append("\n## VQA answers (map of the model's answer vs the question's objects"
                   f"{', ' + methods['vqa'][0] if methods.get('vqa') else ''})\n")
        lead = get_metric(LEAD)  # the baselines' columns: the lead metric only
        out.append("| question type | n | accuracy | " + " | ".join(m.label for m in compact)
                   + f" | center {lead.short_label()} | random {lead.short_label()} |\n|---|---:|---:|"
                   + "---|" * (len(compact) + 2))
        for kind, agg in summary["vqa"].items():
            out.append(f"| {kind} | {agg['n']} | {100 * agg['accuracy']:.1f} | "
                       + " | ".join(_cell(agg[m.key]['model']) for m in compact)
                       + f" | {_cell(agg[LEAD]['center'])} | {_cell(agg[LEAD]['random'])} |")
    for key in ("sanity", "faithfulness", "perturbation"):
        if key in summary:
            out.append(f"\n## {key} (all numbers)\n\n```\n{json.dumps(summary[key], indent=1)}\n```")
    if summary["skipped"]:
        out.append("\n## Skipped\n")
        out += [f"- {s.get('kind')} {s.get('id')}: {s.get('reason')}" for s in summary["skipped"][:200]]
    return "\n".join(out) + "\n"


def write_reports(out: Path, summary: dict) -> None:
    """summary.json and summary.md (figures are the report floor's: ``mmgradcam eval`` draws them)."""
    if "sanity" in summary and "method_table" in summary:
        add_sanity_flags(summary["method_table"], summary["sanity"])
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(out / "summary.json")
    (out / "summary.md").write_text(markdown_tables(summary))
