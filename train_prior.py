"""
The embedded presets' diffusion priors, trained here once and cached, so that `python distill.py` (digits) and
`python distill.py --dataset mnist` run the whole method offline (as nanoGPT's shakespeare_char). The full runs
use the pretrained DiT-XL/2 + SD VAE instead (model.load_prior); these are the stand-ins, saved in diffusers' hub
layout and loaded through the very same `from_pretrained` path.

  digits   a small class-conditional DiT in pixel space (8x8, 1 channel, no VAE: decode = identity)
  mnist    the pipeline of a real run in miniature, so that the decoder sits inside the guidance gradient:
           vae/          an AutoencoderKL, 1 x 32 x 32 -> 4 x 8 x 8, trained on the MNIST train split (MSE + a small
                         KL); its scaling_factor = 1 / std of the train latents, as the SD VAE's 0.18215 was chosen
           transformer/  a DiT on those (scaled) latents with the learned variance (DiT's hybrid loss: eps-MSE plus
                         the variational bound for the variance, Nichol & Dhariwal 2021) and a null label for CFG
           scheduler/    DDPM's linear betas, 1000 steps, as DiT-XL/2

DiT training is standard DDPM (Ho et al. 2020, Eq. 14: eps-MSE on x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps)
with 10% label dropout (diffusers' DiT label embedding applies it in train mode: that is what makes classifier-free
guidance work), AdamW with a short warm-up and cosine decay, EMA weights. Every part resumes where a kill stopped it
(state in `<prior>.partial/`), and the prior appears in the cache only whole (renamed into place).

Run: `python train_prior.py` (or `--dataset mnist`) trains or loads the prior, writes a labelled sample grid and
prints what a user needs to trust it: theta*'s recognition of its unguided samples at the preset's CFG (mnist: and
the VAE's reconstruction error on held-out images).
"""
import math
import os

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel
from tqdm import tqdm

from data import EMBEDDED, ImageSet, get_spec, load_real, sample_real_ipc
from evaluate import logistic_regression
from ground.common import (
    ArgumentParser,
    UserError,
    all_reduce_sum,
    derive_seed,
    get_device,
    image_format,
    is_main,
    print0,
    quoted,
    remove_path,
    require,
    run_cli,
    save_grid,
    save_torch,
    wait_for_rank0,
)
from ground.folder import check_output
from ground.locks import cache_entry
from guidance import SamplerConfig, decode_images, sample
from model import (
    DIGITS_PRIOR,
    DIGITS_SCHEDULE,
    MNIST_DIT,
    MNIST_SCHEDULE,
    MNIST_VAE,
    PriorFiles,
    load_prior,
    predicted_clean,
)
from reference import recognises, reference_model

# How each embedded prior is trained (steps of batch 128). The digits prior: 2000 steps, about 2 minutes on 2 CPU
# cores; its unguided samples are recognised by theta* as well as after the 4000 steps at lr 1e-3 of earlier
# versions (6 minutes): 99.5% of 200 at CFG 2 (1500 steps: 99.0%, 1000 steps: 98.5%; measured once, seed 0)
DIGITS_TRAINING = dict(steps=2000, lr=2e-3, ema_decay=0.995)
MNIST_TRAINING = dict(vae_steps=1500, dit_steps=2500, lr=2e-3, ema_decay=0.995)
PRIOR_CHECK = "train_prior.py"  # the stamp of its sample grids: a later check may replace them, nothing else
CHECK_CFG = {"digits": 2.0, "mnist": 2.0}  # the presets' CFG scale (distill.PRESETS), for the check of main()


# ----------------------------------------------------------------------------- the DiT (both priors)

