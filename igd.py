"""
IGD, influence-guided diffusion (Chen et al., "Influence-Guided Diffusion for Dataset Distillation", ICLR 2025;
code DD_IGD `sample_mp.py`): the paper's seed increment T_1 and its main baseline, steered by the same sampler as
LGD (guidance.py). Where LGD's S asks "does the current student get x wrong (and theta* right)?", IGD asks
"would a training step on x move a surrogate the way real images of y do?":

  I(x, y)  = mean_j cos( grad_theta CE(f_theta_j(x), y),  g_real(j, y) ) - 1          (= -IGD's loss)
  g_real   = grad_theta of the mean CE over the first grad_ipc real images of class y, at theta_j
  z_{t-1} += lambda_I * rho_t * grad_{z_t} I  in IGD's window (30..45 of 50), rho_t as in guidance.py
  z_{t-1} -= gamma * grad_{z_t} cos(z_t, m*)  the deviation guidance, M_c of this increment's own samples

theta_j: snapshots of IGD's surrogate (ConvNet-6 trained on the real train split, its parameters at init and after
every epoch), kept by IGD's adaptive rule (select_checkpoints). Raising I by grad_{z_t} is a gradient of a
gradient: a double backward per sample and checkpoint.

Run: `python distill.py --method igd` (digits), or `--seed-set igd` for LGD on IGD's T_1 (the paper's pipeline).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from config import PAPER
from data import classifier_input, load_real, resize_crop
from guidance import GuidanceConfig
from model import make_student
from reference import reference_view, surrogate_trajectory

ARCH = "convnet"     # IGD's surrogate is ConvNet-6 whatever the evaluation network (DD_IGD `sample.py`, define_model)


def deviation_for(ipc):
    """IGD's gamma (IGD Table 7): 50 for a 10-IPC set, 120 for 50 / 100 and on ImageNet-1K."""
    return 50.0 if ipc <= 10 else 120.0


def uses_igd(method, seed_set):
    """Whether a run samples with I: --method igd, or LGD with T_1 from IGD (the paper's pipeline). A --method dit
    run samples no IGD increment, whatever a preset's seed set says, and builds nothing for it."""
    return method == "igd" or (method == "lgd" and seed_set == "igd")


def igd_guidance(deviation=50.0, scale=PAPER["igd_scale"], guide_from=PAPER["igd_from"],
                 guide_until=PAPER["igd_until"], **kwargs):
    """IGD's constants on the sampler's knobs: the z form, one sample per image (no candidates); its score has no
    reference term (omega is S's, unused)."""
    return GuidanceConfig(scale=scale, deviation=deviation, candidates=1, guide_from=guide_from,
                          guide_until=guide_until, form="z", **kwargs)


class Influence:
    """I(x, y), differentiable in x. real_gradient(j, c) -> the flat g_real vector, computed on demand and cached
    (for ImageNet-1K the vectors of all classes would not fit in memory, and a class block needs only its own)."""

    def __init__(self, checkpoints, view, real_gradient, cache_classes=64):
        self.checkpoints, self.view, self.real_gradient = checkpoints, view, real_gradient
        for model in checkpoints:
            model.eval().requires_grad_(True)  # important! the inner gradient is w.r.t. the weights
        self.cache, self.cache_classes = {}, cache_classes

    def target(self, j, c):
        if (j, c) not in self.cache:
            if len(self.cache) >= self.cache_classes * len(self.checkpoints):
                self.cache.clear()
            self.cache[(j, c)] = self.real_gradient(j, c)
        return self.cache[(j, c)]

    def parts(self, images, classes):
        """images (N, C, H, W) in [-1, 1] -> {"I": (N,)}, differentiable in the images (create_graph)."""
        with torch.enable_grad():  # the weight gradient is needed even when the caller only wants values
            inputs = classifier_input(images, self.view)
            scores = []
            for n in range(len(inputs)):  # per sample: each x has its own weight gradient
                y = classes[n:n + 1]
                cosines = []
                for j, model in enumerate(self.checkpoints):
                    params = list(model.parameters())
                    loss = F.cross_entropy(model(inputs[n:n + 1]), y)
                    grad = torch.autograd.grad(loss, params, create_graph=True)  # kept differentiable in x
                    flat = torch.cat([g.flatten() for g in grad])
                    cosines.append(F.cosine_similarity(flat, self.target(j, int(y)).to(flat.device), dim=0))
                scores.append(torch.stack(cosines).mean() - 1)
            return dict(I=torch.stack(scores))


