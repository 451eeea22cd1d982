"""The method's equations (guidance.py): the learnability score S, the DDPM sampler against DiT's and diffusers',
the guided step (rho_t, the push, its sign), deviation guidance, candidate selection, a score of scores/, and the
guided step's numerics."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import make_empirical_prior
from data import (
    classifier_input,
    get_spec,
)
from guidance import (
    GuidanceConfig,
    Learnability,
    SamplerConfig,
    add_to_memory,
    best_of_candidates,
    cfg_output,
    decode_images,
    deviation_gradient,
    guided_output,
    make_score,
    sample,
    score_names,
    score_of,
)
from model import load_prior, make_student
from reference import reference_view

SPEC = get_spec("digits")


SAMPLER = SamplerConfig(cfg_scale=2.0, steps=20)


def classifiers(seed=0):
    """Two small random ConvNets standing in for the student f_k and the reference f_ref."""
    torch.manual_seed(seed)
    return make_student("convnet", SPEC).eval(), make_student("convnet", SPEC).eval()


def learnability(student, reference, omega=0.5, reference_view=SPEC):
    return Learnability(student, SPEC, reference, reference_view, omega)


def S(score, x, y):
    """The score of images x (in [-1, 1]) of classes y: its first part."""
    return score_of(score, x, y)


def gens(n, seed=0):
    return [torch.Generator().manual_seed(seed * 1000 + i) for i in range(n)]


def test_learnability_is_student_ce_minus_weighted_reference_ce():
    student, reference = classifiers()
    ref_view = reference_view(SPEC)  # each classifier gets its own view
    x, y = torch.rand(5, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 3, 4])
    parts = learnability(student, reference, 0.5, ref_view).parts(x, y)
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
    return S(score, prior.decode(z0_hat), classes), eps


def test_push_follows_the_equation_and_autograd(pixel_prior):
    """push = lambda rho_t g with rho_t = c0 sqrt(1 - abar) ||eps|| / ||g||, g checked by finite differences."""
    prior = load_prior(pixel_prior)
    prior.scheduler.set_timesteps(50)
    score = learnability(*classifiers(1))
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
    """From the same z_t and noise, the guided step's z_{t-1} scores a higher S (at its own x0_hat) than the plain
    one."""
    prior = load_prior(pixel_prior)
    score = learnability(*classifiers(2))
    labels = torch.arange(8) % 10
    guide = GuidanceConfig(scale=30.0, deviation=0.0, candidates=1, guide_from=0, guide_until=0, form=form)
    sampler = SamplerConfig(cfg_scale=2.0, steps=1)  # one step: i = 0 is inside the window
    plain = sample(prior, labels, labels, gens(8), sampler)
    guided = sample(prior, labels, labels, gens(8), sampler, score, guide, None)
    with torch.no_grad():
        s_plain, s_guided = S(score, plain, labels), S(score, guided, labels)
    assert s_guided.mean() > s_plain.mean()
    assert (s_guided > s_plain).float().mean() >= 0.75  # sample by sample, not only on average


@pytest.mark.parametrize("form", ["z", "eps"])
def test_guided_samples_score_higher_than_unguided_from_the_same_noise(form):
    """On a prior with real samples (the exact denoiser of 20 digits per class): guided > unguided S."""
    prior = make_empirical_prior()
    score = learnability(*classifiers(3))
    labels = torch.arange(20) % 10
    guide = GuidanceConfig(scale=60.0, deviation=0.0, candidates=1, guide_from=2, guide_until=17, form=form)
    plain = decode_images(prior, sample(prior, labels, labels, gens(20), SAMPLER))
    guided = decode_images(prior, sample(prior, labels, labels, gens(20), SAMPLER, score, guide, None))
    with torch.no_grad():
        assert S(score, guided * 2 - 1, labels).mean() > S(score, plain * 2 - 1, labels).mean()


def test_reference_accuracy_stays_within_a_margin(digits_reference):
    """With a trained theta* and a prior whose samples are real digits: theta* recognises the guided samples
    (omega = 0.5, the paper's) at most 10 points less often than the unguided ones from the same noise."""
    prior = make_empirical_prior()
    reference, view, _ = digits_reference
    student = make_student("convnet", SPEC, seed=5).eval()
    score = Learnability(student, SPEC, reference, view, 0.5)
    labels = torch.arange(40) % 10
    guide = GuidanceConfig(scale=60.0, deviation=0.0, candidates=1, guide_from=2, guide_until=17)
    plain = decode_images(prior, sample(prior, labels, labels, gens(40), SAMPLER))
    guided = decode_images(prior, sample(prior, labels, labels, gens(40), SAMPLER, score, guide, None))
    with torch.no_grad():
        acc = lambda x: (reference(classifier_input(x * 2 - 1, view)).argmax(1) == labels).float().mean()
        assert acc(plain) >= 0.9  # the stand-in prior makes clean digits
        assert acc(guided) >= acc(plain) - 0.10, (acc(plain), acc(guided))
        assert S(score, guided * 2 - 1, labels).mean() > S(score, plain * 2 - 1, labels).mean()


class Counting:
    """A score wrapper that counts its calls."""

    def __init__(self, score):
        self.score, self.calls = score, 0

    def parts(self, x, y):
        self.calls += 1
        return self.score.parts(x, y)


@pytest.mark.parametrize("form", ["z", "eps"])
def test_guided_code_at_zero_scales_is_bit_identical_to_unguided(pixel_prior, form):
    """lambda = gamma = 0, kappa = 1: the guided code runs (the score is evaluated at every window step) and
    changes nothing, bit for bit."""
    prior = load_prior(pixel_prior)
    score = Counting(learnability(*classifiers()))
    guide = GuidanceConfig(scale=0.0, deviation=0.0, candidates=1, guide_from=0, guide_until=9, form=form)
    labels = torch.arange(4)
    sampler = SamplerConfig(cfg_scale=2.0, steps=10)
    plain = sample(prior, labels, labels, gens(4), sampler)
    guided = sample(prior, labels, labels, gens(4), sampler, score, guide, [torch.randn(3, 64)] * 4)
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
    out = sample(prior, labels, labels, gens(2), SamplerConfig(cfg_scale=2.0, steps=steps),
                 learnability(*classifiers()), guide)
    prior.transformer.forward = forward
    return out, seen


def test_the_window_is_on_the_respaced_index_counting_down(pixel_prior):
    """i runs 49 .. 0 as t runs 999 .. 0: a window at the top of i guides the high-noise steps, one at the
    bottom the low-noise steps (and they change the samples differently); a window outside changes nothing."""
    prior = load_prior(pixel_prior)
    prior.scheduler.set_timesteps(50)
    schedule = prior.scheduler.timesteps.tolist()  # 999, 979, ..., 0
    guide = lambda a, b: GuidanceConfig(scale=50.0, deviation=0.0, candidates=1, guide_from=a, guide_until=b)
    plain = sample(prior, torch.arange(2), torch.arange(2), gens(2), SamplerConfig(cfg_scale=2.0, steps=50))
    high, t_high = guided_timesteps(prior, guide(40, 49))
    low, t_low = guided_timesteps(prior, guide(0, 9))
    outside, t_out = guided_timesteps(prior, guide(50, 60))
    assert t_high == schedule[:10] and t_low == schedule[-10:] and t_out == []
    assert not torch.equal(high, plain) and not torch.equal(low, plain) and not torch.equal(high, low)
    assert torch.equal(outside, plain)


def test_deviation_guidance_moves_samples_away_from_the_memory():
    """Same noise, with and without gamma: with it, each final sample is less similar to its nearest memory latent."""
    prior = make_empirical_prior()
    score = learnability(*classifiers())
    labels = torch.arange(10)
    memory_latents = sample(prior, labels, labels, gens(10, seed=7), SAMPLER)  # earlier samples of the same classes
    memories = [memory_latents[c].flatten()[None] for c in range(10)]
    off = GuidanceConfig(scale=0.0, deviation=0.0, candidates=1, guide_from=2, guide_until=17)
    on = GuidanceConfig(scale=0.0, deviation=20.0, candidates=1, guide_from=2, guide_until=17)
    nearest = lambda z: torch.stack([F.cosine_similarity(z[i].flatten(), memories[i][0], dim=0)
                                     for i in range(10)])
    without = sample(prior, labels, labels, gens(10), SAMPLER, score, off, memories)
    pushed = sample(prior, labels, labels, gens(10), SAMPLER, score, on, memories)
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
    score = learnability(*classifiers(5))
    guide = GuidanceConfig(scale=30.0, deviation=0.0, candidates=3, guide_from=2, guide_until=7)
    sampler = SamplerConfig(cfg_scale=2.0, steps=8)
    classes = torch.tensor([0, 0, 0, 5, 5, 5])
    latents, images, best, parts = best_of_candidates(prior, classes, classes, gens(6), sampler, score, guide)
    assert latents.shape == (2, 1, 8, 8) and parts["S"].shape == (2, 3)
    every = sample(prior, classes, classes, gens(6), sampler, score, guide, None)
    with torch.no_grad():
        s = S(score, decode_images(prior, every) * 2 - 1, classes).view(2, 3)
    assert torch.equal(best, s.argmax(dim=1))
    assert torch.equal(latents, every[best + torch.tensor([0, 3])])
    assert torch.allclose(parts["S"], s)
    assert torch.equal(parts["S"][torch.arange(2), best], parts["S"].max(dim=1).values)  # the kept one is the best


def test_memory_keeps_the_newest_final_latents():
    memory = {}
    for i in range(6):
        add_to_memory(memory, 3, torch.full((1, 1, 8, 8), float(i)), cap=4)
    assert memory[3].shape == (4, 64) and memory[3][:, 0].tolist() == [2.0, 3.0, 4.0, 5.0]


def generators(n, seed=0):
    return [torch.Generator().manual_seed(seed * 100 + i) for i in range(n)]


def test_ddpm_sampler_matches_manual_scheduler_loop(latent_prior):
    """Our sampler (guidance off) == stepping the diffusers DDPM scheduler by hand, learned variance and all."""
    prior = load_prior(latent_prior)
    labels = torch.tensor([3, 155, 999])
    ours = sample(prior, labels, labels, generators(3), SamplerConfig(cfg_scale=4.0, steps=5))

    from diffusers.utils.torch_utils import randn_tensor
    scheduler, gens = prior.scheduler, generators(3)
    scheduler.set_timesteps(5)
    z = randn_tensor((3, 4, 8, 8), generator=gens)
    null = torch.full_like(labels, 1000)
    for t in scheduler.timesteps:
        with torch.no_grad():
            out = prior.transformer(torch.cat([z, z]), timestep=t.expand(6), class_labels=torch.cat([labels,
                                                                                                     null])).sample
        cond, uncond = out.chunk(2)
        eps = uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4])
        z = scheduler.step(torch.cat([eps, cond[:, 4:]], 1), t, z, generator=gens).prev_sample
    assert (ours - z).norm() <= 1e-5 * z.norm()  # relative: these random-weight latents are large


