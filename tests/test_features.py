"""Hidden-state features of the embedded Gemma: pooling, truncation, batching and the cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from synth.errors import CacheCorruptError
from synth.features import TextFeatureExtractor, pool_hidden

pytestmark = pytest.mark.models

TEXTS = ["The cat sat on the mat.",
         "A much longer sentence about the slow economy of small mountain towns in winter.",
         "Hi.",
         "Rain fell all night."]


def reference_hidden_states(gemma, text):
    tokenizer = gemma.tokenizer
    encoded = tokenizer([text], return_tensors="pt")
    with torch.inference_mode():
        output = gemma.model.base_model(**encoded, output_hidden_states=True)
    return output.hidden_states, encoded


def test_last_token_pooling_with_padding():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    attention = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    content = torch.tensor([[0, 1, 1, 1], [0, 1, 0, 0]])
    last = pool_hidden(hidden, attention, content, "last")
    assert last.tolist() == [[9.0, 10.0, 11.0], [15.0, 16.0, 17.0]]
    mean = pool_hidden(hidden, attention, content, "mean")
    assert mean.tolist() == [[6.0, 7.0, 8.0], [15.0, 16.0, 17.0]]


def test_batched_features_match_single_runs(gemma, tmp_path):
    extractor = TextFeatureExtractor(gemma, [3, 9], pooling="last", cache_dir=tmp_path)
    batched = extractor.extract(TEXTS)
    for index, text in enumerate(TEXTS):
        hidden_states, _ = reference_hidden_states(gemma, text)
        for layer in (3, 9):
            expected = hidden_states[layer][0, -1].numpy()
            np.testing.assert_allclose(batched[layer][index], expected,
                                       rtol=1e-4, atol=1e-6 * np.abs(expected).max())


def test_mean_pooling_skips_bos_and_padding(gemma, tmp_path):
    extractor = TextFeatureExtractor(gemma, [6], pooling="mean", cache_dir=tmp_path)
    batched = extractor.extract(TEXTS)
    for index, text in enumerate(TEXTS):
        hidden_states, encoded = reference_hidden_states(gemma, text)
        assert encoded["input_ids"][0, 0].item() == gemma.tokenizer.bos_token_id
        expected = hidden_states[6][0, 1:].mean(dim=0).numpy()
        np.testing.assert_allclose(batched[6][index], expected, rtol=1e-4, atol=1e-3)


def test_no_block_above_requested_layer_runs(gemma, tmp_path):
    extractor = TextFeatureExtractor(gemma, [4], pooling="last", cache_dir=tmp_path,
                                     use_cache=False)
    blocks = extractor._blocks
    calls = []
    handles = [block.register_forward_hook(lambda m, i, o, k=k: calls.append(k))
               for k, block in enumerate(blocks)]
    lm_head_calls = []
    handles.append(gemma.model.lm_head.register_forward_hook(
        lambda *args: lm_head_calls.append(1)))
    try:
        extractor.extract(TEXTS[:2])
    finally:
        for handle in handles:
            handle.remove()
    assert sorted(set(calls)) == [0, 1, 2, 3]
    assert lm_head_calls == []


def test_second_run_reads_cache(gemma, tmp_path):
    first = TextFeatureExtractor(gemma, [5], cache_dir=tmp_path).extract(TEXTS)
    second_extractor = TextFeatureExtractor(gemma, [5], cache_dir=tmp_path)
    second_extractor._compute = None  # any computation would now fail
    second = second_extractor.extract(TEXTS)
    np.testing.assert_array_equal(first[5], second[5])


def test_cache_keyed_by_layer_and_pooling(gemma, tmp_path):
    mean = TextFeatureExtractor(gemma, [5], pooling="mean", cache_dir=tmp_path).extract(TEXTS)
    last = TextFeatureExtractor(gemma, [5], pooling="last", cache_dir=tmp_path).extract(TEXTS)
    other_layer = TextFeatureExtractor(gemma, [7], pooling="mean", cache_dir=tmp_path)
    assert not np.allclose(mean[5], last[5])
    assert other_layer._caches[7].lookup(TEXTS)[1] == [0, 1, 2, 3]


def test_features_deterministic(gemma, tmp_path):
    first = TextFeatureExtractor(gemma, [8], use_cache=False).extract(TEXTS)
    second = TextFeatureExtractor(gemma, [8], use_cache=False).extract(TEXTS)
    np.testing.assert_array_equal(first[8], second[8])


def test_corrupt_cache_entry_named(gemma, tmp_path):
    extractor = TextFeatureExtractor(gemma, [2], cache_dir=tmp_path)
    extractor.extract(TEXTS[:2])
    shard = next(extractor._caches[2].folder.glob("*.npz"))
    shard.write_bytes(b"not a zip file")
    fresh = TextFeatureExtractor(gemma, [2], cache_dir=tmp_path)
    with pytest.raises(CacheCorruptError, match=rf"{shard.name} cannot be read .* Delete that"):
        fresh.extract(TEXTS[:2])


def test_layer_out_of_range(gemma):
    with pytest.raises(ValueError, match=r"Layers \[19\] are outside 1\.\.18"):
        TextFeatureExtractor(gemma, [19], use_cache=False)


def test_missing_model_path_message(tmp_path):
    from synth.errors import ModelNotFoundError
    from synth.models import resolve_model_path

    with pytest.raises(ModelNotFoundError, match="neurosteer never downloads"):
        resolve_model_path(str(tmp_path / "no-such-model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        resolve_model_path(str(tmp_path / "empty"))
    with pytest.raises(ModelNotFoundError, match="Unknown embedded model 'embedded:gpt5'"):
        resolve_model_path("embedded:gpt5")


def test_local_gpt2_folder(gemma, tmp_path):
    """A GPT-2 architecture (blocks under ``h``) saved to a local folder, as a lab's GPT2-XL is."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from synth.models import load_causal_lm

    config = GPT2Config(vocab_size=len(gemma.tokenizer), n_embd=32, n_layer=3, n_head=2,
                        n_positions=64)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "tiny-gpt2")
    gemma.tokenizer.save_pretrained(tmp_path / "tiny-gpt2")

    loaded = load_causal_lm(str(tmp_path / "tiny-gpt2"), device="cpu", dtype="float32")
    assert loaded.identity.startswith("local:tiny-gpt2@")
    features = TextFeatureExtractor(loaded, [1, 2], pooling="last", cache_dir=tmp_path).extract(TEXTS)
    for index, text in enumerate(TEXTS):
        hidden_states, _ = reference_hidden_states(loaded, text)
        for layer in (1, 2):
            np.testing.assert_allclose(features[layer][index], hidden_states[layer][0, -1].numpy(),
                                       rtol=1e-5, atol=1e-5)
