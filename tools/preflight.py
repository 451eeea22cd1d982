"""
The first minutes of a real run: check it on the user's own weights and data, and price it, before hours are spent.

Nothing here can be checked without the real DiT-XL/2, the real data and the real GPU, so it runs where they are:
first in every non-embedded run (`--no-preflight` skips it), or alone with `--preflight`. It must guarantee three
things, each ending the run in one line naming the likely cause if it fails:

  1. the prior makes the dataset's classes   3 unguided samples of each of the first 20 classes (the noise of the
                                             run's own first images, the run's sampler): theta* recognises at least
                                             half of them; their decoded pixels and their latents spread like the real
                                             images' (a label map, a class order, a VAE scaling factor gone wrong)
  2. guidance raises the run's score         a student trained a few epochs on those samples, then one guided sample a
                                             class at the stage-1 settings (M_c = those samples, one candidate) scores
                                             higher than its unguided twin from the same noise, with a finite push
  3. the run fits and is priced              the sampler batch, the largest that fits (grown from the preset by
                                             doubling, bisected, 10% back for headroom); the seconds of each step and
                                             student epoch it will run; from them eta_s, eta_stages_s and disk_bytes
                                             (sampling and DDP students shared by the torchrun ranks, theta* by none)

Writes DIR/preflight.json and DIR/preflight.png (row 1: the first unguided sample of each class, marked `x` where
theta* does not recognise it; row 2: the guided ones). A run reuses a passed preflight of the same settings.

Run: python distill.py --dataset imagewoof --preflight          (then the same command without --preflight)
     python distill.py --preflight                             (the digits preset: seconds on a CPU)
"""
import io
import json
import math
import os
import time
from dataclasses import replace

import numpy as np
import torch

from curriculum import sample_images
from data import ImageSet, classifier_input, load_real, resize_crop
from ground.common import (
    SALT_PREFLIGHT,
    UserError,
    free_memory,
    is_main,
    load_json,
    out_of_memory,
    png_image,
    print0,
    save_grid,
    save_json,
    seconds_per_call,
    stream_seed,
)
from ground.folder import preflight_path
from ground.records import image_record
from ground.run import sampler_batches
from guidance import cfg_output, guided_output, make_score, score_of
from igd import ARCH as IGD_ARCH
from igd import Influence, uses_igd, weight_gradient
from model import make_student
from reference import (
    recognises,
    reference_model,
    reference_view,
    soft_label_teacher,
    surrogate_cached,
    surrogate_epochs,
    surrogate_recipe,
)
from train_student import accuracy, epochs_for_ipc, eval_epochs, eval_points, recipe_view, train_student

PASS_SHARE = 0.5        # theta* must recognise at least half of the unguided samples
PER_CLASS = 3           # unguided samples per class judged (one fixed draw of 10 could fail a good prior 1 time in 20)
LATENT_RATIO = 1.5      # the sampled latents' std within [1/1.5, 1.5] x that of the real images' scaled latents
MEAN_GAP = 0.2          # decoded images: their mean pixel (in [0, 1]) within this of the real data's,
STD_RATIO = 2.0         # and their pixel std within [1/2, 2] x the real data's (gross failures: a broken decoder)
STUDENT_EPOCHS = 30     # "a few epochs" on the samples: enough to learn them, so S has a gradient to follow
HEADROOM = 0.9          # the batch picked is 90% of the largest that fitted (memory varies from step to step)
DAY = 24 * 3600
REPEATS = 5             # timed calls per measurement, their median priced (a busy machine's hiccups do not count)
EPOCHS_TIMED = 6        # epochs of a timed student: the first decodes the set, the median of the others is priced
EVAL_RUNS = 3           # the students of distill.py --eval


# ----------------------------------------------------------------------------- the checks