def train_dit(folder, latents, labels, config, schedule, steps, lr, ema_decay, batch_size=128, seed=0,
              save_every=500, latent_std=None, desc="prior"):
    """Train a class-conditional DiT of `config` on `latents` (N, C, h, w) in its data scale (pixels in [-1, 1], or
    scaled VAE latents); save the EMA weights to `folder`/transformer. Resumable: its state is saved every
    save_every steps in `folder`/dit_state.pt. latent_std: per-latent posterior std; a fresh posterior sample is
    drawn every step (the VAE's, as the SD/DiT pipeline trains on).

    With 2C outputs (learned variance) the loss is DiT's hybrid one: eps-MSE + the variational bound in bits per
    dimension for the variance head, the mean held fixed in it (Nichol & Dhariwal 2021, DiT `diffusion/`)."""
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(**config)
    ema = DiTTransformer2DModel(**config).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    scheduler = DDPMScheduler(**schedule)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    state_path, start = os.path.join(folder, "dit_state.pt"), 0
    if os.path.exists(state_path):  # resume an interrupted training
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"]), ema.load_state_dict(state["ema"]), opt.load_state_dict(state["opt"])
        start = state["step"]
        torch.set_rng_state(state["rng"])
    y_all = torch.as_tensor(labels)
    channels = config["in_channels"]
    model.train()
    for step in tqdm(range(start, steps), desc=desc, initial=start, total=steps, mininterval=2):
        idx = torch.randint(0, len(latents), (batch_size,))
        x0, y = latents[idx], y_all[idx]
        if latent_std is not None:
            x0 = x0 + latent_std[idx] * torch.randn_like(x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,))
        noise = torch.randn_like(x0)
        xt = scheduler.add_noise(x0, noise, t)  # sqrt(abar) x0 + sqrt(1 - abar) eps
        out = model(xt, timestep=t, class_labels=y).sample  # (N, C or 2C, h, w)
        loss = F.mse_loss(out[:, :channels], noise)
        if out.shape[1] == 2 * channels:  # the learned variance: DiT's hybrid loss
            loss = loss + variational_bound(scheduler, out[:, :channels].detach(), out[:, channels:], x0, xt, t)
        for g in opt.param_groups:  # short warm-up then cosine decay
            g["lr"] = lr * min(1.0, (step + 1) / 200) * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - ema_decay)
        if (step + 1) % save_every == 0 and step + 1 < steps:  # a killed run loses at most save_every steps
            save_torch(dict(model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                            step=step + 1, rng=torch.get_rng_state()), state_path)
    scheduler.save_pretrained(os.path.join(folder, "scheduler"))
    ema.save_pretrained(os.path.join(folder, "transformer"))
    remove_path(state_path)


def variational_bound(scheduler, eps, variance_values, x0, xt, t):
    """DiT's (IDDPM's) L_vlb term in bits per dimension: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0,
    the Gaussian negative log-likelihood of x_0 at t = 0. The model's variance is the learned-range interpolation
    diffusers' DDPMScheduler samples with (variance_type="learned_range"): log var = f log beta_t + (1 - f) log
    beta~_t, f = (v + 1) / 2 (v: the second half of the DiT's output); its mean comes from eps, held fixed here."""
    abar = scheduler.alphas_cumprod
    abar_prev = torch.cat([torch.ones(1), abar[:-1]])
    betas = 1 - abar / abar_prev
    beta_tilde = betas * (1 - abar_prev) / (1 - abar)  # the posterior's variance (0 at t = 0)
    log_beta_tilde = torch.log(torch.cat([beta_tilde[1:2], beta_tilde[1:]]))  # clipped at t = 0, as IDDPM
    shape = (-1, 1, 1, 1)
    a, a_prev, b = abar[t].view(shape), abar_prev[t].view(shape), betas[t].view(shape)
    coef_x0, coef_xt = b * a_prev.sqrt() / (1 - a), (1 - a_prev) * (1 - b).sqrt() / (1 - a)
    true_mean, true_log_var = coef_x0 * x0 + coef_xt * xt, log_beta_tilde[t].view(shape)
    x0_hat = predicted_clean(xt, eps, a)
    model_mean = coef_x0 * x0_hat + coef_xt * xt
    frac = (variance_values + 1) / 2
    model_log_var = frac * torch.log(b) + (1 - frac) * true_log_var
    kl = 0.5 * (-1 + model_log_var - true_log_var + torch.exp(true_log_var - model_log_var)
                + (true_mean - model_mean) ** 2 * torch.exp(-model_log_var))
    nll = 0.5 * (math.log(2 * math.pi) + model_log_var + (x0 - model_mean) ** 2 * torch.exp(-model_log_var))
    per_dim = torch.where((t == 0).view(shape), nll, kl) / math.log(2.0)
    return per_dim.mean()


