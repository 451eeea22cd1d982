"""
Learnability-guided sampling (Chan-Santiago & Shah, CVPR 2026, Sec. "Learnability" and "Learnability-guided
diffusion"), read top to bottom: the score S, then the sampler with S inside one step, the memory push, the
best-of-kappa candidates.

With theta_k the current student (trained on D_k) and theta* the reference, inside the window
guide_from <= i <= guide_until of the respaced step index i (49 .. 0 for 50 steps; the paper's window is
10 <= i <= 45), one sampling step is:

  eps       = eps_u + s (eps_c - eps_u)                                 classifier-free guidance, scale s
  S(x, y)   = CE(theta_k(x), y) - omega * CE(theta*(x), y)              Eq. "learnability"
  z0_hat    = (z_t - sqrt(1 - abar_t) * eps) / sqrt(abar_t)             predicted clean latent
  g         = grad_{z_t} S(decode(z0_hat), y)                           through classifiers, VAE, DiT
  rho_t     = c0 * sqrt(1 - abar_t) * ||eps|| / ||g||                   per-sample normalisation
  z_{t-1}   = DDPM step(eps) + lambda * rho_t * g                       learnability guidance (z form)
  z_{t-1}  -= gamma * grad_{z_t} cos(z_t, m*),  m* in M_c               deviation guidance (from IGD)
  keep the best of kappa candidates by S of the final image, add its latent to M_c    candidate selection

Outside the window a step is the plain CFG DDPM step. M_c (memory[c]) holds final latents of class c that the set
already has; curriculum.py fills it.

Where the guidance is added. The paper prints it on the noise prediction, eps~ = eps + lambda rho_t grad S. Its
constants (c0 = 0.0015 hidden in rho_t, lambda, gamma, the window) are IGD's knobs, and IGD's sampler (`p_sample`
of DD_IGD) adds the guidance to z_{t-1} after the ordinary DDPM step. Through the DDPM mean, a change of eps moves
z_{t-1} by only beta_t / (sqrt(alpha_t) sqrt(1 - abar_t)) of it (0.14 at i = 10, 0.37 at i = 45: about 4x weaker
over the window), so with the paper's lambda the printed form under-guides. NOTE(deviation): the default is the z
form above, where the constants were tuned; `form="eps"` (`--guidance-form eps`) keeps the printed form, as
eps~ = eps - lambda rho_t g. Sign: with an eps-predicting model the printed "+" lowers S (z0_hat moves against g),
so both forms use the sign that raises S (tests/test_guidance.py checks it on samples from the same noise).

Glossary (paper symbol -> variable): lambda -> guide.scale, omega -> guide.omega, gamma -> guide.deviation,
kappa -> guide.candidates, c0 -> guide.c0, s -> sampler.cfg_scale, abar_t -> alpha_bar_t, theta_k -> student,
theta* -> reference, M_c -> memory[c]. labels are the prior's class ids (ImageNet 0-999 for the DiT), classes the
dataset's (0 .. C-1): for ImageWoof, class 0 (n02096294) is prior label 193.

The constants. The defaults below are the paper's (config.PAPER); what each dataset runs with is config.PRESETS,
one table beside them (`python distill.py` on digits runs lambda 125, gamma 1, s 2), and every run prints the
constants it resolved before it starts.

The score. The sampler raises whatever score it is given: an object whose parts(images, classes) returns a dict of
per-sample values, the score first. S is Learnability below; IGD's influence (igd.py) rides on the same code; a new
score is one file in scores/ (`--score NAME`, make_score; docs/forking.md).

Every image owns a CPU torch.Generator for its initial noise and every ancestral step's noise, so an image does
not depend on the batch it is in (up to float rounding). Nothing here runs on its own: `python distill.py` drives
it (curriculum.py holds the stage loop).
"""
import importlib
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor

from config import PAPER
from data import classifier_input
from model import predicted_clean


