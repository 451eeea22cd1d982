"""
The stage loop of LGD (Chan-Santiago & Shah, CVPR 2026, Sec. "Incremental distillation": "+10 IPC per stage"),
read top to bottom.

The distilled set is built from K disjoint increments T_1 .. T_K of `stage_ipc` images per class:

  T_1            = the seed increment: unguided DiT samples, IGD's samples (igd.py; the paper's pipeline), MGD3's
                   (mgd3.py) or a folder of the user's                                  (seed_increment)
  for k = 1 .. K-1:
      D_k        = T_1 u .. u T_k                                                       (union)
      theta_k    = a fresh student trained on D_k, "to convergence"                     (stage_student)
      S          = CE(theta_k(x), y) - omega CE(theta*(x), y)                           (guidance.make_score)
      M_c        = the final latents of D_k's class-c images                            (initial_memory)
      T_{k+1}    = slot by slot, for every class c: kappa learnability-guided candidates, pushed away from M_c;
                   the highest S kept and its latent added to M_c                       (generate_increment)
  the set        = D_K

Why stages: a set sampled in one go is redundant (a model trained on one 10-IPC slice already classifies the
others); guiding each increment towards what the current student has not learned (but the reference model theta*
still recognises) makes the increments complementary. The one-pass baselines (--method dit, igd, mgd3) are one
increment of the whole IPC, made as T_1 is.

Pairing: image indices are global (k * stage_ipc + slot) and seed the noise, so T_1 of an LGD run is, image for
image, the first stage_ipc images of `--method dit` with the same seed, and every later LGD image starts from the
same noise as the DiT image with that index.

`run` is the run folder (ground/run.py). The loops here decide what is sampled; the run is only asked: which stages
are done, which sampler batches are not on disk yet, store this, load that.
Run: `python distill.py` (digits, LGD, IPC 10 in 5 stages of 2).
"""
from dataclasses import dataclass

import torch

from data import ImageSet
from ground.common import SALT_STAGE_INIT, SALT_STAGE_TRAIN, derive_seed, stream_seed
from guidance import add_to_memory, best_of_candidates, decode_images, make_score, sample
from igd import influence_score
from mgd3 import ModePull
from model import make_student
from train_student import epochs_for_ipc


@dataclass
class Plan:
    """How the set is cut into stages and sampled."""
    ipc: int                  # images per class in total
    stage_ipc: int            # per increment (paper 10)
    seed: int                 # run seed: the noise of image i of class c derives from it

    @property
    def stages(self):
        return self.ipc // self.stage_ipc


@dataclass
class Students:
    """theta_k: [choice] a fresh student (by default of theta*'s architecture), trained with the evaluation recipe."""
    arch: str
    recipe: str
    view: object              # the view its students are trained and tested in (train_student.recipe_view)
    trainer: object           # where they train (train_student.Trainer)
    epochs: int = None        # None: by IPC (the recipe's protocol)
    teacher: object = None    # the soft-label teacher of a rded recipe


@dataclass
class Seed:
    """How T_1 is made (--seed-set), or the whole set of a one-pass method (--method dit, igd, mgd3)."""
    method: str               # "dit", "igd", "mgd3", or "folder"
    igd: object = None        # igd.IGD: its constants and data
    trainer: object = None    # where IGD's surrogate trains
    mgd3: object = None       # mgd3.MGD3: its constants
    modes: dict = None        # MGD3's modes {class: (n, C, h, w)}, n = the increment's images per class
    files: list = None        # a folder's images, [[path] per class]


def run_stages(run, prior, plan, sampler, guide, students, reference, seed):
    """T_1; for each stage k: D_k, theta_k trained on it, S, T_{k+1} generated against it; then D_K is the set.

    reference: (theta*, its view). seed: how T_1 is made.
    """
    for k in range(plan.stages):
        if run.stage_done(k):  # finished by an earlier start
            continue
        inc = run.increment(k)
        if k == 0:
            seed_increment(run, inc, prior, plan, sampler, seed)                                     # T_1
        else:
            paths, labels = union(run, k)                                                            # D_k
            theta_k = stage_student(run, k, paths, labels, plan, students)
            # S(x, y) = CE(theta_k(x), y) - omega CE(theta*(x), y): high = not learned yet, still valid
            score = make_score(guide.score, theta_k, students.view, *reference, guide)
            memory = initial_memory(run, k, guide.memory_cap) if guide.deviation else None          # M_c
            generate_increment(run, inc, prior, plan, sampler, score, guide, memory)                # T_{k+1}
        run.finish_stage(k)
    run.write_set(*union(run, plan.stages))  # D_K, laid out exactly like a --method dit set


def seed_increment(run, inc, prior, plan, sampler, seed):
    """T_1 (or a one-pass method's set): IGD's influence-guided samples, MGD3's mode-pulled ones, unguided DiT
    samples, or a user's folder (its latents for M_c are the VAE encodings of its images)."""
    if seed.method == "igd":  # one sample per image, pushed away from this increment's earlier samples of the class
        score, checkpoints = influence_score(run.spec, seed.igd, seed.trainer)
        run.save_igd_checkpoints(checkpoints)
        generate_increment(run, inc, prior, plan, sampler, score, seed.igd.guide, memory={})
    elif seed.method == "mgd3":
        generate_increment(run, inc, prior, plan, sampler, modes=seed.modes, mgd3=seed.mgd3)
    elif seed.method == "dit":
        generate_increment(run, inc, prior, plan, sampler)
    else:
        run.copy_seed_set(inc, seed.files, prior)