def run_preflight(args, spec, prior, device, data_dir, guide, igd_guide, sampler, settings, fixed=False, world=1):
    """All three checks -> (result dict, (unguided samples, guided samples or None)). result["failure"] is the
    line a failed check ends the run with (None when all pass). settings: the run's (a run reuses a passed preflight
    of the same); fixed: the batch is the user's or the run's own, only checked; world: the torchrun ranks."""
    start, measured = time.time(), {}
    classes = list(range(min(spec.num_classes, 20)))
    guided_run = args.method == "lgd" and args.ipc > args.stage_ipc
    kappa = guide.candidates if guided_run else 1
    student_view = recipe_view(spec, args.recipe)
    teacher = soft_label_teacher(student_view, args.recipe, data_dir, device, num_workers=args.num_workers)

    # 1. theta* as the run gets it (trained now and cached for the run, or loaded); a DiT or MGD3 set uses none, and
    # none is trained for it. The unguided samples: images 0 .. PER_CLASS-1 of each class, the run's own noise
    ref_cached = args.reference is not None or surrogate_cached(spec, args.reference_arch, data_dir,
                                                                args.reference_epochs)
    reference = ref_view = None
    t = time.time()
    if args.method in ("lgd", "igd") or ref_cached:
        reference, ref_view = reference_model(spec, args.reference_arch, data_dir, device, args.reference_epochs,
                                              num_workers=args.num_workers, path=args.reference)
    measured["theta_star_s"] = time.time() - t
    plain = [in_batches(prior, spec, classes, index, args.seed, sampler, args.batch_size) for index in range(PER_CLASS)]
    z_plain, x_plain = (torch.cat([p[n] for p in plain]) for n in (0, 1))  # index-major: row 0 is image 0 of each class
    labels = torch.tensor(classes * PER_CLASS)
    real = load_real(spec, data_dir, "train")
    real_x = torch.stack([resize_crop(real.load(real.labels.index(c)), spec.image_size) for c in classes])
    recognised = None if reference is None else recognises(reference, ref_view, x_plain, labels).tolist()
    result = dict(dataset=spec.name, method=args.method, samples_checked=len(labels), chance=1 / spec.num_classes,
                  recognised=None if recognised is None else sum(recognised), recognised_per_sample=recognised,
                  pixels=dict(generated=_pixel_stats(x_plain), real=_pixel_stats(real_x)),
                  latents=_latent_stats(prior, z_plain, real_x))

    # the stage-1 student of a guided run: a few epochs on those samples (8-bit, as the run's students see them)
    score = None
    if guided_run:
        student = make_student(args.arch, student_view, seed=stream_seed(args.seed, SALT_PREFLIGHT, 0))
        train_student(student, ImageSet(list((x_plain * 255).round().to(torch.uint8)), labels.tolist()),
                      student_view, args.recipe, STUDENT_EPOCHS, seed=stream_seed(args.seed, SALT_PREFLIGHT, 1),
                      device=device, desc="preflight student", teacher=teacher)
        score = make_score(guide.score, student, student_view, reference, ref_view, guide)  # the run's own score

    # 3a. the sampler batch that fits: the guided step's (before the guided samples below, which must fit too), and
    # IGD's double backward where the run samples an IGD increment at the same batch. IGD samples one image a class,
    # so its search stops at one slot of all classes: that cap is no memory limit, and lowers nothing
    batch, largest, first_oom = pick_batch(prior, spec, sampler, guide if guided_run else None, args.batch_size, kappa,
                                           device, score, fixed)
    probe, igd_search = igd_probe(spec, device) if uses_igd(args.method, args.seed_set) else None, None
    if probe is not None:
        igd_batch, igd_largest, igd_oom = pick_batch(prior, spec, sampler, igd_guide, batch, 1, device, probe[0], fixed)
        igd_search = dict(largest_that_fitted=igd_largest, first_out_of_memory=igd_oom)
        batch = min(batch, igd_batch) if igd_oom is not None else batch

    # 2. guidance direction: one guided sample a class (M_c = the samples above, one candidate: before selection)
    # against its unguided twin from the same noise
    x_guided, record_bytes = None, 0
    if guided_run:
        memory = {c: z_plain[c].flatten()[None].float().cpu() for c in classes} if guide.deviation else None
        one = replace(guide, candidates=1)
        index = -1  # noise of no image of the run
        x_guided = in_batches(prior, spec, classes, index, args.seed, sampler, batch, score, one, memory)[1]
        x_twin = in_batches(prior, spec, classes, index, args.seed, sampler, batch)[1]
        y = torch.tensor(classes, device=device)
        with torch.no_grad():
            s_guided = float(score_of(score, x_guided.to(device) * 2 - 1, y).mean())
            s_twin = float(score_of(score, x_twin.to(device) * 2 - 1, y).mean())
        result["guidance"] = dict(s_guided=s_guided, s_twin=s_twin, gain=s_guided - s_twin,
                                  **push_sizes(prior, spec, sampler, guide, min(len(classes), batch // kappa), device,
                                               score))
        record_bytes = _record_bytes(kappa)
    else:
        result["guidance"] = dict(s_guided=None, s_twin=None, gain=None, nan_fallbacks=0, relative_push=None,
                                  note=f"not checked: --method {args.method} has no learnability-guided stage")

    # 3b. what everything costs at that batch
    measured.update(step_times(prior, spec, sampler, guide, igd_guide, args, batch, kappa, device, score, probe, world))
    measured.update(training_times(args, spec, x_plain, device, data_dir, teacher))
    result.update(sampler_batch=batch, batch_search=dict(start=args.batch_size, largest_that_fitted=largest,
                                                         first_out_of_memory=first_oom, headroom=HEADROOM,
                                                         igd=igd_search),
                  stages=args.ipc // args.stage_ipc if args.method == "lgd" else 1,
                  **estimate(args, spec, guide, igd_guide, batch, kappa, measured, world),
                  disk_bytes=disk_bytes(args, spec, x_plain, z_plain, record_bytes, reference),
                  measured=measured, theta_star_trained_by_preflight=not ref_cached, preflight_s=time.time() - start,
                  device=str(device), world_size=world, settings=settings)
    result["failure"] = verdict(result)
    result["passed"] = result["failure"] is None
    return result, (x_plain[:len(classes)], x_guided)


def in_batches(prior, spec, classes, index, seed, sampler, batch, score=None, guide=None, memory=None):
    """(latents, images) of `classes` at slot `index`, sampled as the run samples them (curriculum.sample_images), in
    batches of at most `batch` samples."""
    per = max(1, batch // (guide.candidates if score is not None else 1))
    made = [sample_images(prior, spec, classes[i:i + per], index, seed, sampler, score, guide, memory)[:2]
            for i in range(0, len(classes), per)]
    return torch.cat([z for z, _ in made]), torch.cat([x for _, x in made])


def report(result, images, spec, out_dir):
    """Write preflight.json and preflight.png (rank 0 of a torchrun job) and print the table."""
    if is_main():
        save_json(result, preflight_path(out_dir))
        save_picture(*images, result, spec, preflight_path(out_dir, "png"))
    print0(table(result))


def push_sizes(prior, spec, sampler, guide, b, device, score):
    """One guided step mid-window on b samples: how many pushes are not finite (those samples would get the plain
    step: a broken gradient, bf16 overflow) and the mean size of the push, ||push|| / ||z_t||."""
    prior.scheduler.set_timesteps(sampler.steps)
    t = prior.scheduler.timesteps[sampler.steps - 1 - (guide.guide_from + guide.guide_until) // 2]
    z, labels, classes = _probe(prior, spec, max(1, b), device)
    _, push, fallback = guided_output(prior, z, t, labels, classes, sampler, score, guide)
    size = push.flatten(1).float().norm(dim=1) / z.flatten(1).float().norm(dim=1).clamp_min(1e-12)
    return dict(nan_fallbacks=int(fallback.sum()), relative_push=float(size.mean()))


def _record_bytes(kappa):
    """Bytes of one image's record (stage_<k>/records/): kappa candidates' score parts."""
    parts = {name: torch.zeros(1, kappa) for name in ("S", "student_ce", "reference_ce")}
    return len(json.dumps(image_record(0, (torch.zeros(1, dtype=torch.long), parts)), indent=2))


def _latent_stats(prior, z, real_x):
    """Std of the prior's sampled final latents and of the real images' latents (the VAE's posterior means times its
    scaling factor: what the DiT was trained to generate); None in pixel space, where the pixel check says it."""
    if prior.vae is None:
        return None
    with torch.no_grad():
        real = prior.encode((real_x * 2 - 1).to(prior.device))
    return dict(generated_std=float(z.float().std()), real_std=float(real.float().std()),
                scaling_factor=prior.scaling_factor)


def _pixel_stats(x):
    """Mean, std and the share of saturated values (0 or 1 after clamping) of images in [0, 1]."""
    x = x.float().clamp(0, 1)
    return dict(mean=float(x.mean()), std=float(x.std()), saturated=float(((x <= 0) | (x >= 1)).float().mean()))


def latents_ok(latents):
    """Whether the sampled latents and the real images' scaled latents have the same spread, within LATENT_RATIO."""
    return latents is None or 1 / LATENT_RATIO <= latents["generated_std"] / latents["real_std"] <= LATENT_RATIO


def pixels_ok(pixels):
    """Whether the decoded images' pixel statistics are the real data's, within MEAN_GAP and STD_RATIO."""
    gen, real = pixels["generated"], pixels["real"]
    return abs(gen["mean"] - real["mean"]) <= MEAN_GAP and 1 / STD_RATIO <= gen["std"] / real["std"] <= STD_RATIO


def labels_ok(result):
    """Whether theta* recognises at least PASS_SHARE of the unguided samples of their class (True when not judged)."""
    return result["recognised"] is None or result["recognised"] >= math.ceil(PASS_SHARE * result["samples_checked"])


def verdict(result):
    """The first failed check as the line a user reads (None when every check passes)."""
    px, lat, g, n = result["pixels"], result["latents"], result["guidance"], result["samples_checked"]
    if not latents_ok(lat):
        return (f"the real images' latents (encoded, times the VAE's scaling factor {lat['scaling_factor']:g}) have "
                f"std {lat['real_std']:.3f}, the prior's samples {lat['generated_std']:.3f}: check the VAE and its "
                f"scaling factor (--vae; vae.config.scaling_factor), the prior")
    if not pixels_ok(px):
        return (f"the decoded images look nothing like the data (pixel mean {px['generated']['mean']:.3f}, std "
                f"{px['generated']['std']:.3f}; the real images: {px['real']['mean']:.3f}, {px['real']['std']:.3f}): "
                f"check the VAE and its scaling factor (--vae; vae.config.scaling_factor), the prior")
    if not labels_ok(result):
        return (f"theta* recognises {result['recognised']}/{n} unguided samples of their class (chance "
                f"{round(result['chance'] * n)}/{n}): check the class order / label map, the VAE and its scaling, "
                f"the prior")
    if g["gain"] is not None and not g["gain"] > 0:
        return (f"guidance does not raise S on these weights (guided {g['s_guided']:.3f} vs unguided twins "
                f"{g['s_twin']:.3f} from the same noise): check the guidance sign and its scale")
    if g["nan_fallbacks"]:
        return (f"{g['nan_fallbacks']} samples of a guided step had a non-finite gradient (they would fall back to the "
                f"plain step): check --precision, the guidance scale")
    return None


# ----------------------------------------------------------------------------- the sampler batch

def pick_batch(prior, spec, sampler, guide, start, step, device, score=None, fixed=False):
    """(batch picked, largest that fitted, first size that did not or None). A batch counts samples (candidates
    included) and is a multiple of `step` (kappa); one slot of all classes (kappa x classes) is the most the sampler
    ever uses, so that is the cap. Grown by doubling from the preset until a step runs out of memory, bisected between
    the last fit and the first failure, then HEADROOM of it. fixed: the batch is the user's --batch-size or the run's
    own (a run folder that exists): only checked."""
    cap = step * spec.num_classes
    fits = lambda b: _fits(prior, spec, sampler, guide, b, device, score)
    b = max(step, min(start, cap) // step * step)
    if fixed:
        if not fits(b):
            raise UserError(f"preflight: the sampler batch {start} (--batch-size, or the run's own) does not fit in "
                            f"GPU memory (give a smaller --batch-size in a new --out-dir, or --precision bf16)")
        return start, b, None
    while not fits(b):  # the start must fit: halve it until it does (a preset made for a bigger GPU)
        if b <= step:
            raise UserError(f"preflight: a sampler batch of {step} does not fit in GPU memory (try --precision bf16)")
        b = max(step, b // 2 // step * step)
    ok, bad = b, None
    while ok < cap and bad is None:  # double until a step runs out of memory, or the cap
        grown = min(cap, 2 * ok)
        ok, bad = (grown, None) if fits(grown) else (ok, grown)
    while bad is not None and bad - ok > step:  # bisect, in steps of kappa
        mid = (ok + bad) // 2 // step * step
        if mid <= ok:
            break
        ok, bad = (mid, bad) if fits(mid) else (ok, mid)
    # headroom only where memory was the limit: peak memory varies with the step and with fragmentation
    return (ok if bad is None else max(step, int(HEADROOM * ok) // step * step)), ok, bad


def _probe(prior, spec, b, device):
    """Inputs of one sampler step at batch b: noise, labels cycling over the classes."""
    z = torch.randn(b, prior.channels, prior.latent_size, prior.latent_size,
                    generator=torch.Generator().manual_seed(0)).to(prior.device)
    classes = torch.arange(b) % spec.num_classes
    labels = torch.tensor([spec.prior_labels[c] for c in classes.tolist()], device=prior.device)
    return z, labels, classes.to(device)


def _step(prior, spec, sampler, guide, b, device, score):
    """One sampler step at batch b mid-schedule (memory and time per step do not depend on t), guided when `guide` is
    given: the CFG pass (plus the gradient through decoder and classifiers), then the scheduler step."""
    prior.scheduler.set_timesteps(sampler.steps)
    t = prior.scheduler.timesteps[min(len(prior.scheduler.timesteps) - 1, sampler.steps // 2)]
    z, labels, classes = _probe(prior, spec, b, device)
    with torch.no_grad():
        out = cfg_output(prior, z, t, labels, sampler) if guide is None else \
            guided_output(prior, z, t, labels, classes, sampler, score, guide)[0]
        prior.scheduler.step(out, t, z)
    if prior.device.type == "cuda":
        torch.cuda.synchronize(prior.device)


def _fits(prior, spec, sampler, guide, b, device, score):
    """Whether one step at batch b runs; out of memory (in any of the forms CUDA raises it) is the answer no, and the
    memory it held is given back once the exception is gone."""
    try:
        _step(prior, spec, sampler, guide, b, device, score)
        return True
    except RuntimeError as e:
        if not out_of_memory(e):
            raise
    free_memory()
    return False


# ----------------------------------------------------------------------------- what things cost

def batch_sizes(spec, batch, kappa, world=1):
    """The samples in each sampler batch of one slot on rank 0, the busiest rank, cut exactly as the run cuts them
    (ground.run.sampler_batches): a block of classes, kappa candidates each."""
    return [len(block) * kappa for block in sampler_batches(spec.num_classes, batch, kappa, 0, world)]


def igd_probe(spec, device):
    """IGD's score on random surrogate snapshots (4, as IGD keeps; weights do not change its cost), for sizing and
    timing its step: (the score, the nets, their view)."""
    view = reference_view(spec)
    nets = [make_student(IGD_ARCH, view, seed=j).to(device) for j in range(4)]
    size = sum(p.numel() for p in nets[0].parameters())
    targets = {}
    return Influence(nets, view, lambda j, c: targets.setdefault((j, c), torch.randn(size, device=device))), nets, view


def step_times(prior, spec, sampler, guide, igd_guide, args, batch, kappa, device, score, probe=None, world=1):
    """Seconds per sampler step at each batch size the run will use: unguided (the seed increment or a DiT set, the
    steps outside the window), guided, and IGD's."""
    device = torch.device(device)
    timed = lambda g, b, s: seconds_per_call(lambda: _step(prior, spec, sampler, g, b, device, s), device, REPEATS,
                                             median=True)
    guided_sizes = set(batch_sizes(spec, batch, kappa, world)) if score is not None else set()
    plain_sizes = set(batch_sizes(spec, batch, 1, world))
    out = dict(unguided_step_s={str(b): timed(None, b, None) for b in sorted(plain_sizes | guided_sizes)})
    if score is not None:
        out["guided_step_s"] = {str(b): timed(guide, b, score) for b in sorted(guided_sizes)}
    if probe is not None:  # IGD's step: a double backward per checkpoint
        score_igd, nets, view = probe
        out["igd_step_s"] = {str(b): timed(igd_guide, b, score_igd) for b in sorted(plain_sizes)}
        x = torch.rand(args.grad_ipc, spec.channels, view.res, view.res, device=device)
        y = torch.zeros(len(x), dtype=torch.long, device=device)
        out["igd_real_gradient_s"] = seconds_per_call(
            lambda: weight_gradient(nets[0], classifier_input(x * 2 - 1, view), y), device, REPEATS, median=True)
    return out


def _image_seconds(arch, view, recipe, images, device, teacher=None):
    """Seconds per training image of `arch` on `images` (an ImageSet): the median epoch after the first (which also
    decodes the set) over its images. Per image, not per batch: the run's batches (RDED's grow with IPC to 100 or 200)
    are bigger than a preflight can fill, and a bigger batch costs no more per image."""
    stamps = []
    train_student(make_student(arch, view, seed=0), images, view, recipe, EPOCHS_TIMED, device=device,
                  teacher=teacher, desc="preflight timing", on_epoch=lambda e, m: stamps.append(time.perf_counter()))
    return float(np.median(np.diff(stamps[1:]))) / len(images)


def training_times(args, spec, x_plain, device, data_dir, teacher):
    """Seconds per training image of the per-stage students, the evaluation students, and IGD's surrogate where it is
    not theta* (theta*, trained by the preflight or cached, costs the run nothing); one test pass of the evaluation.
    Timed on the preflight's own samples repeated to 256 images (their content does not change the cost)."""
    uint8 = list((x_plain * 255).round().to(torch.uint8))
    many = ImageSet([uint8[i % len(uint8)] for i in range(256)], [i % spec.num_classes for i in range(256)])
    view = recipe_view(spec, args.recipe)
    out = dict(student_image_s=_image_seconds(args.arch, view, args.recipe, many, device, teacher))
    if args.eval:
        out["eval_image_s"] = out["student_image_s"] if args.eval_arch == args.arch else _image_seconds(
            args.eval_arch, view, args.recipe, many, device, teacher)
        test = load_real(spec, data_dir, "test")
        subset, model = test.subset(range(min(len(test), 512))), make_student(args.eval_arch, view).to(device)
        per_subset = seconds_per_call(lambda: accuracy(model, subset, view, device), device, REPEATS, median=True)
        out["test_pass_s"] = per_subset * len(test) / len(subset)  # one test pass, scaled from 512 images
    if uses_igd(args.method, args.seed_set) and not (args.reference is None and IGD_ARCH == args.reference_arch):
        out["surrogate_image_s"] = _image_seconds(IGD_ARCH, reference_view(spec), surrogate_recipe(spec), many, device)
        out["real_train_images"] = len(load_real(spec, data_dir, "train"))
    return out


def estimate(args, spec, guide, igd_guide, batch, kappa, m, world=1):
    """eta_s for the whole command and eta_stages_s per stage, from the measured seconds: for every slot, rank 0's
    sampler batches (the ranks sample their class blocks at once), then the students' epochs x images, shared by the
    ranks of a DDP student; IGD's surrogate and the evaluation are one process's work."""
    C, steps = spec.num_classes, args.steps
    plain = lambda b: m["unguided_step_s"][str(b)]
    window, igd_window = guide.guided_steps(steps), igd_guide.guided_steps(steps)

    def unguided_stage(slots):  # one sampler pass per slot and batch
        return slots * sum(steps * plain(b) for b in batch_sizes(spec, batch, 1, world))

    def igd_stage(slots):  # IGD's window steps are double backwards; + each class's real gradients
        per_slot = sum(igd_window * m["igd_step_s"][str(b)] + (steps - igd_window) * plain(b)
                       for b in batch_sizes(spec, batch, 1, world))
        return slots * per_slot + C * 4 * m["igd_real_gradient_s"]

    def guided_stage(slots):  # kappa candidates per image in the window, the plain step outside it
        return slots * sum(window * m["guided_step_s"][str(b)] + (steps - window) * plain(b)
                           for b in batch_sizes(spec, batch, kappa, world))

    def student_seconds(ipc, per_image, epochs=None):  # epochs x images x seconds per image
        return (epochs or epochs_for_ipc(ipc, args.recipe, spec.name, num_classes=C)) * C * ipc * per_image

    if args.method in ("dit", "mgd3"):  # MGD3's pull is arithmetic on the step's own output: a DiT step's price
        stages = [unguided_stage(args.ipc)]
    elif args.method == "igd":
        stages = [igd_stage(args.ipc)]
    else:
        stages = [igd_stage(args.stage_ipc) if args.seed_set == "igd" else
                  unguided_stage(args.stage_ipc) if args.seed_set in ("dit", "mgd3") else 0.0]
        stages += [guided_stage(args.stage_ipc) +  # a guided stage: its student, then its samples
                   student_seconds(k * args.stage_ipc, m["student_image_s"], args.student_epochs) / world
                   for k in range(1, args.ipc // args.stage_ipc)]
    extra = {}
    if "surrogate_image_s" in m:  # IGD's surrogate, when it is not theta*'s trajectory
        epochs = surrogate_epochs(spec.name, args.reference_epochs)
        extra["surrogate_s"] = epochs * m["real_train_images"] * m["surrogate_image_s"]
        extra["igd_checkpoint_selection_s"] = C * (epochs + 1) * m["igd_real_gradient_s"]
    if args.eval:  # the best-seen column's test passes, as train_student spaces them
        epochs = epochs_for_ipc(args.ipc, args.recipe, spec.name, num_classes=C)
        passes = len(eval_epochs(epochs, eval_points(spec.name)))
        extra["eval_s"] = EVAL_RUNS * (student_seconds(args.ipc, m["eval_image_s"], epochs) + passes * m["test_pass_s"])
    return dict(eta_s=sum(stages) + sum(extra.values()), eta_stages_s=stages, eta_other_s=extra)


def disk_bytes(args, spec, x_plain, z_plain, record_bytes, reference):
    """What the run will write: per image a stage PNG, its copy in distilled/, its latent and record; per guided
    stage a student (theta*'s size: by default the same architecture). theta*'s cache is the preflight's own."""
    png = np.mean([len(_png_bytes(x)) for x in x_plain])  # the bytes save_png writes
    buffer = io.BytesIO()
    torch.save(z_plain[0].cpu().clone(), buffer)
    student = sum(p.numel() * p.element_size() for p in reference.parameters()) if reference is not None else 0
    lgd = args.method == "lgd"
    images, guided = spec.num_classes * args.ipc, spec.num_classes * (args.ipc - args.stage_ipc) if lgd else 0
    return int(images * ((2 if lgd else 1) * png + buffer.tell()) + guided * record_bytes +
               (args.ipc // args.stage_ipc - 1 if lgd else 0) * student)


def _png_bytes(x):
    buffer = io.BytesIO()
    png_image(x).save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------- reading and showing it

# what a run and --dry-run read from preflight.json, with the type each must have
PREFLIGHT_KEYS = {"passed": bool, "settings": dict, "sampler_batch": int, "eta_s": (int, float), "eta_stages_s": list,
                  "eta_other_s": dict, "disk_bytes": int, "device": str}


def load_preflight(out_dir):
    """out_dir's preflight.json, or None; a file that is not one the preflight wrote (hand-edited, truncated) is one
    line naming it and the way out (the preflight simply runs again)."""
    path = preflight_path(out_dir)
    if not os.path.exists(path):
        return None
    remedy = "delete it and rerun: the preflight runs again"
    result = load_json(path, what="preflight result", remedy=remedy)
    wrong = [k for k, kind in PREFLIGHT_KEYS.items() if not isinstance(result.get(k), kind)] \
        if isinstance(result, dict) else ["a JSON object"]
    if wrong:
        raise UserError(f"preflight result {path} is not one the preflight wrote (missing or wrong: "
                        f"{', '.join(wrong)}); {remedy}")
    return result


def load_passing(out_dir, settings):
    """A passing preflight.json of these settings in out_dir (the run reuses it), else None."""
    result = load_preflight(out_dir)
    return result if result is not None and result["passed"] and result["settings"] == settings else None


def duration(seconds):
    if seconds >= 2 * DAY:
        return f"{seconds / DAY:.1f} days"
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    return f"{int(seconds // 60)} min {int(seconds % 60):02d} s" if seconds >= 60 else f"{seconds:.1f} s"


def size(nbytes):
    return f"{nbytes / 2**30:.2f} GB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MB"


def eta_line(result):
    """One line: what the run will cost, from a preflight."""
    other = ", ".join(f"{k[:-2].replace('_', ' ')} {duration(v)}" for k, v in result["eta_other_s"].items())
    return (f"ETA {duration(result['eta_s'])} on {result['device']} (stages {duration(sum(result['eta_stages_s']))}"
            + (f", {other}" if other else "") + f"), sampler batch {result['sampler_batch']}, disk "
            f"{size(result['disk_bytes'])}")


def table(result):
    """The table the preflight prints: each check, what it measured, what it needs, ok or FAIL."""
    g, n, px, search = result["guidance"], result["samples_checked"], result["pixels"], result["batch_search"]
    ok = lambda passed: "ok" if passed else "FAIL"
    rows = [("prior + labels", f"not checked: a {result['method']} set trains no theta*",
             "give --reference FILE, or preflight an LGD run first (it caches theta*)", "-")
            if result["recognised"] is None else
            ("prior + labels", f"theta* recognises {result['recognised']}/{n}",
             f"chance {round(result['chance'] * n)}/{n}, need {math.ceil(PASS_SHARE * n)}", ok(labels_ok(result))),
            ("decoded images", "mean {mean:.3f} std {std:.3f} saturated {saturated:.1%}".format(**px["generated"]),
             "real: mean {mean:.3f} std {std:.3f} saturated {saturated:.1%}".format(**px["real"]), ok(pixels_ok(px)))]
    if result["latents"] is not None:  # a VAE: its scaling factor, checked on the latents themselves
        lat = result["latents"]
        rows.append(("latent scale", f"samples' std {lat['generated_std']:.3f}",
                     f"real images' latents {lat['real_std']:.3f} (scaling factor {lat['scaling_factor']:g}), need "
                     f"within {LATENT_RATIO:g}x", ok(latents_ok(lat))))
    if g["gain"] is not None:
        rows += [("guidance direction", f"S guided {g['s_guided']:.3f} vs twin {g['s_twin']:.3f}",
                  f"gain {g['gain']:+.3f}, need > 0", ok(g["gain"] > 0)),
                 ("non-finite pushes", str(g["nan_fallbacks"]), "need 0", ok(not g["nan_fallbacks"])),
                 ("push per guided step", f"{g['relative_push']:.4f} of ||z_t|| (mean, mid-window)", "", "")]
    else:
        rows.append(("guidance direction", g["note"], "", "-"))
    rows += [("sampler batch", str(result["sampler_batch"]), f"largest that fitted {search['largest_that_fitted']}"
              + (f", out of memory at {search['first_out_of_memory']}" if search["first_out_of_memory"] else
                 ", none ran out of memory (capped at one slot of every class)"), ""),
             ("ETA", duration(result["eta_s"]), " + ".join(duration(s) for s in result["eta_stages_s"][:6]) +
              (" ..." if len(result["eta_stages_s"]) > 6 else "") + f" (stages, {result['world_size']} rank(s))", ""),
             ("disk", size(result["disk_bytes"]), "the run folder (PNGs, latents, records, students)", "")]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join([f"preflight ({result['device']}, {result['preflight_s']:.0f} s):"] +
                     ["  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows])


def save_picture(x_plain, x_guided, result, spec, path):
    """Row 1: the first unguided sample of each class (x = theta* does not recognise it); row 2: the guided ones."""
    n = len(x_plain)
    marks = (result["recognised_per_sample"] or [True] * n)[:n]  # not judged: no marks
    names = [spec.class_names()[c][-8:] + ("" if ok else " x") for c, ok in enumerate(marks)]
    rows = [x_plain] + ([x_guided] if x_guided is not None else [])
    title = (f"preflight: theta* recognises {result['recognised']}/{result['samples_checked']}"
             if result["recognised"] is not None else "preflight: unguided samples (not judged)")
    gain = result["guidance"]["gain"]
    save_grid(torch.cat(rows).cpu(), path, ["unguided", "guided"][:len(rows)], names,
              title + (f"; S gain {gain:+.3f}" if gain is not None else ""))
