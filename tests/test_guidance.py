"""Learnability guidance (METHOD.md sections 4-5): the equations, their direction, and their limits."""
import torch
import torch.nn.functional as F

from common import derive_seed
from data import classifier_input, get_spec
from guidance import (GuidanceConfig, Learnability, add_to_memory, decode_images, deviation_gradient,
                      generate_increment, guided_model_output, learnability, model_output_cfg, sample)
from model import load_prior, make_student

SPEC = get_spec("digits")


def classifiers(seed=0):
    """Two small random ConvNets standing in for the student f_k and the reference f_ref."""
    torch.manual_seed(seed)
    return make_student("convnet", SPEC).eval(), make_student("convnet", SPEC).eval()


def gens(n, seed=0):
    return [torch.Generator().manual_seed(seed * 1000 + i) for i in range(n)]


def test_learnability_is_student_ce_minus_weighted_reference_ce():
    student, reference = classifiers()
    x, y = torch.rand(5, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 3, 4])
    s = learnability(student, reference, x, y, SPEC, lambda_ref=0.5)
    inputs = classifier_input(x, SPEC)
    expected = F.cross_entropy(student(inputs), y, reduction="none") - 0.5 * F.cross_entropy(reference(inputs), y, reduction="none")
    assert s.shape == (5,) and torch.allclose(s, expected)


def test_scale_zero_is_bit_identical_to_unguided(pixel_prior, tmp_path):
    """lambda = gamma = 0, kappa = 1 -> the guided sampler is the unguided one, bit for bit (PNG bytes too)."""
    prior = load_prior(pixel_prior)
    score = Learnability(*classifiers(), SPEC, 0.5)
    cfg = GuidanceConfig(guidance_scale=0.0, deviation_scale=0.0, candidates=1, guide_from=0, guide_until=9)
    labels = torch.arange(4)
    plain = sample(prior, labels, gens(4), steps=10)
    guided = sample(prior, labels, gens(4), steps=10, score=score, classes=labels, cfg=cfg,
                    memories=[torch.randn(3, 64)] * 4)
    assert torch.equal(plain, guided)
    generate_increment(prior, SPEC, str(tmp_path / "a"), 1, 0, seed=3, steps=10)
    generate_increment(prior, SPEC, str(tmp_path / "b"), 1, 0, seed=3, steps=10, score=score, cfg=cfg, memory={})
    for c in range(10):
        a, b = (open(tmp_path / d / str(c) / "00000.png", "rb").read() for d in "ab")
        assert a == b


