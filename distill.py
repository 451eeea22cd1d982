"""
Distil a dataset with a class-conditional diffusion prior: LGD (the stage loop of curriculum.py with
the learnability-guided sampler of guidance.py), or a baseline sampler of the paper's tables.

  --method lgd   the paper's method: a seed increment, then per stage a fresh student and a
                 learnability-guided increment; the union of the increments is the set.
  --method dit   plain class-conditional DiT sampling with CFG: the "DiT" row of every table.
  --method igd   influence-guided sampling (IGD, Chen et al., ICLR 2025), the paper's seed increment and
                 main baseline; `--method lgd --seed-set igd` is the paper's pipeline (T_1 from IGD).

Every method writes DIR/distilled/<class>/<index>.png (an ImageFolder any evaluator reads),
DIR/args.json (with the git commit), DIR/grid.png, and with --eval DIR/eval.json (evaluate.py).

Defaults reproduce the paper per dataset (PRESETS below, built on the paper's constants in
guidance.GuidanceConfig); `python distill.py` with no arguments is the embedded CPU run: digits, LGD,
IPC 10 in 5 stages of 2, a small pixel-space DiT prior trained once and cached under out/cache, then
evaluated.

Run:
  python distill.py                                          # digits, LGD, a few minutes on a CPU
  python distill.py --dataset imagewoof --ipc 100 --eval     # downloads DiT-XL/2 and ImageWoof
  python distill.py --dataset imagewoof --dry-run --json     # the resolved configuration, as JSON
  torchrun --nproc_per_node=8 distill.py --dataset imagenet --data-dir /data/imagenet --ipc 50
"""
import argparse
import json
import math
import os
import re
import shlex
import sys
import time
from dataclasses import asdict, fields

import torch

from common import ArgumentParser, UserError, all_gather, all_reduce_sum, barrier, get_device, is_main, print0, \
    require, run_cli, setup_distributed
from curriculum import Plan, Ranks, Students, generate_increment, influence_score, run_stages, save_set_grid, \
    seed_set_files, uses_igd
from data import class_table, get_spec, resolve_data_dir
from evaluate import evaluate_folder
from guidance import GuidanceConfig, SamplerConfig, igd_guidance
from model import ARCHS, DEFAULT_PRIOR, DIGITS_SCHEDULE, load_prior
from preflight import DAY, duration, eta_line, load_passing, load_preflight, report, run_preflight
from run_folder import (changed_settings, check_classes, check_run_folder, claim_run_folder, default_run_dir,
                        distilled_dir, eval_path, grid_path, preflight_path, record_args, run_latents, stage_summary,
                        update_args, write_classes)
from train_prior import digits_prior
from train_student import (IGD_ARCH, RECIPES, recipe_spec, reference_model, reference_models, reference_spec,
                           soft_label_teacher, surrogate_cached, surrogate_epochs)

PAPER = asdict(GuidanceConfig())  # the paper's constants: one home (guidance.GuidanceConfig)

# Per-dataset defaults; a flag given on the command line always wins, and anything not set here is
# the paper's constant above.
PRESETS = {
    # the embedded CPU preset. NOTE(deviation): 8x8 pixel space, not 32x32x4 latents: the guidance
    # constants are re-tuned by the sweep in the README (rho_t normalises g, but 64 pixel values vs
    # 4096 latent values change how far a step of a given size moves the sample).
    "digits": dict(ipc=10, stage_ipc=2, arch="convnet", recipe="minimax", cfg_scale=2.0, batch_size=128, eval=True,
                   scale=125.0, deviation=1.0, igd_scale=500.0, igd_deviation=5.0, grad_ipc=100),
    # ImageNette / ImageWoof: the paper's pipeline, T_1 = IGD's 10-IPC increment
    "imagenette": dict(ipc=100, stage_ipc=10, arch="convnet", recipe="minimax", cfg_scale=4.0, batch_size=24,
                       seed_set="igd"),
    "imagewoof": dict(ipc=100, stage_ipc=10, arch="convnet", recipe="minimax", cfg_scale=4.0, batch_size=24,
                      seed_set="igd"),
    # ImageNet-1K: ResNet-18 students on soft labels (RDED protocol); theta* = torchvision's pretrained one.
    # [choice] seed: unguided DiT, because IGD's seed needs its own ConvNet-6 surrogate trained on all of
    # ImageNet-1K for 50 epochs (GPU-days); `--seed-set igd` runs the paper's pipeline at that cost.
    "imagenet": dict(ipc=50, stage_ipc=10, arch="resnet18_bn", recipe="rded", cfg_scale=4.0, batch_size=24,
                     igd_deviation=120.0, seed_set="dit"),
}
_IGD = igd_guidance()  # IGD's own constants: one home, guidance.igd_guidance
IGD = dict(igd_scale=_IGD.scale, igd_from=_IGD.guide_from, igd_until=_IGD.guide_until, grad_ipc=200)

