"""Learnability guidance (the paper's score and guided sampler): the equations, where they act, their direction
and limits."""
import pytest
import torch
import torch.nn.functional as F

from conftest import make_empirical_prior
from data import classifier_input, get_spec
from guidance import (GuidanceConfig, Learnability, SamplerConfig, SamplerLog, add_to_memory, best_of_candidates,
                      cfg_output, decode_images, deviation_gradient, guided_output, sample)
from model import load_prior, make_student
from train_student import reference_spec

SPEC = get_spec("digits")
SAMPLER = SamplerConfig(cfg_scale=2.0, steps=20)


def classifiers(seed=0):
    """Two small random ConvNets standing in for the student f_k and the reference f_ref."""
    torch.manual_seed(seed)
    return make_student("convnet", SPEC).eval(), make_student("convnet", SPEC).eval()


def score_of(student, reference, omega=0.5, reference_view=SPEC):
    return Learnability(student, SPEC, reference, reference_view, omega)


def gens(n, seed=0):
    return [torch.Generator().manual_seed(seed * 1000 + i) for i in range(n)]


def test_learnability_is_student_ce_minus_weighted_reference_ce():
    student, reference = classifiers()
    ref_view = reference_spec(SPEC)  # each classifier gets its own view
    x, y = torch.rand(5, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 3, 4])
    parts = score_of(student, reference, 0.5, ref_view).parts(x, y)
    ce_s = F.cross_entropy(student(classifier_input(x, SPEC)), y, reduction="none")
    ce_r = F.cross_entropy(reference(classifier_input(x, ref_view)), y, reduction="none")
    assert parts["S"].shape == (5,) and torch.allclose(parts["S"], ce_s - 0.5 * ce_r)
    assert torch.allclose(parts["student_ce"], ce_s) and torch.allclose(parts["reference_ce"], ce_r)
    assert not torch.allclose(ce_r, F.cross_entropy(reference(classifier_input(x, SPEC)), y, reduction="none"))


