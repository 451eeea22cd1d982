"""
Distil a dataset with a class-conditional diffusion prior: LGD (the stage loop of curriculum.py with the
learnability-guided sampler of guidance.py), or a baseline sampler of the paper's tables.

  --method lgd   the paper's method: a seed increment, then per stage a fresh student and a learnability-guided
                 increment; the union of the increments is the set.
  --method dit   plain class-conditional DiT sampling with CFG: the "DiT" row of every table.
  --method igd   influence-guided sampling (IGD, Chen et al., ICLR 2025), the paper's seed increment and main
                 baseline; `--method lgd --seed-set igd` is the paper's pipeline (T_1 from IGD).
  --method mgd3  mode-guided sampling (MGD3, Chan-Santiago et al., ICML 2025), the strongest baseline: each image
                 pulled toward a k-means mode of its class's real latents, no gradient (mgd3.py).

Every method writes DIR/distilled/<class>/<index>.png (an ImageFolder any evaluator reads), DIR/args.json (every
setting, the git commit and the command of every start), DIR/grid.png, and with --eval DIR/eval.json (evaluate.py).
The settings a flag does not give come from config.py (the paper's constants and each dataset's preset, one table);
the run prints the method constants it resolved before it starts. `python distill.py` with no arguments is the
embedded CPU run: digits, LGD, IPC 10 in 5 stages of 2, a small pixel-space DiT prior trained once and cached under
out/cache, then evaluated.

This file is the command line and the order of a run: read `main` then `distill`. The run folder (its lock,
resuming, records) is ground/; the checks, the preflight and --dry-run that guard a start are tools/.

Run:
  python distill.py                                          # digits, LGD, a few minutes on a CPU
  python distill.py --dataset imagewoof --ipc 100 --eval     # downloads DiT-XL/2 and ImageWoof
  python distill.py --dataset imagewoof --dry-run json       # every resolved setting, as JSON
  torchrun --nproc_per_node=8 distill.py --dataset imagenet --data-dir /data/imagenet --ipc 50
"""
import argparse
import os
import sys
import time

import torch

from config import PRESETS, SETTABLE, defaults, parse_constants, preset
from curriculum import Plan, Seed, Students, run_stages, seed_increment
from data import EMBEDDED, get_spec, read_classes, resolve_data_dir
from evaluate import evaluate_folder
from ground.common import (
    ArgumentParser,
    UserError,
    default_workers,
    get_device,
    is_main,
    print0,
    quoted,
    require,
    run_cli,
    setup_distributed,
)
from ground.folder import default_run_dir, distilled_dir, eval_path, preflight_path, seed_set_files
from ground.run import Run
from guidance import GuidanceConfig, SamplerConfig, score_names
from igd import IGD, deviation_for, igd_guidance, uses_igd
from mgd3 import MGD3, uses_mgd3
from model import ARCHS, DEFAULT_PRIOR
from reference import real_modes, reference_model, soft_label_teacher
from tools.checks import check_args, mode_count
from tools.dry_run import print_plan, resolved_line
from tools.preflight import DAY, duration, eta_line
from tools.start import check_inputs, check_settings, run_record, start_run
from train_prior import load_run_prior
from train_student import RECIPES, Trainer, recipe_view