# settings that change the images: a rerun into the same folder must use the same ones (the data tree,
# the precision, the sampler batch (float rounding) and the number of ranks a DDP student trains on
# included). {argparse dest: the flag a user recognises}
RESULT_ARGS = {"dataset": "--dataset", "method": "--method", "ipc": "--ipc", "stage_ipc": "--stage-ipc",
               "seed": "--seed", "prior": "--prior", "vae": "--vae", "sampler": "--sampler", "steps": "--steps",
               "cfg_scale": "--cfg-scale", "three_channels": "--cfg-three-channels", "arch": "--arch",
               "recipe": "--recipe", "student_epochs": "--student-epochs", "scale": "--guidance-scale",
               "omega": "--omega", "c0": "--c0", "deviation": "--deviation-scale", "candidates": "--candidates",
               "guide_from": "--guide-from", "guide_until": "--guide-until", "form": "--guidance-form",
               "through_dit": "--grad-through-dit", "memory_cap": "--memory-cap", "seed_set": "--seed-set",
               "res": "--res", "data_dir": "--data-dir", "precision": "--precision", "batch_size": "--batch-size",
               "student_ddp": "--student-ddp", "student_world": "ranks of a DDP student", "reference": "--reference",
               "reference_epochs": "--reference-epochs", "igd_scale": "--igd-scale", "igd_deviation": "--igd-deviation",
               "igd_from": "--igd-from", "igd_until": "--igd-until", "grad_ipc": "--grad-ipc",
               "igd_checkpoints": "--igd-checkpoints", "igd_threshold": "--igd-threshold",
               "grad_decoder": "--grad-decoder", "views": "--guidance-views", "reference_archs": "--reference-archs",
               "student_archs": "--student-archs"}


