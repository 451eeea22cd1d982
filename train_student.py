"""
Train a student classifier on a (distilled or real) image set: the evaluation protocol of the field
(the paper's experimental setup follows it), also used for the per-stage student theta_{i-1}
of the stage loop (curriculum.py) and for the reference model theta* of the learnability score
(paper Eq. "learnability", theta* = IGD's surrogate).

Recipes (`--recipe`), each re-written from the public code that defines it:
  minimax  [default; MinimaxDiffusion `train.py` + `data.py:transform_imagenet(size=224)`, = IDC]
           SGD lr 0.01, momentum 0.9, wd 5e-4, batch 64, MultiStepLR x0.2 at epochs 2E/3 and 5E/6,
           CutMix on every batch (beta 1), hard labels. Images: Resize(224) + CenterCrop(224), then
           RandomResizedCrop(224, 0.5-1), flip, ColorJitter 0.4, Lighting 0.1. Test: Resize(224) +
           CenterCrop(224). Epochs by IPC: 3000 (1), 2000 (<= 10), 1500 (<= 50), 1000 (<= 200).
  igd      IGD's evaluation (DD_IGD `train.py`): the same with AdamW lr 1e-3, wd 0.01, at IGD's
           `--size` 256 (train and test Resize(256) + CenterCrop(256)).
  rded     [ImageNet-1K soft labels; RDED `validation/main.py`, used by IGD and LGD] AdamW lr 1e-3,
           wd 0.01 on conv/linear weights only, LR x 0.5 (1 + cos(pi e / 2E)) per epoch (ends at
           0.5x), 300 epochs, batch by IPC (10 / 50 / 100 for IPC 1 / <= 10 / more, x2 for >= 100
           classes), RandomResizedCrop(224, 0.5-1) + flip on the whole image, CutMix on every batch,
           KL to the teacher's softmax(logits / 20) on the same crops (no T^2 factor, as RDED).
           Test: Resize(256) + CenterCrop(224).

Data path (kept on the training device): a set is decoded once into uint8 images at the recipe's
storage size (data.storage_size), every batch is augmented on the device by data.Augment with a
seeded CPU generator, so a GPU is not starved by per-image PIL work and a seed gives the same run on
any device. Sets larger than a few GB stream through DataLoader workers instead (same batches).
The test split is decoded once per evaluation at the test view and reused at every checkpoint.

Under torchrun the student is trained with DistributedDataParallel: every rank takes its slice of
each global batch of the same permutation.

Run: `python train_student.py --dataset digits --real-ipc 10` trains one student on 10 random real
digits per class and prints its test accuracy.
"""
import hashlib
import math
import os
import re

import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader
from tqdm import tqdm

from data import (
    EMBEDDED,
    Augment,
    classifier_input,
    cutmix,
    get_spec,
    load_real,
    normalise,
    resize_crop,
    resolve_data_dir,
    sample_real_ipc,
    storage_size,
    with_view,
)
from guidance import Influence, select_checkpoints, weight_gradient
from lab.common import (
    ArgumentParser,
    UserError,
    barrier,
    get_device,
    is_main,
    load_saved,
    print0,
    require,
    run_cli,
    save_torch,
)
from lab.locks import cache_entry
from model import ARCHS, make_student

RECIPES = {
    "minimax": dict(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4, batch_size=64, schedule="multistep",
                    cutmix=True, augment="minimax", pre_crop=True, test_crop_ratio=1.0, temperature=None),
    "igd": dict(optimizer="adamw", lr=1e-3, weight_decay=0.01, batch_size=64, schedule="multistep", cutmix=True,
                augment="minimax", pre_crop=True, test_crop_ratio=1.0, temperature=None, res="generated"),
    "rded": dict(optimizer="adamw", lr=1e-3, weight_decay=0.01, batch_size="rded", schedule="half_cosine",
                 cutmix=True, augment="rded", pre_crop=False, test_crop_ratio=0.875, temperature=20.0, epochs=300,
                 decay_norms=False),
}
# theta* and IGD's surrogate (IGD `train_ckpts.py`): SGD lr 0.01, momentum 0.9, wd 5e-4, batch 64, no
# schedule, no CutMix, Minimax augmentation at the generated size (256 px), mean = std = 0.5, 50 epochs,
# parameters saved at init and after every epoch (the trajectory IGD's checkpoints are chosen from).
SURROGATE = dict(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4, batch_size=64, schedule="constant",
                 cutmix=False, augment="minimax", pre_crop=True, temperature=None)
