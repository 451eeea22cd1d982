"""
The reference model theta* of the learnability score (Chan-Santiago & Shah, CVPR 2026, Eq. "learnability": theta*
is a ConvNet-6 trained on the full real training set, as IGD's surrogate), and the other models trained once on the
real data: IGD's surrogate trajectory (igd.py picks its checkpoints) and RDED's soft-label teacher.

  theta*        the last snapshot of the surrogate trajectory at IGD's view (the generated image as it is, mean =
                std = 0.5); ImageNet-1K with resnet18_bn: torchvision's pretrained ResNet-18; or a user's file
                (--reference, e.g. IGD's released surrogate, with its key names mapped to ours)
  trajectory    IGD `train_ckpts.py`: SGD, no schedule, 50 epochs, parameters at init and after every epoch
  recognises    theta*'s verdict on images: the share it classifies as their class (validity, the prior's check)
  real_modes    MGD3's modes (mgd3.py: each class's training images through the prior's encoder, k-means)

Each is trained (the modes: computed) once per dataset, architecture (prior), view and data tree and cached under
out/cache (ground.locks:
one builder at a time; a second run waits and reuses it).
"""
import functools
import hashlib
import os
import pickle
import re
import urllib.error

import torch
import torchvision
from tqdm import tqdm

from data import classifier_input, load_real, resize_crop, with_view
from ground.common import UserError, is_main, load_saved, print0, save_torch, wait_for_rank0
from ground.locks import cache_entry
from mgd3 import class_modes, encode_class
from model import make_student
from train_student import RECIPES, recipe_view, train_student

# theta* and IGD's surrogate (IGD `train_ckpts.py`): SGD lr 0.01, momentum 0.9, wd 5e-4, batch 64, no
# schedule, no CutMix, Minimax augmentation at the generated size (256 px), mean = std = 0.5, 50 epochs,
# parameters saved at init and after every epoch (the trajectory IGD's checkpoints are chosen from).
SURROGATE = dict(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4, batch_size=64, schedule="constant",
                 cutmix=False, augment="minimax", pre_crop=True, temperature=None)
SURROGATE_EPOCHS = 50


def surrogate_recipe(spec):
    """The surrogate's recipe for a dataset: SURROGATE, with MinimaxDiffusion `argument.py`'s settings for ImageNet
    with more than 100 classes (lr 0.1, weight decay 1e-4, batch at least 128), which IGD's training inherits."""
    if spec.num_classes > 100:
        return dict(SURROGATE, lr=0.1, weight_decay=1e-4, batch_size=max(128, SURROGATE["batch_size"]))
    return SURROGATE
# NOTE(deviation): the embedded datasets' theta* converges sooner: 30 epochs on 8x8 digits (98% test accuracy),
# 20 on MNIST's 4,000 training images (99%)
EMBEDDED_SURROGATE_EPOCHS = {"digits": 30, "mnist": 20}


def reference_view(spec):
    """theta*'s view (IGD's surrogate): the generated image as it is (256 px), mean = std = 0.5."""
    return with_view(spec, res=spec.image_size, crop_ratio=1.0, mean=(0.5,) * spec.channels, std=(0.5,) * spec.channels)


@torch.no_grad()
def recognises(model, view, images, classes):
    """Per image, whether `model` (theta*) classifies it as its class: images (N, C, H, W) in [0, 1] -> (N,) bool."""
    predicted = model(classifier_input(images.to(next(model.parameters()).device) * 2 - 1, view)).argmax(dim=1)
    return predicted.cpu() == classes.cpu()


# ----------------------------------------------------------------------------- models trained on the real data

def subset_key(spec):
    """What keeps a `--classes` subset of ImageNet out of another subset's cache entries: its wnids, in order."""
    return (tuple(spec.wnids),) if spec.name == "imagenet" else ()


