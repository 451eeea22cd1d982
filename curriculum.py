"""
The stage loop of LGD (the paper's incremental curriculum: "+10 IPC per stage"), read top to bottom.

The distilled set is built from K disjoint increments T_1 .. T_K of `stage_ipc` images per class:

  T_1 (stage 0)  = the seed increment (seed_increment): unguided DiT samples ("dit"), IGD's samples ("igd",
                   the paper's pipeline) or a folder of the user's
  for stage k = 1 .. K-1:
      D_k        = T_1 u .. u T_k                                                          (union)
      theta_k    = a fresh student trained on D_k, "to convergence"                        (stage_student)
      T_{k+1}    = learnability-guided samples, S = CE(theta_k) - omega CE(theta*)          (generate_increment,
                   kappa candidates per image, the highest S kept, M_c pushed away from     guidance.py)
  distilled      = D_K, laid out like the unguided baseline's set

Why stages: a set sampled in one go is redundant (a model trained on one 10-IPC slice already classifies the
others); guiding each increment towards what the current student has not learned (but the reference model theta*
still recognises) makes the increments complementary.

Pairing: image indices are global (stage * stage_ipc + slot) and seed the noise, so stage 0 of an LGD run is, image
for image, the first stage_ipc images of `--method dit` with the same seed, and every later LGD image starts from
the same noise as the DiT image with that index.

Every file goes through `run` (lab/run.py, the run folder as this loop sees it): which stages are done, where an
increment's images and latents are, resuming an interrupted batch byte for byte, out-of-memory retries, the
per-image records and stage logs, the grids. This file holds the method only.

Run: `python distill.py` (digits, LGD, IPC 10 in 5 stages of 2).
"""
from dataclasses import dataclass

import torch

from data import ImageSet
from guidance import Learnability, SamplerLog, add_to_memory, best_of_candidates, decode_images, sample
from lab.common import SALT_STAGE_INIT, SALT_STAGE_TRAIN, SALT_VIEWS, UserError, derive_seed, stream_seed
from lab.folder import seed_set_files
from model import make_student
from train_student import SURROGATE, epochs_for_ipc, influence_score, train_student, view_augment


@dataclass
class Plan:
    """How the set is cut into stages and sampled."""
    ipc: int                  # images per class in total
    stage_ipc: int            # per increment (paper 10)
    seed: int                 # run seed: the noise of image i of class c derives from it
    batch_size: int = 32      # samples per sampler batch (candidates included)
    seed_set: str = "dit"     # T_1: "dit" (unguided), "igd" (IGD's increment), or a folder <class>/*.png
    twins: bool = True        # log the unguided twin of every kept image (one more unguided sample each)

    @property
    def stages(self):
        return self.ipc // self.stage_ipc


@dataclass
class Students:
    """The per-stage student theta_k: [choice] the evaluation recipe with the reference's architecture."""
    arch: str
    recipe: str
    view: object              # the classifier view its students are trained and tested in (train_student.recipe_view)
    epochs: int = None        # None: by IPC (the recipe's protocol)
    ddp: bool = True          # under torchrun, trained with DDP (off: every rank trains the same one alone)
    num_workers: int = 0
    channels_last: bool = False  # NHWC classifiers inside the guided step (faster convolutions on GPUs)
    others: tuple = ()        # more student architectures (--student-archs; not the paper's): S averages their CE
    device: str = "cpu"


@dataclass
class IGDSeed:
    """IGD's increment (the paper's T_1, and `--method igd`): its guidance constants and how its score is built."""
    guide: object             # guidance.igd_guidance(...)
    data_dir: str
    grad_ipc: int = 200       # real images per class in its target gradients
    checkpoints: str = "auto"  # IGD's adaptive rule, or a list of surrogate snapshots
    threshold: float = 0.7
    epochs: int = None        # the surrogate's epochs (IGD 50)
    num_workers: int = 0


def uses_igd(method, seed_set):
    """Whether a run samples with IGD's influence score: --method igd, or LGD with T_1 from IGD (the paper's pipeline).
    A --method dit run samples no IGD increment, whatever a preset's seed set says, and builds nothing for it."""
    return method == "igd" or (method == "lgd" and seed_set == "igd")


# ----------------------------------------------------------------------------- the stages

