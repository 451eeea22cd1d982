"""
Benchmark of one sampling step (METHOD.md section 5): what learnability guidance costs.

Times, at one model size and batch, in one process:
  (a) unguided   the CFG step of the plain DiT sampler (no gradient anywhere)
  (b) guided     Eq. eps~ with g = grad_{z_t} S through the classifiers, the VAE decoder and the DiT
  (c) guided-z0  the same with eps held fixed (g from z0_hat only: no backward through the DiT)
  (d) naive      (b) written the obvious way: a no-grad CFG pass for the step plus a second CFG pass
                 with gradient for g, i.e. what guided_model_output avoids by reusing one pass
and prints step time, ratio to (a), images/s and peak memory (CUDA max allocated, or the process's
peak RSS on CPU, which only grows: read it as "at most").

Sizes: `--size xl` = DiT-XL/2 256 px + SD VAE (random weights: speed does not depend on them) with
ConvNet-6 classifiers at 224 px; `--size tiny` = the digits prior's architecture (8 px, pixel space).

Run: `python bench.py --size tiny`, `python bench.py --size xl --batch-size 8 --json out/bench_xl.json`
"""
import argparse
import json
import os
import resource
import time

import torch

from common import get_device
from data import get_spec
from guidance import GuidanceConfig, Learnability, SamplerConfig, cfg_output, guided_output
from model import DIGITS_PRIOR, Prior, make_scheduler, make_student


def build(size, device, dtype):
    """(prior, spec) with random weights at the requested size."""
    from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel
    scheduler_config = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").config
    if size == "tiny":
        transformer = DiTTransformer2DModel(**DIGITS_PRIOR)
        prior = Prior(transformer.to(device), make_scheduler(scheduler_config, "ddpm", True, False))
        return prior, get_spec("digits")
    transformer = DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                        num_layers=28, sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4, sample_size=256,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, scaling_factor=0.18215)
    prior = Prior(transformer.to(device), make_scheduler(scheduler_config, "ddpm", False, True),
                  vae.to(device))
    return prior, get_spec("imagewoof")


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def naive_guided(prior, z, t, labels, classes, sampler, score, guide):
    """(d): the 'before' version: a separate no-grad CFG pass for the step, another with grad for g."""
    with torch.no_grad():
        out = cfg_output(prior, z, t, labels, sampler)
    guided_output(prior, z, t, labels, classes, sampler, score, guide)  # through the DiT
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="Time unguided vs learnability-guided sampling steps.")
    p.add_argument("--size", default="tiny", choices=["tiny", "xl"], help="digits prior or DiT-XL/2 256")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default: tiny 128, xl 8)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (default: tiny 10, xl 2)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16 autocast on CUDA")
    p.add_argument("--grad-checkpoint", action=argparse.BooleanOptionalAction, default=False,
                   help="gradient checkpointing in DiT/VAE during the guided step")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--json", default=None, help="also write the table as JSON here")
    args = p.parse_args(argv)
    device = get_device(args.device)
    batch = args.batch_size or (128 if args.size == "tiny" else 8)
    repeats = args.repeats or (10 if args.size == "tiny" else 2)
    torch.manual_seed(0)
    prior, spec = build(args.size, device, torch.float32)
    prior.autocast = args.precision == "bf16" and device.type == "cuda"
    if args.grad_checkpoint:
        prior.enable_gradient_checkpointing()
    student, reference = make_student("convnet", spec).to(device), make_student("convnet", spec).to(device)
    score = Learnability(student, spec, reference, spec, 0.5)
    sampler = SamplerConfig(cfg_scale=4.0)
    prior.scheduler.set_timesteps(50)
    t = prior.scheduler.timesteps[25]  # mid-window: cost per step does not depend on t
    z = torch.randn(batch, prior.channels, prior.latent_size, prior.latent_size, device=device)
    labels = torch.tensor([spec.prior_labels[i % spec.num_classes] for i in range(batch)], device=device)
    classes = torch.arange(batch, device=device) % spec.num_classes
    guide = GuidanceConfig()
    guide_z0 = GuidanceConfig(through_dit=False)

    variants = {
        "unguided": lambda: cfg_output(prior, z, t, labels, sampler),
        "guided": lambda: guided_output(prior, z, t, labels, classes, sampler, score, guide)[0],
        "guided-z0": lambda: guided_output(prior, z, t, labels, classes, sampler, score, guide_z0)[0],
        "naive": lambda: naive_guided(prior, z, t, labels, classes, sampler, score, guide),
    }
    rows = []
    for name, fn in variants.items():
        if device.type == "cuda":  # per-variant peak on GPU; on CPU the RSS peak only grows (see docstring)
            torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():  # important! the sampler runs under no_grad; guidance re-enables it locally
            fn()  # warm-up: first-call allocations and kernel selection are not the step's cost
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            for _ in range(repeats):
                out = fn()
                prior.scheduler.step(out, t, z)  # the step itself is part of the cost
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        seconds = (time.perf_counter() - start) / repeats
        rows.append(dict(variant=name, step_s=seconds, images_per_s=batch / seconds, peak_mb=peak_memory_mb(device)))
    base = rows[0]["step_s"]
    for row in rows:
        row["ratio"] = row["step_s"] / base
    print(f"bench: size {args.size}, batch {batch}, device {device}, {args.precision}, "
          f"grad checkpointing {'on' if args.grad_checkpoint else 'off'}, {repeats} repeats")
    print(f"{'variant':<10} {'step s':>9} {'x unguided':>11} {'img/s':>9} {'peak MB':>9}")
    for row in rows:
        print(f"{row['variant']:<10} {row['step_s']:9.4f} {row['ratio']:11.2f} {row['images_per_s']:9.2f} "
              f"{row['peak_mb']:9.0f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(vars(args), batch=batch, device=str(device), rows=rows), f, indent=2)
    return rows


if __name__ == "__main__":
    main()