def get_parser():
    p = ArgumentParser(description="Distil a dataset with learnability-guided diffusion (LGD).")
    p.add_argument("--dataset", default="digits", help="digits | imagenette | imagewoof | imagenet")
    p.add_argument("--method", default="lgd", choices=["lgd", "dit", "igd"],
                   help="LGD stage loop, unguided DiT, or influence-guided IGD")
    p.add_argument("--ipc", type=int, default=None, help="images per class in total (preset: 10 digits, 100, 50 IN-1K)")
    p.add_argument("--stage-ipc", type=int, default=None, help="images per class per increment (paper 10, digits 2)")
    p.add_argument("--out-dir", default=None, help="output folder (default out/<dataset>_<method>_ipc<N>_seed<S>)")
    p.add_argument("--seed", type=int, default=0, help="run seed (noise of image i of class c derives from it)")
    p.add_argument("--data-dir", default=None, help="ImageFolder root with train/<wnid>/ and val/<wnid>/")
    p.add_argument("--res", type=int, default=None, help="classifier resolution (default: the dataset's, 224)")
    # the prior and its sampler
    p.add_argument("--prior", default=None, help=f"hub id or local diffusers dir (default {DEFAULT_PRIOR}; digits: cached)")
    p.add_argument("--vae", default="auto", help="'auto', 'none' (pixel space), or a hub id / dir of an AutoencoderKL")
    p.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"], help="ancestral DDPM (field default) or DDIM")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (respaced)")
    p.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale (4.0 field default)")
    p.add_argument("--cfg-three-channels", dest="three_channels", action=argparse.BooleanOptionalAction, default=False,
                   help="reproduce DiT/IGD's CFG on 3 of 4 latent channels (a known quirk; off = all channels)")
    p.add_argument("--batch-size", type=int, default=None, help="samples per sampler batch (candidates included); "
                   "halved automatically on out-of-memory")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16 autocast for DiT/VAE (CUDA)")
    p.add_argument("--grad-checkpoint", action=argparse.BooleanOptionalAction, default=False,
                   help="gradient checkpointing in DiT/VAE for the guided step (less memory, more compute)")
    p.add_argument("--grad-decoder", default="vae", help="decoder of the guidance gradient only: 'vae' (exact), "
                   "'taesd' (madebyollin/taesd, ~10x cheaper; an approximation the paper does not make) or a dir")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the DiT and the decoders (first-order gradients only, as LGD needs)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC decoders and classifiers (default: on with CUDA)")
    # learnability guidance (the paper's score and guided sampler); defaults: guidance.GuidanceConfig, then the preset
    p.add_argument("--guidance-scale", dest="scale", type=float, default=None,
                   help=f"lambda: learnability guidance scale (paper {PAPER['scale']:g})")
    p.add_argument("--omega", "--lambda-ref", dest="omega", type=float, default=None,
                   help=f"omega: weight of the reference CE in S (paper {PAPER['omega']:g})")
    p.add_argument("--c0", type=float, default=None, help=f"constant inside rho_t (IGD's {PAPER['c0']:g})")
    p.add_argument("--deviation-scale", dest="deviation", type=float, default=None,
                   help=f"gamma: deviation guidance away from memory M_c (paper {PAPER['deviation']:g})")
    p.add_argument("--candidates", type=int, default=None,
                   help=f"kappa: guided candidates per image, best S kept (paper {PAPER['candidates']})")
    p.add_argument("--guide-from", type=int, default=None,
                   help=f"window start, respaced index counting down (paper {PAPER['guide_from']})")
    p.add_argument("--guide-until", type=int, default=None, help=f"window end (paper {PAPER['guide_until']} of 50)")
    p.add_argument("--guidance-form", dest="form", default=None, choices=["z", "eps"],
                   help="z: lambda rho_t g added to z_{t-1} after the step (IGD's code, where the constants come "
                        "from; default); eps: the paper's printed eps~")
    p.add_argument("--grad-through-dit", dest="through_dit", action=argparse.BooleanOptionalAction, default=None,
                   help="g through the DiT (IGD) or from z0_hat with eps held fixed (cheaper)")
    p.add_argument("--memory-cap", type=int, default=None, help=f"|M_c|: latents kept per class ({PAPER['memory_cap']})")
    p.add_argument("--guidance-views", dest="views", type=int, default=None,
                   help="K: S averaged over K random views of x0_hat from each classifier's training augmentation "
                        "(1 = the image, the paper's S; not the paper's when > 1)")
    p.add_argument("--student-archs", default=None,
                   help="per-stage students as an ensemble, e.g. convnet,mlp: the student term of S is the mean of "
                        "their CEs (default: --arch alone, the paper's)")
    p.add_argument("--reference-archs", default=None,
                   help="theta* as an ensemble, e.g. convnet,mlp: the reference term is the mean of their CEs "
                        "(default: --arch alone, the paper's)")
    p.add_argument("--seed-set", default=None, help="stage 0: 'dit' (unguided samples), 'igd' (IGD's samples, the "
                   "paper's pipeline; the ImageNette/ImageWoof default) or a folder <class>/*.png")
    # IGD (--method igd, --seed-set igd): its own constants on the same knobs
    p.add_argument("--igd-scale", type=float, default=None, help=f"IGD's guidance scale k ({IGD['igd_scale']:g})")
    p.add_argument("--igd-deviation", type=float, default=None,
                   help="IGD's gamma (IGD Table 7: 50 at IPC 10, 120 at IPC 50/100 and on ImageNet-1K)")
    p.add_argument("--igd-from", type=int, default=None, help=f"IGD's window start ({IGD['igd_from']})")
    p.add_argument("--igd-until", type=int, default=None, help=f"IGD's window end ({IGD['igd_until']})")
    p.add_argument("--grad-ipc", type=int, default=None, help=f"real images per class in IGD's target gradients "
                   f"({IGD['grad_ipc']})")
    p.add_argument("--igd-checkpoints", default="auto", help="'auto' (IGD's adaptive rule) or surrogate snapshots, "
                   "e.g. 0,5,16,40 (IGD's ImageWoof list)")
    p.add_argument("--igd-threshold", type=float, default=0.7, help="IGD's rule: keep a snapshot when the cosine of "
                   "its class gradients to the last kept one falls below this")
    p.add_argument("--log-twins", dest="twins", action=argparse.BooleanOptionalAction, default=True,
                   help="log S of each kept image's unguided twin (same noise) in stage_<k>/log.json")
    # students (per-stage theta_k, reference theta*, evaluation)
    p.add_argument("--arch", default=None, choices=ARCHS, help="per-stage student and reference model architecture")
    p.add_argument("--recipe", default=None, choices=list(RECIPES), help="student training recipe")
    p.add_argument("--student-epochs", type=int, default=None, help="per-stage student epochs (default: by IPC)")
    p.add_argument("--student-ddp", action=argparse.BooleanOptionalAction, default=True,
                   help="under torchrun, train the per-stage student with DDP (off: every rank trains it alone)")
    p.add_argument("--reference", default=None, help="a state dict of theta* for --arch (e.g. IGD's surrogate) "
                   "instead of training it")
    p.add_argument("--reference-epochs", type=int, default=None, help="theta* training epochs (IGD: 50; digits 30)")
    p.add_argument("--eval", action=argparse.BooleanOptionalAction, default=None,
                   help="evaluate the distilled set afterwards (evaluate.py; default on for digits)")
    p.add_argument("--eval-arch", default=None, choices=ARCHS, help="evaluation architecture (default --arch)")
    p.add_argument("--eval-runs", type=int, default=3, help="seeded students in the evaluation")
    p.add_argument("--eval-epochs", type=int, default=None, help="evaluation epochs (default: by IPC)")
    p.add_argument("--num-workers", type=int, default=None, help="DataLoader workers decoding real images "
                   "(default: 8 with CUDA, else 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--preflight", action=argparse.BooleanOptionalAction, default=None,
                   help="check the run on these weights and data and price it (preflight.py), then stop; "
                        "default: every non-digits run does it first (reused once passed); --no-preflight skips it")
    p.add_argument("--preflight-classes", type=int, default=None,
                   help="classes the preflight samples (default: all, at most 20)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (stages, images, sampler steps) and exit")
    p.add_argument("--json", action="store_true", help="with --dry-run: the fully resolved configuration as JSON")
    return p


