"""
The stage loop of LGD (the paper's incremental curriculum: "+10 IPC per stage"), read top to bottom:
the loop (`run_stages`), what each stage does (its student, its memory, its increment), and the per-image
records a stage's log is summed from. The folder it fills is run_folder.py's (layout, lock, resume).

The distilled set is built from K disjoint increments T_1 .. T_K of `stage_ipc` images per class:

  T_1 (stage 0)  = the seed: unguided DiT samples (`--seed-set dit`), IGD's samples (`--seed-set igd`,
                   the paper's choice) or a folder the user gives
  for stage k = 1 .. K-1:
      theta_k    = a fresh student trained on D_k = T_1 u .. u T_k            ("to convergence")
      T_{k+1}    = learnability-guided samples, S = CE(theta_k) - omega CE(theta*)   (guidance.py)
      D_{k+1}    = D_k u T_{k+1}
  distilled      = D_K, written to DIR/distilled/<class>/<index>.png like the unguided baseline

Why stages: a set sampled in one go is redundant (a model trained on one 10-IPC slice already
classifies the others); guiding each increment towards what the current student has not learned
(but the reference model still recognises) makes the increments complementary.

Image indices are global (stage * stage_ipc + slot) and seed the noise, so stage 0 of an LGD run
is, image for image, the first stage_ipc images of `--method dit` with the same seed, and every
later LGD image starts from the same noise as the DiT image with that index: the comparison is
paired. A rerun skips finished stages, reloads a saved student, and skips images already written;
what guidance did for each image is written beside it (stage_<k>/records/), so a stage's log.json
describes every image of the stage however many starts it took.

Run: `python distill.py` (digits, LGD, IPC 10 in 5 stages of 2).
"""
import os
from collections import Counter
from dataclasses import dataclass

import torch
from tqdm import tqdm

from common import (SALT_STAGE_INIT, SALT_STAGE_TRAIN, SALT_VIEWS, Mismatch, UserError, all_gather, barrier, copy_file,
                    derive_seed, is_main, load_json, print0, save_grid, save_json, save_png, save_torch, stream_seed)
from data import ImageSet, classifier_input, list_image_folder, load_image, load_real, numeric_order, resize_crop
from guidance import (Influence, Learnability, SamplerLog, add_to_memory, best_of_candidates, decode_images, sample,
                      select_checkpoints, weight_gradient)
from model import make_student
from run_folder import (check_stage_files, distilled_dir, done_path, igd_path, image_header, image_path,
                        increment_folder, latent_path, load_or_none,
                        load_saved, load_stage_file, record_path, stage_dir, stage_files, stage_images, stage_latents,
                        stage_log_path, stage_records, student_path, union_files)
from train_student import (IGD_ARCH, SURROGATE, epochs_for_ipc, reference_spec, surrogate_trajectory, train_student,
                           view_augment)


@dataclass
class Plan:
    """How the set is cut into stages and sampled."""
    ipc: int                  # images per class in total
    stage_ipc: int            # per increment (paper 10)
    seed: int                 # run seed: the noise of image i of class c derives from it
    batch_size: int = 32      # samples per sampler batch (candidates included)
    seed_set: str = "dit"     # stage 0: "dit" (unguided), or a folder <class>/*.png
    twins: bool = True        # log the unguided twin of every kept image (one more unguided sample each)


def uses_igd(method, seed_set):
    """Whether a run samples with IGD's influence score: --method igd, or LGD with T_1 from IGD (the paper's pipeline).
    A --method dit run samples no IGD increment, whatever a preset's seed set says, and builds nothing for it."""
    return method == "igd" or (method == "lgd" and seed_set == "igd")


@dataclass
class Students:
    """The per-stage student theta_k: [choice] the evaluation recipe with the reference's architecture."""
    arch: str
    recipe: str
    view: object              # the spec the students are trained and tested in (train_student.recipe_spec)
    epochs: int = None        # None: by IPC (the recipe's protocol)
    ddp: bool = True          # under torchrun, trained with DDP (off: every rank trains the same one alone)
    num_workers: int = 0
    channels_last: bool = False  # NHWC classifiers inside the guided step (faster convolutions on GPUs)
    others: tuple = ()        # more student architectures (--student-archs; not the paper's): S averages their CE


