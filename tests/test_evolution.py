"""Gradient-free synthesis: image spaces, the genetic algorithm, CMA-ES and the generation protocol."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from synth.evolution import (
    CmaEs,
    FourierCodeSpace,
    GeneratorSpace,
    GeneticAlgorithm,
    ImageEvolution,
    make_optimizer,
)
from synth.image_synthesis import DisplayLimits, rms_contrast
from synth.objectives import Drive

torch.set_num_threads(1)

SIZE = 32
N_GENERATIONS = 8
POPULATION = 16


@pytest.fixture(scope="module")
def space() -> FourierCodeSpace:
    return FourierCodeSpace(SIZE, max_frequency=3)


def reference_images(n: int = 3) -> np.ndarray:
    rng = np.random.default_rng(99)
    return rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def correlation_with(target: np.ndarray):
    """Return a score function: each image's Pearson correlation with ``target``, pixel by pixel."""
    flat_target = target.reshape(-1).astype(np.float64)

    def score(images: np.ndarray) -> np.ndarray:
        flat = images.reshape(len(images), -1).astype(np.float64)
        return np.array([np.corrcoef(image, flat_target)[0, 1] for image in flat])

    return score


def hidden_target(space: FourierCodeSpace) -> np.ndarray:
    return space.decode(np.random.default_rng(1234).standard_normal((1, space.n_dims)))[0]


def run(evolution: ImageEvolution, score, n_generations: int = N_GENERATIONS) -> list:
    generations = []
    for _ in range(n_generations):
        generation = evolution.propose()
        generations.append(generation)
        evolution.tell(score(generation.images))
    return generations


def test_fourier_space_decodes_within_limits(space):
    # Per colour channel: the mean colour, 3 + 3 x 7 frequencies x (real, imaginary), minus one.
    assert space.n_dims == 3 * (2 * (1 + 3 + 3 * 7) - 1)
    codes = 3 * np.random.default_rng(0).standard_normal((70, space.n_dims))
    images = space.decode(codes)
    assert images.shape == (70, SIZE, SIZE, 3)
    assert images.dtype == np.uint8
    assert rms_contrast(images).max() <= DisplayLimits().rms_contrast
    np.testing.assert_array_equal(space.decode(codes[:5]), images[:5])


def test_fourier_space_dimensions_are_independent(space):
    patterns = space._raw(np.eye(space.n_dims)).reshape(space.n_dims, -1).numpy()
    assert np.linalg.matrix_rank(patterns) == space.n_dims


def test_fourier_space_rejects_bad_arguments(space):
    with pytest.raises(ValueError, match="max_frequency"):
        FourierCodeSpace(SIZE, max_frequency=16)
    with pytest.raises(ValueError, match=r"codes must be \(n, 147\)"):
        space.decode(np.zeros((2, 5)))


@pytest.mark.parametrize("method", ["ga", "cmaes"])
def test_method_improves_correlation_with_hidden_image(space, method):
    score = correlation_with(hidden_target(space))
    evolution = ImageEvolution(space, make_optimizer(method, space.n_dims, POPULATION,
                                                     np.random.default_rng(0)), reference_images())
    run(evolution, score)
    first, last = evolution.history[0], evolution.history[-1]
    assert last.mean > first.mean + 0.3, [round(h.mean, 2) for h in evolution.history]
    assert evolution.best_score >= last.max
    assert evolution.best_score == pytest.approx(score(evolution.best_image[None])[0])


def test_proportional_selection_improves(space):
    score = correlation_with(hidden_target(space))
    optimizer = GeneticAlgorithm(space.n_dims, POPULATION, np.random.default_rng(0),
                                 selection="proportional", temperature=0.5)
    evolution = ImageEvolution(space, optimizer, reference_images())
    run(evolution, score)
    assert evolution.history[-1].mean > evolution.history[0].mean + 0.3


@pytest.mark.parametrize("method", ["ga", "cmaes"])
def test_references_in_every_generation(space, method):
    references = reference_images()
    evolution = ImageEvolution(space, make_optimizer(method, space.n_dims, 6,
                                                     np.random.default_rng(0)), references)
    generations = run(evolution, correlation_with(hidden_target(space)), n_generations=4)
    for generation in generations:
        assert generation.references is generations[0].references
        np.testing.assert_array_equal(generation.references, references)
        assert generation.images.shape == (6, SIZE, SIZE, 3)
    assert not generations[0].references.flags.writeable
    assert [generation.index for generation in generations] == [0, 1, 2, 3]


@pytest.mark.parametrize("method", ["ga", "cmaes"])
def test_same_seed_same_generations(space, method):
    score = correlation_with(hidden_target(space))
    runs = []
    for global_seed in (1, 2):
        # The global numpy state differs between the runs and must not matter.
        np.random.seed(global_seed)
        optimizer = make_optimizer(method, space.n_dims, 8, np.random.default_rng(5))
        runs.append(run(ImageEvolution(space, optimizer, reference_images()), score, 3))
    for first, second in zip(*runs, strict=True):
        np.testing.assert_array_equal(first.codes, second.codes)
        np.testing.assert_array_equal(first.images, second.images)


