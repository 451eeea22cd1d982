"""
What a guided sampling step costs and where the time goes (guidance.py's sampler), in one process at one size:

  variants     unguided | guided (g through the classifiers, the VAE decoder and the DiT) | igd (IGD's influence, 4
               checkpoints: a double backward): seconds a step, ratio to unguided, images/s, peak memory (CUDA max
               allocated; on a CPU the process's peak RSS, which only grows)
  components   each part of the guided step timed alone with its FLOPs (torch.utils.flop_counter), their sum
               against the measured step (the rest is this code's overhead)
  --student    student training throughput;  --eta  a preflight of an embedded run, then the run it priced:
               ETA / measured (target: within 1.5x either way)

`--size xl`: DiT-XL/2 256 + the SD VAE (random weights: speed does not depend on them) with ConvNet-6 classifiers at
224 px; `--size tiny`: the digits prior. `--channels-last` measures what a run does not do (docs/cost.md).

Run: python bench.py --size tiny
     python bench.py --size xl --device cuda --batch-size 8 --precision bf16 --json out/bench_gpu.json
"""
import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel
from torch.utils.flop_counter import FlopCounterMode

from data import Augment, ImageSet, get_spec, load_real, sample_real_ipc
from ground.common import (
    ArgumentParser,
    UserError,
    get_device,
    load_json,
    require,
    run_cli,
    save_json,
    seconds_per_call,
)
from ground.folder import check_output
from guidance import GuidanceConfig, Learnability, SamplerConfig, cfg_output, guided_output
from igd import Influence
from model import DIGITS_PRIOR, Prior, make_scheduler, make_student, predicted_clean
from reference import reference_view
from train_student import recipe_view, train_student

XL_DIT = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
              sample_size=32, patch_size=2, num_embeds_ada_norm=1000)  # DiT-XL/2 256
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), latent_channels=4, sample_size=256,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              layers_per_block=2, scaling_factor=0.18215)  # sd-vae-ft-mse's architecture