def union(run, k):
    """D_k = T_1 u .. u T_k: the files of stages 0 .. k-1, stage by stage, class by class, in index order (a fixed
    order, so the student's data order is too). Returns (paths, labels)."""
    paths, labels = [], []
    for j in range(k):
        p, y = run.increment(j).files()
        paths, labels = paths + p, labels + y
    return paths, labels


def stage_student(run, k, paths, labels, plan, students):
    """theta_k: a fresh student trained on D_k (paths, labels), re-initialised every stage. It is a seeded function of
    D_k, so a student an earlier start saved is reloaded."""
    model = make_student(students.arch, students.view, seed=stream_seed(plan.seed, SALT_STAGE_INIT, k))
    state = run.saved_student(k)
    if state is not None:
        model.load_state_dict(state)
        return students.trainer.place(model)
    epochs = students.epochs or epochs_for_ipc(k * plan.stage_ipc, students.recipe, run.spec.name,
                                               num_classes=run.spec.num_classes)
    model = students.trainer.train(model, ImageSet(paths, labels, channels=run.spec.channels), students.view,
                                   students.recipe, epochs, seed=stream_seed(plan.seed, SALT_STAGE_TRAIN, k),
                                   desc=f"stage {k} student", teacher=students.teacher)
    run.save_student(k, model, dict(stage=k, arch=students.arch, recipe=students.recipe, epochs=epochs,
                                    train_files=paths))
    return model


def initial_memory(run, k, cap):
    """[choice] M_c starts as the final latents of D_k's class-c images, so T_{k+1} moves away from them."""
    memory = {}
    for j in range(k):
        inc = run.increment(j)
        for c in range(run.spec.num_classes):
            for index in inc.indices:
                add_to_memory(memory, c, inc.latent(c, index)[None], cap)
    return memory


# ----------------------------------------------------------------------------- generating an increment

def generate_increment(run, inc, prior, plan, sampler, score=None, guide=None, memory=None, modes=None, mgd3=None):
    """Fill increment `inc`: for each of its slots, an image per class. Guided when a score is given (kappa
    candidates each, the highest score kept, pushed away from M_c); MGD3's pull toward the image's mode when modes
    are given (modes[c][j]: the mode of the j-th image of class c in the increment); else the plain DiT sampler.

    The slots of a class are filled in order, so M_c grows within a stage: after a slot, its kept latents (read back
    from disk, so a resumed run sees the same memory) join M_c. The classes of a block share a sampler batch."""
    kappa = guide.candidates if score is not None else 1
    for block in run.blocks(inc, kappa):  # classes sampled together (under torchrun: this rank's)
        for index in inc.indices:  # slot by slot: M_c of a class depends only on its own earlier slots
            for classes in run.pending(inc, block, index):  # the sampler batches of the slot not on disk yet
                with run.halved_on_out_of_memory(classes):  # out of memory: these classes come back in halves
                    pull = None if modes is None else ModePull(
                        torch.stack([modes[c][index - inc.indices[0]] for c in classes]).to(prior.device), mgd3)
                    made = sample_images(prior, run.spec, classes, index, plan.seed, sampler, score, guide, memory,
                                         pull)
                    run.store(inc, index, classes, *made)
            if memory is not None:
                for c in block:
                    add_to_memory(memory, c, inc.latent(c, index)[None], guide.memory_cap)


def sample_images(prior, spec, classes, index, seed, sampler, score=None, guide=None, memory=None, pull=None):
    """The images of `classes` at slot `index` -> (final latents (n, C, h, w), images (n, C, H, W) in [0, 1],
    candidates: None unguided, else (kept candidate (n,), every candidate's score parts {name: (n, kappa)})).

    Unguided: the plain DiT sampler (with MGD3's pull if given). Guided: kappa candidates per image from fresh noise,
    the one with the highest score on its final decoded image kept (the paper's candidate selection).
    """
    kappa = guide.candidates if score is not None else 1
    items = [(c, j) for c in classes for j in range(kappa)]  # (class, candidate), the candidates of an image adjacent
    labels = torch.tensor([spec.prior_labels[c] for c, _ in items])  # the prior's ids (ImageNet's for the DiT)
    targets = torch.tensor([c for c, _ in items], device=prior.device)  # y of the score: the dataset's class index
    generators = [torch.Generator().manual_seed(derive_seed(seed, c, index, j)) for c, j in items]
    if score is None:
        z0 = sample(prior, labels, targets, generators, sampler, pull=pull)
        return z0, decode_images(prior, z0), None
    memories = [memory.get(c) for c, _ in items] if memory is not None else None
    z0, images, best, parts = best_of_candidates(prior, labels, targets, generators, sampler, score, guide, memories)
    return z0, images, (best, parts)
