"""Train, calibrate and report a gate on the gate data format (DIR/train, DIR/test): the Python API
behind `eco-proxy classifier train --gate-data`, `eco-proxy classifier refit-vocabulary` and the demo build."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from classifier.encoder import DEFAULT_ENCODER, GATE_ENCODER
from classifier.gate_data import GateRecord, obfuscated
from classifier.runtime import DEFAULT_RUNTIME


@dataclass(frozen=True)
class GateTraining:
    gate_data: Path
    out: Path
    model: str = "finetuned"  # or "logistic", the baseline
    alpha: float = 0.01
    delta: float = 0.1
    epochs: int = 4
    max_minutes: float = 20.0
    layers: int | None = None  # finetuned: the encoder's first layers kept (None: all)
    frozen_layers: int = 0  # finetuned: the encoder's lowest layers kept as pretrained
    diluted_fraction: float = 0.1
    obfuscated_fraction: float = 0.1  # obfuscated copies of the training split's forget prompts
    misspelt_fraction: float = 0.0  # misspelt copies of them
    encoder: str | None = None  # default: GATE_ENCODER (finetuned), DEFAULT_ENCODER (logistic)
    C: float = 10.0  # logistic only
    seed: int = 0
    entities: Path | None = None  # key terms, one per line; default: derived from the training split
    entities_top_k: int = 40
    runtime: str = DEFAULT_RUNTIME  # finetuned: what it scores and is calibrated with (`classifier.runtime`)

    def __post_init__(self) -> None:
        for name in ("diluted_fraction", "obfuscated_fraction", "misspelt_fraction"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a fraction of 0 or more, not {value}")


TERM_FRAMES_PER_TERM = 2


def term_records(directory: Path) -> list[GateRecord]:
    """Training prompts from the target's vocabulary (DIR/terms/forget.txt) and its namesakes
    (DIR/terms/retain.txt): each term in a few neutral frames, chosen by a hash of the term. The
    vocabulary defines the target, so these go to the training split only, never to calibration or test."""
    import hashlib

    from classifier.data import ENTITY_FRAMES, read_terms

    records = []
    for label, group in (("forget", "direct"), ("retain", "namesakes")):
        path = directory / "terms" / f"{label}.txt"
        for term in read_terms(path) if path.is_file() else []:
            start = int.from_bytes(hashlib.sha256(term.encode()).digest()[:4], "big")
            for k in range(TERM_FRAMES_PER_TERM):
                frame = ENTITY_FRAMES[(start + k) % len(ENTITY_FRAMES)]
                records.append(GateRecord(frame.format(term), label, group, f"term:{term}", source=f"{path.name}"))
    return records


def gate_splits(directory: Path, seed: int, diluted_fraction: float) -> dict[str, list[GateRecord]]:
    """train and calibration (DIR/train split by cluster) and test (DIR/test), each with diluted forget
    prompts made from its own forget and long-document records; the term prompts join train."""
    from classifier.gate_data import apart_from, diluted, load_records, split_by_cluster

    test = load_records(directory / "test")
    # The test split was written apart; a cluster it names (the same entity or topic) or a text it holds
    # is kept out of training and calibration too, so that nothing sits on both sides.
    kept = apart_from(load_records(directory / "train"), test)
    parts = split_by_cluster(kept, seed=seed)
    splits = {"train": parts["train"] + term_records(directory), "calibration": parts["calibration"], "test": test}
    for offset, (name, records) in enumerate(splits.items()):
        forget = [r for r in records if r.label == "forget" and r.group != "diluted" and not r.cluster.startswith("term:")]
        hosts = [r for r in records if r.group == "long_documents"]
        count = round(diluted_fraction * len(forget))
        if count and hosts and any(r.messages is None for r in forget):
            records.extend(diluted(forget, hosts, count, seed=seed + offset))
    return splits


def counts(records: list[GateRecord]) -> str:
    forget = sum(r.label == "forget" for r in records)
    return f"{forget} forget, {len(records) - forget} retain"


def train_gate(job: GateTraining, log: Any = print) -> dict[str, Any]:
    """Fit on the train part, calibrate per retain group on the calibration part, report calibration and
    the frozen test split; writes the artifact and its report.md to `job.out`. Returns the reports."""
    from classifier.calibration import mondrian_threshold
    from classifier.data import read_terms
    from classifier.entities import distinctive_terms
    from classifier.report import score_records

    splits = gate_splits(job.gate_data, job.seed, job.diluted_fraction)
    forget = [r for r in splits["train"] if r.label == "forget" and r.group != "diluted"]
    splits["train"] += obfuscated(forget, round(job.obfuscated_fraction * len(forget)), seed=job.seed)
    splits["train"] += obfuscated(forget, round(job.misspelt_fraction * len(forget)), seed=job.seed,
                                  disguise="misspelt")
    for name, records in splits.items():
        log(f"{name:12s} {counts(records)}")
    train, calibration = splits["train"], splits["calibration"]
    texts, labels = [r.text for r in train], [int(r.label == "forget") for r in train]
    started = time.monotonic()
    if job.model == "finetuned":
        from classifier.finetuned import FineTunedClassifier

        vocabulary = job.gate_data / "terms" / "forget.txt"
        classifier: Any = FineTunedClassifier(job.encoder or GATE_ENCODER, epochs=job.epochs,
                                              max_minutes=job.max_minutes, layers=job.layers,
                                              frozen_layers=job.frozen_layers,
                                              random_state=job.seed, runtime=job.runtime,
                                              terms=read_terms(vocabulary) if vocabulary.is_file() else ())
        classifier.fit(texts, labels, progress=True)
        _log_vocabulary(classifier, log)
        _calibrate_gate(classifier, calibration, job.alpha, job.delta, log)
    elif job.model == "logistic":
        from classifier.model import PromptClassifier

        classifier = PromptClassifier(job.encoder or DEFAULT_ENCODER, C=job.C, random_state=job.seed)
        log("encoding and fitting the training split ...")
        classifier.fit(texts, labels, progress=True)
        retain = [r for r in calibration if r.label == "retain"]
        log(f"calibrating on {len(retain)} retain prompts (alpha {job.alpha}, delta {job.delta}) ...")
        by_group: dict[str, list[float]] = {}
        for record, score in zip(retain, score_records(classifier, retain, progress=True)):
            by_group.setdefault(record.group, []).append(float(score))
        classifier.threshold_, groups = mondrian_threshold(by_group, job.alpha, job.delta)
        classifier.alpha_ = job.alpha
        classifier.metrics_["calibration"] = {"delta": job.delta, "group_thresholds": groups}
    else:
        raise ValueError(f"unknown model {job.model!r}; use finetuned or logistic")
    seconds = time.monotonic() - started
    classifier.entities_ = read_terms(job.entities) if job.entities else distinctive_terms(
        [r.text for r in train if r.label == "forget"], [r.text for r in train if r.label == "retain"],
        top_k=job.entities_top_k)
    classifier.metrics_["training_seconds"] = round(seconds, 1)
    log(f"entities: {', '.join(classifier.entities_[:15])}{' ...' if len(classifier.entities_) > 15 else ''}")
    header = f"Model: {job.model}; fitted and calibrated in {seconds / 60:.1f} min on {counts(train)}"
    if job.model == "finetuned":
        header += f", scored with {job.runtime}"
    return _report_and_save(classifier, splits, job.out, header, job.alpha, job.delta, log)


@dataclass(frozen=True)
class VocabularyRefit:
    artifact: Path  # a fine-tuned gate; its encoder is kept as it is
    gate_data: Path
    out: Path  # may be `artifact` itself
    alpha: float = 0.01
    delta: float = 0.1
    diluted_fraction: float = 0.1
    seed: int = 0  # the split seed the artifact was trained with
    runtime: str | None = None  # another runtime to serve and calibrate with; default: the artifact's


def refit_vocabulary(job: VocabularyRefit, log: Any = print) -> dict[str, Any]:
    """A fine-tuned gate's vocabulary stage fitted again on the training split's retain texts (after the
    terms or the matching rules changed) and the gate recalibrated, in minutes instead of a new fine-tune;
    reported and written as `train_gate` does."""
    from classifier.data import read_terms
    from classifier.finetuned import FineTunedClassifier

    classifier = FineTunedClassifier.load(job.artifact)
    if job.runtime is not None:
        classifier.use_runtime(job.runtime)
    splits = gate_splits(job.gate_data, job.seed, job.diluted_fraction)
    train = splits["train"]
    classifier.fit_vocabulary(read_terms(job.gate_data / "terms" / "forget.txt"),
                              [r.text for r in train if r.label == "retain"])
    _log_vocabulary(classifier, log)
    _calibrate_gate(classifier, splits["calibration"], job.alpha, job.delta, log)
    minutes = classifier.metrics_.get("training_seconds", 0.0) / 60
    header = (f"Model: finetuned; fitted in {minutes:.1f} min, its vocabulary stage refitted on {counts(train)} "
              f"and calibrated again, scored with {classifier.runtime}")
    return _report_and_save(classifier, splits, job.out, header, job.alpha, job.delta, log)


def _log_vocabulary(classifier: Any, log: Any) -> None:
    kept = classifier.metrics_["vocabulary"]
    log(f"vocabulary: {kept['kept']} of {kept['terms']} terms kept; used by retain texts, so dropped: "
        f"{', '.join(kept['dropped_as_used_by_retain_texts']) or 'none'}")


def _calibrate_gate(classifier: Any, calibration: list[GateRecord], alpha: float, delta: float, log: Any) -> None:
    from classifier.report import record_segments

    log(f"calibrating on {counts(calibration)} (alpha {alpha}, delta {delta}) ...")
    classifier.calibrate([record_segments(r) for r in calibration], [int(r.label == "forget") for r in calibration],
                         [r.group for r in calibration], alpha, delta)


def _report_and_save(classifier: Any, splits: dict[str, list[GateRecord]], out: Path, header: str, alpha: float,
                     delta: float, log: Any) -> dict[str, Any]:
    """Rates on the calibration and test splits into the artifact's metrics and its report.md."""
    from classifier.report import markdown, score_records, split_report

    reports = {name: split_report(splits[name], score_records(classifier, splits[name], progress=True),
                                  classifier.threshold_) for name in ("calibration", "test")}
    classifier.metrics_.update(reports)
    classifier.save(out)
    text = markdown(reports, [f"{header}; alpha {alpha}, delta {delta}; threshold {classifier.threshold_:.4f}."])
    (out / "report.md").write_text(text, encoding="utf-8")
    log("\n" + text)
    log(f"wrote {out} (and report.md in it)")
    return reports