def get_parser():
    p = ArgumentParser(prog="distill.py", description="Distil a dataset with learnability-guided diffusion (LGD). "
                       "A setting no flag gives comes from config.py: the paper's, then the dataset's preset.")
    run = p.add_argument_group("a run (what a first run needs)")
    run.add_argument("--dataset", default="digits", choices=list(PRESETS), help="the dataset to distil")
    run.add_argument("--method", default="lgd", choices=["lgd", "dit", "igd", "mgd3"],
                     help="LGD stage loop, unguided DiT, influence-guided IGD or mode-guided MGD3")
    run.add_argument("--ipc", type=int, default=None, help=f"images per class in total ({defaults('ipc')})")
    run.add_argument("--stage-ipc", type=int, default=None, help=f"images per class per increment "
                     f"({defaults('stage_ipc')}; the paper's 10)")
    run.add_argument("--seed", type=int, default=0, help="run seed (the noise of image i of class c derives from it)")
    run.add_argument("--out-dir", default=None, help="output folder (default out/<dataset>_<method>_ipc<N>_seed<S>)")
    run.add_argument("--data-dir", default=None, help="ImageFolder root with train/<wnid>/ and val/<wnid>/")
    run.add_argument("--classes", default=None, help="--dataset imagenet: a subset, one wnid a line in the order that "
                     "defines its labels (the DiT's label of each: its ImageNet-1K index)")
    run.add_argument("--prior", default=None, help=f"hub id or local diffusers dir (default {DEFAULT_PRIOR}; "
                     f"digits, mnist: trained here, cached)")
    run.add_argument("--eval", action=argparse.BooleanOptionalAction, default=None,
                     help=f"evaluate the set afterwards with 3 students (evaluate.py; {defaults('eval')})")
    run.add_argument("--dry-run", nargs="?", const="plan", default=None, choices=["plan", "json"],
                     help="print the plan (stages, images, sampler steps), or with `json` every resolved setting, "
                          "and exit")
    run.add_argument("--preflight", action=argparse.BooleanOptionalAction, default=None,
                     help="check the run on these weights and data and price it (tools/preflight.py), then stop; "
                          "default: every run on downloaded data and weights does it first (reused once passed); "
                          "--no-preflight skips it")
    method = p.add_argument_group("the method's constants (config.py: the paper's and each dataset's)")
    method.add_argument("--score", default=None, choices=score_names(),
                        help="what guidance raises: learnability (S, the paper's) or a score of scores/")
    method.add_argument("--guidance-scale", dest="scale", type=float, default=None,
                        help=f"lambda: learnability guidance scale ({defaults('scale')})")
    method.add_argument("--omega", type=float, default=None, help=f"omega: weight of theta*'s CE in S "
                        f"({defaults('omega')})")
    method.add_argument("--deviation-scale", dest="deviation", type=float, default=None,
                        help=f"gamma: deviation guidance away from memory M_c ({defaults('deviation')})")
    method.add_argument("--candidates", type=int, default=None,
                        help=f"kappa: guided candidates per image, best S kept ({defaults('candidates')})")
    method.add_argument("--guide-from", type=int, default=None,
                        help=f"window start, respaced index counting down ({defaults('guide_from')})")
    method.add_argument("--guide-until", type=int, default=None, help=f"window end ({defaults('guide_until')})")
    method.add_argument("--guidance-form", dest="form", default=None, choices=["z", "eps"],
                        help="z: lambda rho_t g added to z_{t-1} after the step (IGD's code, where the constants come "
                             "from; default); eps: the paper's printed eps~")
    method.add_argument("--cfg-scale", type=float, default=None, help=f"s: classifier-free guidance scale "
                        f"({defaults('cfg_scale')})")
    method.add_argument("--seed-set", default=None, help="T_1: 'dit' (unguided samples), 'igd' (IGD's samples, the "
                        f"paper's pipeline), 'mgd3' (MGD3's) or a folder <class>/*.png ({defaults('seed_set')})")
    method.add_argument("--set", dest="constants", action="append", default=[], metavar="NAME=VALUE",
                        help="any other constant of config.py: " + ", ".join(
                            f"{key} ({defaults(key)})" for key in SETTABLE))
    students = p.add_argument_group("students (theta_k), theta* and evaluation")
    students.add_argument("--arch", default=None, choices=ARCHS, help=f"the per-stage student ({defaults('arch')})")
    students.add_argument("--reference-arch", default=None, choices=ARCHS,
                          help="theta*'s architecture (default: the student's, --arch)")
    students.add_argument("--recipe", default=None, choices=list(RECIPES), help=f"student training recipe "
                          f"({defaults('recipe')})")
    students.add_argument("--student-epochs", type=int, default=None, help="per-stage student epochs (default: by IPC)")
    students.add_argument("--reference", default=None, help="a state dict of theta* for --reference-arch (e.g. IGD's "
                          "surrogate) instead of training it")
    students.add_argument("--reference-epochs", type=int, default=None,
                          help="theta* training epochs (IGD: 50; digits 30, mnist 20)")
    students.add_argument("--eval-arch", default=None, choices=ARCHS, help="evaluation architecture (default --arch)")
    students.add_argument("--res", type=int, default=None, help="classifier resolution (default: the dataset's, 224)")
    machine = p.add_argument_group("the sampler and the machine")
    machine.add_argument("--steps", type=int, default=None, help=f"sampling steps, respaced ({defaults('steps')})")
    machine.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"],
                         help="ancestral DDPM (the field's) or DDIM")
    machine.add_argument("--vae", default="auto",
                         help="'auto', 'none' (pixel space), or a hub id / dir of an AutoencoderKL")
    machine.add_argument("--batch-size", type=int, default=None, help="samples per sampler batch (candidates "
                         f"included; {defaults('batch_size')}); halved automatically on out-of-memory")
    machine.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                         help="bf16 autocast for DiT, VAE and classifiers (CUDA)")
    machine.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    machine.add_argument("--num-workers", type=int, default=None, help="DataLoader workers decoding real images "
                         "(default: 8 with CUDA, fewer where /dev/shm is small; else 0)")
    machine.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads; default: "
                         "torch's, a resume: the run's). On a CPU another count trains other students: a setting")
    return p


