"""
Learnability-guided sampling: METHOD.md sections 4 and 5 (the paper's Eq. for S, eps~ and rho_t).

The plain class-conditional DiT sampler is the special case guidance_scale = deviation_scale = 0,
candidates = 1 (the "DiT" baseline of every table). LGD adds, inside the window
guide_from <= i <= guide_until of the respaced step index i (49 .. 0 for 50 steps):

  S(x, y)   = CE(f_k(x), y) - omega * CE(f_ref(x), y)                 learnability, section 4
  z0_hat    = (z_t - sqrt(1 - abar_t) * eps) / sqrt(abar_t)           predicted clean latent
  g         = grad_{z_t} S(decode(z0_hat), y)                         through classifiers, VAE, DiT
  rho_t     = c0 * sqrt(1 - abar_t) * ||eps|| / ||g||                 per-sample normalisation
  eps~      = eps - lambda * rho_t * g                                learnability guidance, 5a
  z_{t-1}   = scheduler.step(eps~) - gamma * grad_{z_t} cos(z_t, m*)  deviation guidance, 5b
  keep the best of kappa candidates by S of the final image           candidate selection, 5c

Glossary (symbol -> variable): lambda -> guidance_scale, omega -> lambda_ref, gamma ->
deviation_scale, kappa -> candidates, c0 -> c0, abar_t -> alpha_bar_t, f_k -> student,
f_ref -> reference, M_c -> memory[c], s (CFG) -> cfg_scale.

Sign. The paper writes "eps + lambda rho_t grad S"; with the eps-parameterisation that lowers S
(z0_hat moves against g), so we use eps - lambda rho g, which raises S; tests/test_guidance.py
checks that guided samples score higher S than unguided ones from the same noise.
c0 = 0.0015 is the factor IGD's code hides inside rho_t; the paper's lambda = 15 was tuned with it.

Reproducibility. Every image owns a CPU torch.Generator seeded from (run seed, class, image index,
candidate); it draws the initial noise and every ancestral step's noise, so image i of class c does
not depend on the batch it is in (up to float rounding) and is bit-identical whatever the number of
torchrun ranks (batches are fixed class blocks, see generate_increment).

Run: `python guidance.py` samples 10 unguided digits per class from the digits prior into out/samples/ (+ grid.png).
"""
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor
from tqdm import tqdm

from common import barrier, derive_seed, is_main, save_grid, save_png
from data import classifier_input, load_image


@dataclass
class GuidanceConfig:
    guidance_scale: float = 15.0   # lambda [paper]
    lambda_ref: float = 0.5        # omega [paper]
    c0: float = 0.0015             # IGD's hidden factor inside rho_t [choice, METHOD 5a]
    deviation_scale: float = 50.0  # gamma [paper, from IGD]
    candidates: int = 3            # kappa [paper]
    guide_from: int = 10           # window on the respaced index i, counting down [paper: 10 <= i <= 45]
    guide_until: int = 45
    grad_through_dit: bool = True  # g through DiT (IGD) or from z0_hat only (eps held fixed)
    memory_cap: int = 64           # |M_c| [paper, from IGD]
    nan_fallbacks: int = field(default=0, compare=False)  # samples whose g was not finite -> unguided step

    def active(self, i):
        return self.guide_from <= i <= self.guide_until


# ----------------------------------------------------------------------------- section 4: learnability

def learnability(student, reference, images, classes, spec, lambda_ref):
    """S(x, y) = CE(f_k(x), y) - omega * CE(f_ref(x), y), per sample. images: (N, C, H, W) in [-1, 1]."""
    inputs = classifier_input(images, spec)  # exactly the test-time view: resize, centre crop, normalise
    loss_student = F.cross_entropy(student(inputs), classes, reduction="none")      # high: not yet learned
    loss_reference = F.cross_entropy(reference(inputs), classes, reduction="none")  # low: a valid example
    return loss_student - lambda_ref * loss_reference  # (N,)