def weight_gradient(model, inputs, labels, batch=50):
    """grad_theta of the mean CE over (inputs, labels), flattened; in batches (IGD: 4 batches of 50)."""
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    for i in range(0, len(inputs), batch):
        with torch.enable_grad():
            loss = F.cross_entropy(model(inputs[i:i + batch]), labels[i:i + batch], reduction="sum") / len(inputs)
            for t, g in zip(total, torch.autograd.grad(loss, params)):
                t += g
    return torch.cat([t.flatten() for t in total]).detach()


def select_checkpoints(similarity, threshold=PAPER["igd_threshold"]):
    """IGD's adaptive rule (DD_IGD `test_ckpts_grad_sim.py`): keep the random init (0); walking the trajectory,
    keep checkpoint j when the class-averaged cosine of its real gradient to the last kept one falls below
    `threshold`, and compare later checkpoints to it. similarity: (J, J) class-averaged cosines."""
    kept = [0]
    for j in range(1, len(similarity)):
        if similarity[kept[-1], j] < threshold:
            kept.append(j)
    return kept


@dataclass
class IGD:
    """IGD's increment for one dataset: its guidance constants and how its score is built."""
    guide: GuidanceConfig       # igd_guidance(...)
    data_dir: str
    grad_ipc: int = PAPER["grad_ipc"]
    checkpoints: str = PAPER["igd_checkpoints"]   # the adaptive rule, or surrogate snapshots, e.g. "0,5,16,40"
    threshold: float = PAPER["igd_threshold"]
    epochs: int = None          # the surrogate's epochs (None: IGD's 50; digits 30, mnist 20)


def influence_score(spec, igd, trainer):
    """I for a dataset -> (the score, what was chosen): the surrogate's trajectory (with --arch convnet theta* is its
    last snapshot: one training, cached), the chosen checkpoints and the real-gradient targets.
    trainer: where the surrogate trains (train_student.Trainer)."""
    view, device = reference_view(spec), trainer.device
    trajectory = surrogate_trajectory(view, ARCH, igd.data_dir, device, igd.epochs, num_workers=trainer.num_workers)
    real = load_real(spec, igd.data_dir, "train")
    members = [[i for i, y in enumerate(real.labels) if y == c][:igd.grad_ipc] for c in range(spec.num_classes)]

    def inputs(c):  # IGD's real view: the first grad_ipc images of the class, sorted by name, at 256 px, 0.5/0.5
        x = torch.stack([resize_crop(real.load(i), view.res) for i in members[c]]).to(device)
        return classifier_input(x * 2 - 1, view), torch.full((len(x),), c, device=device)

    def model_at(j):
        model = make_student(ARCH, view)
        model.load_state_dict(trajectory[j])
        return model.to(device).eval()

    if igd.checkpoints == "auto":  # class by class (the gradients of all classes need not fit in memory)
        similarity = torch.zeros(len(trajectory), len(trajectory))
        for c in tqdm(range(spec.num_classes), desc="IGD checkpoint selection", disable=trainer.rank != 0):
            x, y = inputs(c)
            grads = torch.stack([weight_gradient(model_at(j), x, y) for j in range(len(trajectory))])
            grads = F.normalize(grads.cpu(), dim=1)
            similarity += grads @ grads.T / spec.num_classes
        chosen = select_checkpoints(similarity, igd.threshold)
        info = dict(rule=f"adaptive, threshold {igd.threshold}", similarity_to_previous_kept=[
            float(similarity[a, b]) for a, b in zip(chosen, chosen[1:])])
    else:
        chosen = [int(j) for j in igd.checkpoints.split(",")]
        info = dict(rule="given")
    models = [model_at(j) for j in chosen]
    score = Influence(models, view, lambda j, c: weight_gradient(models[j], *inputs(c)))
    return score, dict(info, checkpoints=chosen, trajectory_length=len(trajectory), grad_ipc=igd.grad_ipc, arch=ARCH)

