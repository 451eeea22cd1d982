"""
The stage loop of LGD (the paper's incremental curriculum: "+10 IPC per stage"), and the run folder it
fills: this file is the only one that knows the folder's layout (distill.py and evaluate.py ask it).

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

The run folder (everything a rerun needs to resume, everything a reader needs to inspect it):

  DIR/args.json                              the settings (+ git commit of every start); marks a run folder
  DIR/stage_<k>/images/<class>/<index>.png   T_{k+1}: indices k*stage_ipc .. (k+1)*stage_ipc - 1
  DIR/stage_<k>/latents/<class>/<index>.pt   the final latent of each kept image (the memory M_c)
  DIR/stage_<k>/student.pt, student.json     theta_k and the exact list of files it was trained on
  DIR/stage_<k>/grid.png, log.json           this increment (one row per class); what guidance did
  DIR/stage_<k>/done.json                    written last: the stage is complete
  DIR/distilled/<class>/<index>.png          the set; DIR/grid.png its picture
  DIR/eval.json, redundancy.json/.png        written by evaluate.py

Image indices are global (stage * stage_ipc + slot) and seed the noise, so stage 0 of an LGD run
is, image for image, the first stage_ipc images of `--method dit` with the same seed, and every
later LGD image starts from the same noise as the DiT image with that index: the comparison is
paired. A rerun skips finished stages, reloads a saved student, and skips images already written.

Run: `python distill.py` (digits, LGD, IPC 10 in 5 stages of 2); the loop itself is `run_stages`.
"""
import glob
import json
import os
import socket
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from common import (SALT_STAGE_INIT, SALT_STAGE_TRAIN, TEMPORARY, UserError, all_gather, barrier, copy_file,
                    derive_seed, git_commit, is_main, load_json, print0, remove_path, remove_stale_temporaries, save_grid, save_json,
                    save_png, save_torch, stream_seed, temporary_path)
from data import ImageSet, class_files, classifier_input, list_image_folder, load_image, load_real, resize_crop
from guidance import (Influence, Learnability, SamplerLog, add_to_memory, best_of_candidates, decode_images, sample,
                      select_checkpoints, weight_gradient)
from model import make_student
from train_student import epochs_for_ipc, reference_spec, surrogate_trajectory, train_student

# ----------------------------------------------------------------------------- the run folder

LOCK = ".lgd-lock"      # held while a run works in the folder (O_EXCL: two runs cannot both hold it)
ARGS = "args.json"      # the settings of the run; its presence marks an lgd run folder


def stage_dir(out_dir, k):
    return os.path.join(out_dir, f"stage_{k}")


def done_path(out_dir, k):
    """Written last by stage k: its presence means the stage is complete."""
    return os.path.join(stage_dir(out_dir, k), "done.json")


def image_path(folder, spec, c, index):
    return os.path.join(folder, spec.class_names()[c], f"{index:05d}.png")


def latent_path(folder, spec, c, index):
    return os.path.join(folder, spec.class_names()[c], f"{index:05d}.pt")


def stage_images(out_dir, k):
    return os.path.join(stage_dir(out_dir, k), "images")


def stage_latents(out_dir, k):
    return os.path.join(stage_dir(out_dir, k), "latents")


def distilled_dir(out_dir):
    return os.path.join(out_dir, "distilled")


def run_latents(out_dir):
    """The final latents of a one-pass method's set (--method igd): its memory M_c reads them back."""
    return os.path.join(out_dir, "latents")


def args_path(out_dir):
    return os.path.join(out_dir, ARGS)


def default_run_dir(dataset, method, ipc, seed):
    return os.path.join("out", f"{dataset}_{method}_ipc{ipc}_seed{seed}")


def default_real_dir(dataset, ipc):
    """Where the random-real baseline of `evaluate.py --real-ipc` goes."""
    return os.path.join("out", f"{dataset}_real_ipc{ipc}")


def eval_path(out_dir, arch=None):
    """eval.json for the run's own (guiding) architecture; eval_<arch>.json for another (cross-architecture)."""
    return os.path.join(out_dir, "eval.json" if arch is None else f"eval_{arch}.json")