def score_of_z0(prior, score, z, t, labels, classes, cfg_scale):
    """Independent re-derivation: S(decode(z0_hat(z_t)), y) per sample, differentiable in z."""
    eps = model_output_cfg(prior, z, t, labels, cfg_scale)[:, :prior.channels]
    alpha_bar = prior.scheduler.alphas_cumprod[t]
    z0_hat = (z - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
    return score(prior.decode(z0_hat), classes), eps


def test_guided_eps_follows_the_equation_and_autograd(pixel_prior):
    """eps~ = eps - lambda rho_t g with rho_t = c0 sqrt(1 - abar) ||eps|| / ||g||, g checked by finite differences."""
    prior = load_prior(pixel_prior)
    prior.scheduler.set_timesteps(50)
    score = Learnability(*classifiers(1), SPEC, 0.5)
    labels = torch.tensor([0, 3, 7])
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = prior.scheduler.timesteps[20]
    cfg = GuidanceConfig(guidance_scale=15.0, c0=0.0015)
    eps_tilde = guided_model_output(prior, z, t, labels, labels, 2.0, score, cfg)

    z_in = z.clone().requires_grad_(True)
    s, eps = score_of_z0(prior, score, z_in, t, labels, labels, 2.0)
    g = torch.autograd.grad(s.sum(), z_in)[0]
    eps = eps.detach()
    alpha_bar = prior.scheduler.alphas_cumprod[t]
    rho = 0.0015 * (1 - alpha_bar).sqrt() * eps.flatten(1).norm(dim=1) / g.flatten(1).norm(dim=1)
    expected = eps - 15.0 * rho.view(-1, 1, 1, 1) * g
    assert torch.allclose(eps_tilde, expected, atol=1e-6)

    # autograd's g agrees with a central finite difference of S along a random direction, per sample
    # (in float64, where a small step h resolves the derivative without rounding noise)
    prior.transformer.double(), score.student.double(), score.reference.double()
    z = z.double().requires_grad_(True)
    s, _ = score_of_z0(prior, score, z, t, labels, labels, 2.0)
    g = torch.autograd.grad(s.sum(), z)[0]
    z = z.detach()
    direction = torch.randn_like(z)
    h = 1e-7  # small enough not to cross a ReLU kink of the classifiers
    with torch.no_grad():
        s_plus, _ = score_of_z0(prior, score, z + h * direction, t, labels, labels, 2.0)
        s_minus, _ = score_of_z0(prior, score, z - h * direction, t, labels, labels, 2.0)
    fd = (s_plus - s_minus) / (2 * h)
    analytic = (g * direction).flatten(1).sum(dim=1)
    assert torch.allclose(fd, analytic, rtol=1e-4, atol=1e-7), (fd, analytic)


def test_one_guided_step_raises_learnability(pixel_prior):
    """From the same z_t, x0_hat under eps~ scores a higher batch-mean S than under the unguided eps."""
    prior = load_prior(pixel_prior)
    prior.scheduler.set_timesteps(50)
    score = Learnability(*classifiers(2), SPEC, 0.5)
    labels = torch.arange(8) % 10
    z = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t = prior.scheduler.timesteps[25]
    alpha_bar = prior.scheduler.alphas_cumprod[t]
    cfg = GuidanceConfig(guidance_scale=15.0)
    with torch.no_grad():
        eps = model_output_cfg(prior, z, t, labels, 2.0)
    eps_tilde = guided_model_output(prior, z, t, labels, labels, 2.0, score, cfg)
    x0 = lambda e: (z - (1 - alpha_bar).sqrt() * e) / alpha_bar.sqrt()  # noqa: E731
    with torch.no_grad():
        s_plain, s_guided = score(x0(eps), labels), score(x0(eps_tilde), labels)
    assert s_guided.mean() > s_plain.mean()
    assert (s_guided > s_plain).float().mean() >= 0.75  # sample by sample, not only on average


def test_guided_samples_score_higher_than_unguided_from_the_same_noise(pixel_prior):
    prior = load_prior(pixel_prior)
    score = Learnability(*classifiers(3), SPEC, 0.5)
    labels = torch.arange(10)
    cfg = GuidanceConfig(guidance_scale=100.0, deviation_scale=0.0, candidates=1, guide_from=2, guide_until=17)
    plain = decode_images(prior, sample(prior, labels, gens(10), steps=20))
    guided = decode_images(prior, sample(prior, labels, gens(10), steps=20, score=score, classes=labels, cfg=cfg))
    with torch.no_grad():
        assert score(guided * 2 - 1, labels).mean() > score(plain * 2 - 1, labels).mean()


def test_large_lambda_ref_keeps_reference_accuracy(pixel_prior):
    """omega large: guided samples stay valid for f_ref. Margin: reference accuracy may drop by <= 5 points
    versus the unguided samples (here it rises, because S rewards a low reference loss)."""
    prior = load_prior(pixel_prior)
    student, reference = classifiers(4)
    score = Learnability(student, reference, SPEC, lambda_ref=10.0)
    labels = torch.arange(40) % 10
    cfg = GuidanceConfig(guidance_scale=100.0, lambda_ref=10.0, deviation_scale=0.0, guide_from=2, guide_until=17)
    plain = decode_images(prior, sample(prior, labels, gens(40), steps=20))
    guided = decode_images(prior, sample(prior, labels, gens(40), steps=20, score=score, classes=labels, cfg=cfg))
    with torch.no_grad():
        ref = lambda x: reference(classifier_input(x * 2 - 1, SPEC))  # noqa: E731
        acc_plain = (ref(plain).argmax(1) == labels).float().mean()
        acc_guided = (ref(guided).argmax(1) == labels).float().mean()
        ce_plain = F.cross_entropy(ref(plain), labels)
        ce_guided = F.cross_entropy(ref(guided), labels)
    assert acc_guided >= acc_plain - 0.05, (acc_plain, acc_guided)
    assert ce_guided < ce_plain


def test_deviation_gradient_moves_away_from_the_nearest_memory():
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    memory = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    memory[2] = z[0].flatten() + 0.3 * torch.randn(64, generator=torch.Generator().manual_seed(2))  # nearest to z[0]
    grad = deviation_gradient(z, [memory, None])
    assert torch.all(grad[1] == 0)  # no memory -> no push
    moved = z[0] - 1.0 * grad[0]  # z_{t-1} -= gamma * grad cos(z_t, m*)
    cos = lambda a: F.cosine_similarity(a.flatten(), memory[2], dim=0)  # noqa: E731
    assert cos(moved) < cos(z[0])
    # the gradient is that of cos(z, m*) w.r.t. z: orthogonal to z (cos is scale-invariant)
    assert abs(float((grad[0].flatten() * z[0].flatten()).sum())) < 1e-5


def test_candidate_selection_keeps_the_highest_learnability(pixel_prior, tmp_path):
    """kappa = 3: the saved image is the candidate with the highest S, out of the 3 seeded candidates."""
    prior = load_prior(pixel_prior)
    score = Learnability(*classifiers(5), SPEC, 0.5)
    cfg = GuidanceConfig(guidance_scale=30.0, deviation_scale=0.0, candidates=3, guide_from=2, guide_until=7)
    generate_increment(prior, SPEC, str(tmp_path), 1, 4, seed=9, steps=8, batch_size=30, score=score, cfg=cfg)
    from data import load_image
    for c in (0, 5):
        g = [torch.Generator().manual_seed(derive_seed(9, c, 4, k)) for k in range(3)]
        labels = torch.full((3,), c)
        images = decode_images(prior, sample(prior, labels, g, steps=8, score=score, classes=labels, cfg=cfg))
        with torch.no_grad():
            best = images[score(images * 2 - 1, labels).argmax()]
        saved = load_image(str(tmp_path / str(c) / "00004.png"), 1)
        assert torch.allclose(saved, (best * 255).round() / 255, atol=1 / 255 + 1e-6)


def test_memory_encodes_and_caps(pixel_prior):
    prior = load_prior(pixel_prior)  # pixel space: encode = identity on [-1, 1]
    memory, cfg = {}, GuidanceConfig(memory_cap=4)
    for i in range(6):
        add_to_memory(memory, 3, torch.full((1, 8, 8), i / 10), prior, cfg)
    assert memory[3].shape == (4, 64)
    assert torch.allclose(memory[3][:, 0], torch.tensor([0.2, 0.3, 0.4, 0.5]) * 2 - 1)  # newest kept
