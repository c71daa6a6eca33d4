"""`eco-proxy classifier train|eval`: build a calibrated prompt classifier and measure it."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from classifier.encoder import DEFAULT_ENCODER


def register(groups: argparse._SubParsersAction) -> None:
    group = groups.add_parser("classifier", help="train and evaluate the prompt classifier")
    commands = group.add_subparsers(dest="classifier_command", required=True)

    train = commands.add_parser(
        "train", help="fit on forget/retain JSONL, calibrate the threshold, report on the test split",
        description="Each file is split train/calibration/test (60/20/20 by a hash of the text, unless a "
                    "record names its split). The threshold is calibrated on held-out retain prompts so that "
                    "the false-positive rate is at most alpha.")
    train.add_argument("--forget", type=Path, action="append", required=True, help="forget-target prompts (JSONL)")
    train.add_argument("--retain", type=Path, action="append", required=True, help="retain prompts (JSONL)")
    train.add_argument("--out", type=Path, required=True, help="artifact directory to write")
    train.add_argument("--alpha", type=float, default=0.05, help="target false-positive rate")
    train.add_argument("--encoder", default=DEFAULT_ENCODER, help="sentence-transformers directory")
    train.add_argument("--C", type=float, default=10.0, help="inverse regularisation strength")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--entities-top-k", type=int, default=40, help="how many key terms to derive")
    train.add_argument("--entities", type=Path, help="key terms, one per line (instead of derived ones)")
    train.add_argument("--forget-entities", type=Path, action="append", default=[],
                       help="names from the target, one per line: each becomes training prompts in neutral frames")
    train.add_argument("--retain-entities", type=Path, action="append", default=[],
                       help="names from neighbouring topics, one per line, likewise as retain training prompts")
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("eval", help="FPR and recall of an artifact, with 95%% intervals")
    evaluate.add_argument("--artifact", type=Path, required=True)
    evaluate.add_argument("--forget", type=Path, action="append", required=True)
    evaluate.add_argument("--retain", type=Path, action="append", required=True)
    evaluate.add_argument("--attack", type=Path, action="append", default=[],
                          help="forget prompts that avoid the obvious words (all records used)")
    evaluate.add_argument("--split", choices=["test", "all"], default="test",
                          help="which part of the forget/retain files to score")
    evaluate.add_argument("--json", type=Path, help="also write the report here")
    evaluate.set_defaults(run=_eval)


def _texts(paths: list[Path], split: str) -> list[str]:
    from classifier.data import read_jsonl
    from classifier.data import split as split_records

    records = [r for path in paths for r in read_jsonl(path)]
    if split != "all":
        records = split_records(records)[split]
    return [r["text"] for r in records]


def _percent(value: float | None, interval: list[float] | None) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:5.1f}%  [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def _train(args: argparse.Namespace) -> int:
    from classifier.data import entity_prompts, read_terms
    from classifier.entities import distinctive_terms
    from classifier.model import PromptClassifier

    try:
        forget = {s: _texts(args.forget, s) for s in ("train", "calibration", "test")}
        retain = {s: _texts(args.retain, s) for s in ("train", "calibration", "test")}
        entities = read_terms(args.entities) if args.entities else None
        forget_named = entity_prompts([name for path in args.forget_entities for name in read_terms(path)])
        retain_named = entity_prompts([name for path in args.retain_entities for name in read_terms(path)])
        for label, parts, named in (("forget", forget, forget_named), ("retain", retain, retain_named)):
            print(f"{label} prompts  train {len(parts['train'])}  calibration {len(parts['calibration'])}  "
                  f"test {len(parts['test'])}" + (f"  (+ {len(named)} from names, train only)" if named else ""))
        classifier = PromptClassifier(args.encoder, C=args.C, random_state=args.seed)
        print("encoding and fitting the training split ...")
        positives, negatives = forget["train"] + forget_named, retain["train"] + retain_named
        classifier.fit(positives + negatives, [1] * len(positives) + [0] * len(negatives), progress=True)
        print(f"calibrating on {len(retain['calibration'])} held-out retain prompts (alpha {args.alpha}) ...")
        classifier.calibrate(retain["calibration"], args.alpha)
        print("scoring the test split ...")
        report = classifier.evaluate(forget["test"], retain["test"])
    except (OSError, ValueError) as exc:
        print(f"eco-proxy classifier train: {exc}", file=sys.stderr)
        return 2
    classifier.metrics_["test"] = report
    classifier.entities_ = entities if entities is not None else distinctive_terms(
        forget["train"], retain["train"], top_k=args.entities_top_k)
    classifier.save(args.out)
    print(f"\nthreshold {classifier.threshold_:.4f}  (alpha {args.alpha})")
    print(f"test FPR     {_percent(report['fpr'], report['fpr_ci'])}   on {report['n_retain']} retain prompts")
    print(f"test recall  {_percent(report['recall'], report['recall_ci'])}   on {report['n_forget']} forget prompts")
    print(f"test AUC     {report.get('auc', float('nan')):.4f}")
    print(f"entities     {', '.join(classifier.entities_[:15])}{' ...' if len(classifier.entities_) > 15 else ''}")
    print(f"wrote {args.out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from classifier.metrics import wilson_interval
    from classifier.model import PromptClassifier

    try:
        classifier = PromptClassifier.load(args.artifact)
        report: dict[str, Any] = classifier.evaluate(_texts(args.forget, args.split), _texts(args.retain, args.split))
        if args.attack:
            attack = _texts(args.attack, "all")
            hits = int(classifier.predict(attack).sum())
            report["attack_n"] = len(attack)
            report["attack_recall"] = hits / len(attack)
            report["attack_recall_ci"] = list(wilson_interval(hits, len(attack)))
    except (OSError, ValueError) as exc:
        print(f"eco-proxy classifier eval: {exc}", file=sys.stderr)
        return 2
    report["split"] = args.split
    print(f"threshold      {report['threshold']:.4f}  ({args.split} split)")
    print(f"FPR            {_percent(report['fpr'], report['fpr_ci'])}   on {report['n_retain']} retain prompts")
    print(f"recall         {_percent(report['recall'], report['recall_ci'])}   on {report['n_forget']} forget prompts")
    if args.attack:
        print(f"attack recall  {_percent(report['attack_recall'], report['attack_recall_ci'])}   "
              f"on {report['attack_n']} attack prompts")
    if "auc" in report:
        print(f"AUC            {report['auc']:.4f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
