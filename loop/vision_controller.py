"""The vision controller: calibration on natural images, closed-loop synthesis, evolution, evaluation.

Runs in the session's main process, like :class:`loop.controller.Controller`, whose trial
machinery it keeps: presentation, fallback slots, response collection, recording and resume.
It differs in what it shows and learns:

- the encoding model predicts every site (``response.target_channels``) from one CNN layer;
- closed-loop blocks show images synthesised by gradient ascent on that model (stretch, one-hot
  population, drive or suppress, per target site), with a few natural reference images, and the
  model is updated after every trial and refitted after every block;
- evolution blocks show generations evolved against the observed response of one site, with no
  gradient (a genetic algorithm or CMA-ES, as XDream does with a generator);
- evaluation shows the final synthesised images and every natural image, each repeated.

Synthesis runs between blocks while the rest message is on screen. Everything it touches is passed
in: the feature extractor, the synthesis device, and ``store_image``, which writes each new image
where the session keeps it (the session file, and a file that the simulated subject reads).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from loop.controller import Controller, _PendingTrial
from loop.presentation import Stimulus
from loop.recording import TrialRecord
from loop.selection import select_random
from synth.encoding import RidgeEncoder, Standardizer, ridge_loo
from synth.image_pool import ImagePool
from synth.objectives import objective_from_spec

logger = logging.getLogger(__name__)

# A condition names its objective and site, e.g. "stretch:SITE003"; natural images shown in
# calibration and evaluation are "natural", those shown beside synthesised images "reference".
NATURAL, REFERENCE = "natural", "reference"


class PerImageObjective:
    """One objective per image of a batch, so that one synthesis run serves several sites."""

    def __init__(self, objectives: list) -> None:
        self.objectives = objectives

    def score(self, responses):
        scores = [objective.score(responses[index:index + 1])[0]
                  for index, objective in enumerate(self.objectives)]
        return torch.stack(scores) if isinstance(responses, torch.Tensor) else np.array(scores)


def condition_site(condition: str) -> str | None:
    """Return the site a condition targets (``stretch:SITE003`` gives ``SITE003``), else None."""
    _, separator, site = condition.partition(":")
    return site if separator else None


class VisionController(Controller):
    """Runs a vision session's schedule; see the module docstring for its phases."""

    def __init__(self, experiment, pool: ImagePool, pool_features: dict[str, np.ndarray],
                 target_indices: list[int], presenter, responses, clock, rng: np.random.Generator,
                 extractor, store_image: Callable[[int], str | None], recorder=None,
                 speed: float = 1.0, on_trial=None, on_phase=None, replay=None,
                 synthesis_device: str = "auto") -> None:
        super().__init__(experiment, pool, pool_features, target_indices, presenter, responses,
                         clock, rng, recorder=recorder, speed=speed, on_trial=on_trial,
                         on_phase=on_phase, replay=replay)
        self.vision = experiment.vision
        self.extractor = extractor
        self.store_image = store_image
        self.synthesis_device = synthesis_device
        self.site_names = list(experiment.response.target_channels)
        self.site_responses: list[np.ndarray] = []
        self.natural = pool.indices_of("natural")
        # Features are standardised as on the natural images, for every fit of the session.
        self.standardizers = {layer: Standardizer.fit(features[self.natural])
                              for layer, features in pool_features.items()}
        # The latest response of every site to each image, for the evolution's scores.
        self._site_response_of: dict[int, np.ndarray] = {}
        self._image_files: dict[int, str | None] = {index: store_image(index)
                                                    for index in range(len(pool))}
        # Synthesis seeds: one stream, so that the images repeat with the session's seed.
        self._synthesis_seeds = np.random.default_rng(rng.integers(2**32))

    # The pool grows as images are synthesised.

    def _add_images(self, images: np.ndarray, labels: list[str]) -> list[int]:
        indices = []
        for image, label in zip(images, labels, strict=True):
            before = len(self.pool)
            index = self.pool.add(image, label, "synthesised")
            if index == before:
                self.state.shown_mask = np.append(self.state.shown_mask, False)
                self._planned = np.append(self._planned, False)
                self._image_files[index] = self.store_image(index)
            indices.append(index)
        # New images in the order they joined the pool; an image proposed twice is added once.
        n_known = len(self.pool_features[self.natural_layer])
        new = sorted({index for index in indices if index >= n_known})
        if new:
            features = self.extractor.extract(np.stack([self.pool.images[i] for i in new]))
            for layer, rows in features.items():
                self.pool_features[layer] = np.vstack([self.pool_features[layer], rows])
        return indices

    @property
    def natural_layer(self) -> str:
        return next(iter(self.pool_features))

    def _stimulus(self, index: int) -> Stimulus:
        return Stimulus(self.pool.ids[index], self.pool.texts[index], image=self.pool.images[index],
                        image_file=self._image_files.get(index))

    def _announce_next_slot(self, duration_s: float, show: bool = True) -> None:
        """Draw the fallback for the next slot among the natural images, and announce it."""
        available = np.zeros(len(self.pool), dtype=bool)
        available[self.natural] = True
        self._fallback_index = int(select_random(available, 1, self._fallback_rng)[0])
        if show:
            self.presenter.expect(self._trial_index + 1, self._next_due, duration_s,
                                  self._stimulus(self._fallback_index))

    # Responses and the model

    def _site_position(self, condition: str) -> int | None:
        site = condition_site(condition)
        return self.site_names.index(site) if site is not None else None

    def _observed(self, pending: _PendingTrial, channels: np.ndarray) -> float:
        """Return the targeted site's response, or the mean over the sites for other images."""
        position = self._site_position(pending.condition)
        sites = channels[self.target_indices]
        return float(sites[position]) if position is not None else float(np.mean(sites))

    def _learn(self, pending: _PendingTrial, record: TrialRecord, channels: np.ndarray) -> None:
        sites = np.asarray(channels[self.target_indices], dtype=np.float64)
        self.state.responses.append(float(record.observed))
        self.site_responses.append(sites)
        self._site_response_of[pending.index] = sites
        if pending.update and self.encoder is not None:
            features = self.pool_features[self.state.layer][pending.index][None]
            self.encoder.update(features, sites[None])
            self._record_update("online", pending.trial)

    def _prediction(self, index: int, condition: str = "") -> tuple[float, float]:
        if self.encoder is None:
            return float("nan"), float("nan")
        mean, sd = self.encoder.predict(self.pool_features[self.state.layer][index][None])
        position = self._site_position(condition)
        if position is None:
            return float(mean[0].mean()), float(np.sqrt(np.mean(sd[0] ** 2)))
        return float(mean[0, position]), float(sd[0, position])

    def fit(self, choose_layer: bool = False) -> None:
        """Fit the per-site model from scratch on every response so far (penalties by LOO)."""
        indices = np.asarray(self.state.indices, dtype=int)
        responses = np.asarray(self.site_responses)
        if choose_layer:
            for layer, features in self.pool_features.items():
                design = self.standardizers[layer].transform(features[indices])[:, :-1]
                loo = ridge_loo(design, responses, self.alphas)
                self.state.layer_cv_r[layer] = float(np.mean(loo.cv_r))
            self.state.layer = max(self.state.layer_cv_r, key=self.state.layer_cv_r.get)
            logger.info("Mean leave-one-out r over the sites by layer: %s; chose %s.",
                        {k: round(v, 3) for k, v in self.state.layer_cv_r.items()},
                        self.state.layer)
            if self.recorder is not None:
                layers = list(self.state.layer_cv_r)
                chosen = layers.index(self.state.layer)
                self.recorder.add_layer_selection(
                    len(indices), np.arange(len(layers)),
                    np.array([self.state.layer_cv_r[k] for k in layers]), chosen)
                self.recorder.file.attrs["vision_layers"] = ",".join(layers)
        layer = self.state.layer
        self.encoder = RidgeEncoder(self.standardizers[layer], self.site_names)
        self.encoder.fit(self.pool_features[layer][indices], responses, self.alphas)
        self._record_update("fit")
        logger.info("Encoding model on %d trials: leave-one-out r per site %s.",
                    self.encoder.n_samples, np.round(self.encoder.cv_r, 2).tolist())

    # Synthesis

    def _target_sites(self) -> list[str]:
        return list(self.vision.synthesis.target_sites or self.site_names)

    def _synthesise(self, phase: str, block: int) -> list[tuple[str, int]]:
        """Synthesise one image per target site and objective; return (condition, index) pairs."""
        from synth.image_synthesis import (
            DisplayLimits,
            EncodingReadout,
            TotalVariation,
            synthesize,
        )

        settings = self.vision.synthesis
        layer = self.state.layer
        natural_predicted = self.encoder.predict(self.pool_features[layer][self.natural])[0]
        objectives, conditions = [], []
        for site in self._target_sites():
            position = self.site_names.index(site)
            for name in settings.objectives:
                objectives.append(objective_from_spec({"name": name, "site": position},
                                                      natural_responses=natural_predicted))
                conditions.append(f"{name}:{site}")
        readout = EncodingReadout.from_encoder(self.extractor.differentiable(layer), self.encoder)
        seed = int(self._synthesis_seeds.integers(2**31))
        result = synthesize(
            readout, PerImageObjective(objectives), n_images=len(objectives),
            n_steps=settings.n_steps, seed=seed, device=self.synthesis_device,
            size=self.vision.image_size, parameterisation=settings.parameterisation,
            penalties=(TotalVariation(settings.total_variation),),
            limits=DisplayLimits(settings.max_rms_contrast), learning_rate=settings.learning_rate)
        labels = [f"{condition} ({phase} {block})" for condition in conditions]
        indices = self._add_images(result.images, labels)
        logger.info("Synthesised %d images for %s %d (seed %d); predicted objective %s.",
                    len(indices), phase, block, seed, np.round(result.values, 2).tolist())
        return list(zip(conditions, indices, strict=True))

    def _run_plan(self, phase: str, block: int, plan: list[tuple[str, int]], update: bool) -> None:
        for position, (condition, index) in enumerate(plan):
            self._planned[index] = False
            predicted, predicted_sd = self._prediction(index, condition)
            self._run_trial(phase, block, condition, index, predicted, predicted_sd, update=update,
                            next_in_run=position < len(plan) - 1)

    def _shuffled(self, plan: list[tuple[str, int]]) -> list[tuple[str, int]]:
        return [plan[i] for i in self.rng.permutation(len(plan))]

    # Phases

    def calibrate(self, n_trials: int | None = None) -> None:
        """Show every natural image ``calibration_repeats`` times, then choose the layer and fit."""
        plan = self._shuffled([(NATURAL, int(index)) for index in self.natural]
                              * self.vision.calibration_repeats)
        self._phase("calibration", len(plan))
        self._run_plan("calibration", 0, plan, update=False)
        self._rest()
        self.fit(choose_layer=True)

    def closed_loop(self) -> None:
        """Blocks of synthesised images and natural references; update per trial, refit per block."""
        settings = self.vision.synthesis
        if settings.n_blocks == 0:
            return
        n_per_block = len(self._target_sites()) * len(settings.objectives) + settings.n_references
        self._phase("closed_loop", settings.n_blocks * n_per_block)
        for block in range(1, settings.n_blocks + 1):
            plan = self._synthesise("closed_loop", block)
            references = self.rng.choice(self.natural, settings.n_references, replace=False)
            plan = self._shuffled(plan + [(REFERENCE, int(index)) for index in references])
            self._run_plan("closed_loop", block, plan, update=True)
            self._rest()
            # The layer stays the one calibration chose: the images synthesised so far were made
            # for it, and the recorded weights keep one width.
            self.fit(choose_layer=False)
            self._next_due = None

    def evolve(self) -> None:
        """Generations evolved against one site's observed response, with natural references."""
        from synth.evolution import FourierCodeSpace, ImageEvolution, make_optimizer
        from synth.image_synthesis import DisplayLimits

        settings = self.vision.evolution
        if settings.n_generations == 0:
            return
        site = settings.target_site or self._target_sites()[0]
        position = self.site_names.index(site)
        space = FourierCodeSpace(self.vision.image_size,
                                 limits=DisplayLimits(self.vision.synthesis.max_rms_contrast))
        optimizer = make_optimizer(settings.method, space.n_dims, settings.population_size,
                                   self.rng.spawn(1)[0])
        references = self.rng.choice(self.natural, settings.n_references, replace=False)
        evolution = ImageEvolution(space, optimizer,
                                   np.stack([self.pool.images[i] for i in references]))
        self._phase("evolution", settings.n_generations
                    * (settings.population_size + settings.n_references))
        condition = f"evolved:{site}"
        for generation in range(1, settings.n_generations + 1):
            proposed = evolution.propose()
            indices = self._add_images(
                proposed.images, [f"{condition} (generation {generation})"] * len(proposed.images))
            plan = self._shuffled([(condition, index) for index in indices]
                                  + [(REFERENCE, int(index)) for index in references])
            self._run_plan("evolution", generation, plan, update=True)
            self._rest()
            scores = np.array([self._site_response_of.get(index, np.full(len(self.site_names),
                                                                         np.nan))[position]
                               for index in indices])
            reference_scores = np.array([self._site_response_of[int(i)][position]
                                         for i in references])
            evolution.tell(scores, reference_scores)
            logger.info("Generation %d for %s: mean %.3f, best %.3f, references %.3f.", generation,
                        site, np.nanmean(scores), np.nanmax(scores), np.mean(reference_scores))
            self.fit(choose_layer=False)
            self._next_due = None
        self._evolved_best = (condition, evolution.best_image)

    def evaluate(self) -> None:
        """Show the final synthesised images and every natural image, each repeated."""
        plan = self._synthesise("evaluation", 0)
        best = getattr(self, "_evolved_best", None)
        if best is not None and best[1] is not None:
            plan += list(zip([best[0]], self._add_images(best[1][None], [f"{best[0]} (best)"]),
                             strict=True))
        plan += [(NATURAL, int(index)) for index in self.natural]
        plan = self._shuffled(plan * self.vision.evaluation_repeats)
        self._phase("evaluation", len(plan))
        self._run_plan("evaluation", 0, plan, update=False)
        self._wait_for_responses()

    def _run(self):
        self.presenter.open()
        presentation = self.experiment.presentation
        self._show_message(presentation.instructions, presentation.instructions_duration_s)
        self.calibrate()
        self.closed_loop()
        self.evolve()
        self.evaluate()
        self._record_frame_reports()
        return self.state