@dataclass
class Ranks:
    """Where this process stands under torchrun (rank 0 of 1 when single-process)."""
    rank: int = 0
    world: int = 1


# ----------------------------------------------------------------------------- the stages

def run_stages(prior, spec, out_dir, plan, sampler, guide, students, reference, ranks=Ranks(), device="cpu",
               teacher=None, seed_stage=None, on_stage_start=None):
    """Build plan.ipc // plan.stage_ipc increments under out_dir (resuming), then write their union to
    out_dir/distilled. reference: [(theta*, its view spec)], one or more members (their CEs are averaged).
    teacher: the soft-label teacher of a rded recipe.
    seed_stage(images_dir, latents_dir, records_dir, batch) -> batch: makes stage 0 another way (IGD's
    increment); default DiT / a folder. on_stage_start(k): a hook called before stage k's work (tests use it
    to kill a run). Returns the smallest sampler batch that fitted.
    """
    if plan.ipc % plan.stage_ipc:
        raise UserError(f"--ipc {plan.ipc} is not a multiple of --stage-ipc {plan.stage_ipc}")
    num_stages = plan.ipc // plan.stage_ipc
    for k in range(num_stages):  # a finished stage must still be whole before anything builds on it
        if os.path.exists(done_path(out_dir, k)):
            check_stage_files(out_dir, spec, k, plan.stage_ipc)
    if students.channels_last:  # theta* once for the whole run; each stage's student below
        reference = [(model.to(memory_format=torch.channels_last), view) for model, view in reference]
    batch = plan.batch_size
    overall = tqdm(total=num_stages, desc="LGD stages", unit="stage", disable=not is_main(), position=0)
    for k in range(num_stages):
        images, latents, records = stage_images(out_dir, k), stage_latents(out_dir, k), stage_records(out_dir, k)
        if os.path.exists(done_path(out_dir, k)):  # written last, so its presence = complete
            print0(f"stage {k}: done, skipping")
            overall.update(1)
            continue
        if on_stage_start is not None:
            on_stage_start(k)
        first = k * plan.stage_ipc  # global image index of this increment's first slot (seeds its noise)
        if k == 0 and seed_stage is not None:  # T_1 from another sampler (IGD's increment, the paper's seed)
            fitted = seed_stage(images, latents, records, batch)
        elif k == 0 and plan.seed_set not in ("dit", "igd"):  # T_1 from a user's folder
            copy_seed_set(plan.seed_set, spec, out_dir, plan.stage_ipc, prior)
            fitted = batch
        elif k == 0:  # T_1: the unguided DiT increment
            fitted = generate_increment(prior, spec, images, latents, plan.stage_ipc, first, plan.seed, sampler, batch,
                                        ranks, desc="stage 0 (unguided)")
        else:
            stage_students = [train_stage_student(out_dir, spec, k, plan, students, device, ranks, teacher, arch)
                              for arch in (students.arch, *students.others)]
            # S(x, y) = CE(theta_k(x), y) - omega CE(theta*(x), y): high = not learned yet, still valid
            if students.channels_last:
                stage_students = [m.to(memory_format=torch.channels_last) for m in stage_students]
            score = Learnability(stage_students, students.view, [m for m, _ in reference], [v for _, v in reference],
                                 guide.omega, guide.views, stage_views(students.view, students.recipe, reference,
                                                                       plan.seed, k, guide.views, len(stage_students)))
            memory = initial_memory(out_dir, spec, k, plan.stage_ipc, guide.memory_cap) if guide.deviation else None
            # T_{k+1}: kappa guided candidates per image, the highest-S one kept and added to M_c
            fitted = generate_increment(prior, spec, images, latents, plan.stage_ipc, first, plan.seed, sampler, batch,
                                        ranks, score, guide, memory, desc=f"stage {k} (guided)", records_dir=records,
                                        twins=plan.twins)
        batch = min(all_gather(fitted))  # the batch every rank could run
        if is_main():
            # the log sums up the records on disk: every image of the stage, however many starts it took
            summary = summarise_records(records, spec, range(first, first + plan.stage_ipc), batch)
            finish_stage(out_dir, spec, k, plan.stage_ipc, summary)
        overall.update(1)
        barrier()
    overall.close()
    write_union(out_dir, spec, num_stages, plan.stage_ipc)  # D_K, laid out exactly like a --method dit set
    return batch