def dit_respacing(num_timesteps=1000, steps=50):
    """DiT's `space_timesteps(1000, "50")`: evenly strided indices with a fractional stride, rounded."""
    stride = (num_timesteps - 1) / (steps - 1)
    return [round(i * stride) for i in range(steps)]  # 0, 20, 41, ..., 999


def test_sampler_step_equals_dit_learned_range_p_sample(latent_prior):
    """The project's 50-step sampler against DiT's own maths, re-derived here in float64 (DiT's
    `diffusion/respace.py` + `gaussian_diffusion.py:p_sample` with learn_sigma, clip_denoised=False):

      kept t_i (respacing), betas_i = 1 - abar(t_i) / abar(t_{i-1}), posterior variance and mean of q(x_{i-1}|x_i, x0),
      log var = frac * log(beta_i) + (1 - frac) * log(clipped posterior var), frac = (v + 1) / 2,
      x_{i-1} = mean + exp(log var / 2) * noise (no noise at i = 0).
    A wrong spacing ("leading"), a swapped variance or a clipped x0 breaks the equality.
    """
    prior = load_prior(latent_prior)
    prior.scheduler.set_timesteps(50)
    kept = dit_respacing()
    assert prior.scheduler.timesteps.tolist() == kept[::-1]

    abar_all = prior.scheduler.alphas_cumprod.double()
    abar = abar_all[kept]                                                   # (50,) respaced abar
    abar_prev = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
    betas = 1 - abar / abar_prev
    post_var = betas * (1 - abar_prev) / (1 - abar)
    post_log_var = torch.log(torch.cat([post_var[1:2], post_var[1:]]))    # DiT clips the first entry
    coef_x0, coef_xt = betas * abar_prev.sqrt() / (1 - abar), (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar)

    labels, gens, c = torch.tensor([3, 155, 999]), generators(3), prior.channels
    sampler = SamplerConfig(cfg_scale=4.0, steps=50)
    ours = sample(prior, labels, labels, gens, sampler)
    gens = generators(3)
    z = torch.cat([torch.randn((1, c, 8, 8), generator=g) for g in gens]).double()
    for i in reversed(range(50)):
        with torch.no_grad():
            out = cfg_output(prior, z.float(), torch.tensor(kept[i]), labels, sampler).double()
        eps, v = out[:, :c], out[:, c:]
        x0 = (z - (1 - abar[i]).sqrt() * eps) / abar[i].sqrt()
        mean = coef_x0[i] * x0 + coef_xt[i] * z
        frac = (v + 1) / 2
        log_var = frac * torch.log(betas[i]) + (1 - frac) * post_log_var[i]
        noise = torch.cat([torch.randn((1, c, 8, 8), generator=g) for g in gens]).double() if i > 0 else 0
        z = mean + (torch.exp(0.5 * log_var) * noise if i > 0 else 0)
    assert (ours.double() - z).norm() <= 1e-4 * z.norm()