def build(size, device):
    """(prior, spec) with random weights at the requested size."""
    scheduler_config = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").config
    if size == "tiny":
        prior = Prior(DiTTransformer2DModel(**DIGITS_PRIOR).to(device),
                      make_scheduler(scheduler_config, "ddpm", True, False))
        return prior, get_spec("digits")
    prior = Prior(DiTTransformer2DModel(**XL_DIT).to(device), make_scheduler(scheduler_config, "ddpm", False, True),
                  AutoencoderKL(**SD_VAE).to(device))
    return prior, get_spec("imagewoof")


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def timed(fn, device, repeats):
    """Seconds per call (after a warm-up call), and the FLOPs of one call."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return seconds_per_call(fn, device, repeats), counter.get_total_flops()


def step_parts(prior, z, t, labels, classes, sampler, score):
    """The pieces of one guided step as (name, callable, part of the step?) (each callable repeats the work it needs
    before it); in pixel space the VAE parts are the identity and not part of the step."""
    c, alpha_bar = prior.channels, prior.scheduler.alphas_cumprod[t].to(z.device)
    state = {}

    def dit_forward_with_grad():
        state["z"] = z.detach().requires_grad_(True)
        with torch.enable_grad():
            state["eps"] = cfg_output(prior, state["z"], t, labels, sampler)[:, :c]

    def dit_backward():
        torch.autograd.grad(state["eps"], state["z"], torch.ones_like(state["eps"]), retain_graph=True)

    def vae_forward():
        state["z0"] = predicted_clean(z, state["eps"].detach(), alpha_bar).requires_grad_(True)
        with torch.enable_grad():
            state["x"] = prior.decode(state["z0"])

    def vae_backward():
        torch.autograd.grad(state["x"], state["z0"], torch.ones_like(state["x"]), retain_graph=True)

    def classifiers():
        x = state["x"].detach().float().requires_grad_(True)
        with torch.enable_grad():
            torch.autograd.grad(score.parts(x, classes)["S"].sum(), x)

    def scheduler_step():
        out = torch.cat([state["eps"].detach(), torch.zeros_like(state["eps"])], dim=1) if prior.learned_variance \
            else state["eps"].detach()
        prior.scheduler.step(out, t, z)
    latent = prior.vae is not None
    return [("DiT CFG forward, with grad", dit_forward_with_grad, True), ("DiT input-backward", dit_backward, True),
            ("VAE decoder forward", vae_forward, latent), ("VAE decoder backward", vae_backward, latent),
            ("classifiers forward+backward", classifiers, True), ("scheduler step", scheduler_step, True)]


def bench_sampler(args, device, batch):
    torch.manual_seed(0)
    prior, spec = build(args.size, device)
    prior.bf16 = args.precision == "bf16" and device.type == "cuda"
    spec.image_size = prior.image_size
    view, ref_view = recipe_view(spec, "minimax"), reference_view(spec)
    student, reference = make_student("convnet", view).to(device), make_student("convnet", ref_view).to(device)
    if args.channels_last:  # NHWC decoder and classifiers
        for module in (prior.vae, student, reference):
            if module is not None:
                module.to(memory_format=torch.channels_last)
    score = Learnability(student, view, reference, ref_view, 0.5)
    influence_nets = [make_student("convnet", ref_view).to(device) for _ in range(4)]
    size = sum(p.numel() for p in influence_nets[0].parameters())
    targets = {}
    influence = Influence(influence_nets, ref_view,
                          lambda j, c: targets.setdefault((j, c), torch.randn(size, device=device)))
    prior.scheduler.set_timesteps(50)
    t = prior.scheduler.timesteps[25]  # mid-window: the cost per step does not depend on t
    z = torch.randn(batch, prior.channels, prior.latent_size, prior.latent_size, device=device)
    labels = torch.tensor([spec.prior_labels[i % spec.num_classes] for i in range(batch)], device=device)
    classes = torch.arange(batch, device=device) % spec.num_classes
    sampler = SamplerConfig(cfg_scale=4.0)

    def step(guide, s):  # one sampler step: the guided output, then the scheduler step
        out = cfg_output(prior, z, t, labels, sampler) if guide is None else guided_output(
            prior, z, t, labels, classes, sampler, s, guide)[0]
        prior.scheduler.step(out, t, z)
    variants = {"unguided": (None, score), "guided": (GuidanceConfig(), score),
                "igd": (GuidanceConfig(scale=5.0, candidates=1), influence)}
    rows = []
    for name, (guide, s) in variants.items():
        if device.type == "cuda":  # per-variant peak on GPU; on CPU the RSS peak only grows (see docstring)
            torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():  # important! the sampler runs under no_grad; guidance re-enables it locally
            seconds, flops = timed(lambda: step(guide, s), device, args.repeats)
        rows.append(dict(variant=name, step_s=seconds, gflops=flops / 1e9, images_per_s=batch / seconds,
                         peak_mb=peak_memory_mb(device)))
    for row in rows:
        row["ratio"] = row["step_s"] / rows[0]["step_s"]
    components, parts_sum = [], 0.0
    with torch.no_grad():
        components.append(dict(part="DiT CFG forward (no grad)", **dict(zip(("s", "flops"), timed(
            lambda: cfg_output(prior, z, t, labels, sampler), device, args.repeats)))))
        for name, fn, exact_part in step_parts(prior, z, t, labels, classes, sampler, score):
            components.append(dict(part=name, **dict(zip(("s", "flops"), timed(fn, device, args.repeats)))))
            parts_sum += components[-1]["s"] if exact_part else 0.0
    guided = next(r for r in rows if r["variant"] == "guided")
    return dict(batch=batch, rows=rows, components=components, exact_parts_sum_s=parts_sum,
                guided_over_parts=guided["step_s"] / parts_sum)


def bench_students(device):
    """Student training throughput: the in-memory uint8 set augmented on the training device."""
    out = {}
    digits = get_spec("digits")
    data = sample_real_ipc(load_real(digits, None, "train"), 50, 0)
    start = time.perf_counter()
    train_student(make_student("convnet", digits, seed=0), data, digits, "minimax", 20, device=device)
    out["digits IPC 50 (500 images, 8 px, ConvNet), img/s"] = 500 * 20 / (time.perf_counter() - start)
    woof = recipe_view(get_spec("imagewoof"), "minimax")
    g = torch.Generator().manual_seed(0)
    images = ImageSet([torch.rand(3, 256, 256, generator=g) for _ in range(100)], [i % 10 for i in range(100)])
    start = time.perf_counter()
    train_student(make_student("convnet", woof, seed=0), images, woof, "minimax", 2, device=device)
    out["224 px (100 images of 256 px, ConvNet-6), img/s"] = 100 * 2 / (time.perf_counter() - start)
    x = (torch.rand(64, 3, 224, 224, generator=g) * 255).to(torch.uint8).to(device)
    augment, start = Augment(woof, "minimax", torch.Generator().manual_seed(0)), time.perf_counter()
    for _ in range(4):
        augment(x)
    out["augmentation alone (Minimax, 224 px), img/s"] = 4 * 64 / (time.perf_counter() - start)
    return out


def bench_eta(device, extra=()):
    """ETA of a digits preflight against the wall time of the run it priced (both as a user runs them)."""
    os.makedirs("out", exist_ok=True)
    folder = tempfile.mkdtemp(prefix="bench_eta_", dir="out")
    command = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "distill.py"), "--out-dir",
               folder, "--device", str(device), *extra]
    for step in (["--preflight"], []):
        start = time.perf_counter()
        done = subprocess.run(command + step, capture_output=True, text=True)
        if done.returncode:
            raise UserError(f"{' '.join(command + step)} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
        seconds = time.perf_counter() - start
        if step:
            preflight_s = seconds
    priced = load_json(os.path.join(folder, "preflight.json"))
    return dict(folder=folder, command=" ".join(command[1:]), preflight_wall_s=preflight_s, eta_s=priced["eta_s"],
                eta_stages_s=priced["eta_stages_s"], eta_other_s=priced["eta_other_s"], run_wall_s=seconds,
                eta_over_measured=priced["eta_s"] / seconds)


def main(argv=None):
    p = ArgumentParser(prog="bench.py", description="Where a learnability-guided sampling step's time goes.")
    p.add_argument("--size", default="tiny", choices=["tiny", "xl"], help="digits prior or DiT-XL/2 256 + SD VAE")
    p.add_argument("--batch-size", type=int, nargs="+", default=None, help="images per step (tiny 128, xl 1 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (default: tiny 10, xl 2)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16 autocast (CUDA)")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=None,
                   help="TF32 matrix multiplies in fp32 (default: on with CUDA, as distill.py)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                   help="NHWC decoder and classifiers (a run does not use it)")
    p.add_argument("--student", action="store_true", help="time student training instead of sampling steps")
    p.add_argument("--eta", action="store_true", help="a preflight, then the run it priced: ETA / measured")
    p.add_argument("--dataset", default="digits", choices=["digits", "mnist"], help="--eta: the embedded run priced")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--json", default=None, help="also write everything as JSON here")
    args = p.parse_args(argv)
    require(args.batch_size is None or min(args.batch_size) >= 1, f"--batch-size must be at least 1, got "
            f"{args.batch_size}")
    require(args.repeats is None or args.repeats >= 1, f"--repeats must be at least 1, got {args.repeats}")
    if args.json:
        check_output(args.json, "--json", "bench.py")
    device = get_device(args.device)
    if args.precision == "bf16" and device.type != "cuda":  # as distill.py: bf16 is CUDA autocast
        raise UserError(f"--precision bf16 is CUDA autocast; this bench is on {device.type} (use --precision fp32)")
    args.tf32 = device.type == "cuda" if args.tf32 is None else args.tf32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    if args.eta:
        result = dict(device=str(device), threads=torch.get_num_threads(),
                      eta=bench_eta(device, ["--dataset", args.dataset]))
        e = result["eta"]
        print(f"preflight {e['preflight_wall_s']:.1f} s; ETA {e['eta_s']:.1f} s (stages "
              f"{' + '.join(f'{s:.1f}' for s in e['eta_stages_s'])}, other {e['eta_other_s']}); run measured "
              f"{e['run_wall_s']:.1f} s -> ETA / measured = {e['eta_over_measured']:.2f} (target 0.67 .. 1.5)")
    elif args.student:
        result = dict(device=str(device), threads=torch.get_num_threads(), student=bench_students(device))
        for name, value in result["student"].items():
            print(f"{name:<55} {value:10.1f}")
    else:
        args.batch_size = args.batch_size if args.batch_size is not None else ([128] if args.size == "tiny" else [1, 2])
        args.repeats = args.repeats if args.repeats is not None else (10 if args.size == "tiny" else 2)
        result = dict(vars(args), device=str(device), threads=torch.get_num_threads(), runs=[])
        for batch in args.batch_size:
            run = bench_sampler(args, device, batch)
            result["runs"].append(run)
            print(f"\nbench: size {args.size}, batch {batch}, {device}, {args.precision}, tf32 {args.tf32}, "
                  f"channels_last {args.channels_last}, {args.repeats} repeats")
            print(f"{'variant':<16} {'step s':>9} {'x unguided':>11} {'GFLOP':>9} {'img/s':>8} {'peak MB':>9}")
            for row in run["rows"]:
                print(f"{row['variant']:<16} {row['step_s']:9.4f} {row['ratio']:11.2f} {row['gflops']:9.1f} "
                      f"{row['images_per_s']:8.2f} {row['peak_mb']:9.0f}")
            print(f"{'component':<32} {'s':>9} {'GFLOP':>9}")
            for c in run["components"]:
                print(f"{c['part']:<32} {c['s']:9.4f} {c['flops'] / 1e9:9.1f}")
            print(f"exact guided step {run['rows'][1]['step_s']:.4f} s = {run['guided_over_parts']:.2f} x the sum of "
                  f"its parts ({run['exact_parts_sum_s']:.4f} s)")
    if args.json:
        save_json(result, args.json, stamp="bench.py")
    return result


if __name__ == "__main__":
    run_cli(main)
