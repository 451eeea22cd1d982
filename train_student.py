"""
Train a student classifier on a (distilled or real) image set: the evaluation protocol of the field
(the paper's experimental setup follows it), also used for the per-stage student theta_k
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
storage size (data.storage_size): in memory up to 4 GiB, beyond that into a uint8 memmap on disk that
every epoch, test pass and run reading the same files shares (only a set too big for the disk streams
through one DataLoader kept for the whole training: persistent workers, pinned memory). Every batch
is augmented on the device by data.Augment with a seeded CPU generator, so a GPU is not starved by
per-image PIL work and a seed gives the same run on any device. The test split is decoded once per
evaluation at the test view and reused at every checkpoint.

Under torchrun the student is trained with DistributedDataParallel: every rank takes its slice of
each global batch of the same permutation.

Nothing here runs on its own: `python evaluate.py --real-ipc 10` trains students on 10 random real images
per class with it, `python evaluate.py --distilled DIR` on a distilled set. theta* and the other models
trained on the real data are in reference.py.
"""
import hashlib
import math
import os
import shutil
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from data import (
    EMBEDDED,
    Augment,
    cutmix,
    normalise,
    resize_crop,
    storage_size,
    with_view,
)
from ground.common import (
    UserError,
    broadcast_state,
    file_stamps,
    is_main,
    temporary_path,
)
from ground.locks import cache_entry

RECIPES = {
    "minimax": dict(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4, batch_size=64, schedule="multistep",
                    cutmix=True, augment="minimax", pre_crop=True, test_crop_ratio=1.0, temperature=None),
    "igd": dict(optimizer="adamw", lr=1e-3, weight_decay=0.01, batch_size=64, schedule="multistep", cutmix=True,
                augment="minimax", pre_crop=True, test_crop_ratio=1.0, temperature=None, res="generated"),
    "rded": dict(optimizer="adamw", lr=1e-3, weight_decay=0.01, batch_size="rded", schedule="half_cosine",
                 cutmix=True, augment="rded", pre_crop=False, test_crop_ratio=0.875, temperature=20.0, epochs=300,
                 decay_norms=False),
}
EMBEDDED_EPOCHS = {"digits": 300, "mnist": 100}  # students of the embedded datasets, whatever the IPC (epochs_for_ipc)


def recipe_view(spec, recipe):
    """The view a recipe's students are trained and tested in (resolution, test crop)."""
    r = RECIPES[recipe]
    res = spec.image_size if r.get("res") == "generated" and spec.name not in EMBEDDED else spec.res
    return with_view(spec, res=res, crop_ratio=1.0 if spec.name in EMBEDDED else r["test_crop_ratio"])


def epochs_for_ipc(ipc, recipe="minimax", dataset=None, num_classes=10):
    """Training length by images per class (Minimax `argument.py:ipc_epoch`, = IDC's): 3000 at IPC 1, 2000 up to 10,
    1500 up to 50, 1000 up to 200, 500 up to 500, else 300; for 100 classes two thirds of it, rounded down to a
    hundred (ImageNet-100: 1300 at IPC 10). rded trains a fixed 300 epochs."""
    if "epochs" in RECIPES[recipe]:
        return RECIPES[recipe]["epochs"]
    if dataset in EMBEDDED:
        # NOTE(deviation): the embedded datasets converge far sooner: 300 epochs on 8x8 digits (a student in under
        # 20 s on a CPU), 100 on 32 px MNIST (10 real images per class: 94.5% against 94.9% at 300 epochs, 2 seeds)
        return EMBEDDED_EPOCHS[dataset]
    epochs = 3000 if ipc <= 1 else 2000 if ipc <= 10 else 1500 if ipc <= 50 else 1000 if ipc <= 200 else \
        500 if ipc <= 500 else 300
    if num_classes == 100:
        epochs = int(2 / 3 * epochs) // 100 * 100
    return epochs


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


MAX_IN_MEMORY = 4 * 2**30    # bytes of uint8 images held in memory
MAX_DECODED = 512 * 2**30     # a bigger set of files is decoded once into a uint8 memmap on disk, up to this size
DECODED_DIR = "out/cache/decoded"  # (a still bigger one, or one the disk has no room for, streams every epoch)


def prepared(images, size, crop_ratio=1.0, num_workers=0):
    """The set as one uint8 tensor (N, C, size, size), decoded once: in memory, or for a large set of files a memmap
    on disk (decoded_on_disk); cached on the set. None: too big for either, the set streams from its files."""
    key = (size, crop_ratio)
    cache = images.__dict__.setdefault("_prepared", {})
    if key not in cache:
        shape = (len(images), images_channels(images) if len(images) else 1, size, size)
        nbytes = math.prod(shape)
        if nbytes <= MAX_IN_MEMORY:
            loader = DataLoader(_Storage(images, size, crop_ratio), batch_size=64, num_workers=num_workers)
            cache[key] = torch.cat([x for x, _ in loader]) if len(images) else torch.zeros(0, 1, size, size)
        elif nbytes <= MAX_DECODED and all(isinstance(item, str) for item in images.items):
            cache[key] = decoded_on_disk(images, shape, crop_ratio, num_workers)
        else:
            return None
    return cache[key]


