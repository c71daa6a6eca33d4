"""The evaluation report: a Markdown table and PNG plots from the harness's JSON."""
from __future__ import annotations

from pathlib import Path
from typing import Any

SYSTEM_NAMES = {"raw": "No guard (raw vLLM)", "system_prompt": "System prompt \"do not discuss\"",
                "refusal": "Classifier + canned refusal", "guarded": "ECO proxy (classifier + corrupted embeddings)"}


def _pct(entry: dict[str, Any]) -> str:
    lo, hi = entry["ci"]
    return f"{100 * entry['rate']:.1f}% [{100 * lo:.0f}–{100 * hi:.0f}] (n={entry['n']})"


def markdown(report: dict[str, Any]) -> str:
    control = report["control_answer_rate"]
    lines = [
        f"## Unlearning report: target `{report['target']}`, model `{report['model']}`",
        "",
        f"Control probes (invented facts the model cannot know), raw model: **{_pct(control)}**",
        "",
        "| System | Forget answer rate | Retain answer rate | Retain output identical to raw | Verbatim ROUGE-L |",
        "|---|---|---|---|---|",
    ]
    for name, row in report["systems"].items():
        lines.append(f"| {SYSTEM_NAMES[name]} | {_pct(row['forget_answer_rate'])} | {_pct(row['retain_answer_rate'])} "
                     f"| {_pct(row['retain_identical_to_raw'])} | {row['verbatim_rouge_l']:.3f} |")
    reference = report.get("counterfactual_answer_rate_by_kind") or {}
    if reference:
        lines += ["", "Forget answer rate per probe kind, beside the counterfactual reference (the raw model on the "
                  "probes' twins, whose names of the target are invented):", "",
                  "| Probe kind | Counterfactual reference | No guard (raw vLLM) | ECO proxy |", "|---|---|---|---|"]
        for kind, entry in reference.items():
            by_system = [report["systems"][name]["forget_answer_rate_by_kind"].get(kind) for name in ("raw", "guarded")]
            lines.append(f"| {kind} | {_pct(entry)} | " + " | ".join(_pct(e) if e else "–" for e in by_system) + " |")
    lines += ["", "| Gate (guarded endpoint) | Flagged |", "|---|---|"]
    for set_name, entry in report["gate"].items():
        lines.append(f"| {set_name} | {_pct(entry)} |")
    if "sustainability" in report:
        s = report["sustainability"]
        lines += ["", f"Sustainability: a proxy guarding `{report['target']}` and `{s['second_target']}`", "",
                  "| Measure | Rate |", "|---|---|",
                  f"| {report['target']} forget answer rate | {_pct(s['first_forget_answer_rate'])} |",
                  f"| {s['second_target']} forget answer rate, raw | {_pct(s['second_forget_answer_rate_raw'])} |",
                  f"| {s['second_target']} forget answer rate, guarded | {_pct(s['second_forget_answer_rate'])} |",
                  f"| retain answer rate, raw | {_pct(s['retain_answer_rate_raw'])} |",
                  f"| retain answer rate, guarded | {_pct(s['retain_answer_rate'])} |",
                  f"| retain output identical to raw | {_pct(s['retain_identical_to_raw'])} |"]
    goals = report["goals"]
    lines += ["", f"Goals: forget answer rate at or below control: **{'yes' if goals['forget_at_or_below_control'] else 'no'}**;"
              f" retain answer rate equal to raw: **{'yes' if goals['retain_equal_to_raw'] else 'no'}**."]
    if goals.get("forget_within_counterfactual"):
        lines[-1] += " Forget answer rate within the counterfactual reference's interval: " + ", ".join(
            f"{kind} **{'yes' if met else 'no'}**" for kind, met in goals["forget_within_counterfactual"].items()) + "."
    return "\n".join(lines) + "\n"


def plots(report: dict[str, Any], directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    names = list(report["systems"])
    labels = [SYSTEM_NAMES[n].split(" (")[0] for n in names]

    figure, axis = plt.subplots(figsize=(8, 4.5))
    width = 0.38
    for offset, (key, title) in enumerate((("forget_answer_rate", "forget probes"),
                                           ("retain_answer_rate", "retain probes"))):
        rates = [report["systems"][n][key]["rate"] for n in names]
        errors = [[r - report["systems"][n][key]["ci"][0] for n, r in zip(names, rates)],
                  [report["systems"][n][key]["ci"][1] - r for n, r in zip(names, rates)]]
        axis.bar([i + (offset - 0.5) * width for i in range(len(names))], rates, width, yerr=errors, capsize=3,
                 label=title)
    axis.axhline(report["control_answer_rate"]["rate"], color="black", linestyle="--", linewidth=1,
                 label="control (cannot know)")
    axis.set_xticks(range(len(names)), labels, rotation=12)
    axis.set_ylabel("answer rate")
    axis.set_ylim(0, 1.05)
    axis.set_title(f"Knowledge probes: {report['target']}")
    axis.legend()
    figure.tight_layout()
    written.append(directory / "answer_rates.png")
    figure.savefig(written[-1], dpi=120)
    plt.close(figure)

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(labels, [report["systems"][n]["verbatim_rouge_l"] for n in names], color="tab:purple")
    left.set_ylabel("mean ROUGE-L F1")
    left.set_title("Verbatim continuations")
    left.tick_params(axis="x", rotation=12)
    gate = report["gate"]
    right.bar(list(gate), [e["rate"] for e in gate.values()], color="tab:green",
              yerr=[[e["rate"] - e["ci"][0] for e in gate.values()], [e["ci"][1] - e["rate"] for e in gate.values()]],
              capsize=3)
    right.set_ylim(0, 1.05)
    right.set_ylabel("share flagged")
    right.set_title("Gate decisions")
    figure.tight_layout()
    written.append(directory / "verbatim_and_gate.png")
    figure.savefig(written[-1], dpi=120)
    plt.close(figure)
    return written
