"""
The stage loop of LGD: METHOD.md section 3 (the paper's incremental curriculum).

The distilled set is built from K disjoint increments T_1 .. T_K of `stage_ipc` images per class:

  T_1 (stage 0)  = the seed: unguided DiT samples (`--seed-set dit`) or a folder the user gives
  for stage k = 1 .. K-1:
      theta_{k}   = a fresh student trained on D_k = T_1 u .. u T_k          ("to convergence")
      T_{k+1}     = learnability-guided samples, S = CE(theta_k) - omega CE(theta*)   (guidance.py)
      D_{k+1}     = D_k u T_{k+1}
  distilled      = D_K, written to DIR/distilled/<class>/<index>.png like the unguided baseline

Why stages: a set sampled in one go is redundant (a model trained on one 10-IPC slice already
classifies the others); guiding each increment towards what the current student has not learned
(but the reference model still recognises) makes the increments complementary.

On disk, one folder per stage (everything a rerun needs to resume, everything a reader needs to
inspect the curriculum):

  DIR/stage_<k>/images/<class>/<index>.png   T_{k+1}: indices k*stage_ipc .. (k+1)*stage_ipc - 1
  DIR/stage_<k>/student.pt, student.json     theta_k and the exact list of files it was trained on
  DIR/stage_<k>/grid.png                     this increment, one row per class
  DIR/stage_<k>/done.json                    written last: the stage is complete

Image indices are global (stage * stage_ipc + slot) and seed the noise, so stage 0 of an LGD run
is, image for image, the first stage_ipc images of `--method dit` with the same seed, and every
later LGD image starts from the same noise as the DiT image with that index: the comparison is
paired. A rerun skips finished stages, reloads a saved student, and skips PNGs already written.

Run: `python distill.py` (digits, LGD, IPC 10 in 5 stages of 2); the loop itself is `run_stages`.
"""
import json
import os
import socket
import time

import torch
from tqdm import tqdm

from common import (TEMPORARY, UserError, all_reduce_sum, barrier, copy_file, derive_seed, git_commit, is_main,
                    load_json, print0, remove_path, remove_stale_temporaries, save_json, save_png, save_torch,
                    temporary_path)
from data import ImageSet, list_image_folder, load_image
from guidance import Learnability, add_to_memory, generate_increment, image_path, save_sample_grid
from model import make_student
from train_student import RECIPES, epochs_for_ipc, train_student


# ----------------------------------------------------------------------------- the run folder

LOCK = ".lgd-lock"      # held while a run works in the folder (O_EXCL: two runs cannot both hold it)
ARGS = "args.json"      # the settings of the run; its presence marks an lgd run folder


def stage_dir(out_dir, k):
    return os.path.join(out_dir, f"stage_{k}")


def owned_folders(out_dir):
    """The folders a run writes into: the only places its stale temporaries may be removed from."""
    if not os.path.isdir(out_dir):
        return []
    inner = [os.path.join(out_dir, d) for d in os.listdir(out_dir) if d.startswith("stage_") or d == "distilled"]
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
        if foreign and not os.path.exists(os.path.join(out_dir, ARGS)):
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

    must_match: the keys that change the images; a rerun with another value would mix two runs' stages.
    Each start is appended to `starts` (time, git commit), so a resumed folder says which code made it.
    """
    path = os.path.join(out_dir, ARGS)
    starts = []
    if os.path.exists(path):
        old = load_json(path, what="run settings")
        if not isinstance(old, dict):
            raise UserError(f"{path} is not an lgd args.json; move it away or use another --out-dir")
        changed = [k for k in must_match if k in old and old[k] != args.get(k)]
        if changed:
            details = ", ".join(f"{k} {old[k]!r} -> {args.get(k)!r}" for k in changed[:4])
            raise UserError(f"{out_dir} holds a run with different {', '.join(changed)} ({details}); use another "
                            f"--out-dir or the same settings to resume")
        starts = old.get("starts", [])
    start = dict(time=time.strftime("%Y-%m-%d %H:%M:%S"), git_commit=git_commit())
    save_json(dict(args, git_commit=start["git_commit"], starts=starts + [start]), path)


def check_stage_files(out_dir, spec, k, stage_ipc):
    """A stage marked done must still hold every image (a deleted file would break the union and students)."""
    for path in stage_files(out_dir, spec, k, stage_ipc)[0]:
        if not os.path.exists(path):
            raise UserError(f"stage {k} is marked done but {path} is missing; restore it, or delete "
                            f"{stage_dir(out_dir, k)} and the later stages to regenerate them")


def stage_files(out_dir, spec, k, stage_ipc):
    """(paths, labels) of stage k's increment, class by class, in index order."""
    paths, labels = [], []
    for c in range(spec.num_classes):
        for index in range(k * stage_ipc, (k + 1) * stage_ipc):
            paths.append(image_path(os.path.join(stage_dir(out_dir, k), "images"), spec, c, index))
            labels.append(c)
    return paths, labels