def run_stages(run, prior, plan, sampler, guide, students, reference, teacher=None, igd=None):
    """T_1; for each stage k: D_k, theta_k trained on it, T_{k+1} generated against it; then D_K is the set.

    run: the run folder (lab.run.Run; a rerun resumes where the last start stopped). reference: [(theta*, its view)]
    (one member: the paper's). teacher: the soft-label teacher of a rded recipe. igd: IGDSeed when T_1 is IGD's.
    Resume, out-of-memory retries, the per-image records and the stage logs live in lab/run.py, behind `run`.
    """
    if plan.ipc % plan.stage_ipc:
        raise UserError(f"--ipc {plan.ipc} is not a multiple of --stage-ipc {plan.stage_ipc}")
    if students.channels_last:  # theta* once for the whole run; each stage's student in stage_student
        reference = [(model.to(memory_format=torch.channels_last), view) for model, view in reference]
    for k in range(plan.stages):
        if run.stage_done(k):  # finished by an earlier start (and still whole)
            continue
        if k == 0:
            seed_increment(run, prior, plan, sampler, igd)
        else:
            archs = (students.arch, *students.others)
            thetas = [stage_student(run, k, plan, students, arch, teacher) for arch in archs]
            # S(x, y) = CE(theta_k(x), y) - omega CE(theta*(x), y): high = not learned yet, still valid
            score = Learnability(thetas, students.view, [m for m, _ in reference], [v for _, v in reference],
                                 guide.omega, guide.views, stage_views(students, reference, plan.seed, k, guide.views))
            memory = initial_memory(run, k, guide.memory_cap) if guide.deviation else None
            generate_increment(run, run.increment(k), prior, plan, sampler, score, guide, memory, plan.twins,
                               desc=f"stage {k} (guided)")
        run.finish_stage(k)  # its picture, its log, and last done.json
    run.write_set(*union(run, plan.stages))  # D_K: the set, laid out exactly like a --method dit set


def seed_increment(run, prior, plan, sampler, igd=None):
    """T_1, chosen by name: IGD's increment (the paper's pipeline), unguided DiT samples, or a user's folder."""
    if plan.seed_set == "igd":
        igd_increment(run, run.increment(0), prior, plan, sampler, igd)
    elif plan.seed_set == "dit":
        generate_increment(run, run.increment(0), prior, plan, sampler, desc="stage 0 (unguided)")
    else:  # [choice] its latents for M_c are the VAE encodings of its images
        run.copy_seed_set(run.increment(0), seed_set_files(plan.seed_set, run.spec, plan.stage_ipc), prior)


def igd_increment(run, inc, prior, plan, sampler, igd):
    """IGD's sampler (the paper's seed increment, and --method igd): influence-guided, one sample per image, pushed
    away from this run's earlier samples of the class (M_c starts empty)."""
    score, info = influence_score(run.spec, igd.data_dir, prior.device, igd.grad_ipc, igd.checkpoints, igd.threshold,
                                  igd.epochs, igd.num_workers)
    run.save_igd_checkpoints(info)
    generate_increment(run, inc, prior, plan, sampler, score, igd.guide, memory={}, desc="IGD sampling")


def union(run, k):
    """D_k = T_1 u .. u T_k: the files of stages 0 .. k-1, stage by stage, class by class, in index order (a fixed
    order, so the student's data order is too). Returns (paths, labels)."""
    paths, labels = [], []
    for j in range(k):
        p, y = run.increment(j).files()
        paths, labels = paths + p, labels + y
    return paths, labels


def stage_student(run, k, plan, students, arch, teacher=None):
    """theta_k: [choice] a fresh student of `arch` with the evaluation recipe, trained on D_k ("to convergence"),
    re-initialised every stage; a student an earlier start saved is reloaded (it is a seeded function of D_k)."""
    state = run.saved_student(k, arch, students.arch)
    if state is not None:
        model = make_student(arch, students.view)
        model.load_state_dict(state)
    else:
        paths, labels = union(run, k)
        epochs = students.epochs or epochs_for_ipc(k * plan.stage_ipc, students.recipe, run.spec.name)
        ddp = students.ddp and run.world > 1
        model = train_student(make_student(arch, students.view, seed=stream_seed(plan.seed, SALT_STAGE_INIT, k)),
                              ImageSet(paths, labels, channels=run.spec.channels), students.view, students.recipe,
                              epochs, seed=stream_seed(plan.seed, SALT_STAGE_TRAIN, k), device=students.device,
                              desc=f"stage {k} student", rank=run.rank if ddp else 0, world=run.world if ddp else 1,
                              num_workers=students.num_workers, teacher=teacher)
        run.save_student(k, arch, students.arch, model, dict(stage=k, arch=arch, recipe=students.recipe, epochs=epochs,
                                                             train_files=paths))
    model = model.to(students.device).eval()
    return model.to(memory_format=torch.channels_last) if students.channels_last else model