def _finite(name, value, low, inclusive=True):
    """A float flag must be a finite number in range (NaN passes every comparison but this one)."""
    ok = math.isfinite(value) and (value >= low if inclusive else value > low)
    require(ok, f"--{name} must be a finite number {'>=' if inclusive else '>'} {low:g}, got {value}")


def resolve_args(args):
    """Fill unset flags from the dataset preset and the paper's constants; check everything before any write."""
    if args.dataset not in PRESETS:
        raise UserError(f"unknown dataset '{args.dataset}' (choose from {', '.join(PRESETS)})")
    for key, value in {**PAPER, **IGD, "eval": False, "seed_set": "dit", **PRESETS[args.dataset]}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.igd_deviation is None:  # IGD Table 7: gamma 50 for a 10-IPC set, 120 for 50/100
        igd_ipc = args.ipc if args.method == "igd" else args.stage_ipc
        args.igd_deviation = 50.0 if igd_ipc <= 10 else 120.0
    if args.method != "lgd":  # no stages; stage_ipc only says how evaluate.py --redundancy cuts the set
        args.stage_ipc = min(args.stage_ipc, args.ipc) if args.ipc > 0 else args.stage_ipc
    require(args.ipc > 0, f"--ipc must be positive, got {args.ipc}")
    require(args.stage_ipc > 0, f"--stage-ipc must be positive, got {args.stage_ipc}")
    require(args.method == "dit" or args.ipc % args.stage_ipc == 0,
           f"--ipc {args.ipc} is not a multiple of --stage-ipc {args.stage_ipc}")
    require(args.steps > 0, f"--steps must be positive, got {args.steps}")
    require(args.prior is not None or args.steps <= DIGITS_SCHEDULE["num_train_timesteps"],
           f"--steps {args.steps} is outside 1..{DIGITS_SCHEDULE['num_train_timesteps']} (the prior's schedule)")
    require(args.batch_size > 0, f"--batch-size must be positive, got {args.batch_size}")
    require(args.candidates >= 1, f"--candidates must be at least 1, got {args.candidates}")
    require(args.guide_from >= 0, f"--guide-from must be >= 0, got {args.guide_from}")
    require(args.guide_from <= args.guide_until, "--guide-from must not exceed --guide-until")
    require(args.memory_cap >= 1, f"--memory-cap must be at least 1, got {args.memory_cap}")
    require(args.views >= 1, f"--guidance-views must be at least 1, got {args.views}")
    args.reference_archs = args.reference_archs or args.arch  # theta*'s architecture(s), the first one theta*
    args.student_archs = args.student_archs or args.arch  # the per-stage students', the first one theta_k
    for flag, value in (("--reference-archs", args.reference_archs), ("--student-archs", args.student_archs)):
        require(all(a in ARCHS for a in value.split(",")), f"{flag} must be architectures from {', '.join(ARCHS)}, "
                f"got {value}")
    require(args.reference is None or "," not in args.reference_archs,
            "--reference gives one theta*; it cannot be combined with --reference-archs")
    require(args.seed >= 0, f"--seed must be >= 0, got {args.seed}")
    require(args.res is None or args.res >= 8, f"--res must be at least 8, got {args.res}")
    require(args.student_epochs is None or args.student_epochs >= 1,
           f"--student-epochs must be at least 1, got {args.student_epochs}")
    require(args.reference_epochs is None or args.reference_epochs >= 1,
           f"--reference-epochs must be at least 1, got {args.reference_epochs}")
    require(args.eval_epochs is None or args.eval_epochs >= 1, f"--eval-epochs must be at least 1, got {args.eval_epochs}")
    require(args.eval_runs >= 1, f"--eval-runs must be at least 1, got {args.eval_runs}")
    require(args.num_workers is None or args.num_workers >= 0, f"--num-workers must be >= 0, got {args.num_workers}")
    require(args.preflight_classes is None or args.preflight_classes >= 2,
            f"--preflight-classes must be at least 2, got {args.preflight_classes}")
    _finite("cfg-scale", args.cfg_scale, 1.0)  # 1 = the conditional model alone; below 1 leans unconditional
    _finite("guidance-scale", args.scale, 0.0)
    _finite("omega", args.omega, 0.0)
    _finite("deviation-scale", args.deviation, 0.0)
    _finite("c0", args.c0, 0.0, inclusive=False)
    _finite("igd-scale", args.igd_scale, 0.0)
    _finite("igd-deviation", args.igd_deviation, 0.0)
    _finite("igd-threshold", args.igd_threshold, -1.0)
    require(0 <= args.igd_from <= args.igd_until, "--igd-from must be >= 0 and not exceed --igd-until")
    require(args.grad_ipc >= 1, f"--grad-ipc must be at least 1, got {args.grad_ipc}")
    require(args.igd_checkpoints == "auto" or all(re.fullmatch(r"[0-9]+", p.strip()) for p in
                                                  args.igd_checkpoints.split(",")),
            f"--igd-checkpoints must be 'auto' or indices like 0,5,16,40, got {args.igd_checkpoints}")
    if args.igd_checkpoints != "auto":  # the surrogate's trajectory: the init and one snapshot per epoch
        last = surrogate_epochs(args.dataset, args.reference_epochs)
        require(max(int(p) for p in args.igd_checkpoints.split(",")) <= last,
                f"--igd-checkpoints {args.igd_checkpoints}: the surrogate's trajectory has snapshots 0..{last} "
                f"(--reference-epochs {last})")
    require(args.seed_set in ("dit", "igd") or os.path.isdir(args.seed_set),
           f"--seed-set {args.seed_set} is not a folder (or 'dit', 'igd')")
    require(args.reference is None or os.path.isfile(args.reference), f"--reference {args.reference} is not a file")
    if args.prior is None and args.dataset != "digits":
        args.prior = DEFAULT_PRIOR
    # a guided sampler whose window holds no sampling step would run "LGD" (or IGD) without one guided step
    windows = []
    if args.method == "lgd" and args.ipc > args.stage_ipc:
        windows.append(("--guide-from", "--guide-until", guidance_config(args)))
    if uses_igd(args.method, args.seed_set):
        windows.append(("--igd-from", "--igd-until", igd_config(args)))
    for start, end, guide in windows:
        require(guide.guided_steps(args.steps) > 0,
                f"the guidance window {start} {guide.guide_from} .. {end} {guide.guide_until} holds none of the "
                f"{args.steps} sampling steps (respaced indices {args.steps - 1} .. 0): nothing would be guided; use "
                f"more --steps or a window inside 0 .. {args.steps - 1}")
    # paths are stored resolved, so evaluate.py finds them from any working directory
    for key in ("data_dir", "prior", "seed_set", "reference"):
        value = getattr(args, key)
        if value is not None and value not in ("dit", "igd") and os.path.exists(value):
            setattr(args, key, os.path.abspath(value))
    args.eval_arch = args.eval_arch or args.arch
    args.out_dir = args.out_dir or default_run_dir(args.dataset, args.method, args.ipc, args.seed)
    return args