@dataclass
class GuidanceConfig:
    """The guidance constants; the defaults are the paper's (config.PAPER says where each comes from)."""
    scale: float = PAPER["scale"]                # lambda: learnability guidance scale
    omega: float = PAPER["omega"]                # omega: weight of the reference CE in S
    c0: float = PAPER["c0"]                      # the constant inside rho_t
    deviation: float = PAPER["deviation"]        # gamma: deviation guidance scale
    candidates: int = PAPER["candidates"]        # kappa: guided candidates per image, the highest S kept
    guide_from: int = PAPER["guide_from"]        # the window on the respaced index i, counting down
    guide_until: int = PAPER["guide_until"]
    form: str = PAPER["form"]                    # "z": added to z_{t-1} after the step (IGD's code); "eps": printed
    memory_cap: int = PAPER["memory_cap"]        # |M_c|: final latents kept per class
    score: str = PAPER["score"]                  # what guidance raises (make_score)

    def active(self, i):
        return self.guide_from <= i <= self.guide_until

    def guided_steps(self, steps):
        """How many of `steps` respaced steps fall inside the window."""
        return sum(map(self.active, range(steps)))


@dataclass
class SamplerConfig:
    """How the prior is sampled (the field's DiT defaults)."""
    cfg_scale: float = PAPER["cfg_scale"]            # s: classifier-free guidance
    steps: int = PAPER["steps"]                      # respaced DDPM steps
    three_channels: bool = PAPER["three_channels"]   # DiT/IGD's quirk: CFG on 3 of the 4 latent channels


# ----------------------------------------------------------------------------- the learnability score S

class Learnability:
    """S(x, y) = CE(theta_k(x), y) - omega * CE(theta*(x), y), per sample (Eq. "learnability").

    High S: the current student theta_k gets x wrong (it has not learned it) while the reference theta* gets it
    right (x is still a valid example of y). Each classifier sees x through the view it was trained with
    (data.classifier_input: resize, crop, normalise), exactly as at test time.
    """

    def __init__(self, student, student_view, reference, reference_view, omega):
        for model in (student, reference):
            model.eval().requires_grad_(False)  # important! eval mode (no norm statistics drift), input grads only
        self.student, self.student_view = student, student_view
        self.reference, self.reference_view = reference, reference_view
        self.omega = omega

    def parts(self, images, classes):
        """images (N, C, H, W) in [-1, 1] -> {"S", "student_ce", "reference_ce"}, each (N,)."""
        student_ce = F.cross_entropy(self.student(classifier_input(images, self.student_view)), classes,
                                     reduction="none")  # high: not learned yet
        reference_ce = F.cross_entropy(self.reference(classifier_input(images, self.reference_view)), classes,
                                       reduction="none")  # low: a valid example
        return dict(S=student_ce - self.omega * reference_ce, student_ce=student_ce, reference_ce=reference_ce)


def score_of(score, images, classes):
    """The score itself, (N,): the first of its parts (S, IGD's I, or a score of scores/)."""
    return next(iter(score.parts(images, classes).values()))


SCORES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scores")  # one file a score: scores/<name>.py


def score_names():
    """What --score may name: learnability (S, the paper's) and every scores/<name>.py."""
    found = sorted(f[:-3] for f in os.listdir(SCORES) if f.endswith(".py") and not f.startswith("_")) \
        if os.path.isdir(SCORES) else []
    return ["learnability", *found]


def make_score(name, student, student_view, reference, reference_view, guide):
    """The score guidance raises in a stage, by name: S of the student theta_k and the reference theta* (the paper's),
    or the class Score of scores/<name>.py, built with the same arguments (it reads its constants from guide)."""
    if name == "learnability":
        return Learnability(student, student_view, reference, reference_view, guide.omega)
    return importlib.import_module(f"scores.{name}").Score(student, student_view, reference, reference_view, guide)


# ----------------------------------------------------------------------------- one step

