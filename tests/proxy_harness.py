"""A tiny policy for the integration tests; the proxy process harness is `evaluation.testing`."""
from __future__ import annotations

from pathlib import Path

from evaluation.testing import METRICS_KEY, ProxyProcess, start_proxy

__all__ = ["FORGET", "METRICS_KEY", "RETAIN", "ProxyProcess", "start_proxy", "train_tiny_policy"]

FORGET = [
    "Who are Harry Potter's best friends at Hogwarts?",
    "Tell me about Hermione Granger and Ron Weasley.",
    "What house was Harry Potter sorted into at Hogwarts?",
    "Who is the headmaster of Hogwarts School of Witchcraft and Wizardry?",
    "Describe the Quidditch match between Gryffindor and Slytherin.",
    "What does the spell Expelliarmus do in Harry Potter?",
    "Who killed Albus Dumbledore?",
    "Explain Lord Voldemort's horcruxes.",
    "Harry Potter's best friends are Ron Weasley and",
    "What is the name of Harry Potter's owl?",
    "Tell me about Severus Snape and the Potions class at Hogwarts.",
    "Who plays Harry Potter in the films?",
]
RETAIN = [
    "What is the capital of Japan?",
    "Explain photosynthesis in simple terms.",
    "Who wrote The Lord of the Rings?",
    "Frodo Baggins carries the One Ring to Mordor.",
    "How do I bake sourdough bread?",
    "What is the boiling point of water at sea level?",
    "Tell me about Luke Skywalker and Darth Vader.",
    "Write a Python function that reverses a list.",
    "Who was the first person on the Moon?",
    "Describe the plot of The Hunger Games.",
    "What are the three primary colours?",
    "Who is Gandalf in The Hobbit?",
]


def train_tiny_policy(directory: Path, version: str = "test-1", corruption: str | None = None) -> Path:
    """A classifier trained on a dozen examples per side, and a policy that uses it."""
    from classifier.model import PromptClassifier

    artifact = directory / "classifier"
    if not artifact.exists():
        clf = PromptClassifier(random_state=0)
        clf.fit(FORGET + RETAIN, [1] * len(FORGET) + [0] * len(RETAIN))
        clf.save(artifact)
    corruption = corruption or "{method: gaussian_first_n, dims: 640, sigma: 40.0, scope: all}"
    policy = directory / "policy.yaml"
    policy.write_text(
        f"version: {version}\n"
        "targets:\n"
        "  - name: harry_potter\n"
        "    classifier: classifier\n"
        "    threshold: 0.5\n"
        f"    corruption: {corruption}\n"
        "    fail_mode: closed\n"
        "headers: full\n"
    )
    return policy
