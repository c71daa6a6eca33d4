"""The evaluation report: a Markdown table and PNG plots from the harness's JSON."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from evaluation.harness import PROBABILITY_ROUTES, ROUTES

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
        "| System | Forget answer rate, completions | Forget answer rate, chats | Retain answer rate "
        "| Retain output identical to raw | Degenerate continuations | Refusals in forget chats |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in report["systems"].items():
        lines.append(f"| {SYSTEM_NAMES[name]} | {_pct(row['forget_answer_rate'])} "
                     f"| {_pct(row['forget_answer_rate_chat'])} | {_pct(row['retain_answer_rate'])} | {_pct(row['retain_identical_to_raw'])} "
                     f"| {_pct(row['continuation_degenerate_rate'])} | {_pct(row['forget_refusal_rate_chat'])} |")
    for route, reference in (report.get("counterfactual_answer_rate_by_kind") or {}).items():
        if not reference:
            continue
        key = ROUTES[route]
        lines += ["", f"Forget answer rate per probe kind on {route}s, beside the counterfactual reference (the raw "
                  "model on the probes' twins, whose names of the target are invented):", "",
                  "| Probe kind | Counterfactual reference | No guard (raw vLLM) | Classifier + canned refusal "
                  "| ECO proxy |",
                  "|---|---|---|---|---|"]
        for kind, entry in reference.items():
            by_system = [report["systems"][name][key].get(kind) for name in ("raw", "refusal", "guarded")]
            lines.append(f"| {kind} | {_pct(entry)} | " + " | ".join(_pct(e) if e else "–" for e in by_system) + " |")
    for route, reference in (report.get("counterfactual_answer_probability_by_kind") or {}).items():
        key = PROBABILITY_ROUTES[route]
        lines += ["", f"Probability of continuing with the answer on {route}s, per probe kind (from the top-20 "
                  "logprobs: what a client sampling at temperature 1 gets; the mean, with the Wilson interval of "
                  "the mean taken as a rate):", "",
                  "| Probe kind | Counterfactual reference | No guard (raw vLLM) | ECO proxy |", "|---|---|---|---|"]
        for kind, entry in reference.items():
            by_system = [report["systems"][name][key].get(kind) for name in ("raw", "guarded")]
            lines.append(f"| {kind} | {_pct(entry)} | " + " | ".join(_pct(e) if e else "–" for e in by_system) + " |")
    if report["attacks"]:
        lines += ["", "Forget probes as an attacker sends them (completions; framed: behind a jailbreak preamble, "
                  "diluted: after ~110 words of unrelated text, obfuscated: one to three words disguised):", "",
                  "| Attack | No guard (raw vLLM) | Classifier + canned refusal | ECO proxy | Flagged by the gate "
                  "| ECO proxy, flagged prompts only |", "|---|---|---|---|---|---|"]
        for attack, entry in report["attacks"].items():
            lines.append(f"| {attack} | " + " | ".join(_pct(entry[key]) for key in
                                                        ("raw", "refusal", "guarded", "flagged", "guarded_when_flagged"))
                         + " |")
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
    for route, by_kind in goals.get("forget_within_counterfactual", {}).items():
        if by_kind:
            lines[-1] += (f" Forget answer rate on {route}s within the counterfactual reference's interval: "
                          + ", ".join(f"{kind} **{'yes' if met else 'no'}**" for kind, met in by_kind.items()) + ".")
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
    for offset, (key, title) in enumerate((("continuation_degenerate_rate", "degenerate continuations"),
                                           ("forget_refusal_rate_chat", "refusals in forget chats"))):
        left.bar([i + (offset - 0.5) * width for i in range(len(names))],
                 [report["systems"][n][key]["rate"] for n in names], width, label=title)
    left.set_xticks(range(len(names)), labels, rotation=12)
    left.set_ylim(0, 1.05)
    left.set_ylabel("share of outputs")
    left.set_title("How the answers read")
    left.legend()
    gate = report["gate"]
    right.bar(list(gate), [e["rate"] for e in gate.values()], color="tab:green",
              yerr=[[e["rate"] - e["ci"][0] for e in gate.values()], [e["ci"][1] - e["rate"] for e in gate.values()]],
              capsize=3)
    right.set_ylim(0, 1.05)
    right.set_ylabel("share flagged")
    right.set_title("Gate decisions")
    figure.tight_layout()
    written.append(directory / "naturalness_and_gate.png")
    figure.savefig(written[-1], dpi=120)
    plt.close(figure)
    return written
