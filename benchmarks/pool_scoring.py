"""Pool scoring and decision time.

1. Sentences per second through feature extraction plus prediction, against the reference approach
   measured in the same run: the full model (output layer included) run one sentence at a time.
   The steps between them are measured too: batching, stopping at the needed layer, bfloat16.
2. Decision time of one closed-loop step over a 10,000-sentence pool of precomputed features: the
   rank-one model update, the pool's predicted means and SDs, and the UCB selection.

    python benchmarks/pool_scoring.py [--model embedded:gemma3-270m] [--layer 15] [--n 256]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from loop.selection import select_top  # noqa: E402
from synth.encoding import PoolScorer, RidgeEncoder, Standardizer, alpha_grid  # noqa: E402
from synth.features import TextFeatureExtractor  # noqa: E402
from synth.models import load_causal_lm  # noqa: E402
from synth.pool import load_pool_file  # noqa: E402


def reference_features(loaded, texts, layer):
    """Compute the reference features: the full causal LM, one sentence at a time."""
    import torch

    out = []
    for text in texts:
        encoded = loaded.tokenizer([text], return_tensors="pt").to(loaded.device)
        with torch.inference_mode():
            hidden = loaded.model(**encoded, output_hidden_states=True).hidden_states[layer]
        out.append(hidden[0, 1:].float().mean(dim=0).cpu().numpy())
    return np.stack(out)


def rate(function, n_items):
    started = time.perf_counter()
    result = function()
    elapsed = time.perf_counter() - started
    return n_items / elapsed, result


def scoring(args) -> None:
    texts = load_pool_file(REPO / "synth" / "data" / "pool_gemma3_270m_6w.txt").texts[:args.n]
    n_reference = min(len(texts), args.n_reference)
    fp32 = load_causal_lm(args.model, device=args.device, dtype="float32")
    bf16 = load_causal_lm(args.model, device=args.device, dtype="bfloat16")
    n_layers = fp32.model.config.num_hidden_layers

    rng = np.random.default_rng(0)
    encoder = RidgeEncoder(Standardizer(np.zeros(fp32.model.config.hidden_size),
                                        np.ones(fp32.model.config.hidden_size)), ["target"])
    encoder.weights[:] = rng.normal(size=encoder.weights.shape)

    def scored(extractor):
        layer = extractor.layers[-1]
        return lambda: encoder.predict(extractor.extract(texts)[layer])

    reference_rate, reference = rate(lambda: reference_features(fp32, texts[:n_reference],
                                                                args.layer), n_reference)
    rows = [("full model, one sentence at a time (reference)", reference_rate)]
    full_batched = TextFeatureExtractor(fp32, [n_layers], use_cache=False,
                                        batch_size=args.batch_size)
    rows.append(("full backbone, batched, fp32", rate(scored(full_batched), len(texts))[0]))
    truncated = TextFeatureExtractor(fp32, [args.layer], use_cache=False,
                                     batch_size=args.batch_size)
    truncated_rate, (_, _) = rate(scored(truncated), len(texts))
    rows.append((f"stop at layer {args.layer}, batched, fp32", truncated_rate))
    lean = TextFeatureExtractor(bf16, [args.layer], use_cache=False, batch_size=args.batch_size)
    lean_rate, _ = rate(scored(lean), len(texts))
    rows.append((f"stop at layer {args.layer}, batched, bf16 (neurosteer)", lean_rate))

    exact = truncated.extract(texts[:n_reference])[args.layer]
    low = lean.extract(texts[:n_reference])[args.layer]
    cosine = np.sum(exact * low, axis=1) / (np.linalg.norm(exact, axis=1)
                                            * np.linalg.norm(low, axis=1))
    agree = np.max(np.abs(exact - reference)) / np.max(np.abs(reference))

    print(f"Pool scoring: {len(texts)} sentences ({n_reference} for the reference), "
          f"model {fp32.identity}, layer {args.layer}, mean pooling, device {fp32.device}")
    for name, value in rows:
        print(f"  {name:<52} {value:8.1f} sentences/s  {value / reference_rate:6.1f}x")
    print(f"  bf16 against fp32 features: cosine min {cosine.min():.5f}, "
          f"median {np.median(cosine):.5f}")
    print(f"  batched fp32 against the reference: max relative difference {agree:.2e}")
    target = 25.0
    ratio = lean_rate / reference_rate
    print(f"  target: at least {target:.0f}x the reference; measured {ratio:.1f}x "
          f"({'met' if ratio >= target else 'NOT met'})")


def decision(args) -> None:
    rng = np.random.default_rng(1)
    n_pool, width = 10_000, 640
    pool = rng.normal(size=(n_pool, width)).astype(np.float32) * rng.uniform(0.1, 30, width)
    truth = pool @ rng.normal(size=width) / 30
    encoder = RidgeEncoder(Standardizer.fit(pool), ["target"])
    calibration = rng.choice(n_pool, 300, replace=False)
    encoder.fit(pool[calibration], truth[calibration] + rng.normal(size=300),
                alpha_grid(0.1, 1e6, 29))
    scorer = PoolScorer(encoder, pool)
    available = np.ones(n_pool, bool)
    available[calibration] = False

    times = []
    index = int(np.flatnonzero(available)[0])
    for _ in range(args.n_steps):
        response = np.array([[truth[index] + rng.normal()]])
        started = time.perf_counter()
        scorer.apply_update(encoder.update(pool[index:index + 1], response))
        value, sd = scorer.mean[:, 0], scorer.sd[:, 0]
        index = int(select_top(value, sd, available, 1.0, 1)[0])
        times.append(time.perf_counter() - started)
        available[index] = False
    times_ms = np.array(times) * 1000
    print(f"\nDecision time over a {n_pool:,}-sentence pool ({width} features), "
          f"{args.n_steps} closed-loop steps: median {np.median(times_ms):.2f} ms, "
          f"p99 {np.percentile(times_ms, 99):.2f} ms, max {times_ms.max():.2f} ms "
          f"(target: p99 under 10 ms)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:gemma3-270m")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--n", type=int, default=256, help="sentences scored by each method")
    parser.add_argument("--n-reference", type=int, default=64,
                        help="sentences for the slow one-at-a-time reference")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--n-steps", type=int, default=500)
    parser.add_argument("--skip-scoring", action="store_true")
    args = parser.parse_args()
    if not args.skip_scoring:
        scoring(args)
    # The controller runs with one BLAS thread (see Controller.run); measure it the same way.
    with threadpool_limits(limits=1, user_api="blas"):
        decision(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