SURROGATE_EPOCHS = 50
IGD_ARCH = "convnet"  # IGD's surrogate is ConvNet-6 whatever the evaluation network (DD_IGD `sample.py`, define_model)


def surrogate_recipe(spec):
    """The surrogate's recipe for a dataset: SURROGATE, with MinimaxDiffusion `argument.py`'s settings for ImageNet
    with more than 100 classes (lr 0.1, weight decay 1e-4, batch at least 128), which IGD's training inherits."""
    if spec.num_classes > 100:
        return dict(SURROGATE, lr=0.1, weight_decay=1e-4, batch_size=max(128, SURROGATE["batch_size"]))
    return SURROGATE
# NOTE(deviation): the embedded datasets' theta* converges sooner: 30 epochs on 8x8 digits (98% test accuracy),
# 20 on MNIST's 4,000 training images (99%)
EMBEDDED_SURROGATE_EPOCHS = {"digits": 30, "mnist": 20}
EMBEDDED_EPOCHS = {"digits": 300, "mnist": 100}  # students of the embedded datasets, whatever the IPC (epochs_for_ipc)


def recipe_view(spec, recipe):
    """The view a recipe's students are trained and tested in (resolution, test crop)."""
    r = RECIPES[recipe]
    res = spec.image_size if r.get("res") == "generated" and spec.name not in EMBEDDED else spec.res
    return with_view(spec, res=res, crop_ratio=1.0 if spec.name in EMBEDDED else r["test_crop_ratio"])


def reference_view(spec):
    """theta*'s view (IGD's surrogate): the generated image as it is (256 px), mean = std = 0.5."""
    return with_view(spec, res=spec.image_size, crop_ratio=1.0, mean=(0.5,) * spec.channels, std=(0.5,) * spec.channels)


def epochs_for_ipc(ipc, recipe="minimax", dataset=None):
    """Training length by images per class (Minimax `argument.py:ipc_epoch`); rded trains a fixed 300 epochs."""
    if "epochs" in RECIPES[recipe]:
        return RECIPES[recipe]["epochs"]
    if dataset in EMBEDDED:
        # NOTE(deviation): the embedded datasets converge far sooner: 300 epochs on 8x8 digits (a student in under
        # 20 s on a CPU), 100 on 32 px MNIST (10 real images per class: 94.5% against 94.9% at 300 epochs, 2 seeds)
        return EMBEDDED_EPOCHS[dataset]
    return 3000 if ipc <= 1 else 2000 if ipc <= 10 else 1500 if ipc <= 50 else 1000 if ipc <= 200 else \
        500 if ipc <= 500 else 300


def batch_size_for(r, ipc, num_classes, n_images):
    """The recipe's batch; RDED's grows with IPC (`argument.py`: 10 / 50 / 100, x2 for >= 100 classes)."""
    if r["batch_size"] != "rded":
        return min(r["batch_size"], n_images)
    base = 10 if ipc <= 1 else 50 if ipc <= 10 else 100
    return min(base * (2 if num_classes >= 100 else 1), n_images)