def cross_eval_paths(out_dir):
    """{arch: path} of a run folder's cross-architecture evaluations."""
    return {os.path.basename(p)[len("eval_"):-len(".json")]: p for p in glob.glob(os.path.join(out_dir, "eval_*.json"))}


def redundancy_path(out_dir):
    return os.path.join(out_dir, "redundancy.json")


def heatmap_path(out_dir):
    return os.path.join(out_dir, "redundancy.png")


def validity_path(out_dir):
    return os.path.join(out_dir, "validity.json")


def grid_path(out_dir):
    return os.path.join(out_dir, "grid.png")


def igd_path(out_dir):
    return os.path.join(out_dir, "igd.json")


def distilled_folder(run_dir):
    """A run folder holds its set in distilled/; a bare ImageFolder is the set itself."""
    inner = distilled_dir(run_dir)
    return inner if os.path.isdir(inner) else run_dir


def set_image_size(folder, spec):
    """The side of the images in a set folder (the igd recipe evaluates at the generated size)."""
    return load_image(class_files(os.path.join(folder, spec.class_names()[0]))[0]).shape[-1]


def run_info(run_dir):
    """args.json of a distill.py run folder, or {} for a bare ImageFolder."""
    return load_json(args_path(run_dir), what="run settings") if os.path.exists(args_path(run_dir)) else {}


def stage_files(out_dir, spec, k, stage_ipc):
    """(paths, labels) of stage k's increment, class by class, in index order."""
    paths, labels = [], []
    for c in range(spec.num_classes):
        for index in range(k * stage_ipc, (k + 1) * stage_ipc):
            paths.append(image_path(stage_images(out_dir, k), spec, c, index))
            labels.append(c)
    return paths, labels


def union_files(out_dir, spec, k, stage_ipc):
    """D_k: the files of stages 0 .. k-1 (the union the stage-k student is trained on)."""
    paths, labels = [], []
    for j in range(k):  # stage, then class, then index: a fixed order, so the student's data order is too
        p, y = stage_files(out_dir, spec, j, stage_ipc)
        paths, labels = paths + p, labels + y
    return paths, labels


def stage_summary(out_dir):
    """[(k, done)] for the stage folders of a run, for --dry-run and the README."""
    stages = sorted(int(d.split("_")[1]) for d in os.listdir(out_dir) if d.startswith("stage_"))
    return [(k, os.path.exists(done_path(out_dir, k))) for k in stages]


def owned_folders(out_dir):
    """The folders a run writes into: the only places its stale temporaries may be removed from."""
    if not os.path.isdir(out_dir):
        return []
    inner = [os.path.join(out_dir, d) for d in os.listdir(out_dir) if d.startswith("stage_") or d in ("distilled", "latents")]
    return [out_dir] + [d for d in inner if os.path.isdir(d)]


