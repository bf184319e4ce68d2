"""Image synthesis throughput: images synthesised per second for a fixed number of steps.

Each configuration runs ``synthesize`` for ``--steps`` steps and reports images per second,
against two baselines measured in the same run: the plain pixel parameterisation without
transforms or penalties, and the full configuration at batch 1. It runs on the CPU and, when CUDA
is present, again on the GPU with the same code. The readout is a small seeded conv net
(``--backbone small``) or the embedded MobileNetV2 up to ``--layer`` (``--backbone mobilenet``)
with a random linear readout standardised on the natural-image set.

    python benchmarks/image_synthesis.py [--backbone small|mobilenet] [--size 64] [--steps 20]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from synth.image_synthesis import EncodingReadout, TotalVariation, synthesize  # noqa: E402
from synth.objectives import Drive  # noqa: E402

N_SITES = 8


def small_readout(size: int, seed: int = 0) -> EncodingReadout:
    """Return a seeded three-layer conv net with a random readout of ``N_SITES`` sites."""
    generator = torch.Generator().manual_seed(seed)
    network = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 5, stride=2, padding=2), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(3), torch.nn.Flatten(),
    )
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
        features = network(torch.rand(32, 3, size, size, generator=generator)).numpy()
    network.requires_grad_(False)
    return random_readout(network, features, seed)


def mobilenet_readout(size: int, layer: str, seed: int = 0) -> EncodingReadout:
    """Return the embedded MobileNetV2 up to ``layer``, grid-pooled, with a random readout."""
    from synth.image_features import ImageFeatureExtractor
    from synth.natural_images import load_natural_images
    from synth.vision_models import load_vision_model

    loaded = load_vision_model("embedded:mobilenet_v2", device="cpu")
    extractor = ImageFeatureExtractor(loaded, [layer], pooling="grid", image_size=size,
                                      use_cache=False)
    features = extractor.extract(load_natural_images(size).images)[layer]
    return random_readout(extractor.differentiable(layer), features, seed)


def random_readout(network: torch.nn.Module, features: np.ndarray, seed: int) -> EncodingReadout:
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(N_SITES, features.shape[1])) / np.sqrt(features.shape[1])
    # A floor at the median scale keeps features that are nearly constant on the standardising
    # images from dominating the readout.
    scale = np.maximum(features.std(axis=0), np.median(features.std(axis=0)))
    return EncodingReadout(network, features.mean(axis=0), scale, weights, np.zeros(N_SITES))


def images_per_second(readout, device: str, size: int, n_steps: int, n_images: int,
                      n_repeats: int, **options) -> float:
    """Return images per second of the fastest of ``n_repeats`` timed runs, after a warm-up."""
    # The warm-up step keeps one-off costs (allocator, cuDNN plans, thread pools) out of the timing.
    synthesize(readout, Drive(0), n_images, 1, seed=0, device=device, size=size, **options)
    fastest = float("inf")
    for _ in range(n_repeats):
        started = time.perf_counter()
        # synthesize returns numpy arrays, which waits for the GPU to finish.
        synthesize(readout, Drive(0), n_images, n_steps, seed=0, device=device, size=size, **options)
        fastest = min(fastest, time.perf_counter() - started)
    return n_images / fastest


def report(readout, device: str, args) -> None:
    plain = {"parameterisation": "pixel", "transforms": (), "penalties": ()}
    full = {"parameterisation": "fourier", "transforms": None, "penalties": (TotalVariation(0.1),)}
    rates = {
        "pixel, no transforms": images_per_second(readout, device, args.size, args.steps,
                                                  args.batch, args.repeats, **plain),
        "fourier + transforms + TV": images_per_second(readout, device, args.size, args.steps,
                                                       args.batch, args.repeats, **full),
        "fourier + transforms + TV, batch 1": images_per_second(readout, device, args.size,
                                                                args.steps, 1, args.repeats, **full),
    }
    print(f"\n{device}: {args.steps} steps, {args.size} x {args.size} px, batch {args.batch}")
    for name, rate in rates.items():
        print(f"  {name:<38} {rate:8.2f} images/s")
    baseline = rates["pixel, no transforms"]
    full_rate = rates["fourier + transforms + TV"]
    print(f"  full / plain pixel: {full_rate / baseline:.2f}x; "
          f"batch {args.batch} / batch 1: {full_rate / rates['fourier + transforms + TV, batch 1']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", choices=("small", "mobilenet"), default="small",
                        help="readout network: a small seeded conv net, or the embedded MobileNetV2")
    parser.add_argument("--layer", default="features.6",
                        help="MobileNetV2 module whose grid-pooled output feeds the readout")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=20, help="gradient steps per synthesis")
    parser.add_argument("--batch", type=int, default=8, help="images synthesised together")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs per configuration; the fastest is reported")
    # One thread by default: on 2 cores shared with other jobs, 2 torch threads ran 10 times slower
    # per step than 1 (small backbone, 64 px, batch 8, torch 2.13).
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.backbone == "small":
        readout = small_readout(args.size)
    else:
        readout = mobilenet_readout(args.size, args.layer)
    print(f"backbone {args.backbone}, torch {torch.__version__}, {args.threads} CPU threads")

    report(readout, "cpu", args)
    if torch.cuda.is_available():
        report(readout, "cuda", args)
    else:
        print("\ncuda: not available in this torch build; the GPU path was not measured.")


if __name__ == "__main__":
    main()