def test_elites_survive_unchanged(space):
    optimizer = GeneticAlgorithm(space.n_dims, 8, np.random.default_rng(0), n_elite=2)
    codes = optimizer.ask()
    scores = np.arange(8.0)
    optimizer.tell(codes, scores)
    np.testing.assert_array_equal(optimizer.ask()[:2], codes[[7, 6]])


def test_generator_space_with_cmaes():
    rng = np.random.default_rng(3)
    basis = rng.normal(size=(12, SIZE * SIZE * 3))

    def generator(latents: np.ndarray) -> np.ndarray:
        pixels = 1 / (1 + np.exp(-(latents @ basis) / 4))
        return pixels.reshape(len(latents), SIZE, SIZE, 3)

    space = GeneratorSpace(generator, n_latent=12, size=SIZE)
    target = space.decode(rng.normal(size=(1, 12)))[0]
    optimizer = CmaEs(12, 10, np.random.default_rng(0), initial_sd=1.0)
    evolution = ImageEvolution(space, optimizer, reference_images(2))
    run(evolution, correlation_with(target))
    assert evolution.history[-1].mean > evolution.history[0].mean + 0.3
    assert rms_contrast(evolution.best_image[None])[0] <= DisplayLimits().rms_contrast


def test_generator_space_checks_output():
    space = GeneratorSpace(lambda latents: np.zeros((len(latents), 8, 8, 3)), n_latent=4, size=SIZE)
    with pytest.raises(ValueError, match="generator returned images of shape"):
        space.decode(np.zeros((2, 4)))
    out_of_range = GeneratorSpace(lambda latents: np.full((len(latents), SIZE, SIZE, 3), 2.0),
                                  n_latent=4, size=SIZE)
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        out_of_range.decode(np.zeros((2, 4)))


def test_tell_takes_responses_with_objective(space):
    evolution = ImageEvolution(space, make_optimizer("ga", space.n_dims, 4, np.random.default_rng(0)),
                               reference_images(), objective=Drive(1))
    evolution.propose()
    responses = np.array([[0.0, 1.0], [0.0, 5.0], [9.0, 2.0], [0.0, 3.0]])
    evolution.tell(responses, reference_scores=np.array([1.0, 2.0, 3.0]))
    assert evolution.best_score == 5.0
    assert evolution.history[0].reference_mean == pytest.approx(2.0)


def test_non_finite_scores_rank_last(space):
    optimizer = GeneticAlgorithm(space.n_dims, 4, np.random.default_rng(0), n_elite=1)
    evolution = ImageEvolution(space, optimizer, reference_images())
    generation = evolution.propose()
    evolution.tell(np.array([np.nan, -5.0, -7.0, np.inf]))
    assert evolution.best_score == -5.0
    np.testing.assert_array_equal(optimizer.ask()[0], generation.codes[1])
    evolution.propose()
    with pytest.raises(ValueError, match="Every score"):
        evolution.tell(np.full(4, np.nan))


def test_protocol_errors(space):
    evolution = ImageEvolution(space, make_optimizer("ga", space.n_dims, 4, np.random.default_rng(0)),
                               reference_images())
    with pytest.raises(RuntimeError, match="call propose"):
        evolution.tell(np.zeros(4))
    evolution.propose()
    with pytest.raises(RuntimeError, match="still waiting"):
        evolution.propose()
    with pytest.raises(ValueError, match=r"one score per image, \(4,\)"):
        evolution.tell(np.zeros(3))
    with pytest.raises(ValueError, match="reference_scores must be"):
        evolution.tell(np.zeros(4), reference_scores=np.zeros(2))


@pytest.mark.parametrize(("arguments", "message"), [
    ({"method": "pso"}, "method must be one of"),
    ({"method": "ga", "selection": "roulette"}, "selection must be one of"),
    ({"method": "ga", "n_elite": 4}, "n_elite must be"),
    ({"method": "ga", "mutation_rate": 1.5}, "probabilities"),
    ({"method": "cmaes", "population_size": 1}, "population_size >= 2"),
])
def test_optimizer_arguments_checked(arguments, message):
    arguments = {"population_size": 4, **arguments}
    method = arguments.pop("method")
    population_size = arguments.pop("population_size")
    with pytest.raises(ValueError, match=message):
        make_optimizer(method, 10, population_size, np.random.default_rng(0), **arguments)


def test_references_checked(space):
    optimizer = make_optimizer("ga", space.n_dims, 4, np.random.default_rng(0))
    with pytest.raises(ValueError, match="references must be uint8"):
        ImageEvolution(space, optimizer, np.zeros((2, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="references must be uint8"):
        ImageEvolution(space, optimizer, np.zeros((2, SIZE, SIZE, 3)))
