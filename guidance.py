"""
Learnability-guided sampling: the method section of the paper (Chan-Santiago & Shah, CVPR 2026,
its learnability score and its learnability-guided diffusion), read top to bottom:
the score, the sampler, the guidance inside one step, the memory push, the best-of-kappa candidates.

Inside the window guide_from <= i <= guide_until of the respaced step index i (49 .. 0 for 50
steps; the paper's window is 10 <= i <= 45), one sampling step is:

  S(x, y)   = CE(f_k(x), y) - omega * CE(f_ref(x), y)                  Eq. "learnability"
  z0_hat    = (z_t - sqrt(1 - abar_t) * eps) / sqrt(abar_t)            predicted clean latent
  g         = grad_{z_t} S(decode(z0_hat), y)                          through classifiers, VAE, DiT
  rho_t     = c0 * sqrt(1 - abar_t) * ||eps|| / ||g||                  per-sample normalisation
  z_{t-1}   = DDPM step(eps) + lambda * rho_t * g                      learnability guidance (z form)
  z_{t-1}  -= gamma * grad_{z_t} cos(z_t, m*)                          deviation guidance (from IGD)
  keep the best of kappa candidates by S of the final image            candidate selection

Where the guidance is added. The paper prints it on the noise prediction, eps~ = eps + lambda rho_t
grad S. Its constants (c0 = 0.0015 hidden in rho_t, lambda, gamma, the window) are IGD's knobs, and
IGD's sampler (`p_sample` of DD_IGD / MinimaxDiffusion's IGD fork) adds the guidance to z_{t-1}
after the ordinary DDPM step. Through the DDPM mean, a change of eps moves z_{t-1} by only
beta_t / (sqrt(alpha_t) sqrt(1 - abar_t)) of it (0.14 at i = 10, 0.37 at i = 45: about 4x weaker
over the window), so with the paper's lambda the printed form under-guides. NOTE(deviation): the
default is therefore the z form above, where the constants were tuned; `form="eps"` (`--guidance-form
eps`) keeps the printed form, as eps~ = eps - lambda rho_t g. Sign: with an eps-predicting model the
printed "+" lowers S (z0_hat moves against g), so both forms use the sign that raises S, which
tests/test_guidance.py checks on samples from the same noise.

Glossary (paper symbol -> variable): lambda -> guide.scale, omega -> guide.omega / Learnability.omega,
gamma -> guide.deviation, kappa -> guide.candidates, c0 -> guide.c0, abar_t -> alpha_bar_t,
f_k (theta_{i-1}) -> student, f_ref (theta*) -> reference, M_c -> memory[c], s (CFG) -> sampler.cfg_scale.
labels are the prior's class ids (ImageNet 0-999 for the DiT), classes the dataset's (0 .. C-1): for
ImageWoof, class 0 (n02086240) is prior label 155.

A second score, IGD's influence I (Influence below: the paper's seed increment and main baseline),
is steered by the same sampler: the sampler asks only for a score of x0_hat to raise.

Reproducibility. Every image owns a CPU torch.Generator; it draws the initial noise and every
ancestral step's noise, so an image does not depend on the batch it is in (up to float rounding).

Nothing here runs on its own: `python distill.py` drives it (curriculum.py holds the stage loop).
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor

from data import classifier_input, normalise


@dataclass
class GuidanceConfig:
    """The paper's constants (its implementation details); one home: presets and help derive from it."""
    scale: float = 15.0        # lambda: learnability guidance scale [paper]
    omega: float = 0.5         # omega: weight of the reference CE in S [paper]
    c0: float = 0.0015         # the constant inside rho_t [IGD's code; the paper's lambda was tuned with it]
    deviation: float = 50.0    # gamma: deviation guidance scale [paper, from IGD]
    candidates: int = 3        # kappa: guided candidates per image, the highest S kept [paper]
    guide_from: int = 10       # the window on the respaced index i, counting down [paper: 10 <= i <= 45]
    guide_until: int = 45
    form: str = "z"            # "z": added to z_{t-1} after the step (IGD's code); "eps": the printed Eq.
    through_dit: bool = True   # g through the DiT (as IGD) or from z0_hat with eps held fixed (cheaper)
    memory_cap: int = 64       # |M_c|: final latents kept per class [IGD]
    views: int = 1             # K: S averaged over K random training views of x0_hat (1: the image; not the paper's)

    def active(self, i):
        return self.guide_from <= i <= self.guide_until

    def guided_steps(self, steps):
        """How many of `steps` respaced steps fall inside the window."""
        return sum(map(self.active, range(steps)))