def decoded_on_disk(images, shape, crop_ratio, num_workers):
    """A large set of image files decoded once into DECODED_DIR/<key>.u8 (uint8, (N, C, size, size)), shared by every
    epoch, test pass and run that reads the same files at the same size (the key: their paths, sizes and times).
    None when the disk has no room for it."""
    stamp = repr(file_stamps(images.items) + [shape, crop_ratio])
    path = os.path.join(DECODED_DIR, hashlib.sha1(stamp.encode()).hexdigest()[:16] + ".u8")
    with cache_entry(path, f"{shape[0]} images decoded at {shape[-1]} px") as missing:
        if missing:
            os.makedirs(DECODED_DIR, exist_ok=True)
            if shutil.disk_usage(DECODED_DIR).free < 1.1 * math.prod(shape):
                return None
            tmp = temporary_path(path)
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            loader = DataLoader(_Storage(images, shape[-1], crop_ratio), batch_size=64, num_workers=num_workers)
            start = 0
            for x, _ in tqdm(loader, desc="decoding the set once", unit="batch", leave=False, mininterval=2):
                out[start:start + len(x)] = x.numpy()
                start += len(x)
            out.flush()
            del out
            os.replace(tmp, path)
    return torch.from_numpy(np.load(path, mmap_mode="c"))  # copy-on-write: read-only on disk, no warning


def images_channels(images):
    return images.channels or images.load(0).shape[0]


class _Order(torch.utils.data.Sampler):
    """The batches of the current epoch, set before each epoch: one DataLoader (and its workers) serves them all."""

    def __init__(self):
        self.chunks = []

    def __iter__(self):
        return iter(self.chunks)

    def __len__(self):
        return len(self.chunks)


def _stream(images, size, crop_ratio, num_workers):
    """A large set's loader, made once per set and view and kept on the set: its workers persist across epochs and
    test passes, and batches land in pinned memory when a GPU takes them."""
    key = ("loader", size, crop_ratio, num_workers)
    cache = images.__dict__.setdefault("_prepared", {})
    if key not in cache:
        order = _Order()
        cache[key] = order, DataLoader(_Storage(images, size, crop_ratio), batch_sampler=order,
                                       num_workers=num_workers, persistent_workers=num_workers > 0,
                                       pin_memory=torch.cuda.is_available())
    return cache[key]


def batches(images, size, order, batch_size, num_workers, crop_ratio=1.0, rank=0, world=1):
    """(uint8 images, labels) batches in `order`, each this rank's slice of the global batch (every rank reads only
    its own images): from memory, or streamed from disk for a large set."""
    labels = torch.as_tensor(images.labels)
    cached = prepared(images, size, crop_ratio, num_workers)
    chunks = [order[i:i + batch_size][rank::world] for i in range(0, len(order), batch_size)]
    if cached is not None:
        for idx in chunks:
            yield cached[idx], labels[idx]
    else:
        sampler, loader = _stream(images, size, crop_ratio, num_workers)
        sampler.chunks = [c.tolist() for c in chunks]
        yield from loader


def recipe_settings(recipe):
    """A recipe's settings: by name (RECIPES) or a recipe dict itself (SURROGATE)."""
    return RECIPES[recipe] if isinstance(recipe, str) else recipe


def recipe_augment(view, r, generator):
    """The recipe's training augmentation in `view` (digits: the 1-pixel shift), drawing from `generator`."""
    return Augment(view, "shift" if view.name in EMBEDDED else r["augment"], generator)


def training_size(view, r):
    """Side of the images the recipe's augmentation starts from (its deterministic first resize, done once)."""
    return view.res if view.name in EMBEDDED else storage_size(view, r["pre_crop"])


# test passes per student for the best-seen column: 100 evenly spaced, as Minimax evaluates. NOTE(deviation): mnist's
# 1,000 test images at 32 px cost a ConvNet-3 a second a pass on a CPU, so 10 there (the final column is unaffected)
TEST_PASSES = {"mnist": 10}


def eval_points(dataset):
    """How many evenly spaced test passes a student of `dataset` makes (eval_epochs spaces them)."""
    return TEST_PASSES.get(dataset, 100)


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
        for x, y in batches(train_set, size, order, batch_size, num_workers, rank=rank, world=world):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
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


@dataclass
class Trainer:
    """Where students train: the device, DataLoader workers (for sets that stream from disk) and the torchrun ranks
    that share one student (DDP)."""
    device: object = "cpu"
    num_workers: int = 0
    rank: int = 0
    world: int = 1

    def train(self, model, train_set, view, recipe, epochs, seed, desc="student", teacher=None):
        """train_student on this hardware; the trained model placed (place). Under torchrun every rank then holds rank
        0's weights and batch-norm statistics (DDP averages gradients, not each rank's running statistics), so every
        rank guides with the student rank 0 saves."""
        model = train_student(model, train_set, view, recipe, epochs, seed, self.device, teacher, self.num_workers,
                              desc, self.rank, self.world)
        return self.place(broadcast_state(model))

    def place(self, model):
        """A classifier ready for the guided step: on the device, in eval mode."""
        return model.to(self.device).eval()


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
