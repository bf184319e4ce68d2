"""Compare the pool sampler of synth.generation with transformers' ``generate`` on the same prompts.

Runs offline on the developer's machine with an embedded or local model. Both methods continue each
prompt ``--batch-size`` times with the same top-p and temperature, and their continuations pass
through the same filter, so sentences per second compare like with like. The two methods alternate
prompt by prompt, so other load on the machine slows both alike. ``--nucleus`` also measures how much
of the top-p nucleus each top-k bound cuts off. Usage: ``python benchmarks/pool_generation.py``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import torch

from synth import generation
from synth.generation import (
    DEFAULT_PROMPTS,
    SamplingCounts,
    example_sentence_keys,
    sample_continuations,
    select_sentences,
)
from synth.models import LoadedModel, load_causal_lm

NUCLEUS_BOUNDS = (256, 512, 1024, 2048, 4096)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:gemma3-270m")
    parser.add_argument("--n-prompts", type=int, default=8, help="prompts taken from the defaults")
    parser.add_argument("--batch-size", type=int, default=64, help="continuations per prompt")
    parser.add_argument("--n-words", type=int, default=6)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--nucleus", action="store_true",
                        help="also measure the nucleus mass cut off by each top-k bound")
    return parser.parse_args()


def generate_with_transformers(loaded: LoadedModel, prompt: str, n_rows: int, top_p: float,
                               temperature: float, max_new_tokens: int, seed: int) -> list[str]:
    """Sample continuations with ``generate``: pure top-p (top_k=0), stopping at a sentence end."""
    tokenizer = loaded.tokenizer
    inputs = tokenizer(prompt, return_tensors="pt").to(loaded.device)
    torch.manual_seed(seed)  # generate draws from the global generator
    output = loaded.model.generate(
        **inputs,
        do_sample=True,
        top_p=top_p,
        top_k=0,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        num_return_sequences=n_rows,
        stop_strings=["\n", ".", "!", "?"],
        tokenizer=tokenizer,
        pad_token_id=tokenizer.pad_token_id,
    )
    new_tokens = output[:, inputs.input_ids.shape[1]:]
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


@dataclass
class MethodRun:
    """Sentences kept by one method and the seconds it spent, over all prompts so far."""

    name: str
    seen: set[str]
    counts: SamplingCounts = field(default_factory=SamplingCounts)
    n_kept: int = 0
    elapsed_s: float = 0.0

    @property
    def sentences_per_s(self) -> float:
        return self.n_kept / self.elapsed_s


def compare_speed(loaded: LoadedModel, prompts: list[str], args: argparse.Namespace) -> None:
    max_new_tokens = 3 * args.n_words + 4
    generator = torch.Generator(device=loaded.device).manual_seed(args.seed)
    lean = MethodRun(f"lean loop (top-k {generation.TOP_K_BOUND})", example_sentence_keys(prompts))
    baseline = MethodRun("transformers generate", example_sentence_keys(prompts))

    # One short batch each first, so neither method pays the first call's set-up in the timing.
    with torch.inference_mode():
        sample_continuations(loaded, prompts[0], 4, args.n_words, args.top_p, args.temperature,
                             generation.TOP_K_BOUND, 4, generator, SamplingCounts())
    generate_with_transformers(loaded, prompts[0], 4, args.top_p, args.temperature, 4, args.seed)

    for index, prompt in enumerate(prompts):
        start = time.perf_counter()
        with torch.inference_mode():
            continuations = sample_continuations(
                loaded, prompt, args.batch_size, args.n_words, args.top_p, args.temperature,
                generation.TOP_K_BOUND, max_new_tokens, generator, lean.counts,
            )
        lean.n_kept += len(select_sentences(continuations, args.n_words, lean.seen, lean.counts))
        lean.elapsed_s += time.perf_counter() - start

        start = time.perf_counter()
        continuations = generate_with_transformers(loaded, prompt, args.batch_size, args.top_p,
                                                   args.temperature, max_new_tokens,
                                                   args.seed + index)
        baseline.counts.n_rows += args.batch_size
        baseline.n_kept += len(select_sentences(continuations, args.n_words, baseline.seen,
                                                baseline.counts))
        baseline.elapsed_s += time.perf_counter() - start
        print(f"prompt {index + 1}/{len(prompts)}: lean {lean.n_kept} kept in "
              f"{lean.elapsed_s:.1f} s, generate {baseline.n_kept} kept in "
              f"{baseline.elapsed_s:.1f} s", flush=True)

    print(f"\n{'method':<28}{'rows':>6}{'exact':>7}{'yield':>8}{'kept':>6}{'time_s':>9}"
          f"{'sent/s':>8}")
    for run in (lean, baseline):
        print(f"{run.name:<28}{run.counts.n_rows:>6}{run.counts.n_exact_length:>7}"
              f"{run.counts.n_exact_length / run.counts.n_rows:>8.1%}{run.n_kept:>6}"
              f"{run.elapsed_s:>9.1f}{run.sentences_per_s:>8.2f}")
    print(f"lean loop / generate: {lean.sentences_per_s / baseline.sentences_per_s:.2f}x")


def measure_nucleus(loaded: LoadedModel, prompts: list[str], args: argparse.Namespace) -> None:
    """Print, for each top-k bound, how often and how much it would cut the top-p nucleus."""
    cut_masses: list[torch.Tensor] = []
    nucleus_sizes: list[torch.Tensor] = []
    sample = generation.sample_top_p

    def recording_sampler(logits, top_p, temperature, generator, top_k=generation.TOP_K_BOUND):
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        top_probs = torch.topk(probs, max(NUCLEUS_BOUNDS), dim=-1).values
        cumulative = top_probs.cumsum(dim=-1)
        masses = torch.stack([cumulative[:, k - 1] for k in NUCLEUS_BOUNDS], dim=1)
        cut_masses.append((top_p - masses).clamp(min=0.0))
        nucleus_sizes.append(((cumulative - top_probs) < top_p).sum(dim=-1))
        return sample(logits, top_p, temperature, generator, top_k)

    # sample_continuations looks sample_top_p up in its module, so replacing it there records the
    # probabilities of every real draw without changing what is drawn.
    generation.sample_top_p = recording_sampler
    try:
        generator = torch.Generator(device=loaded.device).manual_seed(args.seed)
        with torch.inference_mode():
            for prompt in prompts:
                sample_continuations(loaded, prompt, args.batch_size, args.n_words, args.top_p,
                                     args.temperature, generation.TOP_K_BOUND,
                                     3 * args.n_words + 4, generator, SamplingCounts())
    finally:
        generation.sample_top_p = sample

    cut = torch.cat(cut_masses)
    sizes = torch.cat(nucleus_sizes).float()
    print(f"\nnucleus at top_p={args.top_p} over {cut.shape[0]} draws; size median "
          f"{sizes.median():.0f}, 99th percentile {sizes.quantile(0.99):.0f}, max {sizes.max():.0f}"
          f" (max counted: {max(NUCLEUS_BOUNDS)})")
    print(f"{'top_k':>6}{'draws cut':>11}{'mean mass cut':>15}{'max mass cut':>14}")
    for column, bound in enumerate(NUCLEUS_BOUNDS):
        values = cut[:, column]
        print(f"{bound:>6}{(values > 0).float().mean():>11.3%}{values.mean():>15.6f}"
              f"{values.max():>14.4f}")


def main() -> None:
    args = parse_args()
    loaded = load_causal_lm(args.model, device=args.device)
    prompts = list(DEFAULT_PROMPTS[: args.n_prompts])
    print(f"{loaded.identity} on {loaded.device} in {loaded.dtype}, {torch.get_num_threads()} "
          f"threads; {len(prompts)} prompts x {args.batch_size} continuations, top_p={args.top_p}")
    compare_speed(loaded, prompts, args)
    if args.nucleus:
        measure_nucleus(loaded, prompts, args)


if __name__ == "__main__":
    main()