def finish_stage(out_dir, spec, k, stage_ipc, summary):
    """A stage's picture, log and (last) done.json, with the one line it prints."""
    first = k * stage_ipc
    guided = range(first, first + stage_ipc) if k else ()
    save_set_grid(stage_images(out_dir, k), spec, range(first, first + stage_ipc),
                  os.path.join(stage_dir(out_dir, k), "grid.png"),
                  f"stage {k}: images {first}..{first + stage_ipc - 1} ({'guided' if k else 'seed'}); rows = classes",
                  guided)
    if k:
        expected = spec.num_classes * stage_ipc
        if summary["images_logged"] != expected:  # generate_increment leaves no image without its record
            raise UserError(f"stage {k}: {summary['images_logged']} of {expected} images have a record in "
                            f"{stage_records(out_dir, k)}; delete {stage_dir(out_dir, k)} and the later stages to "
                            f"sample them again")
        save_json(summary, stage_log_path(out_dir, k))
        print0(log_line(k, summary))
    save_json(dict(stage=k, indices=[first, first + stage_ipc], sampler_batch=summary["sampler_batch"],
                   nan_fallbacks=summary["nan_fallbacks"], grad_decoder_cosine=summary["grad_decoder_cosine"]),
              done_path(out_dir, k))
    if summary["grad_decoder_cosine"] is not None:
        print0(f"stage {k}: cheap gradient decoder vs exact, cosine {summary['grad_decoder_cosine']:.3f} "
               f"(first guided batch)")
    if summary["nan_fallbacks"]:
        print0(f"stage {k}: {summary['nan_fallbacks']} samples fell back to the unguided step (non-finite gradient)")


def stage_views(student_view, recipe, reference, seed, k, views, students=1):
    """The augmentations S averages over with --guidance-views K > 1 (None at K = 1): the student's recipe, and
    theta*'s (the surrogate recipe) for each reference member, drawing from one generator seeded per stage.
    The draws follow the order of the sampler's batches, so with K > 1 an image depends on its batch (one process,
    one batch size: reproducible)."""
    if views == 1:
        return None
    g = torch.Generator().manual_seed(stream_seed(seed, SALT_VIEWS, k))
    return [view_augment(student_view, recipe, g) for _ in range(students)] + \
        [view_augment(v, SURROGATE, g) for _, v in reference]


def train_stage_student(out_dir, spec, k, plan, students, device, ranks, teacher=None, arch=None):
    """theta_k: a fresh student on D_k, saved with the list of its training files (or reloaded). arch: one of
    --student-archs after the first (student_<arch>.pt; the same seeds)."""
    path, arch = student_path(out_dir, k, None if arch in (None, students.arch) else arch), arch or students.arch
    view = students.view
    # resume: the student is a deterministic function of (seed, k, D_k), so reloading equals retraining, and a
    # damaged student.pt is simply trained again
    state = load_or_none(path, f"stage {k}'s student") if os.path.exists(path) else None
    if state is not None:
        model = make_student(arch, view)
        model.load_state_dict(state)
        return model.to(device).eval()
    paths, labels = union_files(out_dir, spec, k, plan.stage_ipc)
    epochs = students.epochs or epochs_for_ipc(k * plan.stage_ipc, students.recipe, spec.name)
    # [choice] the evaluation recipe, the reference model's architecture, re-initialised each stage;
    # a per-stage seed keeps every student reproducible on its own. With a soft-label recipe (rded,
    # ImageNet-1K) the recipe's teacher labels the crops.
    model = make_student(arch, view, seed=stream_seed(plan.seed, SALT_STAGE_INIT, k))
    ddp = students.ddp and ranks.world > 1
    model = train_student(model, ImageSet(paths, labels, channels=spec.channels), view, students.recipe, epochs,
                          seed=stream_seed(plan.seed, SALT_STAGE_TRAIN, k), device=device, desc=f"stage {k} student",
                          rank=ranks.rank if ddp else 0, world=ranks.world if ddp else 1,
                          num_workers=students.num_workers, teacher=teacher)
    if is_main():  # the file list makes "trained on exactly D_k" checkable after the fact (and is tested)
        save_json(dict(stage=k, arch=arch, recipe=students.recipe, epochs=epochs, train_files=paths),
                  path[:-len(".pt")] + ".json")
        save_torch(model.state_dict(), path)
    barrier()
    return model