def igd_guidance(deviation=50.0, scale=5.0, guide_from=30, guide_until=45, **kwargs):
    """IGD's constants on the same knobs (IGD Table 7 for DiT, DD_IGD `sample_mp.sh`): its guidance scale
    k = 5, gamma = 50 at IPC 10 and 120 at IPC 50/100 (ImageNet-1K: 120), the window 30..45 of 50, the z form,
    one sample per image (no candidates), no reference term."""
    return GuidanceConfig(scale=scale, omega=0.0, deviation=deviation, candidates=1, guide_from=guide_from,
                          guide_until=guide_until, form="z", **kwargs)


@dataclass
class SamplerConfig:
    """How the prior is sampled (the field's DiT defaults)."""
    cfg_scale: float = 4.0          # s: classifier-free guidance
    steps: int = 50                 # respaced DDPM steps
    three_channels: bool = False    # DiT/IGD's quirk: CFG on 3 of the 4 latent channels


@dataclass
class SamplerLog:
    """What a guided run did, per respaced step i: the relative size of each push (||push|| / ||z_{t-1}||)."""
    guidance: dict = field(default_factory=dict)   # i -> [relative sizes, one per sample]
    deviation: dict = field(default_factory=dict)
    fallbacks: list = field(default_factory=list)   # per sample: guided steps whose g was not finite (plain step)
    gradient_cosine: dict = field(default_factory=dict)  # i -> cos(g cheap decoder, g exact), first batch only
    check_gradient: bool = True                     # still to do (once per log: its first guided batch)

    @property
    def nan_fallbacks(self):
        return sum(self.fallbacks)


# ----------------------------------------------------------------------------- the learnability score S

class Learnability:
    """S(x, y) = CE(f_k(x), y) - omega * CE(f_ref(x), y), per sample (Eq. "learnability").

    High S: the current student f_k gets x wrong (it has not learned it) while the reference f_ref gets it
    right (x is still a valid example of y). Each classifier sees x through the view it was trained with
    (data.classifier_input: resize, crop, normalise), exactly as at test time.

    Options that are not the paper's (off by default, each the paper's S when off):
      ensembles           student, and reference / reference_view, may be lists: each term is the mean of its
                          members' CE, so a push must work on students of several architectures (--student-archs)
                          and keep x valid for theta* of several (--reference-archs)
      views = K > 1       each CE is the mean over K random views of x drawn from that classifier's training
                          augmentation (augments[m](x in [0, 1]) -> views at its resolution; m counts the students,
                          then the reference members): S's gradient is then the mean of the per-view gradients, so
                          a push that only one view rewards (a pixel pattern) averages away: an expectation over
                          transformations (--guidance-views). K = 1 is the image itself.
    """

    def __init__(self, student, student_view, reference, reference_view, omega, views=1, augments=None):
        students = list(student) if isinstance(student, (list, tuple)) else [student]
        members = list(zip(reference, reference_view)) if isinstance(reference, (list, tuple)) else \
            [(reference, reference_view)]
        for model in students + [m for m, _ in members]:
            model.eval().requires_grad_(False)  # important! eval mode (no norm statistics drift), input grads only
        self.students, self.student_view = students, student_view
        self.members, self.omega = members, omega
        self.student, (self.reference, self.reference_view) = students[0], members[0]  # theta_k and theta*
        self.views, self.augments = views, augments
        if views > 1 and (augments is None or len(augments) != len(students) + len(members)):
            raise ValueError("views > 1 needs one augmentation per classifier (the students, then each reference)")

    def _ce(self, m, model, view, images, classes):
        """CE of classifier m on x, or its mean over K random views of x."""
        if self.views == 1:
            return F.cross_entropy(model(classifier_input(images, view)), classes, reduction="none")
        n, k = len(images), self.views
        x = self.augments[m]((images * 0.5 + 0.5).repeat(k, 1, 1, 1))  # (K*N) views, each its own random draw
        ce = F.cross_entropy(model(normalise(x, view)), classes.repeat(k), reduction="none")
        return ce.view(k, n).mean(dim=0)

    @property
    def draws_views(self):
        """Whether S draws random views: its value then depends on the views drawn before (one stream per stage)."""
        return self.views > 1

    def parts(self, images, classes):
        """images (N, C, H, W) in [-1, 1] -> {"S", "student_ce", "reference_ce"}, each (N,)."""
        classifiers = [(m, self.student_view) for m in self.students] + self.members
        ces = [self._ce(j, model, view, images, classes) for j, (model, view) in enumerate(classifiers)]
        student_ce = _mean(ces[:len(self.students)])  # high: not learned yet
        reference_ce = _mean(ces[len(self.students):])  # low: a valid example
        return dict(S=student_ce - self.omega * reference_ce, student_ce=student_ce, reference_ce=reference_ce)

    def __call__(self, images, classes):
        return self.parts(images, classes)["S"]


