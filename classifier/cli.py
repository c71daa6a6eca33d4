"""`eco-proxy classifier train|eval`: build a calibrated prompt classifier and measure it.

With `--gate-data DIR` (the gate data format: DIR/train and DIR/test), either model is trained on
part of DIR/train, calibrated on the rest (split by cluster) and reported on both that part and
DIR/test. The older `--forget/--retain` files train the logistic baseline alone.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from classifier.encoder import DEFAULT_ENCODER, GATE_ENCODER
from classifier.runtime import DEFAULT_RUNTIME, RUNTIMES

MODELS = ("finetuned", "logistic")


def register(groups: argparse._SubParsersAction) -> None:
    group = groups.add_parser("classifier", help="train and evaluate the prompt classifier")
    commands = group.add_subparsers(dest="classifier_command", required=True)

    train = commands.add_parser(
        "train", help="fit, calibrate the threshold, report per group on the calibration and test splits",
        description="With --gate-data, DIR/train is split train/calibration by cluster and DIR/test is only "
                    "scored; diluted forget prompts are added to each split from its own records. The threshold "
                    "is the largest of per-retain-group thresholds whose FPR exceeds alpha with probability at "
                    "most delta. Without it, --forget/--retain files train the logistic baseline (60/20/20 "
                    "split by a hash of the text, split-conformal threshold).")
    train.add_argument("--model", choices=MODELS, help="default: finetuned with --gate-data, logistic otherwise")
    train.add_argument("--gate-data", type=Path, help="gate data directory (train/ and test/ of JSONL)")
    train.add_argument("--forget", type=Path, action="append", default=[], help="forget-target prompts (JSONL)")
    train.add_argument("--retain", type=Path, action="append", default=[], help="retain prompts (JSONL)")
    train.add_argument("--out", type=Path, required=True, help="artifact directory to write")
    train.add_argument("--alpha", type=float, default=0.01, help="target false-positive rate")
    train.add_argument("--delta", type=float, default=0.1,
                       help="allowed probability that a group's FPR exceeds alpha (--gate-data)")
    train.add_argument("--epochs", type=int, default=4, help="fine-tuning epochs (finetuned)")
    train.add_argument("--max-minutes", type=float, default=20.0,
                       help="time budget of the fine-tune: fewer epochs when it binds (finetuned)")
    train.add_argument("--layers", type=int,
                       help="keep the encoder's first N layers (default all): cheaper to train and to run (finetuned)")
    train.add_argument("--frozen-layers", type=int, default=0,
                       help="the encoder's lowest layers left as pretrained, with its embeddings (finetuned)")
    train.add_argument("--diluted-fraction", type=float, default=0.1,
                       help="diluted forget prompts added to each split, as a fraction of its forget records")
    train.add_argument("--obfuscated-fraction", type=float, default=0.1,
                       help="obfuscated copies of the training split's forget prompts, as a fraction of them")
    train.add_argument("--misspelt-fraction", type=float, default=0.0,
                       help="copies of the training split's forget prompts with a name or two misspelt, as a "
                       "fraction of them")
    train.add_argument("--encoder", help=f"{GATE_ENCODER} (finetuned's default), {DEFAULT_ENCODER} (logistic's "
                       "default) or a sentence-transformers directory")
    train.add_argument("--C", type=float, default=10.0, help="inverse regularisation strength (logistic)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--entities-top-k", type=int, default=40, help="how many key terms to derive")
    train.add_argument("--entities", type=Path, help="key terms, one per line (instead of derived ones)")
    train.add_argument("--forget-entities", type=Path, action="append", default=[],
                       help="names from the target, one per line: each becomes training prompts in neutral frames")
    train.add_argument("--retain-entities", type=Path, action="append", default=[],
                       help="names from neighbouring topics, one per line, likewise as retain training prompts")
    train.add_argument("--runtime", choices=RUNTIMES, default=DEFAULT_RUNTIME,
                       help="what the fine-tuned gate scores with once trained; it is calibrated on it")
    train.set_defaults(run=_train)

    refit = commands.add_parser(
        "refit-vocabulary", help="refit a fine-tuned gate's vocabulary stage and calibrate it again",
        description="For a fine-tuned artifact whose encoder is kept: the vocabulary stage is fitted again "
                    "(DIR/terms/forget.txt, minus the terms a retain text of the training split uses) with the "
                    "current matching rules, the threshold calibrated again on the calibration split, and both "
                    "splits reported, as train does. Minutes instead of a new fine-tune.")
    refit.add_argument("--artifact", type=Path, required=True, help="a fine-tuned gate artifact")
    refit.add_argument("--gate-data", type=Path, required=True, help="the gate data it was trained on")
    refit.add_argument("--out", type=Path, help="where to write (default: the artifact itself)")
    refit.add_argument("--alpha", type=float, default=0.01, help="target false-positive rate")
    refit.add_argument("--delta", type=float, default=0.1,
                       help="allowed probability that a group's FPR exceeds alpha")
    refit.add_argument("--diluted-fraction", type=float, default=0.1)
    refit.add_argument("--seed", type=int, default=0, help="the split seed the artifact was trained with")
    refit.add_argument("--runtime", choices=RUNTIMES,
                       help="score and calibrate with this runtime from now on (default: the artifact's)")
    refit.set_defaults(run=_refit_vocabulary)

    evaluate = commands.add_parser("eval", help="FPR and recall of an artifact, with 95%% intervals")
    evaluate.add_argument("--artifact", type=Path, required=True)
    evaluate.add_argument("--gate-data", type=Path,
                          help="report per group on DIR/train's calibration part and DIR/test (as train does)")
    evaluate.add_argument("--forget", type=Path, action="append", default=[],
                          help="forget prompts (JSONL): recall; either side may be left out")
    evaluate.add_argument("--retain", type=Path, action="append", default=[],
                          help="retain prompts (JSONL): FPR, e.g. an outside set of innocent prompts")
    evaluate.add_argument("--attack", type=Path, action="append", default=[],
                          help="forget prompts that avoid the obvious words (all records used)")
    evaluate.add_argument("--split", choices=["test", "all"], default="test",
                          help="which part of the forget/retain files to score")
    evaluate.add_argument("--seed", type=int, default=0, help="the split seed the artifact was trained with")
    evaluate.add_argument("--diluted-fraction", type=float, default=0.1)
    evaluate.add_argument("--json", type=Path, help="also write the report here")
    evaluate.add_argument("--markdown", type=Path, help="also write the Markdown report here (--gate-data)")
    evaluate.set_defaults(run=_eval)


# -- gate data ------------------------------------------------------------------------------
def _train_gate(args: argparse.Namespace) -> int:
    from classifier.training import GateTraining, train_gate

    try:
        train_gate(GateTraining(args.gate_data, args.out, model=args.model or "finetuned", alpha=args.alpha,
                                delta=args.delta, epochs=args.epochs, max_minutes=args.max_minutes,
                                layers=args.layers, frozen_layers=args.frozen_layers,
                                diluted_fraction=args.diluted_fraction, obfuscated_fraction=args.obfuscated_fraction,
                                misspelt_fraction=args.misspelt_fraction, encoder=args.encoder, C=args.C,
                                seed=args.seed, entities=args.entities, entities_top_k=args.entities_top_k,
                                runtime=args.runtime))
    except (OSError, ValueError) as exc:
        print(f"eco-proxy classifier train: {exc}", file=sys.stderr)
        return 2
    return 0


def _refit_vocabulary(args: argparse.Namespace) -> int:
    from classifier.training import VocabularyRefit, refit_vocabulary

    try:
        refit_vocabulary(VocabularyRefit(args.artifact, args.gate_data, args.out or args.artifact, alpha=args.alpha,
                                         delta=args.delta, diluted_fraction=args.diluted_fraction, seed=args.seed,
                                         runtime=args.runtime))
    except (OSError, ValueError) as exc:
        print(f"eco-proxy classifier refit-vocabulary: {exc}", file=sys.stderr)
        return 2
    return 0


def _eval_gate(args: argparse.Namespace) -> int:
    from classifier import load_classifier
    from classifier.report import markdown, score_records, split_report
    from classifier.training import gate_splits

    try:
        classifier = load_classifier(args.artifact)
        if classifier.threshold_ is None:
            raise ValueError(f"{args.artifact} is not calibrated")
        splits = gate_splits(args.gate_data, args.seed, args.diluted_fraction)
        reports = {name: split_report(splits[name], score_records(classifier, splits[name], progress=True),
                                      classifier.threshold_) for name in ("calibration", "test")}
    except (OSError, ValueError) as exc:
        print(f"eco-proxy classifier eval: {exc}", file=sys.stderr)
        return 2
    text = markdown(reports, [f"Artifact: {args.artifact} ({classifier.kind}); threshold {classifier.threshold_:.4f}."])
    print(text)
    for path, content in ((args.markdown, text), (args.json, json.dumps(reports, indent=2) + "\n")):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content, encoding="utf-8")
            print(f"wrote {path}")
    return 0


# -- forget/retain files (the logistic baseline) --------------------------------------------
def _train(args: argparse.Namespace) -> int:
    if args.gate_data is not None:
        if args.forget or args.retain:
            print("eco-proxy classifier train: give --gate-data or --forget/--retain, not both", file=sys.stderr)
            return 2
        return _train_gate(args)
    if not (args.forget and args.retain) or args.model == "finetuned":
        print("eco-proxy classifier train: give --gate-data DIR (either model), or --forget and --retain files "
              "(the logistic baseline)", file=sys.stderr)
        return 2
    return _train_files(args)


def _train_files(args: argparse.Namespace) -> int:
    from classifier.training import FileTraining, train_logistic_files

    job = FileTraining(args.forget, args.retain, args.out, alpha=args.alpha, encoder=args.encoder or DEFAULT_ENCODER,
                       C=args.C, seed=args.seed, entities=args.entities, entities_top_k=args.entities_top_k,
                       forget_entities=tuple(args.forget_entities), retain_entities=tuple(args.retain_entities))
    try:
        train_logistic_files(job)
    except (OSError, ValueError) as exc:
        print(f"eco-proxy classifier train: {exc}", file=sys.stderr)
        return 2
    return 0


def _eval(args: argparse.Namespace) -> int:
    if args.gate_data is not None:
        return _eval_gate(args)
    if not (args.forget or args.retain):
        print("eco-proxy classifier eval: give --gate-data DIR, or --forget and/or --retain files", file=sys.stderr)
        return 2
    return _eval_files(args)


def _eval_files(args: argparse.Namespace) -> int:
    from classifier import load_classifier
    from classifier.report import evaluate_texts
    from classifier.training import percent as _percent, texts as _texts

    from stats.intervals import wilson_interval

    try:
        classifier = load_classifier(args.artifact)
        report: dict[str, Any] = evaluate_texts(classifier, _texts(args.forget, args.split),
                                                _texts(args.retain, args.split))
        if args.attack:
            attack = _texts(args.attack, "all")
            hits = int((classifier.score(attack) > report["threshold"]).sum())
            report["attack_n"] = len(attack)
            report["attack_recall"] = hits / len(attack)
            report["attack_recall_ci"] = list(wilson_interval(hits, len(attack)))
    except (OSError, ValueError) as exc:
        print(f"eco-proxy classifier eval: {exc}", file=sys.stderr)
        return 2
    report["split"] = args.split
    print(f"threshold      {report['threshold']:.4f}  ({args.split} split)")
    if report["n_retain"]:
        print(f"FPR            {_percent(report['fpr'], report['fpr_ci'])}   "
              f"{report['retain_flagged']} of {report['n_retain']} retain prompts flagged")
    if report["n_forget"]:
        print(f"recall         {_percent(report['recall'], report['recall_ci'])}   "
              f"{report['forget_flagged']} of {report['n_forget']} forget prompts flagged")
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
