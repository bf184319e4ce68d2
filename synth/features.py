"""Sentence features from the hidden states of a causal language model.

Runs in the controller process (calibration, pool scoring) and in benchmarks. The forward pass goes
through the model's backbone only (never the output layer) and stops after the highest layer
requested: a forward hook on that block raises, so no layer above it runs. Measured on 2 CPU cores
with Gemma 3 270M: see ``benchmarks/pool_scoring.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from synth.cache import FeatureCache
from synth.models import LoadedModel, cache_root

logger = logging.getLogger(__name__)

POOLINGS = ("last", "mean")


class _StopForward(Exception):
    """Raised by the hook on the highest requested block to end the forward pass there."""


def decoder_blocks(backbone, n_layers: int):
    """Return the ModuleList of transformer blocks (``layers`` in Llama/Gemma, ``h`` in GPT-2)."""
    import torch

    for module in backbone.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
            return module
    raise ValueError(
        f"Found no list of {n_layers} transformer blocks in {type(backbone).__name__}; "
        "this architecture is not supported for layer-wise features."
    )


def pool_hidden(hidden, attention_mask, content_mask, pooling: str):
    """Pool ``(batch, n_tokens, width)`` hidden states into ``(batch, width)`` sentence vectors.

    Right padding is assumed. ``last`` takes the last real token of each row (``attention_mask`` sum
    minus one, never a pad). ``mean`` averages the real tokens that are not special tokens. BOS is
    left out because its state in Gemma is thousands of times larger than the rest and the same for
    every text.
    """
    import torch

    if pooling == "last":
        last = attention_mask.sum(dim=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if pooling == "mean":
        weights = content_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")


class TextFeatureExtractor:
    """Hidden-state features of chosen layers for batches of sentences, cached on disk.

    Layers count transformer blocks from 1: layer ``k`` is the output of block ``k`` (the residual
    stream, before any final norm), which equals ``hidden_states[k]`` of transformers for every
    block but the last.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        layers: Sequence[int],
        pooling: str = "mean",
        batch_size: int = 64,
        cache_dir: Path | None = None,
        use_cache: bool = True,
    ) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")
        self.loaded = loaded
        self.backbone = loaded.model.base_model
        self.n_layers = loaded.model.config.num_hidden_layers
        bad = [layer for layer in layers if not 1 <= layer <= self.n_layers]
        if bad:
            raise ValueError(
                f"Layers {bad} are outside 1..{self.n_layers} of {loaded.identity}; "
                "choose layers among the model's blocks."
            )
        self.layers = sorted(set(layers))
        self.pooling = pooling
        self.batch_size = batch_size
        self.width = loaded.model.config.hidden_size
        self._blocks = decoder_blocks(self.backbone, self.n_layers)
        dtype_name = str(loaded.dtype).removeprefix("torch.")
        root = (cache_dir or cache_root()) / "features"
        self._caches = (
            {layer: FeatureCache(root, loaded.identity, layer, pooling, dtype_name)
             for layer in self.layers}
            if use_cache else None
        )

    def extract(
        self, texts: Sequence[str], progress: Callable[[int], None] | None = None
    ) -> dict[int, np.ndarray]:
        """Return ``{layer: (n_texts, width)}`` float32 features, reading the cache first."""
        texts = list(texts)
        result = {layer: np.empty((len(texts), self.width), np.float32) for layer in self.layers}
        missing_any: set[int] = set()
        found_by_layer = {}
        for layer in self.layers:
            if self._caches is None:
                found, missing = {}, list(range(len(texts)))
            else:
                found, missing = self._caches[layer].lookup(texts)
            found_by_layer[layer] = found
            missing_any.update(missing)
        for layer, found in found_by_layer.items():
            for index, vector in found.items():
                result[layer][index] = vector
        if missing_any:
            logger.info("Computing features of %d sentences at layers %s with %s (cached on disk "
                        "for later runs).", len(missing_any), self.layers, self.loaded.identity)
            order = sorted(missing_any)
            computed = self._compute([texts[index] for index in order], progress)
            for layer in self.layers:
                result[layer][order] = computed[layer]
                if self._caches is not None:
                    self._caches[layer].store([texts[index] for index in order], computed[layer])
        return result

    def _compute(self, texts: list[str], progress) -> dict[int, np.ndarray]:
        """Run the truncated backbone over ``texts`` in batches of similar length."""
        tokenizer = self.loaded.tokenizer
        tokenizer.padding_side = "right"
        lengths = [len(tokenizer(text)["input_ids"]) for text in texts]
        order = np.argsort(lengths, kind="stable")
        out = {layer: np.empty((len(texts), self.width), np.float32) for layer in self.layers}
        for start in range(0, len(texts), self.batch_size):
            batch_index = order[start:start + self.batch_size]
            batch = [texts[index] for index in batch_index]
            pooled = self._forward(batch)
            for layer in self.layers:
                out[layer][batch_index] = pooled[layer]
            if progress is not None:
                progress(len(batch))
        return out

    def _forward(self, batch: list[str]) -> dict[int, np.ndarray]:
        import torch

        tokenizer = self.loaded.tokenizer
        encoded = tokenizer(batch, return_tensors="pt", padding=True,
                            return_special_tokens_mask=True)
        device = self.loaded.device
        input_ids = encoded["input_ids"].to(device)
        attention_mask = encoded["attention_mask"].to(device)
        content_mask = attention_mask * (1 - encoded["special_tokens_mask"].to(device))
        captured: dict[int, torch.Tensor] = {}
        top = max(self.layers)

        def make_hook(layer: int):
            def hook(_module, _inputs, output):
                captured[layer] = output[0] if isinstance(output, tuple) else output
                if layer == top:
                    raise _StopForward
            return hook

        handles = [self._blocks[layer - 1].register_forward_hook(make_hook(layer))
                   for layer in self.layers]
        try:
            with torch.inference_mode():
                self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return {
            layer: pool_hidden(captured[layer], attention_mask, content_mask, self.pooling)
            .float().cpu().numpy()
            for layer in self.layers
        }