def guidance_config(args):
    return GuidanceConfig(**{f.name: getattr(args, f.name) for f in fields(GuidanceConfig)})


def igd_config(args):
    return igd_guidance(deviation=args.igd_deviation, scale=args.igd_scale, guide_from=args.igd_from,
                        guide_until=args.igd_until, c0=args.c0, through_dit=args.through_dit, memory_cap=args.memory_cap)


def sampler_config(args):
    return SamplerConfig(**{f.name: getattr(args, f.name) for f in fields(SamplerConfig)})


def resolved_config(args, spec):
    """--dry-run --json: every setting after presets, plus what they imply (views, transforms, schedule)."""
    student = recipe_spec(spec, args.recipe)
    reference = reference_spec(spec)
    r = RECIPES[args.recipe]
    guide = guidance_config(args)
    view = lambda s: dict(res=s.res, test=f"Resize({round(s.res / s.crop_ratio)}) + CenterCrop({s.res})",  # noqa: E731
                          mean=list(s.mean), std=list(s.std))
    return dict(
        {k: v for k, v in vars(args).items() if k not in ("dry_run", "json")},
        student_view=view(student), reference_view=view(reference),
        student_train_transform=("pad 1 + random 8x8 crop" if spec.name == "digits" else
                                 ("Resize + CenterCrop, " if r["pre_crop"] else "") +
                                 f"RandomResizedCrop({student.res}, 0.5-1), flip" +
                                 (", ColorJitter 0.4, Lighting 0.1" if r["augment"] == "minimax" else "")),
        student_norm="batch norm (torchvision)" if args.arch == "resnet18_bn" else "instance norm",
        recipe_settings={k: v for k, v in r.items()}, guidance=asdict(guide), igd_guidance=asdict(igd_config(args)),
        guided_steps=guide.guided_steps(args.steps), sampler=asdict(sampler_config(args)), classes=class_table(spec))


def builds(args, spec, data_dir):
    """What the run trains besides sampling, each with whether it is cached already: only what its method uses (a
    DiT set needs no theta*, no IGD surrogate and no stage students)."""
    items = []
    cached = lambda arch: "cached" if surrogate_cached(spec, arch, data_dir, args.reference_epochs) else "not cached"  # noqa
    epochs = surrogate_epochs(spec.name, args.reference_epochs)
    if args.method == "lgd":
        if args.reference is not None:
            items.append(f"theta*: your --reference {args.reference}")
        else:
            items += [f"theta* {arch} ({epochs} epochs on the real train split; {cached(arch)})"
                      for arch in args.reference_archs.split(",")]
        if RECIPES[args.recipe]["temperature"] is not None:
            items.append("the soft-label teacher (resnet18_bn)")
        stages = args.ipc // args.stage_ipc
        items.append(f"{(stages - 1) * len(args.student_archs.split(','))} stage students ({args.student_archs})")
    if uses_igd(args.method, args.seed_set):
        shared = args.method == "lgd" and args.reference is None and IGD_ARCH in args.reference_archs.split(",")
        items.append("IGD's checkpoint selection on theta*'s trajectory" if shared else
                     f"IGD's surrogate trajectory {IGD_ARCH} ({epochs} epochs; {cached(IGD_ARCH)}) and its checkpoint "
                     f"selection")
    if args.eval:
        items.append(f"{args.eval_runs} evaluation students ({args.eval_arch})")
    return items