class FakeDiT(torch.nn.Module):
    """Returns 1 for every conditional output channel and 0 for the unconditional branch."""
    device = torch.device("cpu")  # as a diffusers model exposes it

    def __init__(self, null_label):
        super().__init__()
        self.null_label = null_label

    def forward(self, z, timestep, class_labels):
        cond = (class_labels != self.null_label).float().view(-1, 1, 1, 1)
        return type("Out", (), {"sample": cond.expand(-1, 8, *z.shape[2:]).clone()})


def test_ddim_sampler_matches_diffusers_dit_pipeline(latent_prior):
    """With DDIM (deterministic), the images equal diffusers' DiTPipeline from the same initial noise."""
    from diffusers import DiTPipeline
    prior = load_prior(latent_prior, sampler="ddim")
    labels = [7, 500]
    ours = decode_images(prior, sample(prior, torch.tensor(labels), torch.tensor(labels), generators(2),
                                       SamplerConfig(cfg_scale=3.0, steps=6)))
    pipe = DiTPipeline(transformer=prior.transformer, vae=prior.vae, scheduler=prior.scheduler)
    theirs = pipe(labels, guidance_scale=3.0, generator=generators(2), num_inference_steps=6, output_type="np").images
    assert np.abs(ours.permute(0, 2, 3, 1).numpy() - theirs).max() < 1e-4