# ----------------------------------------------------------------------------- the mnist VAE and its tiny decoder

def train_vae(folder, images, steps, lr, kl_weight=1e-4, batch_size=32, seed=0):
    """The latent tier's AutoencoderKL (model.MNIST_VAE) on images (N, 1, 32, 32) in [0, 1]: pixel MSE in
    [-1, 1] plus kl_weight x the KL to N(0, 1) per latent dimension, so the latents stay a smooth space a DiT can learn.
    Its scaling_factor is set from the trained latents: 1 / std of the posterior means of the train split, so the
    DiT sees latents of unit variance (as 0.18215 does for the SD VAE). Saved to `folder`/vae."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(**MNIST_VAE)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    x_all = images * 2 - 1
    vae.train()
    for step in tqdm(range(steps), desc="mnist VAE", mininterval=2):
        x = x_all[torch.randint(0, len(x_all), (batch_size,))]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, x) + kl_weight * posterior.kl().mean() / posterior.mean[0].numel()
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    vae.eval()
    means, stds = encode_all(vae, x_all)
    vae.register_to_config(scaling_factor=float(1 / means.std()))
    vae.save_pretrained(os.path.join(folder, "vae"))
    return vae


@torch.no_grad()
def encode_all(vae, x, batch=500):
    """Posterior means and stds of images x in [-1, 1], unscaled (N, 4, 8, 8) each."""
    out = [vae.encode(x[i:i + batch]).latent_dist for i in range(0, len(x), batch)]
    return torch.cat([d.mean for d in out]), torch.cat([d.std for d in out])


# ----------------------------------------------------------------------------- the cache

def prior_path(dataset, cache_dir="out/cache"):
    return os.path.join(cache_dir, f"{dataset}_prior")


def embedded_prior(dataset, cache_dir="out/cache", training=None, check=True):
    """Path of the cached prior of an embedded dataset, trained on its train split on first use. A cache, not a
    result: trained once per checkout and shared by every run; a second run started meanwhile waits for the first
    to finish it (ground.locks.cache_entry). Under torchrun rank 0 trains, the others wait. training: other settings
    than DIGITS_TRAINING / MNIST_TRAINING (the tests' tiny ones, never checked). check: False where the caller
    checks it itself (main)."""
    path, fresh = prior_path(dataset, cache_dir), 0
    if is_main():
        with cache_entry(path, f"the {dataset} prior") as missing:
            if missing:
                if dataset == "digits":
                    build_digits_prior(path, training or DIGITS_TRAINING)
                else:
                    build_mnist_prior(path, training or MNIST_TRAINING)
            fresh = int(missing and training is None)
    wait_for_rank0(path, f"the {dataset} prior")
    if all_reduce_sum(fresh) and check:  # freshly trained: whether it can be trusted, before a run builds on it
        check_prior(dataset, path, get_device())  # every rank: theta* is trained behind a barrier
    return path


def build_digits_prior(path, training=DIGITS_TRAINING):
    """The digits prior at `path`: a DiT on the train pixels in [-1, 1] (no VAE: decode = identity)."""
    print0(f"training the digits prior once ({training['steps']} steps, about 2 minutes on 2 CPU cores; cached in "
           f"{path})")
    partial = path + ".partial"
    os.makedirs(partial, exist_ok=True)
    train = load_real(get_spec("digits"), None, "train")
    train_dit(partial, torch.stack(train.items) * 2 - 1, train.labels, DIGITS_PRIOR, DIGITS_SCHEDULE,
              desc="digits prior", **training)
    os.rename(partial, path)  # the finished parts become the prior: it appears whole or not at all


def build_mnist_prior(path, training=MNIST_TRAINING):
    """The mnist prior at `path`: a VAE, then a DiT on its latents."""
    print0(f"training the mnist prior once: a VAE ({training['vae_steps']} steps), a DiT on its latents "
           f"({training['dit_steps']} steps), about 5 minutes on 2 CPU cores; cached in {path}")
    partial = path + ".partial"
    os.makedirs(partial, exist_ok=True)
    train = load_real(get_spec("mnist"), None, "train")
    images = torch.stack(train.items)
    if os.path.isdir(os.path.join(partial, "vae")):  # each part resumes from the last one finished
        vae = AutoencoderKL.from_pretrained(os.path.join(partial, "vae"))
    else:
        vae = train_vae(partial, images, training["vae_steps"], training["lr"])
    means, stds = encode_all(vae.eval().requires_grad_(False), images * 2 - 1)
    scale = vae.config.scaling_factor
    if not os.path.isdir(os.path.join(partial, "transformer")):
        train_dit(partial, means * scale, train.labels, MNIST_DIT, MNIST_SCHEDULE, training["dit_steps"],
                  training["lr"], training["ema_decay"], latent_std=stds * scale, desc="mnist DiT")
    os.rename(partial, path)  # the finished parts become the prior: it appears whole or not at all


def load_run_prior(args, spec, device):
    """A run's prior, ready to sample: DiT-XL/2 (+VAE) from the hub or a local dir, or the cached prior of an
    embedded dataset (trained on first use). Sets spec.image_size to what it generates."""
    prior_path_ = args.prior or embedded_prior(args.dataset)
    # weights stay float32; bf16 is autocast only, so the scheduler maths and the guidance gradient's
    # normalisation (rho_t) keep full precision
    try:
        prior = load_prior(prior_path_, vae=args.vae, device=device, dtype=torch.float32, sampler=args.sampler,
                           steps=args.steps)
    except PriorFiles as e:
        if args.prior is None and os.path.abspath(e.path).startswith(os.path.abspath(prior_path_)):
            # the cache is ours, and its own files are the cause: say how to rebuild it
            raise UserError(f"{e}; the cached {args.dataset} prior is broken: remove it (rm -r {quoted(prior_path_)}) "
                            f"and rerun to retrain it") from None
        raise
    prior.bf16 = args.precision == "bf16"
    # the prior must make the dataset's images: its channels, and for the embedded datasets their size
    if prior.image_channels != spec.channels:
        raise UserError(f"prior {prior_path_} makes {prior.image_channels}-channel images"
                        f"{' (--vae none: its latents as they are)' if args.vae == 'none' else ''}; {args.dataset} "
                        f"images have {spec.channels} (give a prior of {args.dataset}'s images)")
    if spec.name in EMBEDDED and prior.image_size != spec.image_size:
        raise UserError(f"prior {prior_path_} makes {prior.image_size} px images; {args.dataset} images are "
                        f"{spec.image_size} px (give a prior of {args.dataset}'s images)")
    spec.image_size = prior.image_size  # stand-in priors in the tests generate smaller images
    # a class index past the prior's label table would silently become the CFG null label
    if max(spec.prior_labels) >= prior.null_label:
        raise UserError(f"prior {prior_path_} knows {prior.null_label} classes; {args.dataset} needs label "
                        f"{max(spec.prior_labels)}")
    return prior


# ----------------------------------------------------------------------------- the check

@torch.no_grad()
def recognised(prior, reference, view, cfg_scale, per_class, device):
    """(theta*'s recognition of the prior's unguided samples, the samples (10 x per_class, C, H, W))."""
    labels = torch.arange(10).repeat_interleave(per_class)
    generators = [torch.Generator().manual_seed(derive_seed(123, int(c), i)) for i, c in enumerate(labels)]
    images = decode_images(prior, sample(prior, labels, labels, generators, SamplerConfig(cfg_scale=cfg_scale)))
    return float(recognises(reference, view, images, labels).float().mean()), images


def reconstruction_error(prior, device, n=200):
    """The mnist VAE on held-out images: (mean squared error in [0, 1] pixels, the images' own variance: its scale)."""
    x = torch.stack(load_real(get_spec("mnist"), None, "test").items[:n]).to(device)
    with torch.no_grad():
        recon = decode_images(prior, prior.encode(x * 2 - 1))
    return float(F.mse_loss(recon, x)), float(x.var())


def regime_check(images, per_class, spec):
    """The premise of generative distillation, its cheapest figure: (accuracy of logistic regression on the pixels
    of 10 random real training images per class (seed 0), the same on the first 10 of `per_class` unguided samples
    per class). Deterministic and seconds; the evaluators that train take minutes (docs/regime.md)."""
    k = min(10, per_class)
    chosen = images.view(10, per_class, *images.shape[1:])[:, :k].reshape(-1, *images.shape[1:]).cpu()
    samples = ImageSet(list(chosen), torch.arange(10).repeat_interleave(k).tolist())
    test = load_real(spec, None, "test")
    return (logistic_regression(sample_real_ipc(load_real(spec, None, "train"), k, 0), test),
            logistic_regression(samples, test))


def check_prior(dataset, path, device, cfg_scale=None, per_class=20, grid=None):
    """What a user needs to trust an embedded prior, printed: theta*'s recognition of its unguided samples at the
    preset's CFG (theta* trained and cached as a run would); for mnist also the VAE's reconstruction error on
    held-out images. grid: where to save the samples."""
    cfg_scale = CHECK_CFG[dataset] if cfg_scale is None else cfg_scale
    spec = get_spec(dataset)
    prior = load_prior(path, device=device)
    reference, view = reference_model(spec, "convnet", None, device)
    share, images = recognised(prior, reference, view, cfg_scale, per_class, device)
    print0(f"{dataset} prior: theta* recognises {share:.1%} of {10 * per_class} unguided samples (CFG {cfg_scale})")
    real, generated = regime_check(images, per_class, spec)
    k = min(10, per_class)
    print0(f"{dataset} prior: in the paper's regime (samples worth more than real images)? logistic regression "
           f"trained on {k} unguided samples per class {generated:.1%}, on {k} random real ones {real:.1%}: "
           f"{'yes' if generated >= real else 'no'} ({100 * (generated - real):+.1f} points)"
           + ("; the whole measure: docs/regime.md" if dataset == "mnist" else ""))
    if dataset == "mnist":
        mse, variance = reconstruction_error(prior, device)
        print0(f"{dataset} prior: VAE on 200 held-out images, pixel MSE {mse:.4f} (the images' variance "
               f"{variance:.4f})")
    if grid is not None:
        shown = min(10, per_class)
        rows = images.view(10, per_class, *images.shape[1:])[:, :shown].reshape(-1, *images.shape[1:])
        save_grid(rows, grid, [str(c) for c in range(10)], [str(i) for i in range(shown)],
                  f"{dataset} prior, unguided, CFG {cfg_scale}", stamp=PRIOR_CHECK)
        print0(f"grid: {grid}")
    return share


def main(argv=None):
    """Train (or load) an embedded prior and check it: what a user needs to trust it before a run builds on it."""
    parser = ArgumentParser(prog="train_prior.py", description="Train/load an embedded prior and check it.")
    parser.add_argument("--dataset", default="digits", choices=EMBEDDED, help="the embedded dataset")
    parser.add_argument("--per-class", type=int, default=20, help="samples per class to classify")
    parser.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale (default: the "
                        "preset's)")
    parser.add_argument("--out", default=None, help="where to write the sample grid (default "
                        "out/<dataset>_prior_check.png)")
    args = parser.parse_args(argv)
    args.cfg_scale = CHECK_CFG[args.dataset] if args.cfg_scale is None else args.cfg_scale
    args.out = args.out or f"out/{args.dataset}_prior_check.png"
    # checked before the prior trains (minutes when nothing is cached), not after
    require(args.per_class >= 1, f"--per-class must be at least 1, got {args.per_class}")
    require(math.isfinite(args.cfg_scale) and args.cfg_scale >= 1,
            f"--cfg-scale must be a finite number >= 1, got {args.cfg_scale}")
    check_output(args.out, "--out", PRIOR_CHECK)
    image_format(args.out)  # the grid is written in the format its name asks for
    path = embedded_prior(args.dataset, check=False)
    check_prior(args.dataset, path, get_device(), args.cfg_scale, args.per_class, grid=args.out)

if __name__ == "__main__":
    run_cli(main)