def _mean(values):
    """The mean of per-sample tensors; one is returned as it is (bit for bit the paper's single-model term)."""
    return values[0] if len(values) == 1 else torch.stack(values).mean(dim=0)


# ----------------------------------------------------------------------------- IGD's influence score

class Influence:
    """IGD's guidance score (Chen et al., "Influence-Guided Diffusion for Dataset Distillation", ICLR 2025;
    DD_IGD `sample_mp.py`), the paper's seed increment and main baseline, steered by the same sampler:

      I(x, y) = mean_j cos( grad_theta CE(f_theta_j(x), y),  g_real(j, y) ) - 1          (= -IGD's loss)

    theta_j: checkpoints of IGD's surrogate trajectory; g_real(j, y): the gradient of the mean CE over real
    images of class y at theta_j. Where S asks "does the current student get x wrong (and theta* right)?",
    I asks "would a training step on x move the surrogate the way real images of y do?" -- a gradient of a
    gradient, so raising I by grad_{z_t} is a double backward.

    real_gradient(j, c) -> the flat g_real vector (computed on demand and cached: for ImageNet-1K the
    vectors of all classes would not fit in memory, and a class block needs only its own).
    """

    def __init__(self, checkpoints, view, real_gradient, cache_classes=64):
        self.checkpoints, self.view, self.real_gradient = checkpoints, view, real_gradient
        for model in checkpoints:
            model.eval().requires_grad_(True)  # important! the inner gradient is w.r.t. the weights
        self.cache, self.cache_classes = {}, cache_classes

    def target(self, j, c):
        if (j, c) not in self.cache:
            if len(self.cache) >= self.cache_classes * len(self.checkpoints):
                self.cache.clear()
            self.cache[(j, c)] = self.real_gradient(j, c)
        return self.cache[(j, c)]

    def parts(self, images, classes):
        return dict(I=self(images, classes))

    def __call__(self, images, classes):
        """images (N, C, H, W) in [-1, 1] -> I (N,), differentiable in the images (create_graph)."""
        with torch.enable_grad():  # the weight gradient is needed even when the caller only wants values
            inputs = classifier_input(images, self.view)
            scores = []
            for n in range(len(inputs)):  # per sample: each x has its own weight gradient
                y = classes[n:n + 1]
                cosines = []
                for j, model in enumerate(self.checkpoints):
                    params = list(model.parameters())
                    loss = F.cross_entropy(model(inputs[n:n + 1]), y)
                    grad = torch.autograd.grad(loss, params, create_graph=True)  # kept differentiable in x
                    flat = torch.cat([g.flatten() for g in grad])
                    cosines.append(F.cosine_similarity(flat, self.target(j, int(y)).to(flat.device), dim=0))
                scores.append(torch.stack(cosines).mean() - 1)
            return torch.stack(scores)


