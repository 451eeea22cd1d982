"""
--dry-run: what a distill.py command will do before it does it: the classes, what it trains, each stage's sampling
in images and DiT passes, and the measured price when a preflight has run in the folder (--json: every resolved
setting, view and transform, as JSON). Reads and writes nothing but what it prints.
"""
import json
import os
from dataclasses import asdict

import torch

from config import PAPER
from data import DOWNLOADS, EMBEDDED, class_table
from ground.folder import stage_summary
from igd import ARCH as IGD_ARCH
from igd import uses_igd
from mgd3 import uses_mgd3
from reference import reference_view, surrogate_cached, surrogate_epochs
from tools.checks import mode_count
from tools.preflight import eta_line, load_preflight
from train_prior import prior_path
from train_student import RECIPES, recipe_view


def builds(args, spec, data_dir):
    """What the run trains besides sampling, each with whether it is cached already: only what its method uses (a
    DiT set needs no theta*, no IGD surrogate and no stage students)."""
    items = []
    if spec.name in EMBEDDED and args.prior is None:  # trained here once (train_prior.py), shared by every run
        items.append(f"the {spec.name} prior ({'cached' if os.path.isdir(prior_path(spec.name)) else 'not cached'})")
    cached = lambda arch: "cached" if surrogate_cached(spec, arch, data_dir, args.reference_epochs) else "not cached"
    epochs = surrogate_epochs(spec.name, args.reference_epochs)
    if args.method == "lgd":
        if args.reference is not None:
            items.append(f"theta*: your --reference {args.reference}")
        else:
            items.append(f"theta* {args.reference_arch} ({epochs} epochs on the real train split; "
                         f"{cached(args.reference_arch)})")
        if RECIPES[args.recipe]["temperature"] is not None:
            items.append("the soft-label teacher (resnet18_bn)")
        stages = args.ipc // args.stage_ipc
        items.append(f"{stages - 1} stage students ({args.arch})")
    if uses_igd(args.method, args.seed_set):
        shared = args.method == "lgd" and args.reference is None and IGD_ARCH == args.reference_arch
        items.append("IGD's checkpoint selection on theta*'s trajectory" if shared else
                     f"IGD's surrogate trajectory {IGD_ARCH} ({epochs} epochs; {cached(IGD_ARCH)}) and its checkpoint "
                     f"selection")
    if uses_mgd3(args.method, args.seed_set):
        items.append(f"MGD3's modes: k-means of each class's real training latents into {mode_count(args)[0]} "
                     f"(once per encoder, cached)")
    if args.eval:
        items.append(f"3 evaluation students ({args.eval_arch})")
    return items


def resolved_config(args, spec, guide, igd_guide, sampler):
    """--dry-run --json: every setting after presets, plus what they imply (views, transforms, schedule)."""
    student = recipe_view(spec, args.recipe)
    reference = reference_view(spec)
    r = RECIPES[args.recipe]
    view = lambda v: dict(res=v.res, test=f"Resize({round(v.res / v.crop_ratio)}) + CenterCrop({v.res})",
                          mean=list(v.mean), std=list(v.std))
    return dict(
        {k: v for k, v in vars(args).items() if k != "dry_run"},
        student_view=view(student), reference_view=view(reference),
        student_train_transform=(f"pad {max(1, spec.res // 8)} + random {spec.res}x{spec.res} crop"
                                 if spec.name in EMBEDDED else
                                 ("Resize + CenterCrop, " if r["pre_crop"] else "") +
                                 f"RandomResizedCrop({student.res}, 0.5-1), flip" +
                                 (", ColorJitter 0.4, Lighting 0.1" if r["augment"] == "minimax" else "")),
        student_norm="batch norm (torchvision)" if args.arch == "resnet18_bn" else "instance norm",
        recipe_settings={k: v for k, v in r.items()}, guidance=asdict(guide), igd_guidance=asdict(igd_guide),
        guided_steps=guide.guided_steps(args.steps), sampler=asdict(sampler), classes=class_table(spec))


