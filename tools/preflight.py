"""
The first minutes of a real run: check it on the user's own weights and data, and price it, before hours are spent.

Nothing here can be checked without the real DiT-XL/2, the real data and the real GPU, so it runs where they
are: first in every non-digits run (`--no-preflight` skips it), or alone with `--preflight`.

  1. prior and labels    one unguided sample per class (the first 20 of ImageNet-1K, or --preflight-classes), with
                         the run's sampler, CFG and steps and the noise of the run's own first images. theta* (the
                         run's, trained or cached as the run would) must recognise at least half. A class order or
                         label map that sends class c to another ImageNet id, a VAE with the wrong scaling or a
                         broken prior fail here. Beside it: the decoded images' mean / std / saturated share and
                         the real data's.
  2. guidance direction  a student trained a few epochs on those samples, then one guided batch at the stage-1
                         settings (lambda, omega, gamma with M_c = those samples, one candidate: before selection):
                         mean S of the guided samples must exceed that of their unguided twins from the same noise,
                         with no non-finite fallback. If it does not, the sign, the scale or the gradient decoder is
                         wrong on these weights.
  3. cost                the sampler batch, the largest that fits (grown from the preset by doubling until
                         out-of-memory or one batch per class block, bisected, then 10% back for headroom; recorded
                         in args.json so the run starts there); seconds per unguided and guided sampler step at the
                         batches the run will use, per student epoch, for theta* / IGD's surrogate and the
                         evaluation; from them eta_s (the whole command), eta_stages_s (per stage) and disk_bytes.

Writes DIR/preflight.json and DIR/preflight.png (row 1: the unguided samples, row 2: the guided batch; a column
is marked `x` where theta* does not recognise the unguided sample). A failed check ends the run with one line,
`error: preflight: ...`, naming the likely cause; the JSON is written first (distill.py drives this).

Run: python distill.py --dataset imagewoof --preflight          (then the same command without --preflight)
     python distill.py --preflight                             (the digits preset: seconds on a CPU)
"""
import io
import json
import math
import os
import time

import numpy as np
import torch