def resolve_args(args):
    """Fill unset settings from config.py (the dataset's preset on the paper's); check every one before any write."""
    stage_given = args.stage_ipc is not None
    try:
        constants = parse_constants(args.constants)
    except ValueError as e:
        raise UserError(str(e)) from None
    for key, value in {**preset(args.dataset), **constants}.items():
        if getattr(args, key, None) is None or key in constants:
            setattr(args, key, value)
    del args.constants  # each constant is a setting of its own now (args.json records it by name)
    if args.igd_deviation is None:  # IGD's gamma for the size of the set it samples
        args.igd_deviation = deviation_for(args.ipc if args.method == "igd" else args.stage_ipc)
    if args.method != "lgd" and not stage_given and args.ipc > 0:  # no stages: stage_ipc only says how evaluate.py
        # --redundancy cuts the set; the preset's, or the largest increment below it that divides the set
        args.stage_ipc = max(d for d in range(1, min(args.stage_ipc, args.ipc) + 1) if args.ipc % d == 0)
    args.reference_arch = args.reference_arch or args.arch
    if args.classes is not None:  # the list itself is the setting (a resume with an edited file is another run)
        require(args.dataset == "imagenet", f"--classes picks a subset of ImageNet-1K: use it with --dataset "
                f"imagenet (--dataset {args.dataset} has its own classes)")
        args.classes = read_classes(args.classes)
    check_args(args, guidance_config(args), igd_config(args), uses_igd(args.method, args.seed_set),
               uses_mgd3(args.method, args.seed_set))
    if args.prior is None and args.dataset not in EMBEDDED:
        args.prior = DEFAULT_PRIOR
    # paths are stored resolved, so evaluate.py finds them from any working directory
    for key in ("data_dir", "prior", "seed_set", "reference"):
        value = getattr(args, key)
        if value is not None and value not in ("dit", "igd", "mgd3") and os.path.exists(value):
            setattr(args, key, os.path.abspath(value))
    args.eval_arch = args.eval_arch or args.arch
    args.out_dir = args.out_dir or default_run_dir(args.dataset, args.method, args.ipc, args.seed)
    return args


def guidance_config(args):
    return GuidanceConfig(scale=args.scale, omega=args.omega, c0=args.c0, deviation=args.deviation,
                          candidates=args.candidates, guide_from=args.guide_from, guide_until=args.guide_until,
                          form=args.form, memory_cap=args.memory_cap, score=args.score)


def igd_config(args):
    return igd_guidance(deviation=args.igd_deviation, scale=args.igd_scale, guide_from=args.igd_from,
                        guide_until=args.igd_until, c0=args.c0, memory_cap=args.memory_cap)


def sampler_config(args):
    return SamplerConfig(cfg_scale=args.cfg_scale, steps=args.steps, three_channels=args.three_channels)


def main(argv=None):
    # one OOM halving less: CUDA memory grown in segments, not fragmented blocks (before the first CUDA call)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    args = get_parser().parse_args(argv)
    batch_given = args.batch_size is not None  # a --batch-size the user typed is never replaced by the preflight's
    args = resolve_args(args)
    spec = get_spec(args.dataset, res=args.res, classes=args.classes)
    data_dir = resolve_data_dir(spec, args.data_dir, fetch=False)  # a given tree is checked now, a download later
    if args.dry_run:
        # what the run would refuse, the plan refuses too: the settings of a run already in the folder, the inputs
        earlier = check_settings(args, run_record(args, spec, int(os.environ.get("WORLD_SIZE", 1))))
        check_inputs(args, spec, torch.device("cpu"), data=False)
        return print_plan(args, spec, data_dir, guidance_config(args), igd_config(args), sampler_config(args),
                          earlier)
    device = get_device(args.device)
    if args.precision == "bf16" and device.type != "cuda":
        raise UserError(f"--precision bf16 is CUDA autocast; this run is on {device.type} (use --precision fp32)")
    if args.num_workers is None:
        args.num_workers = default_workers(device)
    if device.type == "cuda":  # fp32 weights, TF32 tensor cores for their matrix multiplies (as DiT's own sampler)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    rank, world = setup_distributed(device)
    configs = (guidance_config(args), igd_config(args), sampler_config(args))
    # the folder is claimed, the inputs checked, the preflight run or reused (tools/start.py); released whatever happens
    with start_run(args, spec, device, argv, world, batch_given, load_run_prior, configs) as (prior, passed):
        if args.preflight:
            print0(f"preflight passed: {eta_line(passed)}\nnext: the same command without --preflight (it starts at "
                   f"sampler batch {args.batch_size}; {preflight_path(args.out_dir, 'png')} shows the samples)")
            return
        if passed is not None and passed["eta_s"] > DAY:  # said, not refused: the user may mean it
            print0(f"note: this run is priced at {duration(passed['eta_s'])} ({preflight_path(args.out_dir)})")
        print0(resolved_line(args))  # the constants this run uses, as config.py and the flags resolved them
        distill(args, spec, device, rank, world, prior)


