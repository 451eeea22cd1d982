"""
The stage loop of LGD (Chan-Santiago & Shah, CVPR 2026, Sec. "Incremental distillation": "+10 IPC per stage"),
read top to bottom.

The distilled set is built from K disjoint increments T_1 .. T_K of `stage_ipc` images per class:

  T_1            = the seed increment: unguided DiT samples, IGD's samples (igd.py; the paper's pipeline) or a
                   folder of the user's
  for k = 1 .. K-1:
      D_k        = T_1 u .. u T_k                                                       (union)
      theta_k    = a fresh student trained on D_k, "to convergence"                     (stage_student)
      M_c        = the final latents of D_k's class-c images                            (initial_memory)
      T_{k+1}    = slot by slot, for every class c: kappa learnability-guided candidates with
                   S = CE(theta_k) - omega CE(theta*), pushed away from M_c; the highest S kept and its
                   latent added to M_c                                                  (generate_increment)
  the set        = D_K

Why stages: a set sampled in one go is redundant (a model trained on one 10-IPC slice already classifies the
others); guiding each increment towards what the current student has not learned (but the reference model theta*
still recognises) makes the increments complementary.

Pairing: image indices are global (k * stage_ipc + slot) and seed the noise, so T_1 of an LGD run is, image for
image, the first stage_ipc images of `--method dit` with the same seed, and every later LGD image starts from the
same noise as the DiT image with that index.

`run` is the run folder (ground/run.py): it answers which stages and images are done, stores what is made, and
retries a sampler batch on out-of-memory. Run: `python distill.py` (digits, LGD, IPC 10 in 5 stages of 2).
"""
from dataclasses import dataclass

import torch

from data import ImageSet
from ground.common import SALT_STAGE_INIT, SALT_STAGE_TRAIN, derive_seed, stream_seed
from guidance import Learnability, add_to_memory, best_of_candidates, decode_images, sample
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
    """theta_k: [choice] a fresh student of the reference's architecture, trained with the evaluation recipe."""
    arch: str
    recipe: str
    view: object              # the view its students are trained and tested in (train_student.recipe_view)
    trainer: object           # where they train (train_student.Trainer)
    epochs: int = None        # None: by IPC (the recipe's protocol)
    teacher: object = None    # the soft-label teacher of a rded recipe


def run_stages(run, prior, plan, sampler, guide, students, reference, seed_increment):
    """T_1; for each stage k: D_k, theta_k trained on it, T_{k+1} generated against it; then D_K is the set.

    reference: (theta*, its view). seed_increment(inc) fills T_1 (distill.py picks: DiT, IGD or a folder).
    """
    for k in range(plan.stages):
        if run.stage_done(k):  # finished by an earlier start
            continue
        if k == 0:
            seed_increment(run.increment(0))
        else:
            theta_k = stage_student(run, k, plan, students)
            # S(x, y) = CE(theta_k(x), y) - omega CE(theta*(x), y): high = not learned yet, still valid
            score = Learnability(theta_k, students.view, *reference, guide.omega)
            memory = initial_memory(run, k, guide.memory_cap) if guide.deviation else None
            generate_increment(run, run.increment(k), prior, plan, sampler, score, guide, memory,
                               desc=f"stage {k} (guided)")
        run.finish_stage(k)
    run.write_set(*union(run, plan.stages))  # D_K, laid out exactly like a --method dit set


def union(run, k):
    """D_k = T_1 u .. u T_k: the files of stages 0 .. k-1, stage by stage, class by class, in index order (a fixed
    order, so the student's data order is too). Returns (paths, labels)."""
    paths, labels = [], []
    for j in range(k):
        p, y = run.increment(j).files()
        paths, labels = paths + p, labels + y
    return paths, labels


def stage_student(run, k, plan, students):
    """theta_k: a fresh student trained on D_k, re-initialised every stage (a seeded function of D_k: a student an
    earlier start saved is reloaded)."""
    model = make_student(students.arch, students.view, seed=stream_seed(plan.seed, SALT_STAGE_INIT, k))
    state = run.saved_student(k)
    if state is not None:
        model.load_state_dict(state)
        return students.trainer.place(model)
    paths, labels = union(run, k)
    epochs = students.epochs or epochs_for_ipc(k * plan.stage_ipc, students.recipe, run.spec.name)
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

def generate_increment(run, inc, prior, plan, sampler, score=None, guide=None, memory=None, desc="sampling",
                       pull=None):
    """Fill increment `inc`: for each of its slots, an image per class; guided when a score is given (kappa
    candidates each, the highest score kept, pushed away from M_c), else the plain DiT sampler (with pull(classes,
    index) -> the sampler's gradient-free pull for those images, e.g. MGD3's, when given).

    The slots of a class are filled in order, so M_c grows within a stage: after a slot, its kept latents (read back
    from disk, so a resumed run sees the same memory) join M_c. The classes of a block share a sampler batch."""
    kappa = guide.candidates if score is not None else 1
    for block in run.blocks(inc, kappa, desc):  # classes sampled together (under torchrun: this rank's)
        for index in inc.indices:  # slot by slot: M_c of a class depends only on its own earlier slots
            run.fill(inc, block, index, lambda classes: sample_images(prior, run.spec, classes, index, plan.seed,
                                                                      sampler, score, guide, memory, pull))
            if memory is not None:
                for c in block:
                    add_to_memory(memory, c, inc.latent(c, index)[None], guide.memory_cap)


def sample_images(prior, spec, classes, index, seed, sampler, score=None, guide=None, memory=None, pull=None):
    """The images of `classes` at slot `index` -> (final latents (n, C, h, w), images (n, C, H, W) in [0, 1],
    candidates: None unguided, else (kept candidate (n,), every candidate's score parts {name: (n, kappa)})).

    Unguided: the plain DiT sampler. Guided: kappa candidates per image from fresh noise, the one with the highest
    score on its final decoded image kept (the paper's candidate selection).
    """
    kappa = guide.candidates if score is not None else 1
    items = [(c, j) for c in classes for j in range(kappa)]  # (class, candidate), the candidates of an image adjacent
    labels = torch.tensor([spec.prior_labels[c] for c, _ in items])  # the prior's ids (ImageNet's for the DiT)
    generators = [torch.Generator().manual_seed(derive_seed(seed, c, index, j)) for c, j in items]
    if score is None:
        z0 = sample(prior, labels, generators, sampler, pull=pull(classes, index) if pull is not None else None)
        return z0, decode_images(prior, z0), None
    memories = [memory.get(c) for c, _ in items] if memory is not None else None
    targets = torch.tensor([c for c, _ in items], device=prior.device)  # y of S: the dataset's class index
    z0, images, best, parts = best_of_candidates(prior, labels, targets, generators, sampler, score, guide, memories)
    return z0, images, (best, parts)