def weight_gradient(model, inputs, labels, batch=50):
    """grad_theta of the mean CE over (inputs, labels), flattened; in batches (IGD: 4 batches of 50)."""
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    for i in range(0, len(inputs), batch):
        with torch.enable_grad():
            loss = F.cross_entropy(model(inputs[i:i + batch]), labels[i:i + batch], reduction="sum") / len(inputs)
            for t, g in zip(total, torch.autograd.grad(loss, params)):
                t += g
    return torch.cat([t.flatten() for t in total]).detach()


def select_checkpoints(similarity, threshold=0.7):
    """IGD's adaptive rule (DD_IGD `test_ckpts_grad_sim.py`): keep the random init (0); walking the trajectory,
    keep checkpoint j when the class-averaged cosine of its real gradient to the last kept one falls below
    `threshold`, and compare later checkpoints to it. similarity: (J, J) class-averaged cosines."""
    kept = [0]
    for j in range(1, len(similarity)):
        if similarity[kept[-1], j] < threshold:
            kept.append(j)
    return kept


# ----------------------------------------------------------------------------- the sampler

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


def score_gradient(prior, z, t, labels, classes, sampler, score, through_dit, decode):
    """g = grad_{z_t} score(decode(z0_hat), y) with the CFG output of the same pass: (output, g, eps)."""
    c = prior.channels
    alpha_bar_t = prior.scheduler.alphas_cumprod[t].to(z.device, torch.float32)  # abar_t
    with torch.enable_grad():
        z_in = z.detach().requires_grad_(True)
        if through_dit:  # one CFG pass serves both the step and the gradient
            out = cfg_output(prior, z_in, t, labels, sampler)
        else:  # eps held fixed: dz0_hat/dz_t = 1/sqrt(abar_t); no backward through the DiT
            with torch.no_grad():
                out = cfg_output(prior, z, t, labels, sampler)
        eps = out[:, :c]  # (N, C, h, w): eps of DiT's (N, 2C, h, w) learned-variance output (all of it without one)
        z0_hat = (z_in - (1 - alpha_bar_t).sqrt() * eps) / alpha_bar_t.sqrt()  # Ho et al. Eq. 15, (N, C, h, w)
        with prior._autocast():  # the classifiers in bf16 too when --precision bf16
            s = score(decode(z0_hat.to(z.dtype)).float(), classes)
        grad = torch.autograd.grad(s.float().sum(), z_in)[0].float()  # samples independent: sum = per-sample grads
    return out.detach(), grad, eps.detach().float()


def guided_output(prior, z, t, labels, classes, sampler, score, guide, check=None):
    """The quantities of one guided step: the CFG output (one pass serves the step and the gradient) and
    push = lambda * rho_t * g, g = grad_{z_t} S(decode(z0_hat), y). Returns (output, push, non-finite mask (N,)).

    score(x0_hat in [-1, 1], classes) -> (N,) is what guidance raises (a Learnability, or IGD's influence);
    the sampler does not care which. check: a list; with a cheap gradient decoder, the cosine of its g to the
    exact g (through the VAE) is appended per sample, so a run shows whether the shortcut is faithful.
    """
    alpha_bar_t = prior.scheduler.alphas_cumprod[t].to(z.device, torch.float32)
    out, grad, eps = score_gradient(prior, z, t, labels, classes, sampler, score, guide.through_dit,
                                    prior.decode_for_gradient)
    if check is not None and prior.grad_vae is not None:
        exact = score_gradient(prior, z, t, labels, classes, sampler, score, guide.through_dit, prior.decode)[1]
        check.extend(F.cosine_similarity(grad.flatten(1), exact.flatten(1), dim=1).tolist())
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
    for i, memory in enumerate(memories):
        if memory is not None and len(memory):
            memory = memory.to(flat.device)
            similarity = F.normalize(memory, dim=1) @ F.normalize(flat[i], dim=0)  # (M,)
            nearest[i], has_memory[i] = memory[similarity.argmax()], True
    with torch.enable_grad():
        z_in = flat.requires_grad_(True)
        grad = torch.autograd.grad(F.cosine_similarity(z_in, nearest, dim=1).sum(), z_in)[0]
    return (grad * has_memory[:, None]).view_as(z).to(z.dtype)