def test_cfg_is_applied_to_every_latent_channel(latent_prior):
    prior = load_prior(latent_prior)
    prior.transformer = FakeDiT(prior.null_label)
    z, t, labels = torch.zeros(2, 4, 8, 8), torch.tensor(500), torch.tensor([1, 2])
    out = cfg_output(prior, z, t, labels, SamplerConfig(cfg_scale=4.0))  # eps = 0 + 4 * (1 - 0) on each channel
    assert out.shape == (2, 8, 8, 8)
    assert torch.all(out[:, :4] == 4.0) and torch.all(out[:, 4:] == 1.0)  # variance from the cond branch
    quirk = cfg_output(prior, z, t, labels, SamplerConfig(cfg_scale=4.0, three_channels=True))
    assert torch.all(quirk[:, :3] == 4.0) and torch.all(quirk[:, 3] == 1.0)  # DiT's 3-of-4 channel variant


def test_same_seed_same_images_and_batch_size_independent(latent_prior):
    prior = load_prior(latent_prior)
    labels = torch.tensor([1, 2, 3, 4])
    four = SamplerConfig(steps=4)
    a = sample(prior, labels, labels, generators(4), four)
    b = sample(prior, labels, labels, generators(4), four)
    assert torch.equal(a, b)
    # image 2 alone, with its own generator, is the same image as in the batch of 4
    alone = sample(prior, labels[2:3], labels[2:3], generators(4)[2:3], four)
    # equal up to float rounding, which depends on the batch and the CPU: compare relative to the magnitude
    # (these random-weight latents reach ~900, so an absolute tolerance would test one machine's rounding)
    assert (alone[0] - a[2]).norm() <= 1e-5 * a[2].norm()
    other_seed = sample(prior, labels, labels, generators(4, seed=1), four)
    assert (other_seed - a).abs().mean() > 0.1


WOOF = get_spec("imagewoof", res=16)