def cfg_output(prior, z, t, labels, sampler):
    """DiT output with classifier-free guidance: eps = eps_u + s (eps_c - eps_u) (Ho & Salimans).

    Returns (N, C_out, h, w): guided eps in the first C channels, the conditional branch's learned
    variance (if any) after it. NOTE(deviation): CFG on all latent channels (diffusers' DiTPipeline
    does the same); DiT/IGD guide only 3 of 4, reproducible with sampler.three_channels.
    """
    n, c = z.shape[0], prior.channels
    timestep = t.expand(n if sampler.cfg_scale == 1 else 2 * n).to(z.device)
    if sampler.cfg_scale == 1:
        return prior.dit(z, timestep, labels)
    null = torch.full_like(labels, prior.null_label)
    out = prior.dit(torch.cat([z, z]), timestep, torch.cat([labels, null]))  # (2N, C or 2C, h, w): one pass, both
    cond, uncond = out.chunk(2)                                                 # (N, C or 2C, h, w) each
    guided = 3 if sampler.three_channels else c  # latent channels that get CFG
    eps = uncond[:, :guided] + sampler.cfg_scale * (cond[:, :guided] - uncond[:, :guided])  # (N, guided, h, w)
    return torch.cat([eps, cond[:, guided:]], dim=1)  # (N, C or 2C, h, w): CFG eps, then cond's learned variance


def score_gradient(prior, z, t, labels, classes, sampler, score):
    """g = grad_{z_t} score(decode(z0_hat), y), through the classifiers, the decoder and the DiT, with the CFG output
    of the same pass (one pass serves the step and the gradient): (output, g, eps)."""
    alpha_bar_t = prior.scheduler.alphas_cumprod[t].to(z.device, torch.float32)  # abar_t
    with torch.enable_grad():
        z_in = z.detach().requires_grad_(True)
        out = cfg_output(prior, z_in, t, labels, sampler)
        eps = out[:, :prior.channels]  # (N, C, h, w): eps of DiT's (N, 2C, h, w) learned-variance output
        z0_hat = predicted_clean(z_in, eps, alpha_bar_t)  # (N, C, h, w)
        with prior.autocast():  # the classifiers in bf16 too when --precision bf16
            s = score_of(score, prior.decode(z0_hat.to(z.dtype)).float(), classes)
        grad = torch.autograd.grad(s.float().sum(), z_in)[0].float()  # samples independent: sum = per-sample grads
    return out.detach(), grad, eps.detach().float()


def guided_output(prior, z, t, labels, classes, sampler, score, guide):
    """The quantities of one guided step: the CFG output and push = lambda * rho_t * g, g = grad_{z_t}
    score(decode(z0_hat), y). Returns (output, push, non-finite (N,)): a sample whose g is NaN or inf gets no push."""
    alpha_bar_t = prior.scheduler.alphas_cumprod[t].to(z.device, torch.float32)
    out, grad, eps = score_gradient(prior, z, t, labels, classes, sampler, score)
    eps_norm, grad_norm = eps.flatten(1).norm(dim=1), grad.flatten(1).norm(dim=1)  # (N,) each: one per sample
    rho_t = guide.c0 * (1 - alpha_bar_t).sqrt() * eps_norm / grad_norm.clamp_min(1e-12)  # per sample (N,)
    push = guide.scale * rho_t.view(-1, 1, 1, 1) * grad
    finite = torch.isfinite(push).flatten(1).all(dim=1)
    push = torch.where(finite.view(-1, 1, 1, 1), push, torch.zeros_like(push))  # NaN/inf g: the plain step
    return out, push.to(z.dtype), ~finite.cpu()


def deviation_gradient(z, memories):
    """grad_{z_t} cos(z_t, m*), m* = the memory latent most similar to z_t (0 where there is no memory).

    IGD's diversity term: z_{t-1} -= gamma * this pushes z away from what M_c already holds.
    """
    flat = z.detach().flatten(1).float()
    nearest = torch.zeros_like(flat)
    has_memory = torch.zeros(len(z), dtype=torch.bool, device=z.device)
    for n, memory in enumerate(memories):
        if memory is not None and len(memory):
            memory = memory.to(flat.device)
            similarity = F.normalize(memory, dim=1) @ F.normalize(flat[n], dim=0)  # (M,)
            nearest[n], has_memory[n] = memory[similarity.argmax()], True
    with torch.enable_grad():
        z_in = flat.requires_grad_(True)
        grad = torch.autograd.grad(F.cosine_similarity(z_in, nearest, dim=1).sum(), z_in)[0]
    return (grad * has_memory[:, None]).view_as(z).to(z.dtype)


