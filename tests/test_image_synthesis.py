"""Image synthesis: parameterisations, display limits, transforms, penalties, readout and the loop."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch

from synth.encoding import RidgeEncoder, Standardizer, alpha_grid
from synth.image_synthesis import (
    NATURAL_COLOUR_COVARIANCE,
    BlurPenalty,
    DisplayLimits,
    EncodingReadout,
    FourierImage,
    Jitter,
    PixelImage,
    RandomScale,
    RandomShiftScale,
    SynthesisError,
    TotalVariation,
    colour_covariance,
    colour_mixing_matrix,
    from_uint8,
    limit_contrast,
    resample,
    rms_contrast,
    synthesis_device,
    synthesize,
    to_display,
    to_uint8,
)
from synth.objectives import Drive, Suppress

torch.set_num_threads(1)

SIZE = 32
CPU = torch.device("cpu")


def small_network(seed: int = 0) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    network = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 5, stride=2), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(),
    )
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return network


def small_readout(seed: int = 0, n_sites: int = 4) -> EncodingReadout:
    """Return a seeded conv net with a random linear readout, standardised on noise images."""
    network = small_network(seed)
    with torch.no_grad():
        images = torch.rand(40, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
        features = network(images).numpy()
    rng = np.random.default_rng(seed)
    # The scale is floored at its median, because a feature that is nearly constant on noise
    # images (a unit dead on noise) would otherwise dominate once synthesis wakes it.
    scale = np.maximum(features.std(axis=0), np.median(features.std(axis=0)))
    return EncodingReadout(network, features.mean(axis=0), scale,
                           rng.normal(size=(n_sites, features.shape[1])) / 8, rng.normal(size=n_sites))


@pytest.fixture(scope="module")
def readout() -> EncodingReadout:
    return small_readout()


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- Parameterisations --------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(32, 48), (33, 31)])
def test_fourier_round_trips_shape_and_values(size):
    image = FourierImage(2, size, generator=generator(), device=CPU)
    assert image().shape == (2, 3, *size)
    raw = torch.randn((2, 3, *size), generator=generator(1))
    image.encode(raw)
    torch.testing.assert_close(image(), raw, atol=1e-4, rtol=1e-4)


def test_pixel_round_trips():
    image = PixelImage(2, (SIZE, SIZE), generator=generator(), device=CPU)
    raw = torch.randn((2, 3, SIZE, SIZE), generator=generator(1))
    image.encode(raw)
    torch.testing.assert_close(image(), raw)


def test_natural_colour_covariance_matches_photographs():
    photographs = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(),
                   skimage.data.rocket()]
    np.testing.assert_allclose(colour_covariance(photographs), NATURAL_COLOUR_COVARIANCE,
                               atol=6e-5)


def channel_correlation(images: torch.Tensor) -> np.ndarray:
    return np.corrcoef(images.detach().permute(1, 0, 2, 3).reshape(3, -1).numpy())


def test_fourier_channels_are_decorrelated_colours():
    image = FourierImage(64, (SIZE, SIZE), generator=generator(), device=CPU, init_sd=1.0)
    rgb = image()
    natural = NATURAL_COLOUR_COVARIANCE / np.sqrt(np.outer(np.diag(NATURAL_COLOUR_COVARIANCE),
                                                           np.diag(NATURAL_COLOUR_COVARIANCE)))
    # Independent parameter channels come out with natural colour correlations...
    np.testing.assert_allclose(channel_correlation(rgb), natural, atol=0.05)
    # ...and the inverse colour matrix makes them uncorrelated again.
    unmixing = torch.as_tensor(np.linalg.inv(colour_mixing_matrix()), dtype=torch.float32)
    decorrelated = torch.einsum("ck,nkhw->nchw", unmixing, rgb)
    np.testing.assert_allclose(channel_correlation(decorrelated), np.eye(3), atol=0.05)


def neighbour_correlation(images: torch.Tensor) -> float:
    values = images.detach().numpy()
    return float(np.corrcoef(values[..., :-1].ravel(), values[..., 1:].ravel())[0, 1])


def test_fourier_spectrum_falls_as_one_over_frequency():
    fourier = FourierImage(32, (SIZE, SIZE), generator=generator(), device=CPU, init_sd=1.0)
    pixel = PixelImage(32, (SIZE, SIZE), generator=generator(), device=CPU, init_sd=1.0)
    # A 1/f spectrum makes neighbouring pixels correlate; independent pixels do not.
    assert neighbour_correlation(fourier()) > 0.6
    assert abs(neighbour_correlation(pixel())) < 0.05
    amplitude = torch.fft.rfft2(fourier().detach()).abs().mean(dim=(0, 1))
    # At (2, 2), (4, 4) and (12, 12) cycles per image, 1/f predicts amplitude ratios of 2 and 3.
    assert 1.5 < amplitude[2, 2] / amplitude[4, 4] < 2.7
    assert 2.2 < amplitude[4, 4] / amplitude[12, 12] < 4


# --- Display limits -----------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [0.02, 0.1, 0.25, 0.5])
def test_display_limits_hold_after_quantisation(limit):
    limits = DisplayLimits(rms_contrast=limit)
    raw = 5 * torch.randn((16, 3, SIZE, SIZE), generator=generator())
    raw[0] = 0.0  # an all-grey image
    raw[1] = 1e-4 * torch.randn((3, SIZE, SIZE), generator=generator(1))  # near grey
    displayed = to_display(raw, limits)
    assert displayed.min() >= 0
    assert displayed.max() <= 1
    images = to_uint8(displayed)
    assert images.dtype == np.uint8
    assert images.shape == (16, SIZE, SIZE, 3)
    assert rms_contrast(images).max() <= limit


def test_quantisation_toward_grey_bound():
    # Values just either side of 127.5 are the worst case for rounding to the nearest level.
    levels = np.array([127.4, 127.6, 127.5, 0.3, 254.7, 200.2]) / 255
    images = torch.as_tensor(np.tile(levels, (1, 3, 1, 1)))
    quantised = to_uint8(images)[0, 0, :, 0]
    assert quantised.tolist() == [128, 127, 127, 1, 254, 200]


def test_limit_contrast_leaves_low_contrast_alone():
    images = 0.5 + 0.01 * torch.randn((2, 3, SIZE, SIZE), generator=generator())
    torch.testing.assert_close(limit_contrast(images, DisplayLimits(0.25)), images)


@pytest.mark.parametrize("limit", [0.0, 0.001, 0.6, float("nan")])
def test_display_limits_reject_invalid(limit):
    with pytest.raises(ValueError, match="rms_contrast must be in"):
        DisplayLimits(rms_contrast=limit)


def test_synthesised_images_within_limits(readout):
    limits = DisplayLimits(rms_contrast=0.1)
    result = synthesize(readout, Drive(0), n_images=4, n_steps=15, seed=0, device="cpu",
                        size=SIZE, limits=limits, learning_rate=0.3)
    assert result.images.dtype == np.uint8
    assert result.images.shape == (4, SIZE, SIZE, 3)
    # The high learning rate pushes contrast to the limit; it must stop there.
    assert rms_contrast(result.images).max() <= 0.1
    assert rms_contrast(result.images).min() > 0.09


# --- Transforms and penalties --------------------------------------------------------------------


def test_resample_integer_shift_is_reflected_translation():
    images = torch.rand((2, 3, 12, 10), generator=generator(), dtype=torch.float64)
    shift = torch.tensor([[2.0, -3.0], [0.0, 1.0]], dtype=torch.float64)
    moved = resample(images, shift, torch.ones(2, dtype=torch.float64)).numpy()
    for index, (down, right) in enumerate([(2, -3), (0, 1)]):
        padded = np.pad(images[index].numpy(), ((0, 0), (4, 4), (4, 4)), mode="reflect")
        expected = padded[:, 4 - down:4 - down + 12, 4 - right:4 - right + 10]
        np.testing.assert_allclose(moved[index], expected, atol=1e-12)


def test_transforms_are_seeded_and_keep_range():
    images = torch.rand((4, 3, SIZE, SIZE), generator=generator())
    for transform in (Jitter(3), RandomScale(0.8, 1.2), RandomShiftScale(3, 0.8, 1.2)):
        first = transform(images, generator(5))
        second = transform(images, generator(5))
        torch.testing.assert_close(first, second, atol=0, rtol=0)
        assert first.min() >= 0
        assert first.max() <= 1 + 1e-6
        assert not torch.equal(first, images)
    unit = RandomScale(1.0, 1.0)(images, generator())
    torch.testing.assert_close(unit, images)
    still = RandomShiftScale(0, 1.0, 1.0)(images, generator())
    torch.testing.assert_close(still, images)


def test_penalties_zero_on_flat_positive_on_checkerboard():
    flat = torch.full((1, 3, 8, 8), 0.5)
    checkerboard = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2
    checkerboard = checkerboard.float().expand(1, 3, 8, 8)
    assert TotalVariation(2.0)(flat).item() == 0.0
    assert TotalVariation(2.0)(checkerboard).item() == pytest.approx(4.0)
    assert BlurPenalty(1.0)(flat).item() == pytest.approx(0.0, abs=1e-12)
    assert BlurPenalty(1.0)(checkerboard).item() > 0.1


def test_penalty_smooths_images(readout):
    rough = synthesize(readout, Drive(0), n_images=2, n_steps=20, seed=0, device="cpu", size=SIZE,
                       parameterisation="pixel", penalties=())
    smooth = synthesize(readout, Drive(0), n_images=2, n_steps=20, seed=0, device="cpu", size=SIZE,
                        parameterisation="pixel", penalties=(TotalVariation(5.0), BlurPenalty(20.0)))
    roughness = [TotalVariation(1.0)(from_uint8(r.images, CPU)).mean().item() for r in (rough, smooth)]
    assert roughness[1] < 0.7 * roughness[0]


# --- Readout ------------------------------------------------------------------------------------


def test_readout_matches_ridge_encoder(tmp_path):
    network = small_network()
    images = torch.rand((30, 3, SIZE, SIZE), generator=generator(3))
    with torch.no_grad():
        features = network(images).double().numpy()
    responses = features @ np.random.default_rng(0).normal(size=(64, 2)) + 1.0
    encoder = RidgeEncoder(Standardizer.fit(features), ["site0", "site1"])
    encoder.fit(features, responses, alpha_grid(0.1, 100, 5))
    expected, _ = encoder.predict(features)

    readout = EncodingReadout.from_encoder(network, encoder)
    with torch.no_grad():
        predicted = readout(images).double().numpy()
    np.testing.assert_allclose(predicted, expected, rtol=1e-4, atol=1e-4)

    encoder.save(tmp_path / "encoder.npz")
    with np.load(tmp_path / "encoder.npz") as arrays:
        reloaded = EncodingReadout.from_arrays(network, arrays)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images), readout(images))


def test_readout_rejects_bad_shapes():
    network = small_network()
    with pytest.raises(ValueError, match="weights must be"):
        EncodingReadout(network, np.zeros(64), np.ones(64), np.zeros((2, 65)), np.zeros(2))
    with pytest.raises(ValueError, match="intercept must be"):
        EncodingReadout(network, np.zeros(64), np.ones(64), np.zeros((2, 64)), np.zeros(3))
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        EncodingReadout(network, np.zeros(64), np.zeros(64), np.zeros((2, 64)), np.zeros(2))
    wrong_width = EncodingReadout(network, np.zeros(10), np.ones(10), np.zeros((2, 10)), np.zeros(2))
    with pytest.raises(ValueError, match=r"expects \(n_images, 10\)"):
        wrong_width(torch.rand(1, 3, SIZE, SIZE))


# --- The synthesis loop -------------------------------------------------------------------------


def test_same_seed_same_images(readout):
    first = synthesize(readout, Drive(1), n_images=2, n_steps=5, seed=11, device="cpu", size=SIZE)
    second = synthesize(readout, Drive(1), n_images=2, n_steps=5, seed=11, device="cpu", size=SIZE)
    other = synthesize(readout, Drive(1), n_images=2, n_steps=5, seed=12, device="cpu", size=SIZE)
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.trace, second.trace)
    assert not np.array_equal(first.images, other.images)


def test_result_fields(readout):
    result = synthesize(readout, Suppress(2), n_images=3, n_steps=6, seed=0, device="cpu", size=SIZE)
    assert result.trace.shape == (6, 3)
    assert result.responses.shape == (3, readout.n_sites)
    np.testing.assert_allclose(result.values, -result.responses[:, 2])
    with torch.no_grad():
        shown = readout(from_uint8(result.images, CPU)).double().numpy()
    np.testing.assert_allclose(result.responses, shown, rtol=1e-6)
    assert result.trace[-1].mean() > result.trace[0].mean()
    assert (result.seed, result.device, result.parameterisation) == (0, "cpu", "fourier")


def test_readout_left_as_found(readout):
    readout.train()
    synthesize(readout, Drive(0), n_images=1, n_steps=3, seed=0, device="cpu", size=SIZE)
    assert readout.training
    assert all(parameter.grad is None for parameter in readout.parameters())
    readout.eval()


def test_init_images_are_the_start(readout):
    start = np.full((2, SIZE, SIZE, 3), 128, np.uint8)
    start[:, 8:24, 8:24] = (150, 110, 120)
    result = synthesize(readout, Drive(0), n_images=2, n_steps=0, seed=0, device="cpu", size=SIZE,
                        init_images=start)
    assert np.abs(result.images.astype(int) - start).max() <= 1


def test_non_finite_readout_raises():
    class NanFeatures(torch.nn.Module):
        def forward(self, images):
            return images.mean(dim=(2, 3)) * float("nan")

    readout = EncodingReadout(NanFeatures(), np.zeros(3), np.ones(3), np.ones((1, 3)), np.zeros(1))
    with pytest.raises(SynthesisError, match="non-finite"):
        synthesize(readout, Drive(0), n_images=1, n_steps=2, seed=0, device="cpu", size=SIZE)


def test_bad_arguments_raise(readout):
    with pytest.raises(ValueError, match="parameterisation must be one of"):
        synthesize(readout, Drive(0), 1, 1, seed=0, device="cpu", size=SIZE, parameterisation="gan")
    with pytest.raises(ValueError, match="at least 8 px"):
        synthesize(readout, Drive(0), 1, 1, seed=0, device="cpu", size=4)
    with pytest.raises(ValueError, match="init_images must be"):
        synthesize(readout, Drive(0), 2, 1, seed=0, device="cpu", size=SIZE,
                   init_images=np.zeros((1, SIZE, SIZE, 3), np.uint8))


def test_device_resolution():
    has_cuda = torch.cuda.is_available()
    assert synthesis_device("auto").type == ("cuda" if has_cuda else "cpu")
    assert synthesis_device("cpu") == CPU
    if has_cuda:
        assert synthesis_device("cuda").type == "cuda"
    else:
        with pytest.raises(ValueError, match="no CUDA device"):
            synthesis_device("cuda")