def _lock_owner(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_run_folder(out_dir):
    """Make `out_dir` this run's, before any work: returns a function that releases it.

    Refuses a file, and a non-empty folder that is not an lgd run (no args.json): a run never writes
    into, or tidies, a folder of someone else's. Then takes the lock file with O_EXCL, so of two runs
    started at once into one folder exactly one proceeds; a lock left by a killed run (same host,
    dead pid) is taken over. Creating the lock is also the check that the folder is writable.
    """
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out-dir {out_dir} is a file, not a folder")
    if os.path.isdir(out_dir):
        foreign = [n for n in os.listdir(out_dir) if n != LOCK and not TEMPORARY.match(n)]
        if foreign and not os.path.exists(args_path(out_dir)):
            raise UserError(f"--out-dir {out_dir} is not empty and holds no {ARGS}: not an lgd run folder "
                            f"(choose a new or empty folder)")
    os.makedirs(out_dir, exist_ok=True)
    lock = os.path.join(out_dir, LOCK)
    me = dict(pid=os.getpid(), host=socket.gethostname(), started=time.strftime("%Y-%m-%d %H:%M:%S"))
    for attempt in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            owner = _lock_owner(lock)
            stale = owner.get("host") == me["host"] and isinstance(owner.get("pid"), int) and not _alive(owner["pid"])
            if attempt == 0 and stale:  # a killed run's lock: move it aside atomically (only one taker wins)
                try:
                    os.replace(lock, temporary_path(lock))
                    os.remove(temporary_path(lock))
                except FileNotFoundError:
                    pass
                continue
            raise UserError(f"{out_dir} is in use by another run (pid {owner.get('pid', '?')} on "
                            f"{owner.get('host', '?')}, since {owner.get('started', '?')}); wait for it or use "
                            f"another --out-dir (if no run is using it, remove {lock})") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break

    def release():
        if _lock_owner(lock).get("pid") == me["pid"]:
            remove_path(lock)
    remove_stale_temporaries(owned_folders(out_dir))  # ours now: a killed run's half-written files go
    return release


def record_args(out_dir, args, must_match):
    """Write `args` (a dict) to args.json, or check a resumed run's against it.

    must_match: {key: flag name} of the settings that change the images; a rerun with another value would
    mix two runs' stages. Each start is appended to `starts` (time, git commit), so a resumed folder says
    which code made it.
    """
    path = args_path(out_dir)
    starts = []
    if os.path.exists(path):
        old = load_json(path, what="run settings")
        if not isinstance(old, dict):
            raise UserError(f"{path} is not an lgd args.json; move it away or use another --out-dir")
        changed = [k for k in must_match if k in old and old[k] != args.get(k)]
        if changed:
            details = ", ".join(f"{must_match[k]} {old[k]!r} -> {args.get(k)!r}" for k in changed[:4])
            raise UserError(f"{out_dir} holds a run with different {', '.join(must_match[k] for k in changed)} "
                            f"({details}); use another --out-dir or the same settings to resume")
        starts = old.get("starts", [])
        args = dict(old, **args)  # keeps what the run recorded while it ran (e.g. the sampler batch used)
    start = dict(time=time.strftime("%Y-%m-%d %H:%M:%S"), git_commit=git_commit())
    save_json(dict(args, git_commit=start["git_commit"], starts=starts + [start]), path)


def update_args(out_dir, **values):
    """Add what a run learned while running (e.g. the sampler batch that fitted) to args.json."""
    if is_main():
        save_json(dict(load_json(args_path(out_dir), what="run settings"), **values), args_path(out_dir))


def check_stage_files(out_dir, spec, k, stage_ipc):
    """A stage marked done must still hold every image (a deleted file would break the union and students)."""
    for path in stage_files(out_dir, spec, k, stage_ipc)[0]:
        if not os.path.exists(path):
            raise UserError(f"stage {k} is marked done but {path} is missing; restore it, or delete "
                            f"{stage_dir(out_dir, k)} and the later stages to regenerate them")


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

@dataclass
class Ranks:
    """Where this process stands under torchrun (rank 0 of 1 when single-process)."""
    rank: int = 0
    world: int = 1


@dataclass
class StageLog:
    """What one increment's generation did, gathered over ranks into stage_<k>/log.json."""
    sampler: SamplerLog
    kept: dict
    rejected: dict
    twin: dict
    kept_candidate: list
    batch: int


def new_log(batch):
    return StageLog(SamplerLog(), {}, {}, {}, [], batch)


def _extend(table, parts, rows=None):
    for name, value in parts.items():
        value = value if rows is None else value[rows]
        table.setdefault(name, []).extend(value.flatten().tolist())


def _generate_chunk(prior, spec, images_dir, latents_dir, chunk, index, seed, sampler, score, guide, memory, log,
                    twins):
    """Sample the images of `chunk` (classes) at slot `index`, keep the best candidates, write latents + PNGs."""
    kappa = guide.candidates if score is not None else 1
    items = [(c, j) for c in chunk for j in range(kappa)]  # (class, candidate), the candidates of an image adjacent
    classes = torch.tensor([c for c, _ in items], device=prior.device)
    labels = torch.tensor([spec.prior_labels[c] for c, _ in items])  # the prior's ids (ImageNet's for the DiT)
    generators = [torch.Generator().manual_seed(derive_seed(seed, c, index, j)) for c, j in items]
    if score is None:  # the plain DiT sampler (seed increment, --method dit)
        z0 = sample(prior, labels, generators, sampler)
        images = decode_images(prior, z0)
    else:
        memories = [memory.get(c) for c, _ in items] if memory is not None else None
        z0, images, best, parts = best_of_candidates(prior, labels, classes, generators, sampler, score, guide,
                                                     memories, log.sampler)
        log.kept_candidate.extend(best.tolist())
        kept = torch.zeros_like(next(iter(parts.values())), dtype=torch.bool)
        kept[torch.arange(len(best)), best] = True
        _extend(log.kept, parts, kept)
        _extend(log.rejected, parts, ~kept)
        if twins:  # the unguided twin of every kept image: the same noise without guidance
            twin_gens = [torch.Generator().manual_seed(derive_seed(seed, c, index, int(j))) for c, j in zip(chunk, best)]
            twin_classes = torch.tensor(chunk, device=prior.device)
            twin = decode_images(prior, sample(prior, torch.tensor([spec.prior_labels[c] for c in chunk]), twin_gens,
                                               sampler))
            with torch.no_grad():
                _extend(log.twin, score.parts(twin * 2 - 1, twin_classes))
    for c, z, image in zip(chunk, z0, images):
        if latents_dir is not None:  # the latent first: a PNG on disk means the image is complete
            save_torch(z.detach().cpu().clone(), latent_path(latents_dir, spec, c, index))
        save_png(image, image_path(images_dir, spec, c, index))


def generate_increment(prior, spec, images_dir, latents_dir, slots, first_index, seed, sampler, batch_size,
                       ranks=Ranks(), score=None, guide=None, memory=None, desc="sampling", log=None, twins=False):
    """Fill `images_dir/<class>/<index>.png` (and the final latents) for indices first_index .. + slots - 1.

    The slots of a class are filled in order, so M_c grows within a stage: after a slot, its kept
    latents (read back from disk, so a resumed run sees the same memory) join M_c.
    Classes are cut into fixed blocks of batch_size // kappa classes, dealt round-robin to the ranks,
    so which images share a batch does not depend on the number of ranks. On out-of-memory the batch
    is halved and the block retried (images are seeded one by one, so the set is unchanged up to
    float rounding). Existing PNGs are kept (resume). Returns the batch size that fitted.
    """
    kappa = guide.candidates if (guide is not None and score is not None) else 1
    per_block = max(1, batch_size // kappa)
    blocks = [list(range(c, min(c + per_block, spec.num_classes))) for c in range(0, spec.num_classes, per_block)]
    my_blocks = blocks[ranks.rank::ranks.world]
    log = log if log is not None else new_log(batch_size)
    bar = tqdm(total=slots * sum(map(len, my_blocks)), desc=desc, unit="img", disable=not is_main(), mininterval=2)
    # block by block, then slot by slot: M_c depends only on class c's earlier slots, so the order of blocks
    # changes nothing, and a score with per-class state (IGD's real gradients) needs one block at a time
    for block in my_blocks:
        for slot in range(slots):
            index = first_index + slot
            while True:
                todo = [c for c in block if not os.path.exists(image_path(images_dir, spec, c, index))]
                per_chunk = max(1, log.batch // kappa)
                try:
                    for j in range(0, len(todo), per_chunk):
                        _generate_chunk(prior, spec, images_dir, latents_dir, todo[j:j + per_chunk], index, seed,
                                        sampler, score, guide, memory, log, twins)
                    break
                except torch.OutOfMemoryError:
                    if per_chunk == 1:
                        raise
                    log.batch = max(kappa, log.batch // 2)
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    print(f"out of memory: sampler batch halved to {log.batch} (same images, seeded one by one)")
            if memory is not None:  # the kept latents of this slot join M_c, read back from disk
                for c in block:
                    add_to_memory(memory, c, torch.load(latent_path(latents_dir, spec, c, index))[None],
                                  guide.memory_cap)
            bar.update(len(block))
            bar.set_postfix(img_per_s=f"{bar.n / max(1e-9, bar.format_dict['elapsed']):.2f}")
    bar.close()
    barrier()
    return log


def summarise_log(log):
    """One stage's StageLog, gathered over ranks -> a JSON-ready dict (means, per-step relative pushes)."""
    logs = all_gather(log)
    mean = lambda values: float(torch.tensor(values).mean()) if values else None  # noqa: E731

    def merged(tables):  # {key: values} of every rank -> one {key: all values}
        out = {}
        for table in tables:
            for key, values in table.items():
                out.setdefault(key, []).extend(values)
        return out

    def per_step(tables):  # {step i: mean over every rank's samples}, from the first step (49) down
        values = merged(tables)
        return {str(i): mean(values[i]) for i in sorted(values, reverse=True)}

    tables = {name: {part: mean(values) for part, values in merged(getattr(entry, name) for entry in logs).items()}
              for name in ("kept", "rejected", "twin")}
    steps = {kind: per_step(getattr(entry.sampler, kind) for entry in logs) for kind in ("guidance", "deviation")}
    cosines = [entry.sampler.gradient_cosine for entry in logs]
    kept_candidate = [k for entry in logs for k in entry.kept_candidate]
    kappa = max(kept_candidate) + 1 if kept_candidate else 0
    return dict(images_logged=len(kept_candidate), **tables,
                kept_candidate_counts=[kept_candidate.count(k) for k in range(kappa)],
                relative_guidance_per_step=steps["guidance"], relative_deviation_per_step=steps["deviation"],
                nan_fallbacks=sum(entry.sampler.nan_fallbacks for entry in logs),
                sampler_batch=min(entry.batch for entry in logs),
                grad_decoder_cosine=mean([v for values in merged(cosines).values() for v in values]),
                grad_decoder_cosine_per_step=per_step(cosines))


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

def influence_score(spec, arch, data_dir, device, out_dir, grad_ipc=200, checkpoints="auto", threshold=0.7,
                    epochs=None, num_workers=0):
    """IGD's influence score (guidance.Influence) for a dataset: the surrogate trajectory (the very training
    theta* is the last snapshot of, cached), the chosen checkpoints (IGD's adaptive rule, or a given list;
    written to out_dir/igd.json), and real-gradient targets over the first grad_ipc real images per class."""
    view = reference_spec(spec)
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


# ----------------------------------------------------------------------------- the stages

@dataclass
class Plan:
    """How the set is cut into stages and sampled."""
    ipc: int                  # images per class in total
    stage_ipc: int            # per increment (paper 10)
    seed: int                 # run seed: the noise of image i of class c derives from it
    batch_size: int = 32      # samples per sampler batch (candidates included)
    seed_set: str = "dit"     # stage 0: "dit" (unguided), or a folder <class>/*.png
    twins: bool = True        # log the unguided twin of every kept image (one more unguided sample each)


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


def copy_seed_set(seed_dir, spec, out_dir, stage_ipc, prior):
    """[choice] `--seed-set PATH`: the first stage_ipc images per class (sorted names) of a user's set.

    Its latents for the memory M_c are the VAE encodings of the images (posterior mean; the only
    place we encode: generated images keep their own final latents).
    """
    paths, labels = list_image_folder(seed_dir, spec.class_names(), what="seed set")
    images_dir, latents_dir = stage_images(out_dir, 0), stage_latents(out_dir, 0)
    for c in range(spec.num_classes):
        # sorted names, first stage_ipc: a fixed choice, so a resumed run copies the same images
        mine = [p for p, y in zip(paths, labels) if y == c][:stage_ipc]
        if len(mine) < stage_ipc:
            raise UserError(f"seed set {seed_dir} has {len(mine)} images of class {spec.class_names()[c]}, "
                            f"needs --stage-ipc {stage_ipc}")
        for index, path in enumerate(mine):
            if not is_main() or os.path.exists(image_path(images_dir, spec, c, index)):
                continue
            x = load_image(path, spec.channels)
            if x.shape[-1] != spec.image_size or x.shape[-2] != spec.image_size:  # store at generation size
                x = torch.nn.functional.interpolate(x[None], size=(spec.image_size,) * 2, mode="bilinear",
                                                    antialias=True, align_corners=False)[0].clamp(0, 1)
            save_png(x, image_path(images_dir, spec, c, index))
            x = load_image(image_path(images_dir, spec, c, index), spec.channels)  # encode what is stored
            save_torch(prior.encode((x[None] * 2 - 1).to(prior.device))[0].cpu(), latent_path(latents_dir, spec, c, index))
    barrier()


def initial_memory(out_dir, spec, k, stage_ipc, cap):
    """[choice] M_c starts as the final latents of D_k's class-c images, so T_{k+1} moves away from them."""
    memory = {}
    for j in range(k):
        for c in range(spec.num_classes):
            for index in range(j * stage_ipc, (j + 1) * stage_ipc):
                add_to_memory(memory, c, torch.load(latent_path(stage_latents(out_dir, j), spec, c, index))[None], cap)
    return memory


def train_stage_student(out_dir, spec, k, plan, students, device, ranks, teacher=None):
    """theta_k: a fresh student on D_k, saved with the list of its training files (or reloaded)."""
    folder = stage_dir(out_dir, k)
    path = os.path.join(folder, "student.pt")
    view = students.view
    # resume: the student is a deterministic function of (seed, k, D_k), so reloading equals retraining
    if os.path.exists(path):
        model = make_student(students.arch, view)
        model.load_state_dict(torch.load(path, map_location="cpu"))
        return model.to(device).eval()
    paths, labels = union_files(out_dir, spec, k, plan.stage_ipc)
    epochs = epochs_for_ipc(k * plan.stage_ipc, students.recipe, spec.name) if students.epochs is None else students.epochs
    # [choice] the evaluation recipe, the reference model's architecture, re-initialised each stage;
    # a per-stage seed keeps every student reproducible on its own. With a soft-label recipe (rded,
    # ImageNet-1K) the recipe's teacher labels the crops.
    model = make_student(students.arch, view, seed=stream_seed(plan.seed, SALT_STAGE_INIT, k))
    ddp = students.ddp and ranks.world > 1
    model = train_student(model, ImageSet(paths, labels, channels=spec.channels), view, students.recipe, epochs,
                          seed=stream_seed(plan.seed, SALT_STAGE_TRAIN, k), device=device, desc=f"stage {k} student",
                          rank=ranks.rank if ddp else 0, world=ranks.world if ddp else 1,
                          num_workers=students.num_workers, teacher=teacher)
    if is_main():  # the file list makes "trained on exactly D_k" checkable after the fact (and is tested)
        save_json(dict(stage=k, arch=students.arch, recipe=students.recipe, epochs=epochs, train_files=paths),
                  os.path.join(folder, "student.json"))
        save_torch(model.state_dict(), path)
    barrier()
    return model


def run_stages(prior, spec, out_dir, plan, sampler, guide, students, reference, ranks=Ranks(), device="cpu",
               teacher=None, seed_stage=None, on_stage_start=None):
    """Build plan.ipc // plan.stage_ipc increments under out_dir (resuming), then write their union to
    out_dir/distilled. reference: (theta*, its view spec). teacher: the soft-label teacher of a rded recipe.
    seed_stage(images_dir, latents_dir): makes stage 0 another way (IGD's increment); default DiT / a folder.
    on_stage_start(k): a hook called before stage k's work (tests use it to kill a run).
    Returns the smallest sampler batch that fitted.
    """
    if plan.ipc % plan.stage_ipc:
        raise UserError(f"--ipc {plan.ipc} is not a multiple of --stage-ipc {plan.stage_ipc}")
    num_stages = plan.ipc // plan.stage_ipc
    for k in range(num_stages):  # a finished stage must still be whole before anything builds on it
        if os.path.exists(done_path(out_dir, k)):
            check_stage_files(out_dir, spec, k, plan.stage_ipc)
    if students.channels_last:  # theta* once for the whole run; each stage's student below
        reference = (reference[0].to(memory_format=torch.channels_last), reference[1])
    batch = plan.batch_size
    overall = tqdm(total=num_stages, desc="LGD stages", unit="stage", disable=not is_main(), position=0)
    for k in range(num_stages):
        folder = stage_dir(out_dir, k)
        images, latents = stage_images(out_dir, k), stage_latents(out_dir, k)
        if os.path.exists(done_path(out_dir, k)):  # written last, so its presence = complete
            print0(f"stage {k}: done, skipping")
            overall.update(1)
            continue
        if on_stage_start is not None:
            on_stage_start(k)
        first = k * plan.stage_ipc  # global image index of this increment's first slot (seeds its noise)
        log = new_log(batch)
        if k == 0 and seed_stage is not None:  # T_1 from another sampler (IGD's increment, the paper's seed)
            log = seed_stage(images, latents, log)
        elif k == 0 and plan.seed_set not in ("dit", "igd"):  # T_1 from a user's folder
            copy_seed_set(plan.seed_set, spec, out_dir, plan.stage_ipc, prior)
        elif k == 0:  # T_1: the unguided DiT increment
            generate_increment(prior, spec, images, latents, plan.stage_ipc, first, plan.seed, sampler, batch, ranks,
                               desc="stage 0 (unguided)", log=log)
        else:
            student = train_stage_student(out_dir, spec, k, plan, students, device, ranks, teacher)
            # S(x, y) = CE(theta_k(x), y) - omega CE(theta*(x), y): high = not learned yet, still valid
            if students.channels_last:
                student = student.to(memory_format=torch.channels_last)
            score = Learnability(student, students.view, reference[0], reference[1], guide.omega)
            memory = initial_memory(out_dir, spec, k, plan.stage_ipc, guide.memory_cap) if guide.deviation else None
            # T_{k+1}: kappa guided candidates per image, the highest-S one kept and added to M_c
            generate_increment(prior, spec, images, latents, plan.stage_ipc, first, plan.seed, sampler, batch, ranks,
                               score, guide, memory, desc=f"stage {k} (guided)", log=log, twins=plan.twins)
        summary = summarise_log(log)
        batch = min(batch, summary["sampler_batch"])
        if is_main():
            guided = range(first, first + plan.stage_ipc) if k else ()
            save_set_grid(images, spec, range(first, first + plan.stage_ipc), os.path.join(folder, "grid.png"),
                          f"stage {k}: images {first}..{first + plan.stage_ipc - 1} "
                          f"({'guided' if k else 'seed'}); rows = classes", guided)
            if k:
                save_json(summary, os.path.join(folder, "log.json"))
                print0(log_line(k, summary))
            save_json(dict(stage=k, indices=[first, first + plan.stage_ipc], sampler_batch=summary["sampler_batch"],
                           nan_fallbacks=summary["nan_fallbacks"], grad_decoder_cosine=summary["grad_decoder_cosine"]),
                      done_path(out_dir, k))
            if summary["grad_decoder_cosine"] is not None:
                print0(f"stage {k}: cheap gradient decoder vs exact, cosine {summary['grad_decoder_cosine']:.3f} "
                       f"(first guided batch)")
        if summary["nan_fallbacks"]:
            print0(f"stage {k}: {summary['nan_fallbacks']} samples fell back to the unguided step (non-finite gradient)")
        overall.update(1)
        barrier()
    overall.close()
    write_union(out_dir, spec, num_stages, plan.stage_ipc)  # D_K, laid out exactly like a --method dit set
    return batch


def write_union(out_dir, spec, num_stages, stage_ipc):
    """D_K -> out_dir/distilled/<class>/<index>.png (atomic copies), the evaluator's input."""
    if is_main():
        for k in range(num_stages):
            check_stage_files(out_dir, spec, k, stage_ipc)
            for path, c in zip(*stage_files(out_dir, spec, k, stage_ipc)):
                target = os.path.join(distilled_dir(out_dir), spec.class_names()[c], os.path.basename(path))
                if not os.path.exists(target):
                    copy_file(path, target)
    barrier()


if __name__ == "__main__":
    print("curriculum.py holds the stage loop; run it with `python distill.py` (see its --help).")