def print_plan(args, spec, data_dir=None):
    """--dry-run: what the run will do, in images and DiT forward passes."""
    measured = load_preflight(args.out_dir)
    if args.json:
        print(json.dumps(dict(resolved_config(args, spec), builds=builds(args, spec, data_dir), preflight=measured),
                         indent=2))
        return
    c, stages = spec.num_classes, (args.ipc // args.stage_ipc if args.method == "lgd" else 1)
    window, igd_window = guidance_config(args).guided_steps(args.steps), igd_config(args).guided_steps(args.steps)
    through = ("DiT + " if args.through_dit else "") + ("" if args.dataset == "digits" else "VAE decoder + ")
    done = dict(stage_summary(args.out_dir)) if os.path.isdir(args.out_dir) else {}
    print(f"{args.method} on {args.dataset}: {c} classes x {args.ipc} IPC = {c * args.ipc} images -> {args.out_dir}")
    table = class_table(spec)  # the field's class order: class c is what every peer's class c is
    print("  classes (index: folder, prior label, name): " + "; ".join(
        f"{r['index']}: {r['wnid']}, {r['prior_label']}, {r['name']}" for r in table[:10])
        + ("; ..." if c > 10 else ""))
    print("  trains: " + ("; ".join(builds(args, spec, data_dir)) or "nothing (sampling only)"))
    if args.method == "dit":
        print(f"  one unguided pass: {c * args.ipc} images x {args.steps} steps (CFG: 2 DiT passes per step)")
        return print_eta(args, measured)
    if args.method == "igd":
        print(f"  the surrogate trajectory of theta* (cached), checkpoints {args.igd_checkpoints}, then "
              f"{c * args.ipc} images x {args.steps} steps ({igd_window} guided: a double backward per checkpoint)")
        return print_eta(args, measured)
    for k in range(stages):
        n = c * args.stage_ipc
        status = " [done, will be skipped]" if done.get(k) else ""
        if k == 0 and args.seed_set == "igd":
            print(f"  stage 0: IGD's increment, {n} images x {args.steps} steps ({igd_window} influence-guided){status}")
        elif k == 0:
            print(f"  stage 0: seed set ({args.seed_set}), {n} images x {args.steps} unguided steps{status}")
        else:
            print(f"  stage {k}: train a {args.arch} student on {k * args.stage_ipc} IPC, then {n} images x "
                  f"{args.candidates} candidates x {args.steps} steps ({window} guided: backward through "
                  f"{through}2 classifiers){status}")
    # image-steps: stage 0 samples each slot once, guided stages kappa times (the best candidate is kept)
    total = c * args.stage_ipc * args.steps * (1 + (stages - 1) * args.candidates)
    print(f"  total: {total} sampler image-steps, {(stages - 1) * c * args.stage_ipc * args.candidates * window} "
          f"of them guided; {stages - 1} student trainings")
    print_eta(args, measured)


def print_eta(args, measured):
    """The measured price of the run (from its folder's preflight.json), or how to get one."""
    if measured is not None and measured.get("passed"):
        print(f"  {eta_line(measured)} (measured by the preflight in {args.out_dir})")
    else:
        print("  ETA: not measured; add --preflight to this command to measure it on this machine (minutes on a "
              "GPU: it also checks labels, guidance direction and the batch that fits)")


def claim(out_dir):
    """Rank 0 claims the run folder (curriculum.claim_run_folder); every rank learns whether it may go on."""
    release, error = (lambda: None), None
    if is_main():
        try:
            release = claim_run_folder(out_dir)
        except (UserError, OSError) as e:
            error = e
    if all_reduce_sum(int(error is not None)):  # all ranks stop together instead of waiting at a barrier
        raise error if error is not None else UserError(f"rank 0 could not claim {out_dir}")
    return release


def main(argv=None, on_stage_start=None):
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    args = get_parser().parse_args(argv)
    batch_given = args.batch_size is not None  # a --batch-size the user typed is never replaced by the preflight's
    args = resolve_args(args)
    spec = get_spec(args.dataset, res=args.res)
    # a given --data-dir is validated now; a download happens below, once every cheap check has passed
    data_dir = resolve_data_dir(spec, args.data_dir, fetch=False)
    if args.dry_run:
        check_inputs(args, spec, torch.device("cpu"))  # what the run would refuse, the plan refuses too
        print_plan(args, spec, data_dir)
        return
    device = get_device(args.device)
    if args.precision == "bf16" and device.type != "cuda":
        raise UserError(f"--precision bf16 is CUDA autocast; this run is on {device.type} (use --precision fp32)")
    if args.num_workers is None:  # a GPU trains faster than one process decodes JPEGs
        args.num_workers = min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
    if args.channels_last is None:
        args.channels_last = device.type == "cuda"
    rank, world = setup_distributed(device)
    record = dict(vars(args), data_dir=data_dir, out_dir=os.path.abspath(args.out_dir), world_size=world,
                  student_world=world if (args.method == "lgd" and args.student_ddp) else 1)
    # every input is checked before the folder is claimed, so a refused start leaves the folder as it was:
    # the folder itself and the settings of a run already in it (read only), a given prior (loading it is
    # the check), the seed set and the reference model. The digits prior is our own cache, built after the claim.
    check_run_folder(args.out_dir)
    earlier = changed_settings(args.out_dir, record, {k: v for k, v in RESULT_ARGS.items() if k != "batch_size"})
    # the sampler batch: the user's, else the run's own (a resume, or a preflight of a run that exists), else a
    # passing preflight's of these settings, else the preset's
    args.preflight_settings = {key: record[key] for key in RESULT_ARGS if key != "batch_size"}
    passed = load_passing(args.out_dir, args.preflight_settings)
    if not batch_given and earlier:
        args.batch_size = earlier.get("batch_size", args.batch_size)
    elif not batch_given and passed is not None:
        args.batch_size = passed["sampler_batch"]
    args.batch_fixed = batch_given or bool(earlier)  # the preflight checks this batch instead of searching one
    record["batch_size"] = args.batch_size
    changed_settings(args.out_dir, record, RESULT_ARGS)
    check_classes(args.out_dir, class_table(spec), resume=True)
    prior = load_run_prior(args, spec, device) if args.prior is not None else None
    check_inputs(args, spec, device)
    if is_main():  # ImageNette / ImageWoof without --data-dir: fetched (once, shared) before the folder is claimed
        resolve_data_dir(spec, args.data_dir)
    barrier()
    record["command"] = shlex.join(["python", "distill.py", *argv])  # what finishes this run (evaluate/export say it)
    release = claim(args.out_dir)
    try:
        wanted = args.preflight if args.preflight is not None else args.dataset != "digits"
        if wanted and passed is None:  # before args.json: a failed one leaves no settings to resume
            prior = prior or load_run_prior(args, spec, device)
            passed = preflight(args, spec, prior, device)
            if not args.batch_fixed:
                args.batch_size = record["batch_size"] = passed["sampler_batch"]
        elif passed is not None:  # its checks stand for this run
            print0(f"preflight: passed earlier ({preflight_path(args.out_dir)}), reused: {eta_line(passed)}")
        if passed is not None and args.batch_size != passed["sampler_batch"]:
            print0(f"sampler batch {args.batch_size} ({'--batch-size' if batch_given else 'the run in ' + args.out_dir}"
                   f"), not the preflight's {passed['sampler_batch']}")
        if is_main():
            record_args(args.out_dir, record, RESULT_ARGS)
            write_classes(args.out_dir, class_table(spec))  # what class c is, for every reader of the folder
        barrier()  # important! no rank writes before rank 0 has tidied the folder and checked the settings
        if args.preflight:
            print0(f"preflight passed: {eta_line(passed)}\nnext: the same command without --preflight (it starts at "
                   f"sampler batch {args.batch_size}; {preflight_path(args.out_dir, 'png')} shows the samples)")
            return
        if passed is not None and passed["eta_s"] > DAY:  # said, not refused: the user may mean it
            print0(f"note: this run is priced at {duration(passed['eta_s'])} ({preflight_path(args.out_dir)})")
        distill(args, spec, device, Ranks(rank, world), on_stage_start, prior)
    finally:
        release()


def preflight(args, spec, prior, device):
    """The preflight (preflight.py) on every rank; the batch every rank fits, one report, one verdict for all ranks."""
    result, images = run_preflight(args, spec, prior, device, resolve_data_dir(spec, args.data_dir),
                                   guidance_config(args), igd_config(args), sampler_config(args))
    result["sampler_batch"] = min(all_gather(result["sampler_batch"]))
    failures = [f for f in all_gather(result["failure"]) if f is not None]
    report(result, images, spec, args.out_dir)
    if failures:  # every rank stops with the same line
        raise UserError(f"preflight: {failures[0]}")
    return result


def check_inputs(args, spec, device):
    """The user's files, read before anything is written: every seed-set image the run will take, the reference."""
    if args.method == "lgd" and args.seed_set not in ("dit", "igd"):
        seed_set_files(args.seed_set, spec, args.stage_ipc)
    if args.reference is not None:
        reference_model(spec, args.arch, None, device, path=args.reference)


def load_run_prior(args, spec, device):
    """The run's prior, ready to sample: DiT-XL/2 (+VAE) from the hub or a local dir, or the cached digits DiT
    (trained on first use). Sets spec.image_size to what it generates."""
    prior_path = args.prior or digits_prior()
    # weights stay float32; bf16 is autocast only, so the scheduler maths and the guidance gradient's
    # normalisation (rho_t) keep full precision
    try:
        prior = load_prior(prior_path, vae=args.vae, device=device, dtype=torch.float32, sampler=args.sampler,
                           steps=args.steps, grad_decoder=args.grad_decoder)
    except UserError as e:
        if args.prior is None:  # the cache is ours: say how to rebuild it
            raise UserError(f"{e}; the cached digits prior is broken: remove it (rm -r {prior_path}) and rerun "
                            f"to retrain it") from None
        raise
    prior.autocast = args.precision == "bf16"
    if args.grad_checkpoint:
        prior.enable_gradient_checkpointing()
    if args.channels_last:
        prior.channels_last()
    if args.compile:
        prior.compile()
    spec.image_size = prior.image_size  # stand-in priors in the tests generate smaller images
    # a class index past the prior's label table would silently become the CFG null label
    if max(spec.prior_labels) >= prior.null_label:
        raise UserError(f"prior {prior_path} knows {prior.null_label} classes; {args.dataset} needs label "
                        f"{max(spec.prior_labels)}")
    return prior


def distill(args, spec, device, ranks, on_stage_start=None, prior=None):
    """The run itself, once the folder is ours and the settings are recorded."""
    start = time.time()
    data_dir = resolve_data_dir(spec, args.data_dir)  # downloads ImageNette/ImageWoof if no --data-dir
    if prior is None:  # the digits prior: trained once into the shared cache (waiting if another run builds it)
        prior = load_run_prior(args, spec, device)
    sampler, out = sampler_config(args), args.out_dir
    plan = Plan(args.ipc, args.stage_ipc, args.seed, args.batch_size, args.seed_set, args.twins)
    student_view = recipe_spec(spec, args.recipe)
    influence = None
    if uses_igd(args.method, args.seed_set):  # IGD's surrogate trajectory, checkpoints, real gradients
        influence = influence_score(spec, data_dir, device, out, args.grad_ipc, args.igd_checkpoints,
                                    args.igd_threshold, args.reference_epochs, args.num_workers)

    def igd(images_dir, latents_dir, slots, batch, records_dir=None):
        """IGD's sampler: influence-guided, deviation from this run's earlier samples of the class (M_c starts
        empty), one sample per image. Returns the sampler batch that fitted."""
        return generate_increment(prior, spec, images_dir, latents_dir, slots, 0, args.seed, sampler, batch, ranks,
                                  influence, igd_config(args), {}, desc="IGD sampling", records_dir=records_dir)
    if args.method == "dit":
        batch = generate_increment(prior, spec, distilled_dir(out), None, args.ipc, 0, args.seed, sampler,
                                   args.batch_size, ranks, desc="dit sampling")
    elif args.method == "igd":
        batch = igd(distilled_dir(out), run_latents(out), args.ipc, args.batch_size)
    else:
        # theta*, trained once per dataset/arch/view and cached under out/cache (or the user's file); an ensemble
        # of such models with --reference-archs
        reference = reference_models(spec, args.reference_archs, data_dir, device, args.reference_epochs,
                                     args.num_workers, args.reference)
        teacher = soft_label_teacher(student_view, args.recipe, data_dir, device, num_workers=args.num_workers)
        first, *others = args.student_archs.split(",")
        students = Students(first, args.recipe, student_view, args.student_epochs, args.student_ddp,
                            args.num_workers, args.channels_last, tuple(others))
        seed_stage = (lambda images, latents, records, batch: igd(images, latents, args.stage_ipc, batch, records)) \
            if args.seed_set == "igd" else None
        batch = run_stages(prior, spec, out, plan, sampler, guidance_config(args), students, reference, ranks,
                           device, teacher, seed_stage, on_stage_start=on_stage_start)
    update_args(out, sampler_batch_used=batch)
    stages = args.ipc // args.stage_ipc if args.method == "lgd" else 1
    save_set_grid(distilled_dir(out), spec, range(args.ipc), grid_path(out),
                  f"{args.method}: {args.ipc} images per class (* = guided); rows = classes",
                  guided=range(args.stage_ipc, args.ipc) if stages > 1 else ())
    print0(f"wrote {spec.num_classes * args.ipc} images to {distilled_dir(out)} in {time.time() - start:.0f} s "
           f"(grid: {grid_path(out)})")

    if args.eval and is_main():  # evaluation is single-process: N small students, not worth sharding
        evaluate_folder(out, spec, data_dir, args.eval_arch, args.eval_runs, args.recipe, args.eval_epochs,
                        args.seed, device, num_workers=args.num_workers)
        print0(f"next: python evaluate.py --redundancy {out}   (cross-increment redundancy), or "
               f"python evaluate.py --compare {out} <other runs>")
    elif is_main():
        print0(f"next: python evaluate.py --distilled {out}   (-> {eval_path(out)})")


if __name__ == "__main__":
    run_cli(main)