class Learnability:
    """The two frozen classifiers of section 4 and the dataset view they expect, as one callable."""

    def __init__(self, student, reference, spec, lambda_ref):
        for model in (student, reference):
            model.eval().requires_grad_(False)  # important! eval mode (no norm statistics drift), input grads only
        self.student, self.reference, self.spec, self.lambda_ref = student, reference, spec, lambda_ref

    def __call__(self, images, classes):
        return learnability(self.student, self.reference, images, classes, self.spec, self.lambda_ref)


# ----------------------------------------------------------------------------- the sampler

def model_output_cfg(prior, z, t, labels, cfg_scale, cfg_three_channels=False):
    """DiT output with classifier-free guidance: eps = eps_u + s (eps_c - eps_u) (Ho & Salimans).

    Returns (N, C_out, h, w): guided eps in the first C channels, the conditional branch's learned
    variance (if any) after it. NOTE(deviation): CFG on all latent channels (diffusers' DiTPipeline
    does the same); DiT/IGD guide only 3 of 4, reproducible with cfg_three_channels=True.
    """
    n, c = z.shape[0], prior.channels
    timestep = t.expand(n if cfg_scale == 1 else 2 * n).to(z.device)
    if cfg_scale == 1:
        return prior.dit(z, timestep, labels)
    null = torch.full_like(labels, prior.null_label)
    out = prior.dit(torch.cat([z, z]), timestep, torch.cat([labels, null]))  # one pass for both branches
    cond, uncond = out.chunk(2)
    k = 3 if cfg_three_channels else c
    eps = uncond[:, :k] + cfg_scale * (cond[:, :k] - uncond[:, :k])
    return torch.cat([eps, cond[:, k:]], dim=1)


def guided_model_output(prior, z, t, labels, classes, cfg_scale, score, cfg, cfg_three_channels=False):
    """Section 5a: the CFG output with eps replaced by eps~ = eps - lambda * rho_t * grad_{z_t} S."""
    c = prior.channels
    alpha_bar_t = prior.scheduler.alphas_cumprod[t].to(z.device, torch.float32)  # abar_t
    with torch.enable_grad():
        z_in = z.detach().requires_grad_(True)
        if cfg.grad_through_dit:  # one CFG pass serves both the gradient and the step
            out = model_output_cfg(prior, z_in, t, labels, cfg_scale, cfg_three_channels)
        else:  # eps held fixed: dz0_hat/dz_t = 1/sqrt(abar_t); no backward through the DiT
            with torch.no_grad():
                out = model_output_cfg(prior, z, t, labels, cfg_scale, cfg_three_channels)
        eps = out[:, :c]
        z0_hat = (z_in - (1 - alpha_bar_t).sqrt() * eps) / alpha_bar_t.sqrt()  # Ho et al. Eq. 15
        x0_hat = prior.decode(z0_hat.to(z.dtype))
        s = score(x0_hat.float(), classes)
        grad = torch.autograd.grad(s.sum(), z_in)[0].float()  # samples independent: sum = per-sample grads
    eps = eps.detach().float()
    eps_norm, grad_norm = eps.flatten(1).norm(dim=1), grad.flatten(1).norm(dim=1)
    rho_t = cfg.c0 * (1 - alpha_bar_t).sqrt() * eps_norm / grad_norm.clamp_min(1e-12)  # per sample (N,)
    # NOTE(deviation): the paper prints eps + lambda rho g; with eps-prediction that lowers S, so minus (docstring)
    eps_tilde = eps - cfg.guidance_scale * rho_t.view(-1, 1, 1, 1) * grad  # learnability guidance, Eq. eps~ (5a)
    finite = torch.isfinite(eps_tilde).flatten(1).all(dim=1)
    if not finite.all():  # NaN/inf gradient -> that sample takes the unguided step; counted and logged
        cfg.nan_fallbacks += int((~finite).sum())
        eps_tilde = torch.where(finite.view(-1, 1, 1, 1), eps_tilde, eps)
    return torch.cat([eps_tilde.to(out.dtype), out[:, c:].detach()], dim=1)