def initial_memory(run, k, cap):
    """[choice] M_c starts as the final latents of D_k's class-c images, so T_{k+1} moves away from them."""
    memory = {}
    for j in range(k):
        inc = run.increment(j)
        for c in range(run.spec.num_classes):
            for index in inc.indices:
                add_to_memory(memory, c, inc.latent(c, index)[None], cap)
    return memory


def stage_views(students, reference, seed, k, views):
    """The augmentations S averages over with --guidance-views K > 1 (None at K = 1): each student's recipe, and
    theta*'s (the surrogate recipe) for each reference member, drawing from one generator seeded per stage (its
    draws follow the sampler's batches, so the whole stage is one stream: see lab.run.Batches, replay)."""
    if views == 1:
        return None
    g = torch.Generator().manual_seed(stream_seed(seed, SALT_VIEWS, k))
    return [view_augment(students.view, students.recipe, g) for _ in range(1 + len(students.others))] + \
        [view_augment(v, SURROGATE, g) for _, v in reference]


# ----------------------------------------------------------------------------- generating an increment

def generate_increment(run, inc, prior, plan, sampler, score=None, guide=None, memory=None, twins=False,
                       desc="sampling"):
    """Fill increment `inc` (lab.run.Increment): for each of its slots, an image per class; guided when a score is
    given (kappa candidates each, the highest score kept, pushed away from M_c), else the plain DiT sampler.

    The slots of a class are filled in order, so M_c grows within a stage: after a slot, its kept latents (read back
    from disk, so a resumed run sees the same memory) join M_c. The classes of a block share a sampler batch."""
    kappa = guide.candidates if score is not None else 1
    batches = run.batches(inc, kappa, guided=score is not None, replay=getattr(score, "draws_views", False), desc=desc)
    for block in batches.blocks:  # block by block (a score with per-class state, IGD's, needs one block at a time)
        for index in inc.indices:  # then slot by slot: M_c of a class depends only on its own earlier slots
            batches.sample(block, index, lambda classes, first: sample_images(
                prior, run.spec, classes, index, plan.seed, sampler, score, guide, memory, twins, check=first))
            if memory is not None:
                for c in block:
                    add_to_memory(memory, c, inc.latent(c, index)[None], guide.memory_cap)
    batches.close()


def sample_images(prior, spec, classes, index, seed, sampler, score=None, guide=None, memory=None, twins=False,
                  check=False):
    """The images of `classes` at slot `index` -> (final latents (n, C, h, w), images (n, C, H, W) in [0, 1], report).

    Unguided (score None; report None): the plain DiT sampler. Guided: kappa candidates per image from fresh noise,
    the one with the highest score on its final decoded image kept (the paper's candidate selection), and the report
    of what guidance did (lab/records.py writes it down): every candidate's score parts, the kept one, its unguided
    twin from the same noise, the per-step pushes. check: compare a cheap gradient decoder with the exact one.
    """
    kappa = guide.candidates if score is not None else 1
    items = [(c, j) for c in classes for j in range(kappa)]  # (class, candidate), the candidates of an image adjacent
    labels = torch.tensor([spec.prior_labels[c] for c, _ in items])  # the prior's ids (ImageNet's for the DiT)
    generators = [torch.Generator().manual_seed(derive_seed(seed, c, index, j)) for c, j in items]
    if score is None:
        z0 = sample(prior, labels, generators, sampler)
        return z0, decode_images(prior, z0), None
    memories = [memory.get(c) for c, _ in items] if memory is not None else None
    log = SamplerLog(check_gradient=check)
    targets = torch.tensor([c for c, _ in items], device=prior.device)  # y of S: the dataset's class index
    z0, images, best, parts = best_of_candidates(prior, labels, targets, generators, sampler, score, guide, memories,
                                                 log)
    twin = None
    if twins:  # the unguided twin of every kept image: the same noise without guidance
        twin_gens = [torch.Generator().manual_seed(derive_seed(seed, c, index, int(j))) for c, j in zip(classes, best)]
        twin_images = decode_images(prior, sample(prior, torch.tensor([spec.prior_labels[c] for c in classes]),
                                                  twin_gens, sampler))
        with torch.no_grad():
            twin = score.parts(twin_images * 2 - 1, torch.tensor(classes, device=prior.device))
    return z0, images, dict(kappa=kappa, best=best, parts=parts, twin=twin, log=log)