def woof_score(seed=0):
    torch.manual_seed(seed)
    return Learnability(make_student("convnet", WOOF), WOOF, make_student("convnet", WOOF), WOOF, 0.5)


def test_the_gradient_goes_through_the_vae(latent_prior):
    """g = grad_{z_t} S(VAE.decode(z0_hat / scaling)), through the DiT's CFG output, re-derived here independently."""
    prior = load_prior(latent_prior)
    prior.scheduler.set_timesteps(10)
    score, sampler = woof_score(), SamplerConfig(cfg_scale=4.0)
    z, labels, classes = torch.randn(2, 4, 8, 8), torch.tensor([155, 159]), torch.tensor([0, 1])
    t = prior.scheduler.timesteps[4]
    out, push, _ = guided_output(prior, z, t, labels, classes, sampler, score, GuidanceConfig(scale=1.0))
    z_in = z.clone().requires_grad_(True)
    null = torch.full_like(labels, 1000)
    both = prior.transformer(torch.cat([z_in, z_in]), timestep=t.expand(4), class_labels=torch.cat([labels,
                                                                                                    null])).sample
    eps = both[2:, :4] + 4.0 * (both[:2, :4] - both[2:, :4])
    abar = prior.scheduler.alphas_cumprod[t]
    x0 = prior.vae.decode((z_in - (1 - abar).sqrt() * eps) / abar.sqrt() / prior.vae.config.scaling_factor).sample
    g = torch.autograd.grad(S(score, x0, classes).sum(), z_in)[0]
    rho = 0.0015 * (1 - abar).sqrt() * eps.detach().flatten(1).norm(dim=1) / g.flatten(1).norm(dim=1)
    assert torch.allclose(push, rho.view(-1, 1, 1, 1) * g, rtol=1e-4, atol=1e-9)


def test_no_graph_outside_the_window_and_no_weight_gradients(pixel_prior):
    """The guided code is the only place with autograd on, and it never touches a weight gradient: after a
    guided run every DiT and classifier parameter is frozen with no .grad, and DiT calls outside the window
    run without a graph."""
    prior = load_prior(pixel_prior)
    spec = get_spec("digits")
    torch.manual_seed(0)
    student, reference = make_student("convnet", spec), make_student("convnet", spec)
    score = Learnability(student, spec, reference, spec, 0.5)
    with_grad, forward = [], prior.transformer.forward

    def recording(z, timestep, class_labels):
        with_grad.append(torch.is_grad_enabled())
        return forward(z, timestep=timestep, class_labels=class_labels)
    prior.transformer.forward = recording
    labels = torch.arange(3)
    guide = GuidanceConfig(scale=30.0, deviation=1.0, candidates=1, guide_from=2, guide_until=4)
    sample(prior, labels, labels, [torch.Generator().manual_seed(i) for i in range(3)],
           SamplerConfig(cfg_scale=2.0, steps=8), score, guide, [torch.randn(2, 64)] * 3)
    prior.transformer.forward = forward
    assert with_grad == [False] * 3 + [True] * 3 + [False] * 2  # steps i = 7..0: the window 2..4 only
    for model in (prior.transformer, student, reference):
        assert all(not p.requires_grad and p.grad is None for p in model.parameters())


def test_non_finite_guidance_gradient_falls_back_to_the_unguided_step(pixel_prior):
    from guidance import GuidanceConfig, SamplerConfig, guided_output
    from model import load_prior
    prior = load_prior(pixel_prior)
    prior.scheduler.set_timesteps(10)
    t = prior.scheduler.timesteps[3]
    z, labels = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2])

    class Infinite:  # sample 1 divides by zero: an infinite learnability and gradient
        def parts(self, x, y):
            return dict(S=x.flatten(1).sum(dim=1) / torch.tensor([1.0, 0.0, 1.0]))
    score = Infinite()
    out, push, bad = guided_output(prior, z, t, labels, labels, SamplerConfig(cfg_scale=2.0), score,
                                   GuidanceConfig(scale=15.0))
    assert bad.tolist() == [False, True, False]  # per sample: only the one with the infinite S
    assert torch.all(push[1] == 0)  # the NaN sample takes the unguided step
    assert push[0].abs().sum() > 0 and torch.isfinite(push).all() and torch.isfinite(out).all()