@dataclass(frozen=True)
class FileTraining:
    """The logistic baseline on prompt files (JSONL of `text`), each split by `classifier.data.split`."""

    forget: tuple[Path, ...] | list[Path]
    retain: tuple[Path, ...] | list[Path]
    out: Path
    alpha: float = 0.01
    encoder: str = DEFAULT_ENCODER
    C: float = 10.0
    seed: int = 0
    entities: Path | None = None
    entities_top_k: int = 40
    forget_entities: tuple[Path, ...] = ()  # names, one per line, made into extra training prompts
    retain_entities: tuple[Path, ...] = ()


def train_logistic_files(job: FileTraining, log: Any = print) -> dict[str, Any]:
    """Fit on the train split, calibrate on the retain calibration split, report the test split; writes
    the artifact to `job.out` and returns the test report."""
    from classifier.data import entity_prompts, read_terms
    from classifier.entities import distinctive_terms
    from classifier.model import PromptClassifier
    from classifier.report import evaluate_texts

    forget = {s: texts(job.forget, s) for s in ("train", "calibration", "test")}
    retain = {s: texts(job.retain, s) for s in ("train", "calibration", "test")}
    entities = read_terms(job.entities) if job.entities else None
    forget_named = entity_prompts([name for path in job.forget_entities for name in read_terms(path)])
    retain_named = entity_prompts([name for path in job.retain_entities for name in read_terms(path)])
    for label, parts, named in (("forget", forget, forget_named), ("retain", retain, retain_named)):
        log(f"{label} prompts  train {len(parts['train'])}  calibration {len(parts['calibration'])}  "
            f"test {len(parts['test'])}" + (f"  (+ {len(named)} from names, train only)" if named else ""))
    classifier = PromptClassifier(job.encoder, C=job.C, random_state=job.seed)
    log("encoding and fitting the training split ...")
    positives, negatives = forget["train"] + forget_named, retain["train"] + retain_named
    classifier.fit(positives + negatives, [1] * len(positives) + [0] * len(negatives), progress=True)
    log(f"calibrating on {len(retain['calibration'])} held-out retain prompts (alpha {job.alpha}) ...")
    classifier.calibrate(retain["calibration"], job.alpha)
    log("scoring the test split ...")
    report = evaluate_texts(classifier, forget["test"], retain["test"])
    classifier.metrics_["test"] = report
    classifier.entities_ = entities if entities is not None else distinctive_terms(
        forget["train"], retain["train"], top_k=job.entities_top_k)
    classifier.save(job.out)
    log(f"\nthreshold {classifier.threshold_:.4f}  (alpha {job.alpha})")
    log(f"test FPR     {percent(report['fpr'], report['fpr_ci'])}   on {report['n_retain']} retain prompts")
    log(f"test recall  {percent(report['recall'], report['recall_ci'])}   on {report['n_forget']} forget prompts")
    log(f"test AUC     {report.get('auc', float('nan')):.4f}")
    log(f"entities     {', '.join(classifier.entities_[:15])}{' ...' if len(classifier.entities_) > 15 else ''}")
    log(f"wrote {job.out}")
    return report


def texts(paths: list[Path], split: str) -> list[str]:
    from classifier.data import read_jsonl
    from classifier.data import split as split_records

    records = [r for path in paths for r in read_jsonl(path)]
    if split != "all":
        records = split_records(records)[split]
    return [r["text"] for r in records]


def percent(value: float | None, interval: list[float] | None) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:5.1f}%  [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"
