"""The training noise: plain Gaussian by default, with offset and multi-resolution parts on request."""
import torch

from style_dreambooth.training.noise import perturbed, training_noise


def _noise(seed=0, shape=(8, 4, 16, 16), **options):
    return training_noise(torch.zeros(shape), torch.Generator().manual_seed(seed), **options)


def _neighbour_correlation(noise):
    a, b = noise[..., :, :-1].flatten(), noise[..., :, 1:].flatten()
    return torch.corrcoef(torch.stack([a, b]))[0, 1].item()


def test_default_noise_is_the_generators_gaussian():
    assert torch.equal(_noise(seed=3), torch.randn((8, 4, 16, 16), generator=torch.Generator().manual_seed(3)))


def test_offset_noise_shifts_each_image_and_channel_as_a_whole():
    plain, offset = _noise(seed=1), _noise(seed=1, offset=0.5)
    shift = offset - plain
    assert torch.allclose(shift, shift[..., :1, :1].expand_as(shift))  # one value per image and channel
    assert shift[..., 0, 0].abs().mean() > 0.1


def test_multires_noise_is_spatially_correlated_unit_variance_and_reproducible():
    plain, pyramid = _noise(seed=2), _noise(seed=2, multires_iterations=4, multires_discount=0.5)
    assert abs(_neighbour_correlation(plain)) < 0.05
    assert _neighbour_correlation(pyramid) > 0.1  # coarse levels make neighbours alike
    assert torch.allclose(pyramid.std(dim=(1, 2, 3)), torch.ones(8), atol=1e-5)
    assert torch.equal(pyramid, _noise(seed=2, multires_iterations=4, multires_discount=0.5))
    weaker = _noise(seed=2, multires_iterations=4, multires_discount=0.1)
    assert _neighbour_correlation(weaker) < _neighbour_correlation(pyramid)


def test_multires_levels_stop_at_one_latent_pixel():
    """More levels than the latent has halvings change nothing: the last level is a whole-image value."""
    assert torch.equal(_noise(seed=4, shape=(2, 4, 8, 8), multires_iterations=3),
                       _noise(seed=4, shape=(2, 4, 8, 8), multires_iterations=12))


def test_input_perturbation_adds_a_second_draw_of_the_asked_size_and_nothing_at_zero():
    noise = _noise(seed=5)
    gen = torch.Generator().manual_seed(9)
    assert perturbed(noise, gen, 0.0) is noise
    assert torch.equal(torch.randn(3, generator=gen), torch.randn(3, generator=torch.Generator().manual_seed(9)))
    extra = perturbed(noise, torch.Generator().manual_seed(9), 0.1) - noise
    assert abs(extra.std().item() - 0.1) < 0.005  # G times a unit Gaussian
    assert abs(torch.corrcoef(torch.stack([extra.flatten(), noise.flatten()]))[0, 1].item()) < 0.05