def union_files(out_dir, spec, k, stage_ipc):
    """D_k: the files of stages 0 .. k-1 (the union the stage-k student is trained on)."""
    paths, labels = [], []
    for j in range(k):  # stage, then class, then index: a fixed order, so the student's data order is too
        p, y = stage_files(out_dir, spec, j, stage_ipc)
        paths, labels = paths + p, labels + y
    return paths, labels


def copy_seed_set(seed_dir, spec, folder, stage_ipc):
    """[choice] `--seed-set PATH`: the first stage_ipc images per class (sorted names) of a user's set."""
    paths, labels = list_image_folder(seed_dir, spec.class_names(), what="seed set")
    for c in range(spec.num_classes):
        # sorted names, first stage_ipc: a fixed choice, so a resumed run copies the same images
        mine = [p for p, y in zip(paths, labels) if y == c][:stage_ipc]
        if len(mine) < stage_ipc:
            raise UserError(f"seed set {seed_dir} has {len(mine)} images of class {spec.class_names()[c]}, "
                            f"needs --stage-ipc {stage_ipc}")
        for index, path in enumerate(mine):
            x = load_image(path, spec.channels)
            if x.shape[-1] != spec.image_size or x.shape[-2] != spec.image_size:  # store at generation size
                x = torch.nn.functional.interpolate(x[None], size=(spec.image_size,) * 2, mode="bilinear",
                                                    antialias=True, align_corners=False)[0].clamp(0, 1)
            if is_main() and not os.path.exists(image_path(folder, spec, c, index)):
                save_png(x, image_path(folder, spec, c, index))
    barrier()


def train_stage_student(out_dir, spec, k, stage_ipc, arch, recipe, epochs, seed, device, rank, world, ddp,
                        num_workers=0, teacher=None):
    """theta_k: a fresh student on D_k, saved with the list of its training files (or reloaded)."""
    folder = stage_dir(out_dir, k)
    path = os.path.join(folder, "student.pt")
    # resume: the student is a deterministic function of (seed, k, D_k), so reloading equals retraining
    if os.path.exists(path):
        model = make_student(arch, spec)
        model.load_state_dict(torch.load(path, map_location="cpu"))
        return model.to(device).eval()
    paths, labels = union_files(out_dir, spec, k, stage_ipc)
    union = ImageSet(paths, labels, channels=spec.channels)
    epochs = epochs_for_ipc(k * stage_ipc, recipe, spec.name) if epochs is None else epochs
    # [choice] the evaluation recipe, the reference model's architecture, re-initialised each stage;
    # a per-stage seed keeps every student reproducible on its own. With a soft-label recipe (rded,
    # ImageNet-1K) theta* is also the teacher that labels the crops.
    model = make_student(arch, spec, seed=derive_seed(seed, k, 7))
    model = train_student(model, union, spec, recipe, epochs, seed=derive_seed(seed, k, 8) % 2**31, device=device,
                          desc=f"stage {k} student", rank=rank if ddp else 0, world=world if ddp else 1,
                          num_workers=num_workers, teacher=teacher)
    if is_main():  # the file list makes "trained on exactly D_k" checkable after the fact (and is tested)
        save_json(dict(stage=k, arch=arch, recipe=recipe, epochs=epochs, train_files=paths),
                  os.path.join(folder, "student.json"))
        save_torch(model.state_dict(), path)
    barrier()
    return model


def initial_memory(out_dir, spec, k, stage_ipc, prior, cfg):
    """[choice, METHOD 5b] M_c starts as the encoded images of D_k's class c, so T_{k+1} moves away from them."""
    memory = {}
    paths, labels = union_files(out_dir, spec, k, stage_ipc)
    # read back from the PNGs (not kept from the sampler): a resumed stage sees the very same memory
    for path, c in zip(paths, labels):
        add_to_memory(memory, c, load_image(path, spec.channels), prior, cfg)
    return memory


