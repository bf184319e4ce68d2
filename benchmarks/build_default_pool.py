"""Build a candidate pool with synth.generation and write it with its metadata sidecar.

Runs on the developer's machine, offline, with an embedded or local model. By default it rewrites the
pool shipped in synth/data. That pool took 527 s: 3,000 six-word sentences from Gemma 3 270M in
bfloat16 on 2 CPU cores that other work shared.
Usage: ``python benchmarks/build_default_pool.py [--n-sentences 3000] [--output PATH]``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from synth.generation import DEFAULT_POOL_NAME, generate_pool, write_pool
from synth.models import load_causal_lm

logger = logging.getLogger("build_default_pool")

DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "synth" / "data" / DEFAULT_POOL_NAME


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:gemma3-270m",
                        help="model folder, cached hub name or embedded:NAME")
    parser.add_argument("--n-sentences", type=int, default=3000, help="pool size")
    parser.add_argument("--n-words", type=int, default=6, help="words per sentence")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=64, help="continuations per prompt batch")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16), bfloat16 or float32")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help="pool text file; the metadata goes to OUTPUT.json")
    return parser.parse_args()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args()
    loaded = load_causal_lm(args.model, device=args.device, dtype=args.dtype)

    last_report = [time.perf_counter()]

    def report(n_kept: int, n_requested: int) -> None:
        # One line every 30 s is enough to follow a run of several minutes.
        now = time.perf_counter()
        if now - last_report[0] >= 30 or n_kept >= n_requested:
            last_report[0] = now
            logger.info("%d of %d sentences kept", n_kept, n_requested)

    result = generate_pool(
        loaded, args.n_sentences, n_words=args.n_words, seed=args.seed, top_p=args.top_p,
        temperature=args.temperature, batch_size=args.batch_size, progress=report,
    )
    write_pool(args.output, result.sentences, result.metadata())
    logger.info("Wrote %d sentences to %s", len(result.sentences), args.output)


if __name__ == "__main__":
    main()