# ----------------------------------------------------------------------------- the sampler

@torch.no_grad()
def sample(prior, labels, classes, generators, sampler, score=None, guide=None, memories=None, pull=None):
    """Sample final latents z_0 (N, C, h, w) for prior labels (N,), one generator per image.

    Unguided unless `score` and `guide` are given (classes: the score's y; memories: M_c of each sample, or None
    for no deviation guidance). Inside the window the guided code runs even at lambda = gamma = 0, and then
    changes nothing (tested bit for bit). pull: MGD3's mode pull (mgd3.ModePull: modes and constants), a
    gradient-free term added to z_{t-1} after each plain step; None: nothing.
    """
    scheduler = prior.scheduler
    scheduler.set_timesteps(sampler.steps)
    shape = (len(labels), prior.channels, prior.latent_size, prior.latent_size)  # (N, C, h, w): 4x32x32 for DiT-XL/2
    z = randn_tensor(shape, generator=generators, device=prior.device, dtype=prior.transformer.dtype)
    z = z * scheduler.init_noise_sigma
    labels = labels.to(prior.device)
    for step, t in enumerate(scheduler.timesteps):
        i = sampler.steps - 1 - step  # respaced index, counting down 49 .. 0 (the paper's window is on it)
        if score is None or not guide.active(i):
            out = cfg_output(prior, z, t, labels, sampler)
            z_prev = prior.step(out, t, z, generators)  # the plain CFG DDPM step
            z = z_prev if pull is None or not pull.active(i) else z_prev + pull.term(prior, t, z, out)
            continue
        out, push, _ = guided_output(prior, z, t, labels, classes, sampler, score, guide)
        if guide.form == "eps":  # the printed form: eps~ = eps - lambda rho_t g (raises S), then the variance
            out = torch.cat([out[:, :prior.channels] - push, out[:, prior.channels:]], dim=1)
        z_prev = prior.step(out, t, z, generators)
        if guide.form == "z":  # learnability guidance on z_{t-1} (IGD's place for it)
            z_prev = z_prev + push
        if memories is not None:  # deviation guidance: away from the nearest latent of M_c
            z_prev = z_prev - guide.deviation * deviation_gradient(z, memories)
        z = z_prev
    return z


def decode_images(prior, z):
    """Final latents -> images in [0, 1] (N, C, H, W)."""
    with torch.no_grad():
        return (prior.decode(z).float().clamp(-1, 1) + 1) / 2


# ----------------------------------------------------------------------------- candidate selection (kappa)

def best_of_candidates(prior, labels, classes, generators, sampler, score, guide, memories=None):
    """kappa guided candidates per image, the one with the highest score on its final decoded image kept.

    labels, classes, generators, memories: one entry per (image, candidate), candidates of an image adjacent
    (image-major). Returns (kept latents (n, C, h, w), kept images (n, C, H, W) in [0, 1], kept candidate index
    (n,), parts {name: (n, kappa)}) with parts = score.parts of every candidate (the score first, then what it is
    made of).
    """
    kappa = guide.candidates
    z0 = sample(prior, labels, classes, generators, sampler, score, guide, memories)
    images = decode_images(prior, z0)
    with torch.no_grad():
        parts = score.parts(images * 2 - 1, classes)
    parts = {name: value.detach().float().view(-1, kappa).cpu() for name, value in parts.items()}
    best = next(iter(parts.values())).argmax(dim=1)  # the first part is the score itself (S, or IGD's I)
    rows = best + torch.arange(len(best)) * kappa
    return z0[rows.to(z0.device)], images[rows.to(images.device)], best, parts


def add_to_memory(memory, c, latents, cap):
    """M_c <- M_c + latents (N, C, h, w) (final latents of kept samples, as IGD), keeping the newest `cap`."""
    z = latents.detach().flatten(1).float().cpu()
    memory[c] = torch.cat([memory[c], z])[-cap:] if c in memory else z[-cap:]