def _cache_path(kind, view, arch, data_dir, epochs, cache_dir):
    """One cache file per (dataset, arch, view, epochs, data tree): different trees never share an entry."""
    key = f"{view.name}_{arch}_res{view.res}_e{epochs}"
    details = repr((view.mean, view.std, view.crop_ratio, os.path.abspath(data_dir) if data_dir else None) +
                   subset_key(view))
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
        # one run trains it; another run started meanwhile waits for it and reuses it (ground.locks.cache_entry)
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
    wait_for_rank0(path, f"{arch} trained on the real {view.name} data")
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
    """torchvision's ImageNet-1K ResNet-18 (hub weights): RDED's teacher, and theta* on ImageNet-1K. Offline, the
    refusal names the file and where torchvision looks for it; a damaged copy there (a truncated download), that it
    is the cause."""
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    target = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    try:
        return torchvision.models.resnet18(weights=weights).to(device).eval()
    except (OSError, urllib.error.URLError) as e:  # no internet (URLError is an OSError)
        raise UserError(f"could not get torchvision's ResNet-18 weights ({e.__class__.__name__}): download "
                        f"{weights.url} on a machine with internet and copy it to {target}") from None
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:  # the cached file is there, and not whole
        raise UserError(f"torchvision's ResNet-18 weights {target} are damaged ({e.__class__.__name__}; a truncated "
                        f"download?): delete the file and rerun, or copy a good one from {weights.url}") from None


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


# ----------------------------------------------------------------------------- the modes of the real data (MGD3)

def modes_path(spec, prior_key, data_dir, k, flip, cache_dir="out/cache"):
    """One cache file per (dataset, prior, data tree, k, flip): another prior or tree never shares an entry."""
    details = repr((prior_key, os.path.abspath(data_dir) if data_dir else None, flip) + subset_key(spec))
    return os.path.join(cache_dir, f"modes_{spec.name}_k{k}_{hashlib.sha1(details.encode()).hexdigest()[:8]}.pt")


def mode_members(spec, data_dir, k, flag):
    """(the real train split, {class: indices of its images} in the split's order): what k modes per class are
    computed from, refused in one line when a class has fewer than k images (one mode per image it makes)."""
    real = load_real(spec, data_dir, "train")
    members = {c: [] for c in range(spec.num_classes)}
    for i, y in enumerate(real.labels):
        members[y].append(i)
    c = min(members, key=lambda c: len(members[c]))
    if len(members[c]) < k:
        raise UserError(f"MGD3 ties each image of a class to one of its {k} modes, and class {c} has only "
                        f"{len(members[c])} training images: lower {flag} to at most {len(members[c])}")
    return real, members


def real_modes(spec, prior, data_dir, n, flip, flag, cache_dir="out/cache", num_workers=0):
    """MGD3's modes {class: (n, C, h, w)} (mgd3.class_modes of mgd3.encode_class of each class's real training images
    at the size the prior generates: the shorter side resized, centre-cropped, ADM's crop at 256 px). flip: each image
    flipped or not by a coin seeded with its class (fixed, so the modes are too).

    Built by rank 0 alone (the others wait) class by class, so a class's latents are all that is held at once
    (ImageNet-1K's would be 21 GB); cached under out/cache, keyed by what identifies the prior's encoder
    (prior.encoder). flag: the flag that set n, named if a class is too small.
    """
    path = modes_path(spec, prior.encoder, data_dir, n, flip, cache_dir)
    what = f"MGD3's modes of the real {spec.name} train split"
    if is_main():
        with cache_entry(path, what) as missing:
            if missing:
                print0(f"encoding the real {spec.name} train split and clustering each class into {n} modes (cached "
                       f"in {path})")
                real, members = mode_members(spec, data_dir, n, flag)
                real.transform = functools.partial(resize_crop, size=prior.image_size)
                modes = {}
                for c in tqdm(range(spec.num_classes), desc="MGD3 modes", unit="class"):
                    loader = torch.utils.data.DataLoader(real.subset(members[c]), batch_size=64,
                                                         num_workers=num_workers)
                    coins = torch.rand(len(members[c]), generator=torch.Generator().manual_seed(c)) < 0.5
                    coins = coins if flip else torch.zeros_like(coins)
                    latents, seen = [], 0
                    for x, _ in loader:
                        latents.append(encode_class(prior, x, coins[seen:seen + len(x)]))
                        seen += len(x)
                    modes[c] = class_modes(torch.cat(latents), n)
                save_torch(modes, path)
    wait_for_rank0(path, what)
    return load_saved(path, "it is a cache: remove it and rerun to recompute it")