def make_optimizer(model, r, epochs):
    """Optimizer and a per-epoch LR schedule."""
    if r.get("decay_norms", True):
        groups = [dict(params=list(model.parameters()), weight_decay=r["weight_decay"])]
    else:  # RDED: weight decay on conv / linear weights only, not on norms or biases
        decay = [p for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for p in [m.weight]]
        ids = {id(p) for p in decay}
        groups = [dict(params=decay, weight_decay=r["weight_decay"]),
                  dict(params=[p for p in model.parameters() if id(p) not in ids], weight_decay=0.0)]
    if r["optimizer"] == "sgd":
        opt = torch.optim.SGD(groups, lr=r["lr"], momentum=r["momentum"])
    else:
        opt = torch.optim.AdamW(groups, lr=r["lr"], betas=(0.9, 0.999), eps=1e-8)
    if r["schedule"] == "multistep":  # x0.2 at epochs 2E/3 and 5E/6 (Minimax steps it once per epoch)
        factor = lambda e: 0.2 ** ((e >= epochs * 2 // 3) + (e >= epochs * 5 // 6))
    elif r["schedule"] == "half_cosine":  # RDED: 0.5 (1 + cos(pi e / E / 2)), 1.0 -> ~0.5
        factor = lambda e: 0.5 * (1 + math.cos(math.pi * e / epochs / 2))
    else:
        factor = lambda e: 1.0
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


class _Storage(torch.utils.data.Dataset):
    """Streams a large set as uint8 images at the storage size (decoding in DataLoader workers)."""

    def __init__(self, images, size, crop_ratio=1.0):
        self.images, self.size, self.crop_ratio = images, size, crop_ratio

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x = resize_crop(self.images.load(i), self.size, self.crop_ratio)
        return (x * 255).round().clamp(0, 255).to(torch.uint8), self.images.labels[i]


MAX_IN_MEMORY = 4 * 2**30  # bytes of uint8 images held in memory; a bigger set streams from disk


def prepared(images, size, crop_ratio=1.0, num_workers=0):
    """The set as one uint8 tensor (N, C, size, size), decoded once and cached on the set; None if too big."""
    key = (size, crop_ratio)
    cache = images.__dict__.setdefault("_prepared", {})
    if key not in cache:
        if len(images) * images_channels(images) * size * size > MAX_IN_MEMORY:
            return None
        loader = DataLoader(_Storage(images, size, crop_ratio), batch_size=64, num_workers=num_workers)
        cache[key] = torch.cat([x for x, _ in loader]) if len(images) else torch.zeros(0, 1, size, size)
    return cache[key]


def images_channels(images):
    return images.channels or images.load(0).shape[0]


def batches(images, size, order, batch_size, num_workers, crop_ratio=1.0):
    """(uint8 images, labels) batches in `order`: from memory, or streamed from disk for a large set."""
    labels = torch.as_tensor(images.labels)
    cached = prepared(images, size, crop_ratio, num_workers)
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if cached is not None:
        for idx in chunks:
            yield cached[idx], labels[idx]
    else:
        yield from DataLoader(_Storage(images, size, crop_ratio), batch_sampler=[c.tolist() for c in chunks],
                              num_workers=num_workers)


def recipe_settings(recipe):
    """A recipe's settings: by name (RECIPES) or a recipe dict itself (SURROGATE)."""
    return RECIPES[recipe] if isinstance(recipe, str) else recipe


def recipe_augment(view, r, generator):
    """The recipe's training augmentation in `view` (digits: the 1-pixel shift), drawing from `generator`."""
    return Augment(view, "shift" if view.name in EMBEDDED else r["augment"], generator)


def training_size(view, r):
    """Side of the images the recipe's augmentation starts from (its deterministic first resize, done once)."""
    return view.res if view.name in EMBEDDED else storage_size(view, r["pre_crop"])


def view_augment(view, recipe, generator):
    """x in [0, 1] (any size) -> random views as a classifier trained with `recipe` in `view` saw its images:
    the recipe's first resize, then its augmentation, unnormalised, at view.res (guidance.Learnability's views)."""
    r = recipe_settings(recipe)
    augment, size = recipe_augment(view, r, generator), training_size(view, r)
    return lambda x: augment.views(resize_crop(x, size))


def eval_epochs(epochs, eval_points):
    """The epochs (1 .. epochs) after which train_student calls on_eval: every epochs // eval_points epochs (at
    least every epoch), and always the last, whose accuracy is the final column."""
    every = max(1, epochs // eval_points)
    return [e for e in range(1, epochs + 1) if e % every == 0 or e == epochs]


def train_student(model, train_set, view, recipe="minimax", epochs=100, seed=0, device="cpu", teacher=None,
                  num_workers=0, desc="student", rank=0, world=1, on_eval=None, eval_points=100, on_epoch=None):
    """Train `model` on `train_set` (an ImageSet of [0,1] images) seen through `view`; return it in eval mode.

    recipe: a name in RECIPES or a recipe dict (SURROGATE). teacher (rded): a fixed model whose softened
    predictions on the same crops are the targets. on_eval(model): called every epochs / eval_points epochs
    and after the last (Minimax evaluates 100 times; the best of those is what peers report).
    on_epoch(epoch, model): called with epoch 0 (the initialisation) and after every epoch (trajectories).
    """
    r = recipe_settings(recipe)
    if r["temperature"] is not None and teacher is None:
        raise UserError(f"recipe {recipe} trains on soft labels and needs a teacher model")
    if teacher is not None:
        teacher = teacher.to(device).eval().requires_grad_(False)  # important! a fixed labeller
    device = torch.device(device)
    model = model.to(device).train()
    order_gen = torch.Generator().manual_seed(seed)  # the same permutation on every rank
    augment = recipe_augment(view, r, torch.Generator().manual_seed(seed * 1000 + rank))  # each rank its own crops
    size = training_size(view, r)
    ipc = max(1, len(train_set) // view.num_classes)
    batch_size = batch_size_for(r, ipc, view.num_classes, len(train_set))
    net = model
    if world > 1:  # DDP: every rank trains on its slice of each global batch; gradients are averaged
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    opt, schedule = make_optimizer(model, r, epochs)
    checkpoints = set(eval_epochs(epochs, eval_points))
    prepared(train_set, size, num_workers=num_workers)  # decode once, up front: a corrupt file fails here
    if on_epoch is not None:
        on_epoch(0, model)
    bar = tqdm(total=epochs, desc=desc, disable=not is_main(), leave=False, mininterval=2, unit="epoch")
    for epoch in range(epochs):
        order = torch.randperm(len(train_set), generator=order_gen)
        for x, y in batches(train_set, size, order, batch_size, num_workers):
            x, y = x[rank::world].to(device, non_blocking=True), y[rank::world].to(device, non_blocking=True)
            x = augment(x)  # uint8 -> augmented, normalised float on the device
            if r["cutmix"]:
                x, target = cutmix(x, y, view.num_classes, augment.g)
            else:
                target = F.one_hot(y, view.num_classes).float()
            logits = net(x)
            if teacher is not None:  # soft labels: KL to the teacher's tempered softmax on the same crops
                T = r["temperature"]
                with torch.no_grad():
                    target = F.softmax(teacher(x) / T, dim=1)
                loss = F.kl_div(F.log_softmax(logits / T, dim=1), target, reduction="batchmean")
            else:
                loss = torch.sum(-target * F.log_softmax(logits, dim=1), dim=1).mean()  # soft-target CE
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        schedule.step()  # per epoch, as the recipes' own code
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if on_epoch is not None:
            on_epoch(epoch + 1, model)
        if on_eval is not None and epoch + 1 in checkpoints:
            on_eval(model.eval())
            model.train()
    bar.close()
    return model.eval()


@torch.no_grad()
def accuracy(model, test_set, view, device="cpu", batch_size=256, num_workers=0):
    """Top-1 accuracy (a fraction in [0, 1]) with the test view (resize, centre crop, normalise).

    The test split is decoded once at the test view (uint8) and reused at every checkpoint.
    """
    model.eval()
    device = torch.device(device)
    correct = 0
    for x, y in batches(test_set, view.res, torch.arange(len(test_set)), batch_size, num_workers, view.crop_ratio):
        x = normalise(x.to(device).float() / 255, view)
        correct += int((model(x).argmax(dim=1).cpu() == y).sum())
    return correct / max(1, len(test_set))


# ----------------------------------------------------------------------------- models trained on the real data

def _cache_path(kind, view, arch, data_dir, epochs, cache_dir):
    """One cache file per (dataset, arch, view, epochs, data tree): different trees never share an entry."""
    key = f"{view.name}_{arch}_res{view.res}_e{epochs}"
    details = repr((view.mean, view.std, view.crop_ratio, os.path.abspath(data_dir) if data_dir else None))
    return os.path.join(cache_dir, f"{kind}_{key}_{hashlib.sha1(details.encode()).hexdigest()[:8]}.pt")


def _load_cached(path):
    """A cached model (ours, never a user's file): damaged, it says to remove it, and a rerun rebuilds it."""
    return load_saved(path, "it is a cache: remove it and rerun to retrain it")


def load_user_weights(model, path, fits, flag="--reference"):
    """A user's weights for `model` (theta* or a teacher), in the formats the field ships them in:
      - a state dict, or a checkpoint dict holding one under "state_dict" / "model" (DD_IGD `train.py`),
        with DataParallel's "module." prefixes stripped;
      - a replay buffer [trajectory][epoch][parameter tensors] (IGD's surrogate trajectories, MTT's experts):
        the last epoch of the first trajectory, in model.parameters() order.
    Class index c must be the field's class c (data.py: ImageWoof in Minimax / IGD / MTT order), as IGD's own
    surrogates are. Every failure is one line about `flag`, never a hint to delete the user's file."""
    try:
        obj = torch.load(path, map_location="cpu")
    except Exception as e:  # a text file, a truncated download: the user's file, not a cache
        raise UserError(f"{flag} {path} is not a PyTorch weights file ({e.__class__.__name__}); give a state dict "
                        f"or an IGD / MTT replay buffer for {fits}") from None
    where = f"{flag} {path}"
    if isinstance(obj, (list, tuple)):  # a replay buffer: descend to one epoch's parameter list
        while obj and isinstance(obj[0], (list, tuple)):
            obj = obj[0] if (obj[0] and isinstance(obj[0][0], (list, tuple))) else obj[-1]
        params = list(model.parameters())
        if any(b.numel() for b in model.buffers()):
            raise UserError(f"{where} holds parameters only; {fits} also needs its batch-norm statistics "
                            f"(give a state dict)")
        shapes = [tuple(t.shape) if torch.is_tensor(t) else None for t in obj]
        if shapes != [tuple(p.shape) for p in params]:
            raise UserError(f"{where} holds {len(shapes)} parameter tensors that do not fit {fits} "
                            f"({len(params)} tensors, the first {tuple(params[0].shape)})")
        with torch.no_grad():
            for p, t in zip(params, obj):
                p.copy_(t)
        return model
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        obj = {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}
        obj = _our_names(obj, model)
    try:
        model.load_state_dict(obj)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise UserError(f"{where} does not fit {fits}: {_layout_difference(obj, model) or str(e).splitlines()[0]}") \
            from None
    return model


# Other repositories' names for the same tensors (MinimaxDiffusion `train_models/convnet.py` keeps its layers in a
# ModuleDict of lists: layers.conv.<d>, layers.norm.<d>; ours (MTT's) are one Sequential of 4 modules per block).
KEY_RENAMES = [(re.compile(r"^layers\.conv\.(\d+)\."), lambda m: f"features.{4 * int(m.group(1))}."),
               (re.compile(r"^layers\.norm\.(\d+)\."), lambda m: f"features.{4 * int(m.group(1)) + 1}.")]


def _our_names(state, model):
    """A state dict in another repository's key layout -> ours: first the known renames (Minimax's ConvNet); if the
    names still differ but the tensors line up one for one in order with the same shapes (Minimax / IDC
    ResNetAP-10 and ResNet-18: layer0.conv1 ... fc, the same modules in the same order), by position."""
    ours = model.state_dict()
    if set(state) == set(ours):
        return state
    renamed = {}
    for key, value in state.items():
        for pattern, replace in KEY_RENAMES:
            key = pattern.sub(replace, key)
        renamed[key] = value
    if set(renamed) == set(ours):
        return renamed
    theirs = [(k, v) for k, v in state.items() if torch.is_tensor(v)]
    if len(theirs) == len(ours) and all(tuple(v.shape) == tuple(o.shape) for (_, v), o in zip(theirs, ours.values())):
        return {name: value for name, (_, value) in zip(ours, theirs)}
    return state  # load_state_dict names the difference


def _layout_difference(state, model):
    """One phrase: what the model expected against what the file holds (the first differing key and shape)."""
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    theirs = [(k, tuple(v.shape) if torch.is_tensor(v) else type(v).__name__) for k, v in state.items()]
    for (k1, s1), (k2, s2) in zip(ours, theirs):
        if (k1, s1) != (k2, s2):
            return (f"expected {len(ours)} tensors starting {ours[0][0]} {ours[0][1]}, found {len(theirs)}; the first "
                    f"difference: expected {k1} {s1}, found {k2} {s2}")
    if len(ours) != len(theirs):
        return f"expected {len(ours)} tensors, found {len(theirs)} (the first {min(len(ours), len(theirs))} agree)"
    return None


def surrogate_trajectory(view, arch, data_dir, device, epochs=None, cache_dir="out/cache", num_workers=0):
    """IGD's surrogate trained on the full real train split, with its parameters at init and after every
    epoch: a list of epochs + 1 state dicts (cached). view: the surrogate's view (reference_view).

    Trained by rank 0 alone (the others wait), so the cache does not depend on the number of ranks.
    """
    path, epochs = surrogate_path(view, arch, data_dir, epochs, cache_dir)
    if is_main():
        # one run trains it; another run started meanwhile waits for it and reuses it (lab.locks.cache_entry)
        with cache_entry(path, f"{arch} trained on the real {view.name} data") as missing:
            if missing:
                print0(f"training {arch} on the real {view.name} train split for {epochs} epochs (theta*, cached in "
                       f"{path})")
                trajectory = []
                model = make_student(arch, view, seed=0)  # important! an init independent of what ran before
                train_student(model, load_real(view, data_dir, "train"), view, surrogate_recipe(view), epochs, seed=0,
                              device=device, desc=f"theta* {arch}", num_workers=num_workers,
                              on_epoch=lambda e, m: trajectory.append({k: v.detach().cpu().clone()
                                                                       for k, v in m.state_dict().items()}))
                save_torch(trajectory, path)
    barrier()
    return _load_cached(path)


def surrogate_epochs(dataset, epochs=None):
    """The surrogate's training length: the given epochs, else IGD's 50 (digits 30). Its trajectory holds epochs + 1
    snapshots (the init, then one per epoch)."""
    return epochs or EMBEDDED_SURROGATE_EPOCHS.get(dataset, SURROGATE_EPOCHS)


def surrogate_path(view, arch, data_dir, epochs=None, cache_dir="out/cache"):
    """(cache file of the surrogate trajectory, its epochs)."""
    epochs = surrogate_epochs(view.name, epochs)
    return _cache_path("surrogate", view, arch, data_dir, epochs, cache_dir), epochs


def pretrained_reference(spec, arch):
    """[choice] theta* of ImageNet-1K with resnet18_bn: torchvision's pretrained ResNet-18 (trained on it already)."""
    return spec.name == "imagenet" and arch == "resnet18_bn" and spec.num_classes == 1000


def surrogate_cached(spec, arch, data_dir, epochs=None, cache_dir="out/cache"):
    """Whether theta* for this dataset / arch needs no training: cached already, or torchvision's pretrained one."""
    return pretrained_reference(spec, arch) or \
        os.path.exists(surrogate_path(reference_view(spec), arch, data_dir, epochs, cache_dir)[0])


def pretrained_resnet18(device):
    """torchvision's ImageNet-1K ResNet-18 (hub weights): RDED's teacher, and theta* on ImageNet-1K."""
    return torchvision.models.resnet18(weights="IMAGENET1K_V1").to(device).eval()


def reference_model(spec, arch, data_dir, device, epochs=None, cache_dir="out/cache", num_workers=0, path=None):
    """theta* and the view it sees: (model in eval mode, view spec).

    [paper] a ConvNet-6 trained on the full real set, as IGD's surrogate: the last snapshot of
    surrogate_trajectory at IGD's view (256 px, mean = std = 0.5). path: a user's state dict for `arch` at
    that view (e.g. IGD's released surrogate). [choice] ImageNet-1K with resnet18_bn: torchvision's
    pretrained ResNet-18 (trained on the full real set already), at its own view (224, ImageNet statistics).
    """
    view = reference_view(spec)
    if path is None and pretrained_reference(spec, arch):
        return pretrained_resnet18(device), recipe_view(spec, "rded")
    model = make_student(arch, view, seed=0)
    if path is not None:
        load_user_weights(model, path, f"--arch {arch} at {view.res} px")
    else:
        model.load_state_dict(surrogate_trajectory(view, arch, data_dir, device, epochs, cache_dir, num_workers)[-1])
    return model.to(device).eval(), view


def reference_models(spec, archs, data_dir, device, epochs=None, num_workers=0, path=None):
    """[(theta*, its view)] for each architecture of --reference-archs (one: the paper's theta*); path: the user's
    file for the first (a single theta*)."""
    return [reference_model(spec, arch, data_dir, device, epochs=epochs, num_workers=num_workers,
                            path=path if j == 0 else None) for j, arch in enumerate(archs.split(","))]


def soft_label_teacher(spec, recipe, data_dir, device, cache_dir="out/cache", num_workers=0):
    """The RDED teacher for soft-label recipes (None for hard-label ones), in the students' view `spec`:
    torchvision's pretrained ResNet-18 for ImageNet-1K [RDED/IGD/LGD protocol], else a ResNet-18 (BN)
    trained on the real train split with the surrogate protocol."""
    if RECIPES[recipe]["temperature"] is None:
        return None
    if spec.name == "imagenet" and spec.num_classes == 1000:
        return pretrained_resnet18(device)
    model = make_student("resnet18_bn", spec, seed=0)
    model.load_state_dict(surrogate_trajectory(spec, "resnet18_bn", data_dir, device, None, cache_dir,
                                               num_workers)[-1])
    return model.to(device).eval()


# ----------------------------------------------------------------------------- IGD's score for a dataset

def influence_score(spec, data_dir, device, grad_ipc=200, checkpoints="auto", threshold=0.7, epochs=None,
                    num_workers=0):
    """IGD's influence score (guidance.Influence) for a dataset -> (the score, what was chosen, for igd.json): the
    trajectory of IGD's surrogate (ConvNet-6 whatever the evaluation network; with --arch convnet the very training
    theta* is the last snapshot of, cached), the chosen checkpoints (IGD's adaptive rule, DD_IGD
    `test_ckpts_grad_sim.py`, or a given list) and real-gradient targets over the first grad_ipc real images per
    class."""
    arch, view = IGD_ARCH, reference_view(spec)
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
    else:  # the range was checked against the trajectory's length before the run started
        chosen = [int(j) for j in checkpoints.split(",")]
        info = dict(rule="given")
    print0(f"IGD checkpoints {chosen} of 0..{len(trajectory) - 1} ({info['rule']})")
    models = [model_at(j) for j in chosen]
    score = Influence(models, view, lambda j, c: weight_gradient(models[j], *inputs(c)))
    return score, dict(info, checkpoints=chosen, trajectory_length=len(trajectory), grad_ipc=grad_ipc, arch=arch)


def main():
    parser = ArgumentParser(prog="train_student.py", description="Train one student on K random real images per class.")
    parser.add_argument("--dataset", default="digits",
                        choices=["digits", "mnist", "imagenette", "imagewoof", "imagenet"],
                        help="benchmark")
    parser.add_argument("--data-dir", default=None,
                        help="ImageFolder root with train/ and val/ (not for the embedded digits and mnist)")
    parser.add_argument("--arch", default="convnet", choices=ARCHS, help="student architecture")
    parser.add_argument("--real-ipc", type=int, default=10, help="random real images per class")
    parser.add_argument("--recipe", default="minimax", choices=list(RECIPES), help="training recipe")
    parser.add_argument("--epochs", type=int, default=None, help="default: by IPC (Minimax protocol)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the image draw and the training")
    args = parser.parse_args()
    require(args.real_ipc > 0, f"--real-ipc must be positive, got {args.real_ipc}")
    require(args.epochs is None or args.epochs >= 1, f"--epochs must be at least 1, got {args.epochs}")
    spec, device = get_spec(args.dataset), get_device()
    data_dir = resolve_data_dir(spec, args.data_dir)
    view = recipe_view(spec, args.recipe)
    train = sample_real_ipc(load_real(spec, data_dir, "train"), args.real_ipc, args.seed)
    teacher = soft_label_teacher(view, args.recipe, data_dir, device)
    epochs = epochs_for_ipc(args.real_ipc, args.recipe, args.dataset) if args.epochs is None else args.epochs
    model = train_student(make_student(args.arch, view, seed=args.seed), train, view, args.recipe, epochs, args.seed,
                          device, teacher=teacher)
    print0(f"test accuracy: {accuracy(model, load_real(spec, data_dir, 'test'), view, device):.4f}")


if __name__ == "__main__":
    run_cli(main)