def initial_memory(out_dir, spec, k, stage_ipc, cap):
    """[choice] M_c starts as the final latents of D_k's class-c images, so T_{k+1} moves away from them."""
    memory = {}
    for j in range(k):
        for c in range(spec.num_classes):
            for index in range(j * stage_ipc, (j + 1) * stage_ipc):
                latent = load_stage_file(latent_path(stage_latents(out_dir, j), spec, c, index), out_dir, j)
                add_to_memory(memory, c, latent[None], cap)
    return memory


def seed_set_files(seed_dir, spec, stage_ipc):
    """[choice] `--seed-set PATH`: the first stage_ipc images per class of a user's set, in numeric name order
    (IGD writes `0.png .. 99.png` unpadded; plain sorting would take 0, 1, 10, 11, ...). Images of another colour mode
    than the dataset's, or of another size than the set's own, are not its images: named in one notice and passed
    over. Every file taken is read once here, so a bad seed set is refused before a run folder is claimed. Returns
    [[path] per class]."""
    paths, labels = list_image_folder(seed_dir, spec.class_names(), what="seed set")
    headers = {p: image_header(p) for p in paths}
    side = Counter(h[:2] for h in headers.values()).most_common(1)[0][0]  # the set's own size
    odd = [p for p in paths if headers[p] != (*side, spec.channels)]
    if odd:
        print0(f"note: {len(odd)} images of seed set {seed_dir} are not {side[0]}x{side[1]} "
               f"{'grey' if spec.channels == 1 else 'colour'} like the rest and are passed over: "
               + ", ".join(os.path.relpath(p, seed_dir) for p in odd[:5]) + (", ..." if len(odd) > 5 else ""))
    chosen = []
    for c in range(spec.num_classes):
        mine = sorted((p for p, y in zip(paths, labels) if y == c and p not in set(odd)), key=numeric_order)
        if len(mine) < stage_ipc:
            raise UserError(f"seed set {seed_dir} has {len(mine)} usable images of class {spec.class_names()[c]}, "
                            f"needs --stage-ipc {stage_ipc}")
        for path in mine[:stage_ipc]:
            load_image(path, spec.channels)  # unreadable: one line naming the file
        chosen.append(mine[:stage_ipc])
    return chosen


def copy_seed_set(seed_dir, spec, out_dir, stage_ipc, prior):
    """Stage 0 from a user's folder (seed_set_files). Its latents for the memory M_c are the VAE encodings of the
    images (posterior mean; the only place we encode: generated images keep their own final latents)."""
    images_dir, latents_dir = stage_images(out_dir, 0), stage_latents(out_dir, 0)
    for c, mine in enumerate(seed_set_files(seed_dir, spec, stage_ipc)):
        for index, path in enumerate(mine):
            if not is_main() or os.path.exists(image_path(images_dir, spec, c, index)):
                continue
            x = load_image(path, spec.channels)
            if x.shape[-1] != spec.image_size or x.shape[-2] != spec.image_size:  # store at generation size
                x = torch.nn.functional.interpolate(x[None], size=(spec.image_size,) * 2, mode="bilinear",
                                                    antialias=True, align_corners=False)[0].clamp(0, 1)
            # the latent first: a PNG on disk means the image is complete (as for generated images)
            latent = prior.encode((_png_round_trip(x)[None] * 2 - 1).to(prior.device))[0].cpu()
            save_torch(latent, latent_path(latents_dir, spec, c, index))
            save_png(x, image_path(images_dir, spec, c, index))
    barrier()


