"""Gradient-free image synthesis against live responses: a genetic algorithm or CMA-ES, ask and tell.

Runs in the controller process between blocks. It is pure computation: no clock, file or socket,
and all randomness comes from the numpy Generator passed in. Each generation is a set of codes in a
low-dimensional image space, decoded to uint8 images within the display limits. The default space
is the lowest spatial frequencies of a colour-decorrelated Fourier spectrum; a generator's latent
space can replace it. Every generation is shown with the same few natural reference images, so
drift of the recording shows up in their responses, as in XDream (Ponce et al. 2019, Cell).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from synth.image_synthesis import (
    DEFAULT_LIMITS,
    NATURAL_COLOUR_COVARIANCE,
    DisplayLimits,
    colour_mixing_matrix,
    limit_contrast,
    mix_colours,
    spectrum_scale,
    to_display,
    to_uint8,
)

logger = logging.getLogger(__name__)

METHODS = ("ga", "cmaes")
SELECTIONS = ("tournament", "proportional")

# Decoding runs in chunks of this many codes, so a large population does not hold all its float
# images at once (64 codes of 224 x 224 px take 39 MB as float32).
_DECODE_CHUNK = 64


# --- Image spaces ------------------------------------------------------------------------------


class FourierCodeSpace:
    """Images from the lowest spatial frequencies of a colour-decorrelated Fourier spectrum.

    A code contains, per decorrelated colour channel, the mean colour and the real and imaginary
    parts of every frequency of up to ``max_frequency`` cycles per image each way. Of each pair of
    mirrored frequencies only one is included, so no two dimensions make the same image.
    Coefficients are scaled by ``1 / f**decay`` as in ``FourierImage``, and the whole map is scaled
    so that standard-normal codes give raw pixels of unit variance before ``tanh``.
    """

    def __init__(self, size: int | tuple[int, int] = 64, max_frequency: int = 3, *,
                 limits: DisplayLimits = DEFAULT_LIMITS, decay: float = 1.0,
                 colour_covariance: np.ndarray = NATURAL_COLOUR_COVARIANCE) -> None:
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        if not 1 <= max_frequency < min(height, width) / 2:
            raise ValueError(f"max_frequency must be from 1 to below half the image size "
                             f"({min(height, width) / 2:g} cycles), got {max_frequency}.")
        self.size = (int(height), int(width))
        self.limits = limits
        self.max_frequency = max_frequency

        # Real-part and imaginary-part positions on the rfft2 grid, per colour channel. The
        # imaginary part of the mean colour makes no image and is left out.
        cycles = range(-max_frequency, max_frequency + 1)
        half_plane = [(0, 0)] + [(ky, 0) for ky in range(1, max_frequency + 1)]
        half_plane += [(ky, kx) for kx in range(1, max_frequency + 1) for ky in cycles]
        positions = [(ky % height, kx, part) for ky, kx in half_plane for part in (0, 1)]
        self._positions = np.array([position for position in positions if position != (0, 0, 1)])
        self.n_dims = 3 * len(self._positions)

        scale = spectrum_scale(self.size, decay)
        self._scale = torch.as_tensor(scale[self._positions[:, 0], self._positions[:, 1]],
                                      dtype=torch.float64)
        self._mixing = torch.as_tensor(colour_mixing_matrix(colour_covariance), dtype=torch.float64)
        # Each dimension's image is a fixed pattern, so a standard-normal code's pixel variance is
        # the sum of the squared patterns.
        self._gain = 1.0
        identity = np.eye(self.n_dims)
        variance = sum(self._raw(identity[start:start + _DECODE_CHUNK]).pow(2).sum(0)
                       for start in range(0, self.n_dims, _DECODE_CHUNK))
        self._gain = 1.0 / math.sqrt(float(variance.mean()))

    def _raw(self, codes: np.ndarray) -> torch.Tensor:
        height, width = self.size
        codes = torch.as_tensor(codes, dtype=torch.float64).reshape(len(codes), 3, -1)
        coefficients = torch.zeros((len(codes), 3, height, width // 2 + 1, 2), dtype=torch.float64)
        rows, columns, parts = (torch.as_tensor(self._positions[:, i]) for i in range(3))
        coefficients[:, :, rows, columns, parts] = codes * self._scale * self._gain
        spectrum = torch.view_as_complex(coefficients)
        decorrelated = torch.fft.irfft2(spectrum, s=self.size, norm="ortho")
        return mix_colours(decorrelated, self._mixing)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Return uint8 images ``(n, H, W, 3)`` within the display limits for codes ``(n, n_dims)``."""
        codes = _check_codes(codes, self.n_dims)
        chunks = [to_uint8(to_display(self._raw(codes[start:start + _DECODE_CHUNK]), self.limits))
                  for start in range(0, len(codes), _DECODE_CHUNK)]
        return np.concatenate(chunks)