def distill(args, spec, device, rank, world, prior):
    """The run itself, once the folder is ours and the settings are recorded."""
    start = time.time()
    data_dir = resolve_data_dir(spec, args.data_dir)
    sampler, out = sampler_config(args), args.out_dir
    plan = Plan(args.ipc, args.stage_ipc, args.seed)
    run = Run(out, spec, plan, args.batch_size, rank, world, tolerant=device.type == "cuda")
    trainer = Trainer(device, args.num_workers, rank, world)
    if args.method == "lgd":
        # theta*, trained once per dataset/arch/view and cached under out/cache (or the user's file)
        theta_star, reference_view = reference_model(spec, args.reference_arch, data_dir, device,
                                                     args.reference_epochs, num_workers=args.num_workers,
                                                     path=args.reference)
        student_view = recipe_view(spec, args.recipe)
        teacher = soft_label_teacher(student_view, args.recipe, data_dir, device, num_workers=args.num_workers)
        students = Students(args.arch, args.recipe, student_view, trainer, args.student_epochs, teacher)
        run_stages(run, prior, plan, sampler, guidance_config(args), students,
                   (trainer.place(theta_star), reference_view), seed(args, run, prior, trainer, data_dir))
    else:  # a one-pass method: its whole set is one increment, made as LGD's T_1 would be
        seed_increment(run, run.one_pass(latents=args.method == "igd"), prior, plan, sampler,
                       seed(args, run, prior, trainer, data_dir))
    run.finish(args.method, guided=range(args.stage_ipc, args.ipc) if plan.stages > 1 and args.method == "lgd"
               else ())
    print0(f"wrote {spec.num_classes * args.ipc} images to {distilled_dir(out)} in {time.time() - start:.0f} s "
           f"(grid: {out}/grid.png)")
    if args.eval and is_main():  # evaluation is single-process: N small students, not worth sharding
        evaluate_folder(out, spec, data_dir, args.eval_arch, 3, args.recipe, None, args.seed, device,
                        num_workers=args.num_workers)
        # only what works on this folder as printed: a redundancy cut needs two increments, --compare the run's
        # own eval.json (an --eval-arch of another family writes eval_<arch>.json)
        if args.ipc // args.stage_ipc >= 2:
            print0(f"next: python evaluate.py --redundancy {quoted(out)}   (cross-increment redundancy)")
        if args.eval_arch == args.arch:
            print0(f"next: python evaluate.py --compare {quoted(out)}   (add other runs' folders to compare them)")
    elif is_main():
        print0(f"next: python evaluate.py --distilled {quoted(out)}   (-> {eval_path(out)})")


def seed(args, run, prior, trainer, data_dir):
    """How T_1 is made (--seed-set), or a one-pass method's set (--method): its method and what it needs."""
    method = args.method if args.method != "lgd" else args.seed_set
    if method == "igd":
        igd = IGD(igd_config(args), data_dir, args.grad_ipc, args.igd_checkpoints, args.igd_threshold,
                  args.reference_epochs)
        return Seed("igd", igd=igd, trainer=trainer)
    if method == "mgd3":  # one mode per image of a class it makes, computed once per dataset, encoder and n (cached)
        n, flag = mode_count(args)
        modes = real_modes(run.spec, prior, data_dir, n, flip=run.spec.name not in EMBEDDED, flag=flag,
                           num_workers=args.num_workers)
        return Seed("mgd3", mgd3=MGD3(args.mode_scale, args.mode_stop), modes=modes)
    if method == "dit":
        return Seed("dit")
    return Seed("folder", files=seed_set_files(args.seed_set, run.spec, args.stage_ipc))


if __name__ == "__main__":
    run_cli(main)