from data import ImageSet, classifier_input, load_real, resize_crop
from ground.common import (
    SALT_PREFLIGHT,
    UserError,
    derive_seed,
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
from guidance import cfg_output, decode_images, guided_output, make_score, sample, score_of
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
from train_student import (
    RECIPES,
    accuracy,
    batch_size_for,
    epochs_for_ipc,
    eval_epochs,
    eval_points,
    recipe_settings,
    recipe_view,
    train_student,
)

PASS_SHARE = 0.5        # theta* must recognise at least half of the unguided samples
LATENT_RATIO = 1.5      # the prior's sampled latents: their std within [1/1.5, 1.5] x that of the real images' latents
                        # (encoded and scaled by vae.config.scaling_factor, as the DiT was trained on them): a VAE
                        # loaded with another scaling factor scales one and not the other
MEAN_GAP = 0.2          # decoded images: their mean pixel (in [0, 1]) within this of the real data's,
STD_RATIO = 2.0         # and their pixel std within [1/2, 2] x the real data's (gross failures: a broken decoder)
STUDENT_EPOCHS = 30     # "a few epochs" on one sample per class: enough to learn them, so S has a gradient to follow
HEADROOM = 0.9          # the batch picked is 90% of the largest that fitted (memory varies from step to step)
DAY = 24 * 3600
EVAL_RUNS = 3           # the students of distill.py --eval
REPEATS = 5             # timed calls per measurement, their median priced (a busy machine's hiccups do not count)
EPOCHS_TIMED = 6        # epochs of a timed student: the first decodes the set, the median of the others is priced


# ----------------------------------------------------------------------------- the checks

def run_preflight(args, spec, prior, device, data_dir, guide, igd_guide, sampler, settings, fixed=False):
    """All three checks -> (result dict, (unguided samples, guided samples or None)). result["failure"] is the
    line a failed check ends the run with (None when all pass); report() writes and prints it. settings: the run's
    (a run reuses a passed preflight of the same); fixed: the batch is the user's or the run's own, only checked."""
    start = time.time()
    n = min(spec.num_classes, 20)
    classes = torch.arange(n)
    labels = torch.tensor([spec.prior_labels[c] for c in range(n)])
    student_view = recipe_view(spec, args.recipe)
    teacher = soft_label_teacher(student_view, args.recipe, data_dir, device, num_workers=args.num_workers)
    guided_run = args.method == "lgd" and args.ipc > args.stage_ipc
    kappa = guide.candidates if guided_run else 1
    measured = {}

    # 1. prior and labels: theta* as the run gets it (trained now and cached for the run, or loaded). A DiT or MGD3
    # set uses no theta*: it is not trained for this check (only read when it is there, or given)
    ref_cached = args.reference is not None or surrogate_cached(spec, args.reference_arch, data_dir,
                                                                args.reference_epochs)
    reference = None
    t = time.time()
    if args.method in ("lgd", "igd") or ref_cached:
        reference, ref_view = reference_model(spec, args.reference_arch, data_dir, device, args.reference_epochs,
                                              num_workers=args.num_workers, path=args.reference)  # the run's theta*
    measured["theta_star_s"] = time.time() - t
    noise = lambda index: [torch.Generator().manual_seed(derive_seed(args.seed, c, index, 0))
                           for c in range(n)]
    t = time.time()
    z_plain = _in_chunks(lambda rows: sample(prior, labels[rows], classes[rows], _pick(noise(0), rows), sampler), n,
                         args.batch_size)
    x_plain = decode_images(prior, z_plain)  # the run's own image 0 of each class (the same noise)
    measured["unguided_samples_s"] = time.time() - t
    recognised = None
    if reference is not None:
        recognised = recognises(reference, ref_view, x_plain, classes).tolist()
    real = load_real(spec, data_dir, "train")
    firsts = [real.labels.index(c) for c in range(n)]
    real_x = torch.stack([resize_crop(real.load(i), spec.image_size) for i in firsts])
    result = dict(dataset=spec.name, method=args.method, classes_checked=n,
                  recognised=None if recognised is None else sum(recognised),
                  chance=1 / spec.num_classes, recognised_per_class=recognised,
                  pixels=dict(generated=_pixel_stats(x_plain), real=_pixel_stats(real_x)),
                  latents=_latent_stats(prior, z_plain, real_x))

    # the stage-1 student of a guided run: a few epochs on those samples (8-bit, as the run's students see them)
    score = None
    if guided_run:
        student = make_student(args.arch, student_view, seed=stream_seed(args.seed, SALT_PREFLIGHT, 0))
        uint8 = (x_plain * 255).round().to(torch.uint8)
        train_student(student, ImageSet(list(uint8), classes.tolist()), student_view, args.recipe, STUDENT_EPOCHS,
                      seed=stream_seed(args.seed, SALT_PREFLIGHT, 1), device=device, desc="preflight student",
                      teacher=teacher)
        score = make_score(guide.score, student, student_view, reference, ref_view, guide)  # the run's own score

    # 3a. the sampler batch that fits (before the guided batch below, which must fit too): the learnability step's,
    # and IGD's (a double backward per sample) where the run samples an IGD increment at the same batch
    batch, largest, first_oom = pick_batch(prior, spec, sampler, guide if guided_run else None, args.batch_size,
                                           kappa, device, score, fixed=fixed)
    probe = igd_probe(spec, device) if uses_igd(args.method, args.seed_set) else None
    igd_search = None
    if probe is not None:
        igd_batch, igd_largest, igd_oom = pick_batch(prior, spec, sampler, igd_guide, batch, 1, device, probe[0],
                                                     fixed=fixed)
        igd_search = dict(largest_that_fitted=igd_largest, first_out_of_memory=igd_oom)
        batch = min(batch, igd_batch)

    # 2. guidance direction: a guided batch at the stage-1 settings (M_c = the samples above) against its
    # unguided twins from the same noise, one candidate per image (before selection)
    x_guided, record_bytes = None, 0
    if guided_run:
        guided_noise = lambda: [torch.Generator().manual_seed(derive_seed(args.seed, SALT_PREFLIGHT, 2, c))
                                for c in range(n)]
        memories = [z_plain[c].flatten()[None].float().cpu() for c in range(n)] if guide.deviation else None
        x_guided = decode_images(prior, _in_chunks(lambda rows: sample(
            prior, labels[rows], classes[rows].to(prior.device), _pick(guided_noise(), rows), sampler, score, guide,
            _pick(memories, rows) if memories else None), n, batch))
        x_twin = decode_images(prior, _in_chunks(lambda rows: sample(prior, labels[rows], classes[rows],
                                                                      _pick(guided_noise(), rows), sampler), n, batch))
        with torch.no_grad():
            s_guided = float(score_of(score, x_guided.to(device) * 2 - 1, classes.to(device)).mean())
            s_twin = float(score_of(score, x_twin.to(device) * 2 - 1, classes.to(device)).mean())
        result["guidance"] = dict(s_guided=s_guided, s_twin=s_twin, gain=s_guided - s_twin,
                                  **push_sizes(prior, spec, sampler, guide, min(n, batch // kappa), device, score))
        record_bytes = _record_bytes(kappa)
    else:
        result["guidance"] = dict(s_guided=None, s_twin=None, gain=None, nan_fallbacks=0, relative_push=None,
                                  note=f"not checked: --method {args.method} has no learnability-guided stage")

    # 3b. what everything costs at that batch
    measured.update(step_times(prior, spec, sampler, guide, igd_guide, args, batch, kappa, device, score, probe))
    measured.update(training_times(args, spec, x_plain, device, data_dir, ref_cached, teacher))
    result.update(sampler_batch=batch, batch_search=dict(start=args.batch_size, largest_that_fitted=largest,
                                                         first_out_of_memory=first_oom, headroom=HEADROOM,
                                                         igd=igd_search),
                  stages=args.ipc // args.stage_ipc if args.method == "lgd" else 1,
                  **estimate(args, spec, guide, igd_guide, batch, kappa, measured),
                  disk_bytes=disk_bytes(args, spec, x_plain, z_plain, record_bytes, reference),
                  measured=measured, theta_star_trained_by_preflight=not ref_cached, preflight_s=time.time() - start,
                  device=str(device), settings=settings)
    result["failure"] = verdict(result, n)
    result["passed"] = result["failure"] is None
    return result, (x_plain, x_guided)


def report(result, images, spec, out_dir):
    """Write preflight.json and preflight.png (rank 0 of a torchrun job) and print the table."""
    if is_main():
        save_json(result, preflight_path(out_dir))
        save_picture(*images, result, spec, preflight_path(out_dir, "png"))
    print0(table(result))


def _pick(items, rows):
    return [items[i] for i in rows]


def _in_chunks(fn, n, batch):
    """fn(rows) for consecutive rows of at most `batch` samples, concatenated (the preflight's own samples fit
    in the batches the run will use)."""
    return torch.cat([fn(list(range(i, min(n, i + batch)))) for i in range(0, n, max(1, batch))])


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


def latents_ok(latents):
    """Whether the sampled latents and the real images' scaled latents have the same spread, within LATENT_RATIO."""
    return latents is None or 1 / LATENT_RATIO <= latents["generated_std"] / latents["real_std"] <= LATENT_RATIO


def pixels_ok(pixels):
    """Whether the decoded images' pixel statistics are the real data's, within MEAN_GAP and STD_RATIO."""
    gen, real = pixels["generated"], pixels["real"]
    return abs(gen["mean"] - real["mean"]) <= MEAN_GAP and 1 / STD_RATIO <= gen["std"] / real["std"] <= STD_RATIO


def labels_ok(result, n):
    """Whether theta* recognises at least PASS_SHARE of the n unguided samples of their class (True when not judged)."""
    return result["recognised"] is None or result["recognised"] >= math.ceil(PASS_SHARE * n)


def verdict(result, n):
    """The first failed check as the line a user reads (None when every check passes)."""
    px, lat = result["pixels"], result["latents"]
    if not latents_ok(lat):
        return (f"the real images' latents (encoded, times the VAE's scaling factor {lat['scaling_factor']:g}) have "
                f"std {lat['real_std']:.3f}, the prior's samples {lat['generated_std']:.3f}: check the VAE and its "
                f"scaling factor (--vae; vae.config.scaling_factor), the prior")
    if not pixels_ok(px):
        return (f"the decoded images look nothing like the data (pixel mean {px['generated']['mean']:.3f}, std "
                f"{px['generated']['std']:.3f}; the real images: {px['real']['mean']:.3f}, {px['real']['std']:.3f}): "
                f"check the VAE and its scaling factor (--vae; vae.config.scaling_factor), the prior")
    if not labels_ok(result, n):
        return (f"theta* recognises {result['recognised']}/{n} unguided samples of their class (chance "
                f"{round(result['chance'] * n)}/{n}): check the class order / label map, the VAE and its scaling, "
                f"the prior")
    g = result["guidance"]
    if g["gain"] is not None and not g["gain"] > 0:
        return (f"guidance does not raise S on these weights (guided {g['s_guided']:.3f} vs unguided twins "
                f"{g['s_twin']:.3f} from the same noise): check the guidance sign and its scale")
    if g["nan_fallbacks"]:
        return (f"{g['nan_fallbacks']} samples of a guided step had a non-finite gradient (they would fall back to the "
                f"plain step): check --precision, the guidance scale")
    return None


def _pixel_stats(x):
    """Mean, std and the share of saturated values (0 or 1 after clamping) of images in [0, 1]."""
    x = x.float().clamp(0, 1)
    return dict(mean=float(x.mean()), std=float(x.std()), saturated=float(((x <= 0) | (x >= 1)).float().mean()))


# ----------------------------------------------------------------------------- the sampler batch

def pick_batch(prior, spec, sampler, guide, start, step, device, score=None, fixed=False):
    """(batch picked, largest that fitted, first size that did not or None).

    A batch counts samples (candidates included) and is a multiple of `step` (kappa). More than one class block
    (kappa x classes) is never used by the sampler, so that is the cap. Grown by doubling from the preset until a
    step runs out of memory, bisected between the last fit and the first failure, then HEADROOM of it.
    fixed: the batch is the user's --batch-size or the run's own (a run folder that exists): only checked."""
    cap = step * spec.num_classes
    fits = lambda b: _fits(prior, spec, sampler, guide, b, device, score)
    b = max(step, min(start, cap) // step * step)
    if fixed:
        if not fits(b):
            raise UserError(f"preflight: the sampler batch {start} (--batch-size, or the run's own) does not fit in "
                            f"GPU memory (give a smaller --batch-size in a new --out-dir, or --precision bf16)")
        return start, b, None
    # 1. the start must fit: halve it until it does (a preset made for a bigger GPU)
    while not fits(b):
        if b <= step:
            raise UserError(f"preflight: a sampler batch of {step} does not fit in GPU memory (try --precision bf16)")
        b = max(step, b // 2 // step * step)
    # 2. double until a step runs out of memory (or the cap: a bigger batch would never be used)
    ok, bad = b, None
    while ok < cap and bad is None:
        grown = min(cap, 2 * ok)
        if fits(grown):
            ok = grown
        else:
            bad = grown
    # 3. bisect between the last size that fitted and the first that did not, in steps of kappa
    while bad is not None and bad - ok > step:
        mid = (ok + bad) // 2 // step * step
        if mid <= ok:
            break
        ok, bad = (mid, bad) if fits(mid) else (ok, mid)
    # 4. headroom only where memory was the limit: peak memory varies with the step and with fragmentation, and
    # a batch that fits exactly once may not fit for a whole stage (the run would then halve it mid-stage)
    picked = ok if bad is None else max(step, int(HEADROOM * ok) // step * step)
    return picked, ok, bad


def _probe(prior, spec, b, device):
    """Inputs of one sampler step at batch b: noise, labels cycling over the classes, a timestep in the window."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(b, prior.channels, prior.latent_size, prior.latent_size, generator=g).to(prior.device)
    classes = torch.arange(b) % spec.num_classes
    labels = torch.tensor([spec.prior_labels[c] for c in classes.tolist()], device=prior.device)
    return z, labels, classes.to(device)


def _step(prior, spec, sampler, guide, b, device, score):
    """One sampler step at batch b, guided when `guide` is given: the CFG pass (plus the gradient through decoder
    and classifiers), then the scheduler step."""
    prior.scheduler.set_timesteps(sampler.steps)
    # mid-schedule: memory and time per step do not depend on t, and a timestep must come from the schedule
    t = prior.scheduler.timesteps[min(len(prior.scheduler.timesteps) - 1, sampler.steps // 2)]
    z, labels, classes = _probe(prior, spec, b, device)
    with torch.no_grad():
        if guide is None:
            out = cfg_output(prior, z, t, labels, sampler)
        else:
            out = guided_output(prior, z, t, labels, classes, sampler, score, guide)[0]
        prior.scheduler.step(out, t, z)
    if prior.device.type == "cuda":
        torch.cuda.synchronize(prior.device)


def _fits(prior, spec, sampler, guide, b, device, score):
    """Whether one step at batch b runs; out of memory (an OutOfMemoryError or a CUDA / cuBLAS / cuDNN allocation
    failure) is the answer no, and the memory it held is given back once the exception is gone."""
    try:
        _step(prior, spec, sampler, guide, b, device, score)
        return True
    except RuntimeError as e:
        if not out_of_memory(e):
            raise
    free_memory()
    return False


# ----------------------------------------------------------------------------- what things cost

def batch_sizes(spec, batch, kappa):
    """The samples in each sampler batch of one slot, cut exactly as the run cuts them (ground.run.sampler_batches):
    a block of classes, kappa candidates each."""
    return [len(block) * kappa for block in sampler_batches(spec.num_classes, batch, kappa)]


def igd_probe(spec, device):
    """IGD's score on random surrogate snapshots (4, as IGD keeps; weights do not change its cost), for sizing and
    timing its step: (the score, the nets, their view)."""
    view = reference_view(spec)
    nets = [make_student(IGD_ARCH, view, seed=j).to(device) for j in range(4)]
    size = sum(p.numel() for p in nets[0].parameters())
    targets = {}
    return Influence(nets, view, lambda j, c: targets.setdefault((j, c), torch.randn(size, device=device))), nets, view


def step_times(prior, spec, sampler, guide, igd_guide, args, batch, kappa, device, score, probe=None):
    """Seconds per sampler step at each batch size the run will use: unguided (the seed increment or a DiT set, the
    steps outside the window), guided, and IGD's."""
    device = torch.device(device)
    timed = lambda g, b, s: seconds_per_call(lambda: _step(prior, spec, sampler, g, b, device, s), device, REPEATS,
                                             median=True)
    guided_sizes = batch_sizes(spec, batch, kappa) if score is not None else []
    plain_sizes = set(batch_sizes(spec, batch, 1)) | set(guided_sizes)
    out = dict(unguided_step_s={str(b): timed(None, b, None) for b in sorted(plain_sizes)})
    if score is not None:
        out["guided_step_s"] = {str(b): timed(guide, b, score) for b in sorted(set(guided_sizes))}
    if probe is not None:  # IGD's step: a double backward per checkpoint
        score_igd, nets, view = probe
        out["igd_step_s"] = {str(b): timed(igd_guide, b, score_igd) for b in sorted(set(batch_sizes(spec, batch, 1)))}
        x = torch.rand(args.grad_ipc, spec.channels, view.res, view.res, device=device)
        y = torch.zeros(len(x), dtype=torch.long, device=device)
        out["igd_real_gradient_s"] = seconds_per_call(
            lambda: weight_gradient(nets[0], classifier_input(x * 2 - 1, view), y), device, REPEATS, median=True)
    return out


def _epoch_seconds(arch, view, recipe, images, n_classes, device, teacher=None, epochs=EPOCHS_TIMED):
    """Seconds per training batch of `arch` on `images` (an ImageSet): the median epoch after the first (which also
    decodes the set), over its batches; and the recipe's batch size for that set."""
    stamps = []
    train_student(make_student(arch, view, seed=0), images, view, recipe, epochs, device=device, teacher=teacher,
                  desc="preflight timing", on_epoch=lambda e, m: stamps.append(time.perf_counter()))
    r = recipe_settings(recipe)
    bs = batch_size_for(r, max(1, len(images) // n_classes), n_classes, len(images))
    return float(np.median(np.diff(stamps[1:]))) / math.ceil(len(images) / bs), bs


def training_times(args, spec, x_plain, device, data_dir, ref_cached, teacher):
    """Seconds per batch of the per-stage students, the evaluation students, and theta* / IGD's surrogate when the
    run still has to train them; timed on the preflight's own images repeated to a realistic batch count."""
    # the preflight's samples stand in for the run's images (the same size and channels; their content does not
    # change the cost), repeated by reference to four batches, so a per-batch time is measured on full batches
    uint8 = list((x_plain * 255).round().to(torch.uint8))
    n = len(uint8)
    view = recipe_view(spec, args.recipe)
    bs = batch_size_for(RECIPES[args.recipe], args.ipc, spec.num_classes, spec.num_classes * args.ipc)
    many = ImageSet([uint8[i % n] for i in range(max(n, 4 * bs))], [i % n for i in range(max(n, 4 * bs))])
    out = {}
    out["student_batch_s"], _ = _epoch_seconds(args.arch, view, args.recipe, many, spec.num_classes, device, teacher)
    if args.eval:
        out["eval_batch_s"] = out["student_batch_s"] if args.eval_arch == args.arch else _epoch_seconds(
            args.eval_arch, view, args.recipe, many, spec.num_classes, device, teacher)[0]
        test = load_real(spec, data_dir, "test")
        subset = test.subset(range(min(len(test), 512)))
        model = make_student(args.eval_arch, view).to(device)
        per_subset = seconds_per_call(lambda: accuracy(model, subset, view, device), device, REPEATS, median=True)
        out["test_pass_s"] = per_subset * len(test) / len(subset)  # one test pass, scaled from 512 images
    surrogate = IGD_ARCH if uses_igd(args.method, args.seed_set) else None
    if surrogate is not None and not (ref_cached and surrogate == args.reference_arch):
        ref_view = reference_view(spec)
        real = ImageSet([uint8[i % n] for i in range(4 * 64)], [i % n for i in range(4 * 64)])
        out["surrogate_batch_s"], _ = _epoch_seconds(surrogate, ref_view, surrogate_recipe(spec), real,
                                                     spec.num_classes, device)
        out["real_train_images"] = len(load_real(spec, data_dir, "train"))
    return out


def estimate(args, spec, guide, igd_guide, batch, kappa, m):
    """eta_s for the whole command and eta_stages_s per stage, from the measured seconds: for every slot, the run's
    own sampler batches (batch_sizes, i.e. ground.run.sampler_batches), then the students' epochs x batches."""
    C, steps = spec.num_classes, args.steps
    plain = lambda b: m["unguided_step_s"][str(b)]
    window, igd_window = guide.guided_steps(steps), igd_guide.guided_steps(steps)

    def unguided_stage(slots):  # one sampler pass per slot and batch
        return slots * sum(steps * plain(b) for b in batch_sizes(spec, batch, 1))

    def igd_stage(slots):  # IGD's window steps are double backwards; + each class's real gradients
        per_slot = sum(igd_window * m["igd_step_s"][str(b)] + (steps - igd_window) * plain(b)
                       for b in batch_sizes(spec, batch, 1))
        return slots * per_slot + C * 4 * m["igd_real_gradient_s"]

    def guided_stage(slots):  # kappa candidates per image in the window, the plain step outside it
        per_slot = sum(window * m["guided_step_s"][str(b)] + (steps - window) * plain(b)
                       for b in batch_sizes(spec, batch, kappa))
        return slots * per_slot

    def student_seconds(ipc, per_batch, recipe_epochs=None):  # epochs x batches per epoch x seconds per batch
        bs = batch_size_for(RECIPES[args.recipe], ipc, C, C * ipc)
        epochs = recipe_epochs or epochs_for_ipc(ipc, args.recipe, spec.name)
        return epochs * math.ceil(C * ipc / bs) * per_batch

    stages = []
    if args.method in ("dit", "mgd3"):  # MGD3's pull is arithmetic on the step's own output: a DiT step's price
        stages.append(unguided_stage(args.ipc))
    elif args.method == "igd":
        stages.append(igd_stage(args.ipc))
    else:
        stages.append(igd_stage(args.stage_ipc) if args.seed_set == "igd" else
                      unguided_stage(args.stage_ipc) if args.seed_set in ("dit", "mgd3") else 0.0)
        for k in range(1, args.ipc // args.stage_ipc):  # a guided stage: its student, then its samples
            student = student_seconds(k * args.stage_ipc, m["student_batch_s"], args.student_epochs)
            stages.append(guided_stage(args.stage_ipc) + student)
    extra = {}
    if "surrogate_batch_s" in m:  # IGD's surrogate, when it is not theta*'s cached trajectory
        epochs = surrogate_epochs(spec.name, args.reference_epochs)
        extra["surrogate_s"] = epochs * math.ceil(m["real_train_images"] / 64) * m["surrogate_batch_s"]
        extra["igd_checkpoint_selection_s"] = C * (epochs + 1) * m["igd_real_gradient_s"]
    if args.eval:
        # the best-seen column's test passes, as train_student spaces them (100, or mnist's 10, of the epochs)
        epochs = epochs_for_ipc(args.ipc, args.recipe, spec.name)
        passes = len(eval_epochs(epochs, eval_points(spec.name)))
        per_run = student_seconds(args.ipc, m["eval_batch_s"], epochs) + passes * m["test_pass_s"]
        extra["eval_s"] = EVAL_RUNS * per_run
    return dict(eta_s=sum(stages) + sum(extra.values()), eta_stages_s=stages, eta_other_s=extra)


def disk_bytes(args, spec, x_plain, z_plain, record_bytes, reference):
    """What the run will write: per image a stage PNG, its copy in distilled/, its latent and record; per guided
    stage a student (theta*'s size: the same architecture). theta*'s cache is written by the preflight itself."""
    png = np.mean([len(_png_bytes(x)) for x in x_plain])  # the bytes save_png writes
    buffer = io.BytesIO()
    torch.save(z_plain[0].cpu().clone(), buffer)
    latent = buffer.tell()
    student = sum(p.numel() * p.element_size() for p in reference.parameters()) if reference is not None else 0
    images = spec.num_classes * args.ipc
    stages = args.ipc // args.stage_ipc if args.method == "lgd" else 1
    guided = spec.num_classes * (args.ipc - args.stage_ipc) if args.method == "lgd" else 0
    copies = 2 if args.method == "lgd" else 1
    return int(images * (copies * png + latent) + guided * record_bytes + (stages - 1) * student)


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
    wrong = [k for k, kind in PREFLIGHT_KEYS.items() if not isinstance(result, dict) or
             not isinstance(result.get(k), kind)] if isinstance(result, dict) else ["a JSON object"]
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


def eta_line(result):
    """One line: what the run will cost, from a preflight."""
    other = ", ".join(f"{k[:-2].replace('_', ' ')} {duration(v)}" for k, v in result["eta_other_s"].items())
    return (f"ETA {duration(result['eta_s'])} on {result['device']} (stages {duration(sum(result['eta_stages_s']))}"
            + (f", {other}" if other else "") + f"), sampler batch {result['sampler_batch']}, disk "
            f"{size(result['disk_bytes'])}")


def size(nbytes):
    return f"{nbytes / 2**30:.2f} GB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MB"


def table(result):
    """The table the preflight prints."""
    g, n = result["guidance"], result["classes_checked"]
    px = result["pixels"]
    if result["recognised"] is None:
        rows = [("prior + labels", f"not checked: a {result['method']} set trains no theta*",
                 "give --reference FILE, or preflight an LGD run first (it caches theta*)", "-")]
    else:
        rows = [("prior + labels", f"theta* recognises {result['recognised']}/{n}",
                 f"chance {round(result['chance'] * n)}/{n}, need {math.ceil(PASS_SHARE * n)}",
                 "ok" if labels_ok(result, n) else "FAIL")]
    rows += [
             ("decoded images", "mean {mean:.3f} std {std:.3f} saturated {saturated:.1%}".format(**px["generated"]),
              "real: mean {mean:.3f} std {std:.3f} saturated {saturated:.1%}".format(**px["real"]),
              "ok" if pixels_ok(px) else "FAIL")]
    if result["latents"] is not None:  # a VAE: its scaling factor, checked on the latents themselves
        lat = result["latents"]
        rows.append(("latent scale", f"samples' std {lat['generated_std']:.3f}",
                     f"real images' latents {lat['real_std']:.3f} (scaling factor {lat['scaling_factor']:g}), need "
                     f"within {LATENT_RATIO:g}x", "ok" if latents_ok(lat) else "FAIL"))
    if g["gain"] is not None:
        rows += [("guidance direction", f"S guided {g['s_guided']:.3f} vs twin {g['s_twin']:.3f}",
                  f"gain {g['gain']:+.3f}, need > 0", "ok" if g["gain"] > 0 else "FAIL"),
                 ("non-finite fallbacks", str(g["nan_fallbacks"]), "need 0",
                  "ok" if not g["nan_fallbacks"] else "FAIL"),
                 ("push per guided step", f"{g['relative_push']:.4f} of ||z_t|| (mean, mid-window)", "", "")]
    else:
        rows.append(("guidance direction", g["note"], "", "-"))
    search = result["batch_search"]
    rows += [("sampler batch", str(result["sampler_batch"]), f"largest that fitted {search['largest_that_fitted']}"
              + (f", out of memory at {search['first_out_of_memory']}" if search["first_out_of_memory"] else
                 ", none ran out of memory (capped at one class block)"), ""),
             ("ETA", duration(result["eta_s"]), " + ".join(duration(s) for s in result["eta_stages_s"][:6]) +
              (" ..." if len(result["eta_stages_s"]) > 6 else "") + " (stages)", ""),
             ("disk", size(result["disk_bytes"]), "the run folder (PNGs, latents, records, students)", "")]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"preflight ({result['device']}, {result['preflight_s']:.0f} s):"]
    lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def save_picture(x_plain, x_guided, result, spec, path):
    """Row 1: the unguided samples (x = theta* does not recognise it); row 2: the guided twins, when guided."""
    n = len(x_plain)
    marks = result["recognised_per_class"] or [True] * n  # not judged: no marks
    names = [spec.class_names()[c][-8:] + ("" if ok else " x") for c, ok in enumerate(marks)]
    rows = [x_plain] + ([x_guided] if x_guided is not None else [])
    save_grid(torch.cat(rows).cpu(), path, ["unguided", "guided"][:len(rows)], names[:n],
              (f"preflight: theta* recognises {result['recognised']}/{n}" if result["recognised"] is not None else
               "preflight: unguided samples (not judged)")
              + (f"; S gain {result['guidance']['gain']:+.3f}" if result["guidance"]["gain"] is not None else ""))