def deviation_gradient(z, memories):
    """Section 5b: grad_{z_t} cos(z_t, m*), m* = the memory latent most similar to z_t (0 if no memory)."""
    flat = z.detach().flatten(1).float()
    nearest = torch.zeros_like(flat)
    has_memory = torch.zeros(len(z), dtype=torch.bool, device=z.device)
    for i, memory in enumerate(memories):
        if memory is not None and len(memory):
            similarity = F.normalize(memory, dim=1) @ F.normalize(flat[i], dim=0)  # (M,)
            nearest[i], has_memory[i] = memory[similarity.argmax()], True
    with torch.enable_grad():
        z_in = flat.requires_grad_(True)
        cos = F.cosine_similarity(z_in, nearest, dim=1)
        grad = torch.autograd.grad(cos.sum(), z_in)[0]
    return (grad * has_memory[:, None]).view_as(z).to(z.dtype)


@torch.no_grad()
def sample(prior, labels, generators, cfg_scale=4.0, steps=50, score=None, classes=None, memories=None,
           cfg=None, cfg_three_channels=False):
    """Sample final latents z_0 (N, C, h, w) for prior labels (N,), one generator per image.

    Unguided unless `score` (a Learnability) and `cfg` are given; guidance only changes the steps
    inside the window, so scale 0 reproduces the unguided sampler bit for bit.
    """
    scheduler, device = prior.scheduler, prior.device
    dtype = prior.transformer.dtype
    scheduler.set_timesteps(steps)
    shape = (len(labels), prior.channels, prior.latent_size, prior.latent_size)
    z = randn_tensor(shape, generator=generators, device=device, dtype=dtype) * scheduler.init_noise_sigma
    labels = labels.to(device)
    deterministic = isinstance(scheduler, DDIMScheduler)
    for step, t in enumerate(scheduler.timesteps):
        i = steps - 1 - step  # respaced index, counting down 49 .. 0 (the paper's window is on this)
        guided = score is not None and cfg is not None and cfg.active(i)
        if guided and cfg.guidance_scale != 0:
            out = guided_model_output(prior, z, t, labels, classes, cfg_scale, score, cfg, cfg_three_channels)
        else:
            out = model_output_cfg(prior, z, t, labels, cfg_scale, cfg_three_channels)
        if deterministic:
            out = out[:, :prior.channels]  # DDIM uses eps only
        z_prev = scheduler.step(out, t, z, generator=generators).prev_sample
        if guided and cfg.deviation_scale != 0 and memories is not None:
            z_prev = z_prev - cfg.deviation_scale * deviation_gradient(z, memories)  # push away from M_c
        z = z_prev
    return z


def decode_images(prior, z):
    """Final latents -> images in [0, 1] (N, C, H, W)."""
    with torch.no_grad():
        return (prior.decode(z).float().clamp(-1, 1) + 1) / 2


# ----------------------------------------------------------------------------- section 5c: an increment

def image_path(folder, spec, c, index):
    return os.path.join(folder, spec.class_names()[c], f"{index:05d}.png")