def _png_round_trip(x):
    """What an image in [0, 1] reads back as from an 8-bit PNG (save_png's rounding): encode what is stored."""
    return (x.clamp(0, 1) * 255).round() / 255


def write_union(out_dir, spec, num_stages, stage_ipc):
    """D_K -> out_dir/distilled/<class>/<index>.png (atomic copies), the evaluator's input."""
    if is_main():
        for k in range(num_stages):
            check_stage_files(out_dir, spec, k, stage_ipc, notice=False)  # still whole (named at the start)
            for path, c in zip(*stage_files(out_dir, spec, k, stage_ipc)):
                target = os.path.join(distilled_dir(out_dir), spec.class_names()[c], os.path.basename(path))
                if not os.path.exists(target):
                    copy_file(path, target)
    barrier()


def save_set_grid(folder, spec, indices, path, title, guided=()):
    """Grid PNG of a set folder: one row per class (at most 20), one column per image index (at most 20);
    columns of guided images are marked with '*'."""
    if not is_main():
        return
    classes = range(min(spec.num_classes, 20))
    indices = list(indices)[:20]
    images = torch.stack([load_image(image_path(folder, spec, c, i), spec.channels) for c in classes for i in indices])
    save_grid(images, path, [spec.class_names()[c] for c in classes],
              [f"{i}*" if i in set(guided) else str(i) for i in indices], title)


# ----------------------------------------------------------------------------- generating an increment

