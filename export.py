"""
Use the set elsewhere: copies of a distilled set laid out so that another evaluator labels every image right.

Class c is the field's class c (data.py: ImageWoof in the order of MinimaxDiffusion / DD_IGD
`misc/class_woof.txt`, MTT `utils.py` and DD-Ranking `utils/data.py`; sorted wnids for ImageNette and
ImageNet-1K). Each evaluator finds class c by its own rule, and the layout has to satisfy that rule:

  minimax, igd  `<wnid>/*.png`, i.e. `distilled/` as a run writes it: their train.py maps wnid folders through
                their class lists (`find_subclasses` over `misc/class_woof.txt`), so no export is needed
  rded          `00000/`, `00001/`, ...: RDED `validation/utils.py` opens folder `str(c).zfill(5)` as class c
                (its real val split must be laid out the same way, class c = the field's class c)
  ddranking     `00000/`, `00001/`, ...: DD-Ranking reads a synthetic folder with torchvision's ImageFolder,
                which numbers folders by sorted name (wnid folders would not sort in ImageWoof's order), and
                labels its test split by its own class list (= the field's order). Beside them, for its tensor
                API `compute_metrics(image_tensor=..., hard_labels=...)`, images.pt and labels.pt: DD-Ranking
                hands that tensor to the network as it is (a TensorDataset, no transform), so it holds what its
                test images look like: float32, ImageNet mean / std, Resize + CenterCrop to its im_size (default
                128 for ImageNette / ImageWoof, 224 for ImageNet-1K: `get_dataset`), class-major; labels int64.

An export is a copy: the source folder is never moved or written. `export.json` (at the top, where no
evaluator looks for classes) records the layout, the source and the class table.

Run: python evaluate.py --export out/imagewoof_lgd_ipc100_seed0 --layout ddranking --out out/woof_ddranking
"""
import os

import torch

from common import UserError, copy_file, git_commit, print0, save_json, save_torch
from data import IMAGENET_MEAN, IMAGENET_STD, class_table, list_image_folder, load_image, normalise, numeric_order, \
    resize_crop, with_view

LAYOUTS = ("rded", "ddranking")
DDRANKING_SIZE = {"imagenette": 128, "imagewoof": 128, "imagenet": 224}  # DD-Ranking's default im_size
MAX_TENSOR_BYTES = 4 * 2**30  # images.pt above this is not written (ImageNet-1K at IPC 50 would be ~30 GB)


def class_folder(c):
    """RDED's and DD-Ranking's folder of class c: five digits, so sorted order is class order up to 100000."""
    return f"{c:05d}"


def export_set(folder, spec, layout, out, size=None):
    """Copy the set in `folder` (`<class name>/*.png`) to `out` in `layout`; returns the number of images."""
    if layout not in LAYOUTS:
        raise UserError(f"unknown --layout {layout} (choose from {', '.join(LAYOUTS)})")
    if layout == "ddranking" and spec.name not in DDRANKING_SIZE:
        raise UserError(f"DD-Ranking has no {spec.name} dataset (it knows ImageNette, ImageWoof, ImageNet-1K)")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UserError(f"--out {out} exists and is not an empty folder (an export never writes over anything)")
    if os.path.abspath(out).startswith(os.path.abspath(folder) + os.sep):
        raise UserError(f"--out {out} is inside the set {folder}; export it elsewhere")
    paths, labels = list_image_folder(folder, spec.class_names(), what="distilled set")
    by_class = [sorted((p for p, y in zip(paths, labels) if y == c), key=numeric_order)
                for c in range(spec.num_classes)]
    for c, files in enumerate(by_class):
        for path in files:  # copies under their own names: the set's index order survives
            copy_file(path, os.path.join(out, class_folder(c), os.path.basename(path)))
    info = dict(layout=layout, source=os.path.abspath(folder), images=len(paths), git_commit=git_commit(),
                class_folders="00000.. = class index (the field's order)", classes=class_table(spec))
    if layout == "ddranking":
        size = size or DDRANKING_SIZE[spec.name]
        nbytes = len(paths) * spec.channels * size * size * 4
        if nbytes > MAX_TENSOR_BYTES:  # the folders still serve DD-Ranking's image_path API
            print0(f"note: images.pt not written ({nbytes / 2**30:.0f} GB as float32); give DD-Ranking the folder")
        else:
            view = with_view(spec, res=size, crop_ratio=1.0, mean=IMAGENET_MEAN, std=IMAGENET_STD)
            images = torch.stack([normalise(resize_crop(load_image(p, spec.channels), size)[None], view)[0]
                                  for files in by_class for p in files])  # class-major, as DD-Ranking's default
            labels = torch.tensor([c for c, files in enumerate(by_class) for _ in files], dtype=torch.long)
            save_torch(images, os.path.join(out, "images.pt"))
            save_torch(labels, os.path.join(out, "labels.pt"))
            info.update(tensor=dict(file="images.pt", labels="labels.pt", shape=list(images.shape), dtype="float32",
                                    im_size=size, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD),
                                    transform=f"Resize({size}) + CenterCrop({size}), normalised"))
    save_json(info, os.path.join(out, "export.json"))
    return len(paths)


if __name__ == "__main__":
    print("export.py holds the export layouts; run it with `python evaluate.py --export DIR --layout rded|ddranking "
          "--out OUT`.")