def run_stages(prior, spec, out_dir, ipc, stage_ipc, seed, reference, cfg, arch="convnet", recipe="minimax",
               student_epochs=None, cfg_scale=4.0, steps=50, batch_size=32, seed_set="dit", device="cpu",
               rank=0, world=1, student_ddp=True, on_stage_start=None, cfg_three_channels=False, num_workers=0):
    """Build ipc // stage_ipc increments under out_dir (resuming), then write their union to out_dir/distilled.

    reference: theta*, the frozen reference model. cfg: a guidance.GuidanceConfig (lambda, omega, gamma,
    kappa, window). on_stage_start(k): a hook called before stage k's work (tests use it to kill a run).
    """
    if ipc % stage_ipc:
        raise UserError(f"--ipc {ipc} is not a multiple of --stage-ipc {stage_ipc}")
    num_stages = ipc // stage_ipc
    for k in range(num_stages):  # a finished stage must still be whole before anything builds on it
        if os.path.exists(os.path.join(stage_dir(out_dir, k), "done.json")):
            check_stage_files(out_dir, spec, k, stage_ipc)
    overall = tqdm(total=num_stages, desc="LGD stages", unit="stage", disable=not is_main(), position=0)
    for k in range(num_stages):
        folder = stage_dir(out_dir, k)
        images = os.path.join(folder, "images")
        if os.path.exists(os.path.join(folder, "done.json")):  # written last, so its presence = complete
            print0(f"stage {k}: done, skipping")
            overall.update(1)
            continue
        if on_stage_start is not None:
            on_stage_start(k)
        cfg.nan_fallbacks = 0  # counted per stage, logged in done.json
        first = k * stage_ipc  # global image index of this increment's first slot (seeds its noise)
        if k == 0 and seed_set != "dit":  # T_1 from a user's folder (e.g. IGD's 10-IPC set)
            copy_seed_set(seed_set, spec, images, stage_ipc)
        elif k == 0:  # T_1: the unguided DiT increment
            generate_increment(prior, spec, images, stage_ipc, first, seed, cfg_scale, steps, batch_size,
                               rank=rank, world=world, desc="stage 0 (unguided)",
                               cfg_three_channels=cfg_three_channels)
        else:
            student = train_stage_student(out_dir, spec, k, stage_ipc, arch, recipe, student_epochs, seed, device,
                                          rank, world, student_ddp, num_workers,
                                          teacher=reference if RECIPES[recipe]["temperature"] else None)
            # S(x, y) = CE(theta_k(x), y) - omega CE(theta*(x), y): high = not learned yet, still valid (section 4)
            score = Learnability(student, reference, spec, cfg.lambda_ref)
            memory = initial_memory(out_dir, spec, k, stage_ipc, prior, cfg) if cfg.deviation_scale else None
            # T_{k+1}: kappa guided candidates per slot, the highest-S one kept and added to M_c (5a-5c)
            generate_increment(prior, spec, images, stage_ipc, first, seed, cfg_scale, steps, batch_size,
                               score=score, cfg=cfg, memory=memory, rank=rank, world=world,
                               desc=f"stage {k} (guided)", cfg_three_channels=cfg_three_channels)
        fallbacks = all_reduce_sum(cfg.nan_fallbacks)  # every rank counted its own samples
        if is_main():
            save_sample_grid(images, spec, range(first, first + stage_ipc), os.path.join(folder, "grid.png"))
            save_json(dict(stage=k, indices=[first, first + stage_ipc], nan_fallbacks=fallbacks),
                      os.path.join(folder, "done.json"))
        if fallbacks:
            print0(f"stage {k}: {fallbacks} samples fell back to the unguided step (non-finite gradient)")
        overall.update(1)
        barrier()
    overall.close()
    write_union(out_dir, spec, num_stages, stage_ipc)  # D_K, laid out exactly like a --method dit set


def write_union(out_dir, spec, num_stages, stage_ipc):
    """D_K -> out_dir/distilled/<class>/<index>.png (atomic copies), the evaluator's input."""
    if is_main():
        for k in range(num_stages):
            check_stage_files(out_dir, spec, k, stage_ipc)
            for path, c in zip(*stage_files(out_dir, spec, k, stage_ipc)):
                target = os.path.join(out_dir, "distilled", spec.class_names()[c], os.path.basename(path))
                if not os.path.exists(target):
                    copy_file(path, target)
    barrier()


def stage_summary(out_dir):
    """[(k, done)] for the stage folders of a run, for --dry-run and the README."""
    stages = sorted(int(d.split("_")[1]) for d in os.listdir(out_dir) if d.startswith("stage_"))
    return [(k, os.path.exists(os.path.join(stage_dir(out_dir, k), "done.json"))) for k in stages]


if __name__ == "__main__":
    print("curriculum.py holds the stage loop; run it with `python distill.py` (see its --help).")
