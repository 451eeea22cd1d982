"""
The embedded preset's diffusion prior: a small class-conditional DiT trained on scikit-learn's digits,
so `python distill.py` runs the whole method offline (as nanoGPT's shakespeare_char). The full runs
use the pretrained DiT-XL/2 instead (model.load_prior); this file is only the stand-in.

Training is standard DDPM (Ho et al. 2020, Eq. 14: eps-MSE on x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps)
with 10% label dropout (diffusers' DiT label embedding applies it in train mode: that is what makes
classifier-free guidance work), AdamW with a short warm-up and cosine decay, EMA weights. It is saved
in diffusers format, so it loads through the same `from_pretrained` path as DiT-XL/2.

Run: `python train_prior.py` trains (or loads) the prior, writes a labelled sample grid, and prints how
many of its unguided samples theta* (trained on the real digits) recognises.
"""
import math
import os

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DiTTransformer2DModel
from tqdm import tqdm

from data import classifier_input, get_spec, load_digits_split
from guidance import SamplerConfig, decode_images, sample
from lab.common import (
    ArgumentParser,
    barrier,
    check_writable,
    derive_seed,
    get_device,
    is_main,
    print0,
    remove_path,
    require,
    run_cli,
    save_grid,
    save_torch,
    temporary_path,
)
from lab.locks import cache_entry
from model import DIGITS_PRIOR, DIGITS_SCHEDULE, load_prior
from train_student import reference_model


def train_digits_prior(out_dir, images, labels, steps=4000, batch_size=128, lr=1e-3, ema_decay=0.999, seed=0,
                       save_every=500):
    """Train the small pixel-space DiT on digits (once; cached; resumable) and save it in diffusers format.

    images: (N, 1, 8, 8) in [0, 1]. Standard DDPM eps-MSE training (Ho et al. Eq. 14) with 10% label
    dropout, which diffusers' DiT label embedding applies in train mode: that is what makes CFG work.
    """
    if os.path.isdir(out_dir):  # only ever renamed into place whole: its existence means "trained"
        return
    # the resumable training state lives in a side folder; the finished prior is written to a temporary
    # folder and renamed into place, so a kill at any moment never leaves a half-written cache behind
    # (the caller holds the entry's lock: run_folder.cache_entry)
    partial = out_dir + ".partial"
    os.makedirs(partial, exist_ok=True)
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(**DIGITS_PRIOR)
    ema = DiTTransformer2DModel(**DIGITS_PRIOR).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    scheduler = DDPMScheduler(**DIGITS_SCHEDULE)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    state_path, start = os.path.join(partial, "train_state.pt"), 0
    if os.path.exists(state_path):  # resume an interrupted training
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"]), ema.load_state_dict(state["ema"]), opt.load_state_dict(state["opt"])
        start = state["step"]
        torch.set_rng_state(state["rng"])
    x_all, y_all = images * 2 - 1, torch.as_tensor(labels)  # pixels in [-1, 1] like the VAE latents' images
    model.train()
    for step in tqdm(range(start, steps), desc="digits prior", initial=start, total=steps, mininterval=2):
        idx = torch.randint(0, len(x_all), (batch_size,))
        x0, y = x_all[idx], y_all[idx]
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,))
        noise = torch.randn_like(x0)
        xt = scheduler.add_noise(x0, noise, t)  # sqrt(abar) x0 + sqrt(1 - abar) eps
        eps_hat = model(xt, timestep=t, class_labels=y).sample
        loss = F.mse_loss(eps_hat, noise)
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
    tmp = temporary_path(out_dir)
    try:
        scheduler.save_pretrained(os.path.join(tmp, "scheduler"))
        ema.save_pretrained(os.path.join(tmp, "transformer"))
        os.rename(tmp, out_dir)  # atomic: the cache appears complete or not at all
    except BaseException:
        remove_path(tmp)
        raise
    remove_path(partial)


def digits_prior(cache_dir="out/cache", steps=4000):
    """Path of the cached digits prior, training it on the digits train split on first use (~6 min on 2 CPU cores)."""
    path = os.path.join(cache_dir, "digits_prior")
    # the prior is a cache, not a result: trained once per checkout and shared by every digits run; a second run
    # started meanwhile waits for the first to finish it. Under torchrun rank 0 trains, the others wait.
    if is_main():
        with cache_entry(path, "the digits prior") as missing:
            if missing:
                print0(f"training the digits prior once ({steps} steps, about 6 minutes on 2 CPU cores; cached in "
                       f"{path})")
                train = load_digits_split("train")
                train_digits_prior(path, torch.stack(train.items), train.labels, steps=steps)
    barrier()
    return path


def main(argv=None):
    """Train (or load) the digits prior and check it: the share of its unguided samples that theta* recognises."""
    parser = ArgumentParser(prog="train_prior.py",
                            description="Train/load the digits prior and measure its sample quality.")
    parser.add_argument("--per-class", type=int, default=20, help="samples per class to classify")
    parser.add_argument("--cfg-scale", type=float, default=2.0, help="classifier-free guidance scale (digits preset)")
    parser.add_argument("--out", default="out/digits_prior_check.png", help="where to write the sample grid")
    args = parser.parse_args(argv)
    # checked before the prior trains (minutes when nothing is cached), not after
    require(args.per_class >= 1, f"--per-class must be at least 1, got {args.per_class}")
    require(math.isfinite(args.cfg_scale) and args.cfg_scale >= 1,
            f"--cfg-scale must be a finite number >= 1, got {args.cfg_scale}")
    check_writable(os.path.dirname(os.path.abspath(args.out)))
    device, spec = get_device(), get_spec("digits")
    prior = load_prior(digits_prior(), device=device)
    reference, view = reference_model(spec, "convnet", None, device)
    labels = torch.arange(10).repeat_interleave(args.per_class)
    generators = [torch.Generator().manual_seed(derive_seed(123, int(c), i)) for i, c in enumerate(labels)]
    images = decode_images(prior, sample(prior, labels, generators, SamplerConfig(cfg_scale=args.cfg_scale)))
    with torch.no_grad():
        predicted = reference(classifier_input(images.to(device) * 2 - 1, view)).argmax(dim=1).cpu()
    shown = min(10, args.per_class)
    rows = images.view(10, args.per_class, *images.shape[1:])[:, :shown].reshape(-1, *images.shape[1:])
    save_grid(rows, args.out, [str(c) for c in range(10)], [str(i) for i in range(shown)],
              f"digits prior, unguided, CFG {args.cfg_scale}")
    print(f"theta* recognises {(predicted == labels).float().mean():.1%} of {len(labels)} prior samples "
          f"(CFG {args.cfg_scale}); grid: {args.out}")


if __name__ == "__main__":
    run_cli(main)