class GeneratorSpace:
    """Images from a generator's latent space.

    ``generator`` maps latents ``(n, n_latent)`` float64 to images ``(n, H, W, 3)``, uint8 or float
    in [0, 1], for example a GAN's decoder wrapped to return numpy. The display limits are applied
    to what it returns.
    """

    def __init__(self, generator: Callable[[np.ndarray], np.ndarray], n_latent: int,
                 size: int | tuple[int, int], *, limits: DisplayLimits = DEFAULT_LIMITS) -> None:
        if n_latent < 1:
            raise ValueError(f"n_latent must be >= 1, got {n_latent}.")
        self.generator = generator
        self.n_dims = int(n_latent)
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.limits = limits

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Return uint8 images ``(n, H, W, 3)`` within the display limits for latents ``(n, n_latent)``."""
        codes = _check_codes(codes, self.n_dims)
        images = np.asarray(self.generator(codes))
        expected = (len(codes), *self.size, 3)
        if images.shape != expected:
            raise ValueError(f"The generator returned images of shape {images.shape}; expected "
                             f"{expected}, (n, H, W, 3).")
        pixels = images / 255.0 if images.dtype == np.uint8 else images.astype(np.float64)
        if not (np.all(np.isfinite(pixels)) and pixels.min() >= 0 and pixels.max() <= 1):
            raise ValueError("The generator returned pixel values outside [0, 1]; scale its output "
                             "to [0, 1] or return uint8.")
        tensor = torch.as_tensor(pixels).permute(0, 3, 1, 2)
        return to_uint8(limit_contrast(tensor, self.limits))


def _check_codes(codes: np.ndarray, n_dims: int) -> np.ndarray:
    codes = np.asarray(codes, dtype=np.float64)
    if codes.ndim != 2 or codes.shape[1] != n_dims:
        raise ValueError(f"codes must be (n, {n_dims}), got {codes.shape}.")
    return codes


# --- Optimisers --------------------------------------------------------------------------------


class GeneticAlgorithm:
    """An XDream-like genetic algorithm over codes, maximising the score.

    Each generation keeps the ``n_elite`` best codes unchanged (they are shown and scored again,
    which averages out response noise), and fills the rest with children. A child's two parents
    are chosen by tournament or by fitness-proportional selection, where the probability is
    proportional to ``exp(z / temperature)`` of the standardised scores ``z``. The child takes each
    gene from its first parent with probability ``heritability`` and from the second otherwise.
    Then each gene is mutated with probability ``mutation_rate`` by Gaussian noise of SD
    ``mutation_sd``.
    """

    def __init__(self, n_dims: int, population_size: int, rng: np.random.Generator, *,
                 n_elite: int = 2, selection: str = "tournament", tournament_size: int = 3,
                 temperature: float = 1.0, heritability: float = 0.5, mutation_rate: float = 0.25,
                 mutation_sd: float = 0.5, initial_sd: float = 1.0) -> None:
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}.")
        if not 0 <= n_elite < population_size:
            raise ValueError(f"n_elite must be from 0 to population_size - 1 ({population_size - 1}), "
                             f"got {n_elite}.")
        if not (0 <= heritability <= 1 and 0 <= mutation_rate <= 1):
            raise ValueError(f"heritability and mutation_rate are probabilities in [0, 1], got "
                             f"{heritability} and {mutation_rate}.")
        if temperature <= 0 or tournament_size < 1:
            raise ValueError(f"temperature must be > 0 and tournament_size >= 1, got {temperature} "
                             f"and {tournament_size}.")
        self.rng = rng
        self.population_size = population_size
        self.n_elite = n_elite
        self.selection = selection
        self.tournament_size = tournament_size
        self.temperature = temperature
        self.heritability = heritability
        self.mutation_rate = mutation_rate
        self.mutation_sd = mutation_sd
        self.population = initial_sd * rng.standard_normal((population_size, n_dims))

    def ask(self) -> np.ndarray:
        """Return the codes to score, ``(population_size, n_dims)``."""
        return self.population.copy()

    def tell(self, codes: np.ndarray, scores: np.ndarray) -> None:
        """Breed the next population from the scored codes."""
        order = np.argsort(-scores, kind="stable")
        elites = codes[order[:self.n_elite]]
        n_children = self.population_size - self.n_elite
        first = self._select(scores, n_children)
        second = self._select(scores, n_children)

        # Uniform crossover, then Gaussian mutation of a random subset of genes.
        from_first = self.rng.random((n_children, codes.shape[1])) < self.heritability
        children = np.where(from_first, codes[first], codes[second])
        mutated = self.rng.random(children.shape) < self.mutation_rate
        children = children + mutated * self.rng.normal(0.0, self.mutation_sd, children.shape)
        self.population = np.concatenate([elites, children])

    def _select(self, scores: np.ndarray, n_parents: int) -> np.ndarray:
        """Return the indices of ``n_parents`` parents, chosen with replacement."""
        if self.selection == "tournament":
            entrants = self.rng.integers(0, len(scores), (n_parents, self.tournament_size))
            winners = np.argmax(scores[entrants], axis=1)
            return entrants[np.arange(n_parents), winners]
        spread = scores.std()
        standard = (scores - scores.mean()) / spread if spread > 0 else np.zeros_like(scores)
        weights = np.exp((standard - standard.max()) / self.temperature)
        return self.rng.choice(len(scores), size=n_parents, p=weights / weights.sum())


class CmaEs:
    """CMA-ES over codes, maximising the score, through ``cma`` (Hansen's reference implementation).

    Its samples come from ``rng`` through the ``randn`` option, so numpy's global random state is
    neither read nor changed, and its console output and log files are switched off.
    """

    def __init__(self, n_dims: int, population_size: int, rng: np.random.Generator, *,
                 initial_sd: float = 1.0, mean: np.ndarray | None = None,
                 options: dict | None = None) -> None:
        if population_size < 2:
            raise ValueError(f"CMA-ES needs population_size >= 2, got {population_size}.")
        try:
            import cma
        except ImportError as err:
            raise ImportError("CMA-ES needs the cma package: install neurosteer's vision extra "
                              "(pip install -e '.[vision]') or use method 'ga'.") from err
        settings = {
            "popsize": population_size,
            "randn": lambda *shape: rng.standard_normal(size=shape),
            "seed": float("nan"),  # NaN makes cma skip seeding numpy's global generator.
            "verbose": -9,
            "verb_disp": 0,
            "verb_log": 0,
        }
        settings.update(options or {})
        start = np.zeros(n_dims) if mean is None else np.asarray(mean, dtype=np.float64)
        self.strategy = cma.CMAEvolutionStrategy(start, initial_sd, settings)
        self.population_size = population_size

    def ask(self) -> np.ndarray:
        """Return the codes to score, ``(population_size, n_dims)``."""
        return np.array(self.strategy.ask())

    def tell(self, codes: np.ndarray, scores: np.ndarray) -> None:
        """Update the search distribution from the scored codes (``cma`` minimises, so negated)."""
        self.strategy.tell(list(codes), list(-np.asarray(scores, dtype=np.float64)))


def make_optimizer(method: str, n_dims: int, population_size: int, rng: np.random.Generator,
                   **options) -> GeneticAlgorithm | CmaEs:
    """Return a ``GeneticAlgorithm`` (``"ga"``) or ``CmaEs`` (``"cmaes"``) with its options."""
    if method == "ga":
        return GeneticAlgorithm(n_dims, population_size, rng, **options)
    if method == "cmaes":
        return CmaEs(n_dims, population_size, rng, **options)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}.")


# --- Generations -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Generation:
    """One block's images: the synthetic ones and the natural references shown with them."""

    index: int
    images: np.ndarray  # (population_size, H, W, 3) uint8
    references: np.ndarray  # (n_references, H, W, 3) uint8, the same array every generation
    codes: np.ndarray  # (population_size, n_dims)


@dataclass(frozen=True)
class GenerationScores:
    """The observed scores of one generation."""

    index: int
    mean: float
    max: float
    reference_mean: float  # NaN when reference scores were not given


class ImageEvolution:
    """Proposes a generation of images per block and evolves it from the observed scores.

    ``space`` decodes codes to images (``FourierCodeSpace`` or ``GeneratorSpace``); ``optimizer``
    comes from ``make_optimizer`` with ``space.n_dims``. ``references`` are uint8 natural images
    ``(n_references, H, W, 3)`` shown as given in every block. When ``objective`` is given,
    ``tell`` takes responses ``(population_size, n_sites)`` and scores them with
    ``objective.score``; otherwise it takes one score per image.
    """

    def __init__(self, space, optimizer: GeneticAlgorithm | CmaEs, references: np.ndarray,
                 objective=None) -> None:
        references = np.array(references)
        if references.ndim != 4 or references.shape[1:] != (*space.size, 3) or len(references) < 1:
            raise ValueError(f"references must be uint8 (n_references >= 1, {space.size[0]}, "
                             f"{space.size[1]}, 3), got {references.dtype} {references.shape}.")
        if references.dtype != np.uint8:
            raise ValueError(f"references must be uint8, got {references.dtype}.")
        references.setflags(write=False)
        self.space = space
        self.optimizer = optimizer
        self.references = references
        self.objective = objective
        self.history: list[GenerationScores] = []
        self.best_score = -math.inf
        self.best_code: np.ndarray | None = None
        self.best_image: np.ndarray | None = None
        self._pending: Generation | None = None

    @property
    def n_generations(self) -> int:
        return len(self.history)

    def propose(self) -> Generation:
        """Return the next generation of images and the references; call ``tell`` before the next."""
        if self._pending is not None:
            raise RuntimeError(f"Generation {self._pending.index} is still waiting for its scores; "
                               "call tell() with them before proposing another.")
        codes = self.optimizer.ask()
        images = self.space.decode(codes)
        self._pending = Generation(len(self.history), images, self.references, codes)
        return self._pending

    def tell(self, scores: np.ndarray, reference_scores: np.ndarray | None = None) -> None:
        """Record the observed scores of the pending generation's images and evolve the codes.

        A non-finite score (a trial lost to an artefact, say) ranks below every finite one.
        """
        generation = self._pending
        if generation is None:
            raise RuntimeError("No generation is waiting for scores; call propose() first.")
        scores = self._scores(scores, len(generation.codes))

        best = int(np.argmax(scores))
        if scores[best] > self.best_score:
            self.best_score = float(scores[best])
            self.best_code = generation.codes[best].copy()
            self.best_image = generation.images[best].copy()
        reference_mean = math.nan
        if reference_scores is not None:
            reference_scores = np.asarray(reference_scores, dtype=np.float64)
            if reference_scores.shape != (len(self.references),):
                raise ValueError(f"reference_scores must be ({len(self.references)},), one per "
                                 f"reference image, got {reference_scores.shape}.")
            reference_mean = float(np.nanmean(reference_scores))
        self.history.append(GenerationScores(generation.index, float(scores.mean()),
                                             float(scores.max()), reference_mean))

        self.optimizer.tell(generation.codes, scores)
        self._pending = None

    def _scores(self, observed: np.ndarray, n_images: int) -> np.ndarray:
        """Return one finite score per image, from scores or (with an objective) responses."""
        observed = np.asarray(observed, dtype=np.float64)
        if self.objective is not None:
            if observed.ndim != 2 or len(observed) != n_images:
                raise ValueError(f"With an objective, tell() takes responses (n_images={n_images}, "
                                 f"n_sites), got shape {observed.shape}.")
            observed = np.asarray(self.objective.score(observed), dtype=np.float64)
        if observed.shape != (n_images,):
            raise ValueError(f"tell() needs one score per image, ({n_images},), got shape "
                             f"{observed.shape}.")
        finite = np.isfinite(observed)
        if not finite.any():
            raise ValueError("Every score of this generation is non-finite; score the images again "
                             "or skip the block.")
        if not finite.all():
            logger.warning("Generation %d: %d of %d scores are not finite and rank last.",
                           len(self.history), int((~finite).sum()), n_images)
            floor = observed[finite].min()
            observed = np.where(finite, observed, floor - 1.0 - abs(floor))
        return observed