def generate_increment(prior, spec, folder, num_slots, first_index, seed, cfg_scale=4.0, steps=50,
                       batch_size=32, score=None, cfg=None, memory=None, rank=0, world=1, desc="sampling",
                       cfg_three_channels=False):
    """Fill `folder/<class>/<index>.png` for indices first_index .. first_index + num_slots - 1.

    Slots are filled in order (round r = slot r of every class), so M_c grows within a stage (5c).
    Classes are cut into fixed blocks of batch_size // kappa classes; a round's block is one batch of
    (class, candidate) samples, so batches (and thus floating point) do not depend on the number of
    ranks; ranks take blocks round-robin and each keeps the memory of its own classes only.
    Existing PNGs are kept (resume); the memory is always rebuilt from the PNGs on disk, so an
    interrupted and a straight run see the same memories. memory: {class: (M, D) latents} or None.
    """
    kappa = cfg.candidates if (cfg is not None and score is not None) else 1
    per_block = max(1, batch_size // kappa)
    blocks = [list(range(c, min(c + per_block, spec.num_classes))) for c in range(0, spec.num_classes, per_block)]
    my_blocks = blocks[rank::world]
    bar = tqdm(total=num_slots * sum(map(len, my_blocks)), desc=desc, unit="img", disable=not is_main(), mininterval=2)
    for slot in range(num_slots):
        index = first_index + slot
        for block in my_blocks:
            todo = [c for c in block if not os.path.exists(image_path(folder, spec, c, index))]
            if todo:
                items = [(c, k) for c in todo for k in range(kappa)]  # (class, candidate)
                classes = torch.tensor([c for c, _ in items], device=prior.device)
                labels = torch.tensor([spec.prior_labels[c] for c, _ in items])
                generators = [torch.Generator().manual_seed(derive_seed(seed, c, index, k)) for c, k in items]
                memories = [memory.get(c) for c, _ in items] if memory is not None else None
                z0 = sample(prior, labels, generators, cfg_scale, steps, score, classes, memories, cfg, cfg_three_channels)
                images = decode_images(prior, z0)
                if kappa > 1:  # 5c: keep the candidate with the highest S on its final decoded image
                    with torch.no_grad():
                        s = score(images * 2 - 1, classes).view(len(todo), kappa)
                    best = s.argmax(dim=1) + torch.arange(len(todo), device=s.device) * kappa
                    images = images[best.cpu()]
                for c, image in zip(todo, images):
                    save_png(image, image_path(folder, spec, c, index))
            if memory is not None:  # add this slot's kept images to M_c, read back from disk
                for c in block:
                    add_to_memory(memory, c, load_image(image_path(folder, spec, c, index), spec.channels), prior, cfg)
            bar.update(len(block))
            bar.set_postfix(img_per_s=f"{bar.n / max(1e-9, bar.format_dict['elapsed']):.2f}")
    bar.close()
    barrier()


def add_to_memory(memory, c, images, prior, cfg):
    """M_c <- M_c + encode(images) (images (C,H,W) or (N,C,H,W) in [0,1]), keeping the newest memory_cap."""
    images = images[None] if images.ndim == 3 else images
    z = prior.encode((images * 2 - 1).to(prior.device, prior.transformer.dtype)).flatten(1).float()
    memory[c] = torch.cat([memory[c], z]) if c in memory else z
    memory[c] = memory[c][-cfg.memory_cap:]


def save_sample_grid(folder, spec, indices, path, max_per_class=10):
    """Grid PNG of `folder`: one row per class (at most 20 classes), up to 10 images each."""
    if not is_main():
        return
    classes = range(min(spec.num_classes, 20))
    indices = list(indices)[:max_per_class]
    images = torch.stack([load_image(image_path(folder, spec, c, i), spec.channels) for c in classes for i in indices])
    if images.shape[-1] < 32:  # 8 px digits: blow up (nearest) so people can see them
        images = F.interpolate(images, scale_factor=32 // images.shape[-1], mode="nearest")
    save_grid(images, path, nrow=len(indices))


def main():
    import argparse
    from common import get_device
    from data import get_spec
    from model import digits_prior, load_prior
    parser = argparse.ArgumentParser(description="Sample an unguided grid from the digits prior.")
    parser.add_argument("--out", default="out/samples", help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="run seed")
    args = parser.parse_args()
    spec = get_spec("digits")
    prior = load_prior(digits_prior(), device=get_device())
    generate_increment(prior, spec, args.out, 10, 0, args.seed, cfg_scale=2.0)  # the digits preset's CFG
    save_sample_grid(args.out, spec, range(10), os.path.join(args.out, "grid.png"))
    print(f"wrote {args.out}/grid.png")


if __name__ == "__main__":
    main()