def resolved_line(args):
    """The method constants a run resolved (config.py, then the flags), in the paper's symbols: what a reader needs to
    match the code to the run. Where the dataset's preset moved one from the paper's, the paper's follows it."""
    def show(key, symbol):
        value, paper = getattr(args, key), PAPER[key]
        return f"{symbol} {value:g}" + (f" (paper {paper:g})" if paper is not None and value != paper else "")
    sampler = (f"{args.steps} {args.sampler.upper()} steps, {show('cfg_scale', 's')}"
               + (", CFG on 3 channels" if args.three_channels else ""))
    parts = {"dit": [], "mgd3": [show("mode_scale", "lambda"), f"t_stop {args.mode_stop}"],
             "igd": [show("igd_scale", "lambda_I"), show("igd_deviation", "gamma"),
                     f"window {args.igd_from}..{args.igd_until}"]}
    seed = parts.get(args.seed_set, ["a folder"])
    if args.method != "lgd":
        return f"{args.method} on {args.dataset}: {', '.join([sampler, *parts[args.method]])}"
    return (f"lgd on {args.dataset}: score {args.score}, {show('scale', 'lambda')}, {show('omega', 'omega')}, "
            f"{show('deviation', 'gamma')}, kappa {args.candidates}, window {args.guide_from}..{args.guide_until} "
            f"({args.form} form), c0 {args.c0:g}, |M_c| {args.memory_cap}; {sampler}; students {args.arch} "
            f"({args.recipe}), theta* {args.reference_arch}; T_1 {args.seed_set}"
            + (f" ({', '.join(seed)})" if seed else ""))


def print_plan(args, spec, data_dir, guide, igd_guide, sampler, earlier=None):
    """--dry-run: what the run will do, in images and DiT forward passes. earlier: the args.json of a run already in
    the folder (its batch and threads are the ones a resume uses)."""
    measured = load_preflight(args.out_dir)
    for key in ("batch_size", "threads"):  # what the run settles: the user's, else the run's own
        if getattr(args, key) is None:
            setattr(args, key, (earlier or {}).get(key) or (torch.get_num_threads() if key == "threads" else None))
    if args.dry_run == "json":
        config = resolved_config(args, spec, guide, igd_guide, sampler)
        print(json.dumps(dict(config, builds=builds(args, spec, data_dir), preflight=measured), indent=2))
        return
    print(resolved_line(args))
    c, stages = spec.num_classes, (args.ipc // args.stage_ipc if args.method == "lgd" else 1)
    print(f"{args.method} on {args.dataset}: {c} classes x {args.ipc} IPC = {c * args.ipc} images -> {args.out_dir} "
          f"({args.threads} CPU threads)")
    if data_dir is not None:  # a dry run reads no data: a tree not there yet is the download the run will make
        print(f"  data: {data_dir}" if os.path.isdir(data_dir) else f"  data: not downloaded yet: "
              f"{DOWNLOADS[spec.name][0]} (about {DOWNLOADS[spec.name][1]}) to {data_dir}, or give --data-dir DIR")
    window, igd_window = guide.guided_steps(args.steps), igd_guide.guided_steps(args.steps)
    through = "DiT + " + ("" if args.dataset == "digits" else "VAE decoder + ")
    done = dict(stage_summary(args.out_dir)) if os.path.isdir(args.out_dir) else {}
    table = class_table(spec)  # the field's class order: class c is what every peer's class c is
    print("  classes (index: folder, prior label, name): " + "; ".join(
        f"{r['index']}: {r['wnid']}, {r['prior_label']}, {r['name']}" for r in table[:10])
        + ("; ..." if c > 10 else ""))
    print("  trains: " + ("; ".join(builds(args, spec, data_dir)) or "nothing (sampling only)"))
    if args.method == "dit":
        print(f"  one unguided pass: {c * args.ipc} images x {args.steps} steps (CFG: 2 DiT passes per step)")
        return print_eta(args, measured)
    pulled = max(0, args.steps - 1 - args.mode_stop)  # respaced indices i > t_stop
    mgd3 = f"{pulled} pulled toward the image's mode: lambda {args.mode_scale:g}, t_stop {args.mode_stop}"
    if args.method == "mgd3":
        print(f"  one mode-guided pass: {c * args.ipc} images x {args.steps} steps ({mgd3}; no gradient)")
        return print_eta(args, measured)
    if args.method == "igd":
        print(f"  the surrogate trajectory of theta* (cached), checkpoints {args.igd_checkpoints}, then "
              f"{c * args.ipc} images x {args.steps} steps ({igd_window} guided: a double backward per checkpoint)")
        return print_eta(args, measured)
    for k in range(stages):
        n = c * args.stage_ipc
        status = " [done, will be skipped]" if done.get(k) else ""
        if k == 0 and args.seed_set == "igd":
            print(f"  stage 0: IGD's increment, {n} images x {args.steps} steps ({igd_window} influence-guided)"
                  f"{status}")
        elif k == 0 and args.seed_set == "mgd3":
            print(f"  stage 0: MGD3's increment, {n} images x {args.steps} steps ({mgd3}){status}")
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
