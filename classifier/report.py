"""How a gate does on a split of the gate data: FPR per retain group, recall per forget kind and per
language, each with a Wilson 95% interval, as JSON for the artifact and as Markdown for people."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from classifier.calibration import rate_with_interval
from classifier.gate_data import GateRecord
from classifier.loading import GateClassifier


def record_segments(record: GateRecord) -> list[str]:
    """What the proxy reads of a record: its text and, for a chat, each message as well."""
    if record.messages is None:
        return [record.text]
    return list(dict.fromkeys([record.text, *(message["content"] for message in record.messages)]))


def score_records(classifier: GateClassifier, records: Sequence[GateRecord], progress: bool = False) -> np.ndarray:
    """Each record's score as the proxy computes it: the maximum over its segments (one batched call)."""
    pieces = [record_segments(record) for record in records]
    flat = [segment for segments in pieces for segment in segments]
    owners = np.repeat(np.arange(len(records)), [len(segments) for segments in pieces])
    scores = np.zeros(len(records), dtype=np.float64)
    if flat:
        np.maximum.at(scores, owners, classifier.score(flat, progress=progress))  # type: ignore[call-arg]
    return scores


def evaluate_texts(classifier: GateClassifier, forget_texts: Sequence[str],
                   retain_texts: Sequence[str]) -> dict[str, Any]:
    """FPR on the retain texts and recall on the forget texts at the classifier's threshold, with Wilson
    95% intervals (None for a side given no texts), and the AUC when both sides have texts."""
    from sklearn.metrics import roc_auc_score

    if classifier.threshold_ is None:
        raise ValueError("no threshold: calibrate the classifier first")
    forget = classifier.score(forget_texts) if len(forget_texts) else np.zeros(0)
    retain = classifier.score(retain_texts) if len(retain_texts) else np.zeros(0)
    flagged_retain = rate_with_interval(int((retain > classifier.threshold_).sum()), len(retain))
    flagged_forget = rate_with_interval(int((forget > classifier.threshold_).sum()), len(forget))
    report: dict[str, Any] = {
        "threshold": classifier.threshold_, "n_forget": len(forget), "n_retain": len(retain),
        "retain_flagged": flagged_retain["hits"], "forget_flagged": flagged_forget["hits"],
        "fpr": flagged_retain["rate"], "fpr_ci": flagged_retain["ci"],
        "recall": flagged_forget["rate"], "recall_ci": flagged_forget["ci"],
    }
    if len(forget) and len(retain):
        labels = np.r_[np.ones(len(forget)), np.zeros(len(retain))]
        report["auc"] = float(roc_auc_score(labels, np.r_[forget, retain]))
    return report


def split_report(records: Sequence[GateRecord], scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """Rates at `threshold` (a prompt is flagged when its score is above it), overall and by group."""
    from sklearn.metrics import roc_auc_score

    flagged = np.asarray(scores) > threshold
    forget = np.array([record.label == "forget" for record in records], dtype=bool)

    def rates(mask_of: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
        return {key: rate_with_interval(int(flagged[mask].sum()), int(mask.sum()))
                for key, mask in sorted(mask_of.items())}

    def by(attribute: str, among: np.ndarray) -> dict[str, np.ndarray]:
        values = [getattr(record, attribute) for record in records]
        return {str(v): among & np.array([value == v for value in values]) for v in set(values) if v is not None}

    multilingual = forget & np.array([record.group == "multilingual" for record in records])
    # retain prompts written in a named language: whether a neighbour in another language is left alone
    languages = ~forget & np.array([record.lang is not None for record in records])
    report: dict[str, Any] = {
        "threshold": threshold,
        "fpr": rate_with_interval(int(flagged[~forget].sum()), int((~forget).sum())),
        "recall": rate_with_interval(int(flagged[forget].sum()), int(forget.sum())),
        "fpr_by_group": rates({g: m for g, m in by("group", ~forget).items() if m.any()}),
        "recall_by_group": rates({g: m for g, m in by("group", forget).items() if m.any()}),
        "recall_by_language": rates({lang: m for lang, m in by("lang", multilingual).items() if m.any()}),
        "fpr_by_language": rates({lang: m for lang, m in by("lang", languages).items() if m.any()}),
        "fpr_languages": rate_with_interval(int(flagged[languages].sum()), int(languages.sum())),
    }
    if forget.any() and (~forget).any():
        report["auc"] = float(roc_auc_score(forget, scores))
    return report


def _rate(entry: dict[str, Any]) -> str:
    if entry["rate"] is None:
        return "n/a | "
    low, high = entry["ci"]
    return f"{100 * entry['rate']:.1f}% | [{100 * low:.1f}, {100 * high:.1f}]"


def _table(title: str, rate_name: str, rows: dict[str, dict[str, Any]], total: dict[str, Any]) -> list[str]:
    lines = [f"| {title} | n | {rate_name} | 95% CI |", "|---|---:|---:|---|"]
    lines += [f"| {key} | {entry['n']} | {_rate(entry)} |" for key, entry in rows.items()]
    lines.append(f"| **all** | {total['n']} | {_rate(total)} |")
    return lines + [""]


def markdown(reports: dict[str, dict[str, Any]], header: Sequence[str] = ()) -> str:
    """The reports of several splits (name -> split_report) as one Markdown document."""
    lines = ["# Gate report", "", *header, ""]
    for name, report in reports.items():
        auc = f", AUC {report['auc']:.4f}" if "auc" in report else ""
        lines += [f"## {name} split (threshold {report['threshold']:.4f}{auc})", ""]
        lines += _table("retain group", "FPR", report["fpr_by_group"], report["fpr"])
        lines += _table("forget kind", "recall", report["recall_by_group"], report["recall"])
        if report["recall_by_language"]:
            multilingual = report["recall_by_group"].get("multilingual", report["recall"])
            lines += _table("language (multilingual)", "recall", report["recall_by_language"], multilingual)
        if report["fpr_by_language"]:
            lines += _table("language (retain prompts with one)", "FPR", report["fpr_by_language"],
                            report["fpr_languages"])
    return "\n".join(lines).rstrip() + "\n"