def score_of_z0(prior, score, z, t, labels, classes, sampler):
    """Independent re-derivation: S(decode(z0_hat(z_t)), y) per sample, differentiable in z."""
    eps = cfg_output(prior, z, t, labels, sampler)[:, :prior.channels]
    alpha_bar = prior.scheduler.alphas_cumprod[t]
    z0_hat = (z - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
    return score(prior.decode(z0_hat), classes), eps


def test_push_follows_the_equation_and_autograd(pixel_prior):
    """push = lambda rho_t g with rho_t = c0 sqrt(1 - abar) ||eps|| / ||g||, g checked by finite differences."""
    prior = load_prior(pixel_prior)
    prior.scheduler.set_timesteps(50)
    score = score_of(*classifiers(1))
    labels = torch.tensor([0, 3, 7])
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = prior.scheduler.timesteps[20]
    out, push, bad = guided_output(prior, z, t, labels, labels, SAMPLER, score, GuidanceConfig(scale=15.0, c0=0.0015))

    z_in = z.clone().requires_grad_(True)
    s, eps = score_of_z0(prior, score, z_in, t, labels, labels, SAMPLER)
    g = torch.autograd.grad(s.sum(), z_in)[0]
    eps = eps.detach()
    alpha_bar = prior.scheduler.alphas_cumprod[t]
    rho = 0.0015 * (1 - alpha_bar).sqrt() * eps.flatten(1).norm(dim=1) / g.flatten(1).norm(dim=1)
    assert not bad.any() and torch.allclose(out[:, :1], eps, rtol=1e-5, atol=1e-6)
    assert torch.allclose(push, 15.0 * rho.view(-1, 1, 1, 1) * g, rtol=1e-4, atol=1e-8)

    # autograd's g agrees with a central finite difference of S along a random direction, per sample
    # (in float64, where a small step h resolves the derivative without rounding noise)
    prior.transformer.double(), score.student.double(), score.reference.double()
    z = z.double().requires_grad_(True)
    s, _ = score_of_z0(prior, score, z, t, labels, labels, SAMPLER)
    g = torch.autograd.grad(s.sum(), z)[0]
    z = z.detach()
    direction = torch.randn_like(z)
    h = 1e-7  # small enough not to cross a ReLU kink of the classifiers
    with torch.no_grad():
        s_plus, _ = score_of_z0(prior, score, z + h * direction, t, labels, labels, SAMPLER)
        s_minus, _ = score_of_z0(prior, score, z - h * direction, t, labels, labels, SAMPLER)
    fd = (s_plus - s_minus) / (2 * h)
    analytic = (g * direction).flatten(1).sum(dim=1)
    assert torch.allclose(fd, analytic, rtol=1e-4, atol=1e-7), (fd, analytic)


@pytest.mark.parametrize("form", ["z", "eps"])
def test_one_guided_step_raises_learnability(pixel_prior, form):
    """From the same z_t and noise, the guided step's z_{t-1} scores a higher S (at its own x0_hat) than the plain one."""
    prior = load_prior(pixel_prior)
    score = score_of(*classifiers(2))
    labels = torch.arange(8) % 10
    guide = GuidanceConfig(scale=30.0, deviation=0.0, candidates=1, guide_from=0, guide_until=0, form=form)
    sampler = SamplerConfig(cfg_scale=2.0, steps=1)  # one step: i = 0 is inside the window
    plain = sample(prior, labels, gens(8), sampler)
    guided = sample(prior, labels, gens(8), sampler, score, labels, None, guide)
    with torch.no_grad():
        s_plain, s_guided = score(plain, labels), score(guided, labels)
    assert s_guided.mean() > s_plain.mean()
    assert (s_guided > s_plain).float().mean() >= 0.75  # sample by sample, not only on average


@pytest.mark.parametrize("form", ["z", "eps"])
def test_guided_samples_score_higher_than_unguided_from_the_same_noise(form):
    """On a prior with real samples (the exact denoiser of 20 digits per class): guided > unguided S."""
    prior = make_empirical_prior()
    score = score_of(*classifiers(3))
    labels = torch.arange(20) % 10
    guide = GuidanceConfig(scale=60.0, deviation=0.0, candidates=1, guide_from=2, guide_until=17, form=form)
    plain = decode_images(prior, sample(prior, labels, gens(20), SAMPLER))
    guided = decode_images(prior, sample(prior, labels, gens(20), SAMPLER, score, labels, None, guide))
    with torch.no_grad():
        assert score(guided * 2 - 1, labels).mean() > score(plain * 2 - 1, labels).mean()


def test_reference_accuracy_stays_within_a_margin(digits_reference):
    """With a trained theta* and a prior whose samples are real digits: theta* recognises the guided samples
    (omega = 0.5, the paper's) at most 10 points less often than the unguided ones from the same noise."""
    prior = make_empirical_prior()
    reference, view, _ = digits_reference
    student = make_student("convnet", SPEC, seed=5).eval()
    score = Learnability(student, SPEC, reference, view, 0.5)
    labels = torch.arange(40) % 10
    guide = GuidanceConfig(scale=60.0, deviation=0.0, candidates=1, guide_from=2, guide_until=17)
    plain = decode_images(prior, sample(prior, labels, gens(40), SAMPLER))
    guided = decode_images(prior, sample(prior, labels, gens(40), SAMPLER, score, labels, None, guide))
    with torch.no_grad():
        acc = lambda x: (reference(classifier_input(x * 2 - 1, view)).argmax(1) == labels).float().mean()  # noqa: E731
        assert acc(plain) >= 0.9  # the stand-in prior makes clean digits
        assert acc(guided) >= acc(plain) - 0.10, (acc(plain), acc(guided))
        assert score(guided * 2 - 1, labels).mean() > score(plain * 2 - 1, labels).mean()


class Counting:
    """A score wrapper that counts its calls."""

    def __init__(self, score):
        self.score, self.calls = score, 0

    def __call__(self, x, y):
        self.calls += 1
        return self.score(x, y)


@pytest.mark.parametrize("form", ["z", "eps"])
def test_guided_code_at_zero_scales_is_bit_identical_to_unguided(pixel_prior, form):
    """lambda = gamma = 0, kappa = 1: the guided code runs (the score is evaluated at every window step) and
    changes nothing, bit for bit."""
    prior = load_prior(pixel_prior)
    score = Counting(score_of(*classifiers()))
    guide = GuidanceConfig(scale=0.0, deviation=0.0, candidates=1, guide_from=0, guide_until=9, form=form)
    labels = torch.arange(4)
    sampler = SamplerConfig(cfg_scale=2.0, steps=10)
    plain = sample(prior, labels, gens(4), sampler)
    guided = sample(prior, labels, gens(4), sampler, score, labels, [torch.randn(3, 64)] * 4, guide, SamplerLog())
    assert score.calls == 10
    assert torch.equal(plain, guided)


def guided_timesteps(prior, guide, steps=50):
    """The DiT timesteps at which the guided code ran (DiT calls made with gradients on)."""
    seen, forward = [], prior.transformer.forward

    def recording(z, timestep, class_labels):
        if torch.is_grad_enabled():
            seen.append(int(timestep[0]))
        return forward(z, timestep=timestep, class_labels=class_labels)
    prior.transformer.forward = recording
    labels = torch.arange(2)
    out = sample(prior, labels, gens(2), SamplerConfig(cfg_scale=2.0, steps=steps), score_of(*classifiers()), labels,
                 None, guide)
    prior.transformer.forward = forward
    return out, seen


def test_the_window_is_on_the_respaced_index_counting_down(pixel_prior):
    """i runs 49 .. 0 as t runs 999 .. 0: a window at the top of i guides the high-noise steps, one at the
    bottom the low-noise steps (and they change the samples differently); a window outside changes nothing."""
    prior = load_prior(pixel_prior)
    prior.scheduler.set_timesteps(50)
    schedule = prior.scheduler.timesteps.tolist()  # 999, 979, ..., 0
    guide = lambda a, b: GuidanceConfig(scale=50.0, deviation=0.0, candidates=1, guide_from=a, guide_until=b)  # noqa
    plain = sample(prior, torch.arange(2), gens(2), SamplerConfig(cfg_scale=2.0, steps=50))
    high, t_high = guided_timesteps(prior, guide(40, 49))
    low, t_low = guided_timesteps(prior, guide(0, 9))
    outside, t_out = guided_timesteps(prior, guide(50, 60))
    assert t_high == schedule[:10] and t_low == schedule[-10:] and t_out == []
    assert not torch.equal(high, plain) and not torch.equal(low, plain) and not torch.equal(high, low)
    assert torch.equal(outside, plain)


def test_deviation_guidance_moves_samples_away_from_the_memory():
    """Same noise, with and without gamma: with it, each final sample is less similar to its nearest memory latent."""
    prior = make_empirical_prior()
    score = score_of(*classifiers())
    labels = torch.arange(10)
    memory_latents = sample(prior, labels, gens(10, seed=7), SAMPLER)  # earlier samples of the same classes
    memories = [memory_latents[c].flatten()[None] for c in range(10)]
    off = GuidanceConfig(scale=0.0, deviation=0.0, candidates=1, guide_from=2, guide_until=17)
    on = GuidanceConfig(scale=0.0, deviation=20.0, candidates=1, guide_from=2, guide_until=17)
    nearest = lambda z: torch.stack([F.cosine_similarity(z[i].flatten(), memories[i][0], dim=0)  # noqa: E731
                                     for i in range(10)])
    without = sample(prior, labels, gens(10), SAMPLER, score, labels, memories, off)
    pushed = sample(prior, labels, gens(10), SAMPLER, score, labels, memories, on)
    assert nearest(pushed).mean() < nearest(without).mean()
    assert (nearest(pushed) <= nearest(without) + 1e-6).float().mean() >= 0.8


def test_deviation_gradient_is_that_of_the_cosine_to_the_nearest_memory():
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    memory = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    memory[2] = z[0].flatten() + 0.3 * torch.randn(64, generator=torch.Generator().manual_seed(2))  # nearest to z[0]
    grad = deviation_gradient(z, [memory, None])
    assert torch.all(grad[1] == 0)  # no memory -> no push
    z0 = z[0].flatten().requires_grad_(True)
    expected = torch.autograd.grad(F.cosine_similarity(z0, memory[2], dim=0), z0)[0]
    assert torch.allclose(grad[0].flatten(), expected, atol=1e-7)


def test_candidate_selection_keeps_the_highest_learnability(pixel_prior):
    """kappa = 3: the kept latent is the candidate with the highest S on its final decoded image."""
    prior = load_prior(pixel_prior)
    score = score_of(*classifiers(5))
    guide = GuidanceConfig(scale=30.0, deviation=0.0, candidates=3, guide_from=2, guide_until=7)
    sampler = SamplerConfig(cfg_scale=2.0, steps=8)
    classes = torch.tensor([0, 0, 0, 5, 5, 5])
    latents, images, best, parts = best_of_candidates(prior, classes, classes, gens(6), sampler, score, guide)
    assert latents.shape == (2, 1, 8, 8) and parts["S"].shape == (2, 3)
    every = sample(prior, classes, gens(6), sampler, score, classes, None, guide)
    with torch.no_grad():
        s = score(decode_images(prior, every) * 2 - 1, classes).view(2, 3)
    assert torch.equal(best, s.argmax(dim=1))
    assert torch.equal(latents, every[best + torch.tensor([0, 3])])
    assert torch.allclose(parts["S"], s) and (parts["S"].max(dim=1).values >= parts["S"].mean(dim=1)).all()


def test_memory_keeps_the_newest_final_latents():
    memory = {}
    for i in range(6):
        add_to_memory(memory, 3, torch.full((1, 1, 8, 8), float(i)), cap=4)
    assert memory[3].shape == (4, 64) and memory[3][:, 0].tolist() == [2.0, 3.0, 4.0, 5.0]