def _relative(delta, reference):
    return (delta.flatten(1).float().norm(dim=1) / reference.flatten(1).float().norm(dim=1).clamp_min(1e-12)).tolist()


@torch.no_grad()
def sample(prior, labels, generators, sampler, score=None, classes=None, memories=None, guide=None, log=None):
    """Sample final latents z_0 (N, C, h, w) for prior labels (N,), one generator per image.

    Unguided unless `score` and `guide` are given; inside the window the guided code runs even at
    lambda = gamma = 0, and then changes nothing (tested bit for bit). log: a SamplerLog to fill.
    """
    scheduler, device = prior.scheduler, prior.device
    scheduler.set_timesteps(sampler.steps)
    shape = (len(labels), prior.channels, prior.latent_size, prior.latent_size)  # (N, C, h, w): 4x32x32 for DiT-XL/2
    z = randn_tensor(shape, generator=generators, device=device, dtype=prior.transformer.dtype)
    z = z * scheduler.init_noise_sigma
    labels = labels.to(device)
    deterministic = isinstance(scheduler, DDIMScheduler)
    fallbacks = torch.zeros(len(labels), dtype=torch.long)  # per sample: guided steps that fell back
    for step, t in enumerate(scheduler.timesteps):
        i = sampler.steps - 1 - step  # respaced index, counting down 49 .. 0 (the paper's window is on it)
        guided = score is not None and guide is not None and guide.active(i)
        if guided:
            check = None
            if log is not None and log.check_gradient and prior.grad_vae is not None:
                check = log.gradient_cosine.setdefault(i, [])
            out, push, bad = guided_output(prior, z, t, labels, classes, sampler, score, guide, check)
        else:
            out = cfg_output(prior, z, t, labels, sampler)
        if deterministic:
            out = out[:, :prior.channels]  # (N, C, h, w): DDIM uses eps only, not the learned variance
        if guided and guide.form == "eps":  # the printed form: eps~ = eps - lambda rho_t g (raises S)
            if log is not None:  # the step's change of z_{t-1}, measured with the same noise
                states = [g.get_state() for g in generators]
                plain = scheduler.step(out, t, z, generator=generators).prev_sample
                for g, state in zip(generators, states):
                    g.set_state(state)
            out = torch.cat([out[:, :prior.channels] - push, out[:, prior.channels:]], dim=1)  # eps~, then the variance
        z_prev = scheduler.step(out, t, z, generator=generators).prev_sample
        if guided and guide.form == "z":  # learnability guidance on z_{t-1} (IGD's place for it)
            plain = z_prev
            z_prev = z_prev + push
        if guided and log is not None:
            log.guidance.setdefault(i, []).extend(_relative(z_prev - plain, plain))
            fallbacks += bad
        if guided and memories is not None:
            push_away = guide.deviation * deviation_gradient(z, memories)  # deviation guidance
            if log is not None:
                log.deviation.setdefault(i, []).extend(_relative(push_away, z_prev))
            z_prev = z_prev - push_away
        z = z_prev
    if log is not None:
        log.fallbacks.extend(fallbacks.tolist())
        if log.gradient_cosine:
            log.check_gradient = False  # the first guided batch has been checked
    return z


def decode_images(prior, z):
    """Final latents -> images in [0, 1] (N, C, H, W)."""
    with torch.no_grad():
        return (prior.decode(z).float().clamp(-1, 1) + 1) / 2


# ----------------------------------------------------------------------------- candidate selection (kappa)

def best_of_candidates(prior, labels, classes, generators, sampler, score, guide, memories=None, log=None):
    """kappa guided candidates per image, the one with the highest S on its final decoded image kept.

    labels, classes, generators, memories: one entry per (image, candidate), candidates of an image
    adjacent (image-major). Returns (kept latents (n, C, h, w), kept images (n, C, H, W) in [0, 1],
    kept candidate index (n,), parts {name: (n, kappa)}) with parts = score.parts of every candidate (its
    first entry the score, then what it is made of).
    """
    kappa = guide.candidates
    z0 = sample(prior, labels, generators, sampler, score, classes, memories, guide, log)
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