def test_bf16_autocast_path_returns_float32_close_to_fp32(latent_prior):
    """--precision bf16 runs DiT, VAE and classifiers under autocast; the sampler and the guidance maths stay in
    float32.
    (Exercised on CPU autocast here; on CUDA distill.py turns it on.)"""
    from data import get_spec
    from guidance import GuidanceConfig, Learnability, SamplerConfig, guided_output
    from model import load_prior, make_student
    spec = get_spec("imagewoof", res=16)
    prior = load_prior(latent_prior)
    prior.scheduler.set_timesteps(10)
    torch.manual_seed(0)
    score = Learnability(make_student("convnet", spec), spec, make_student("convnet", spec), spec, 0.5)
    z, labels, classes = torch.randn(2, 4, 8, 8), torch.tensor([155, 159]), torch.tensor([0, 1])
    t, sampler = prior.scheduler.timesteps[4], SamplerConfig(cfg_scale=4.0)
    full = guided_output(prior, z, t, labels, classes, sampler, score, GuidanceConfig())[1]
    prior.bf16 = True
    half = guided_output(prior, z, t, labels, classes, sampler, score, GuidanceConfig())[1]
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert not torch.equal(half, full)  # bf16 really ran
    # push = lambda rho_t g is a normalised gradient: bf16 may bend its direction a little, not more
    assert (F.cosine_similarity(half.flatten(1), full.flatten(1), dim=1) > 0.95).all()
    assert torch.allclose(half.flatten(1).norm(dim=1), full.flatten(1).norm(dim=1), rtol=0.05)


# ----------------------------------------------------------------------------- the latent tier (a trained decoder)

@pytest.mark.slow
def test_a_guided_step_through_the_trained_decoder_raises_s(mnist_prior):
    """The latent tier: g goes back through the trained VAE decoder, x0_hat = decode(z0_hat / scaling_factor). From
    the same z_t and noise, the guided z_{t-1} decodes to a higher S than the plain one."""
    prior = load_prior(mnist_prior)
    spec = get_spec("mnist")
    torch.manual_seed(2)
    score = Learnability(make_student("convnet", spec).eval(), spec, make_student("convnet", spec).eval(), spec, 0.5)
    labels = torch.arange(8) % 10
    guide = GuidanceConfig(scale=30.0, deviation=0.0, candidates=1, guide_from=0, guide_until=0)
    sampler = SamplerConfig(cfg_scale=2.0, steps=1)  # one step: i = 0 is inside the window
    plain = sample(prior, labels, labels, gens(8), sampler)
    guided = sample(prior, labels, labels, gens(8), sampler, score, guide, None)
    with torch.no_grad():
        s_plain, s_guided = (S(score, prior.decode(z), labels) for z in (plain, guided))
    assert s_guided.mean() > s_plain.mean() and (s_guided > s_plain).float().mean() >= 0.75


def test_a_score_of_scores_is_found_by_its_name_and_guidance_raises_it(pixel_prior):
    """scores/entropy.py (docs/forking.md's worked example): --score entropy names it, make_score builds it with the
    stage's student and theta*, its first part is the student's predictive entropy minus omega theta*'s CE, and one
    guided step raises it, as S is raised: the sampler did not change for it."""
    assert score_names() == ["learnability", "entropy"]
    student, reference = classifiers(2)
    score = make_score("entropy", student, SPEC, reference, SPEC, GuidanceConfig(omega=0.25))
    x, y = torch.rand(4, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 3])
    log_p = F.log_softmax(student(classifier_input(x, SPEC)), dim=1)
    expected = -(log_p.exp() * log_p).sum(1) - 0.25 * F.cross_entropy(reference(classifier_input(x, SPEC)), y,
                                                                       reduction="none")
    assert list(score.parts(x, y))[0] == "S_H" and torch.allclose(S(score, x, y), expected, atol=1e-6)
    prior = load_prior(pixel_prior)
    labels = torch.arange(8) % 10
    guide = GuidanceConfig(scale=30.0, deviation=0.0, candidates=1, guide_from=0, guide_until=0)
    sampler = SamplerConfig(cfg_scale=2.0, steps=1)
    plain = sample(prior, labels, labels, gens(8), sampler)
    guided = sample(prior, labels, labels, gens(8), sampler, score, guide)
    with torch.no_grad():
        assert S(score, guided, labels).mean() > S(score, plain, labels).mean()