def generate_increment(prior, spec, images_dir, latents_dir, slots, first_index, seed, sampler, batch_size,
                       ranks=Ranks(), score=None, guide=None, memory=None, desc="sampling", records_dir=None,
                       twins=False):
    """Fill `images_dir/<class>/<index>.png` (and the final latents) for indices first_index .. + slots - 1.

    The slots of a class are filled in order, so M_c grows within a stage: after a slot, its kept
    latents (read back from disk, so a resumed run sees the same memory) join M_c.
    Classes are cut into fixed blocks of batch_size // kappa classes, dealt round-robin to the ranks,
    so which images share a batch does not depend on the number of ranks. On out-of-memory the batch
    is halved and the block retried (images are seeded one by one, so the set is unchanged up to
    float rounding). records_dir: where each guided image's record goes (what guidance did for it; None: not
    recorded). Returns the batch size that fitted.

    Resume: a sample depends (in its last float bits) on the batch it was computed in, so a rerun recomputes an
    unfinished chunk exactly as the uninterrupted run cut it (the same classes, in the same order) and writes only
    the files that are missing; those already on disk must come out the same bytes (common.atomic_write, verify),
    else the folder is named as damaged. A chunk whose every file is there is skipped, unless the score draws
    random views (--guidance-views > 1): their generator runs through the stage batch by batch, so the whole
    stage is recomputed and checked.
    """
    kappa = guide.candidates if (guide is not None and score is not None) else 1
    per_block = max(1, batch_size // kappa)
    blocks = [list(range(c, min(c + per_block, spec.num_classes))) for c in range(0, spec.num_classes, per_block)]
    my_blocks = blocks[ranks.rank::ranks.world]
    replay = getattr(score, "draws_views", False)  # a stage-long random stream: nothing can be skipped
    dirs = (images_dir, latents_dir, records_dir if score is not None else None)
    batch = batch_size
    bar = tqdm(total=slots * sum(map(len, my_blocks)), desc=desc, unit="img", disable=not is_main(), mininterval=2)
    # block by block, then slot by slot: M_c depends only on class c's earlier slots, so the order of blocks
    # changes nothing, and a score with per-class state (IGD's real gradients) needs one block at a time
    for block in my_blocks:
        for slot in range(slots):
            index = first_index + slot
            while True:
                per_chunk = max(1, batch // kappa)
                try:
                    for j in range(0, len(block), per_chunk):
                        chunk = block[j:j + per_chunk]  # as the uninterrupted run cuts it, whatever is on disk
                        if not replay and all(image_complete(dirs, spec, c, index) for c in chunk):
                            continue
                        # a cheap gradient decoder is checked against the exact one on the stage's first batch
                        first_batch = slot == 0 and block is my_blocks[0] and j == 0
                        _generate_chunk(prior, spec, dirs, chunk, index, seed, sampler, score, guide, memory, twins,
                                        first_batch)
                    break
                except torch.OutOfMemoryError:
                    if per_chunk == 1:
                        raise
                    batch = max(kappa, batch // 2)
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    print(f"out of memory: sampler batch halved to {batch} (same images, seeded one by one)")
                except Mismatch as e:  # a file this run wrote earlier is not what it computes now
                    raise UserError(f"{e}; rerun where it was written, or delete {increment_folder(images_dir)} to "
                                    f"sample it again") from None
            if memory is not None:  # the kept latents of this slot join M_c, read back from disk
                for c in block:
                    path = latent_path(latents_dir, spec, c, index)
                    add_to_memory(memory, c, _load_latent(path, image_path(images_dir, spec, c, index))[None],
                                  guide.memory_cap)
            bar.update(len(block))
            bar.set_postfix(img_per_s=f"{bar.n / max(1e-9, bar.format_dict['elapsed']):.2f}")
    bar.close()
    barrier()
    return batch


def image_complete(dirs, spec, c, index):
    """Every file of image (c, index) is on disk: its PNG, its latent and its record (where they are kept)."""
    paths = [image_path(dirs[0], spec, c, index)]
    if dirs[1] is not None:
        paths.append(latent_path(dirs[1], spec, c, index))
    if dirs[2] is not None:
        paths.append(record_path(dirs[2], spec, c, index))
    return all(os.path.exists(p) for p in paths)


def _load_latent(path, png):
    """A latent of the stage being generated; a damaged one names itself and its image (deleting both makes the
    rerun sample that slot again, from the same seeded noise and in the same batch: the same bytes)."""
    return load_saved(path, f"delete it and {png}, then rerun the same command to sample that image again")


def _generate_chunk(prior, spec, dirs, chunk, index, seed, sampler, score, guide, memory, twins, first_batch):
    """Sample the images of `chunk` (classes) at slot `index`, keep the best candidates, write for each image its
    latent, its record (what guidance did) and last its PNG: a PNG on disk means the image is complete. Files
    already on disk (a resumed chunk) are checked to be the same bytes instead of written."""
    images_dir, latents_dir, records_dir = dirs
    kappa = guide.candidates if score is not None else 1
    items = [(c, j) for c in chunk for j in range(kappa)]  # (class, candidate), the candidates of an image adjacent
    classes = torch.tensor([c for c, _ in items], device=prior.device)
    labels = torch.tensor([spec.prior_labels[c] for c, _ in items])  # the prior's ids (ImageNet's for the DiT)
    generators = [torch.Generator().manual_seed(derive_seed(seed, c, index, j)) for c, j in items]
    records = [None] * len(chunk)
    if score is None:  # the plain DiT sampler (seed increment, --method dit)
        z0 = sample(prior, labels, generators, sampler)
        images = decode_images(prior, z0)
    else:
        memories = [memory.get(c) for c, _ in items] if memory is not None else None
        log = SamplerLog(check_gradient=first_batch)
        z0, images, best, parts = best_of_candidates(prior, labels, classes, generators, sampler, score, guide,
                                                     memories, log)
        twin = None
        if twins:  # the unguided twin of every kept image: the same noise without guidance
            twin_gens = [torch.Generator().manual_seed(derive_seed(seed, c, index, int(j)))
                         for c, j in zip(chunk, best)]
            twin_images = decode_images(prior, sample(prior, torch.tensor([spec.prior_labels[c] for c in chunk]),
                                                      twin_gens, sampler))
            with torch.no_grad():
                twin = score.parts(twin_images * 2 - 1, torch.tensor(chunk, device=prior.device))
        records = [image_record(n, kappa, int(best[n]), parts, twin, log) for n in range(len(chunk))]
    for c, z, image, record in zip(chunk, z0, images, records):
        if latents_dir is not None:
            save_torch(z.detach().cpu().clone(), latent_path(latents_dir, spec, c, index), verify=True)
        if records_dir is not None and record is not None:
            save_json(record, record_path(records_dir, spec, c, index), verify=True)
        save_png(image, image_path(images_dir, spec, c, index), verify=True)


def image_record(n, kappa, kept, parts, twin, log):
    """What guidance did for the n-th image of a batch (its kappa candidates are samples n*kappa .. +kappa-1):
    every candidate's score parts, which one was kept, its unguided twin's parts, and per guided step i the
    relative size of each candidate's pushes. Values are the float32 numbers of the run, exactly."""
    rows = slice(n * kappa, (n + 1) * kappa)
    record = dict(kept_candidate=kept, candidates={name: value[n].tolist() for name, value in parts.items()},
                  twin=({name: value[n].item() for name, value in twin.items()} if twin is not None else {}),
                  guidance_per_step={str(i): v[rows] for i, v in log.guidance.items()},
                  deviation_per_step={str(i): v[rows] for i, v in log.deviation.items()},
                  nan_fallbacks=sum(log.fallbacks[rows]))
    if log.gradient_cosine:
        record["grad_decoder_cosine_per_step"] = {str(i): v[rows] for i, v in log.gradient_cosine.items()}
    return record


def summarise_records(records_dir, spec, indices, batch):
    """A stage's log.json from its image records, in image order (index, then class): means of the kept
    candidates' scores, of the rejected ones', of the unguided twins', which candidate was kept, and per guided
    step the mean relative push (||push|| / ||z_{t-1}||) of guidance and of deviation."""
    remedy = "delete it and rerun the same command: its image is sampled again in the same batch and checked"
    records = [load_json(path, what="image record", remedy=remedy) for index in indices
               for c in range(spec.num_classes) for path in [record_path(records_dir, spec, c, index)]
               if os.path.exists(path)]
    mean = lambda values: float(torch.tensor(values).mean()) if values else None  # noqa: E731

    def merged(tables):  # [{key: values}] -> {key: all values, in order}
        out = {}
        for table in tables:
            for key, values in table.items():
                out.setdefault(key, []).extend(values if isinstance(values, list) else [values])
        return out

    def per_step(name):  # {step i: mean over every sample}, from the first step (49) down
        values = merged(r.get(name, {}) for r in records)
        return {i: mean(values[i]) for i in sorted(values, key=int, reverse=True)}

    kept = [{name: v[r["kept_candidate"]] for name, v in r["candidates"].items()} for r in records]
    rejected = [{name: [x for j, x in enumerate(v) if j != r["kept_candidate"]] for name, v in r["candidates"].items()}
                for r in records]
    tables = {name: {part: mean(values) for part, values in merged(rows).items()}
              for name, rows in (("kept", kept), ("rejected", rejected), ("twin", [r["twin"] for r in records]))}
    kept_candidate = [r["kept_candidate"] for r in records]
    kappa = max(kept_candidate) + 1 if kept_candidate else 0
    cosines = merged(r.get("grad_decoder_cosine_per_step", {}) for r in records)
    return dict(images_logged=len(records), **tables,
                kept_candidate_counts=[kept_candidate.count(k) for k in range(kappa)],
                relative_guidance_per_step=per_step("guidance_per_step"),
                relative_deviation_per_step=per_step("deviation_per_step"),
                nan_fallbacks=sum(r["nan_fallbacks"] for r in records), sampler_batch=batch,
                grad_decoder_cosine=mean([v for values in cosines.values() for v in values]),
                grad_decoder_cosine_per_step=per_step("grad_decoder_cosine_per_step"))


def log_line(k, summary):
    """The one line a stage prints: what guidance bought on the kept images, against its alternatives."""
    def fmt(table):
        if not table:
            return "-"
        return " ".join(f"{name} {value:.3f}" for name, value in table.items() if value is not None)
    guide = [v for v in summary["relative_guidance_per_step"].values() if v is not None]
    dev = [v for v in summary["relative_deviation_per_step"].values() if v is not None]
    return (f"stage {k}: kept [{fmt(summary['kept'])}] | rejected [{fmt(summary['rejected'])}] | unguided twin "
            f"[{fmt(summary['twin'])}] | kept candidate {summary['kept_candidate_counts']} | push/step: guidance "
            f"{sum(guide) / max(1, len(guide)):.4f}, deviation {sum(dev) / max(1, len(dev)):.4f}")


# ----------------------------------------------------------------------------- IGD's score for a dataset

def influence_score(spec, data_dir, device, out_dir, grad_ipc=200, checkpoints="auto", threshold=0.7, epochs=None,
                    num_workers=0):
    """IGD's influence score (guidance.Influence) for a dataset: the trajectory of IGD's surrogate (ConvNet-6
    whatever the evaluation network; with --arch convnet the very training theta* is the last snapshot of, cached),
    the chosen checkpoints (IGD's adaptive rule, or a given list; written to out_dir/igd.json), and real-gradient
    targets over the first grad_ipc real images per class."""
    arch, view = IGD_ARCH, reference_spec(spec)
    trajectory = surrogate_trajectory(view, arch, data_dir, device, epochs, num_workers=num_workers)
    real = load_real(spec, data_dir, "train")
    members = [[i for i, y in enumerate(real.labels) if y == c][:grad_ipc] for c in range(spec.num_classes)]

    def inputs(c):  # IGD's real view: the first grad_ipc images of the class, sorted by name, at 256 px, 0.5/0.5
        x = torch.stack([resize_crop(real.load(i), view.res) for i in members[c]]).to(device)
        return classifier_input(x * 2 - 1, view), torch.full((len(x),), c, device=device)

    def model_at(j):
        model = make_student(arch, view)
        model.load_state_dict(trajectory[j])
        return model.to(device).eval()

    if checkpoints == "auto":  # class by class (the gradients of all classes need not fit in memory)
        similarity = torch.zeros(len(trajectory), len(trajectory))
        for c in tqdm(range(spec.num_classes), desc="IGD checkpoint selection", disable=not is_main()):
            x, y = inputs(c)
            grads = torch.stack([weight_gradient(model_at(j), x, y) for j in range(len(trajectory))])
            grads = torch.nn.functional.normalize(grads.cpu(), dim=1)
            similarity += grads @ grads.T / spec.num_classes
        chosen = select_checkpoints(similarity, threshold)
        info = dict(rule=f"adaptive, threshold {threshold}", similarity_to_previous_kept=[
            float(similarity[a, b]) for a, b in zip(chosen, chosen[1:])])
    else:
        chosen = [int(j) for j in checkpoints.split(",")]
        if min(chosen) < 0 or max(chosen) >= len(trajectory):
            raise UserError(f"--igd-checkpoints {checkpoints}: the trajectory has snapshots 0..{len(trajectory) - 1}")
        info = dict(rule="given")
    if is_main():
        save_json(dict(info, checkpoints=chosen, trajectory_length=len(trajectory), grad_ipc=grad_ipc, arch=arch),
                  igd_path(out_dir))
    print0(f"IGD checkpoints {chosen} of 0..{len(trajectory) - 1} ({info['rule']})")
    models = [model_at(j) for j in chosen]
    return Influence(models, view, lambda j, c: weight_gradient(models[j], *inputs(c)))



if __name__ == "__main__":
    print("curriculum.py holds the stage loop; run it with `python distill.py` (see its --help).")
