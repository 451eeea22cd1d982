"""
Use the set elsewhere: copies of a distilled set laid out so that another evaluator labels every image right.

Class c is the field's class c (data.py: ImageWoof in the order of MinimaxDiffusion / DD_IGD
`misc/class_woof.txt`, MTT `utils.py` and DD-Ranking `utils/data.py`; sorted wnids for ImageNette and
ImageNet-1K). Each evaluator finds class c by its own rule, and the layout has to satisfy that rule:

  minimax, igd  `<wnid>/*.png`, i.e. `distilled/` as a run writes it: their train.py maps wnid folders through
                their class lists (`find_subclasses` over `misc/class_woof.txt`), so no export is needed
  rded          `00000/`, `00001/`, ...: RDED `validation/utils.py` opens folder `str(c).zfill(5)` as class c
                (its real val split must be laid out the same way, class c = the field's class c)
  ddranking     `00000/`, `00001/`, ...: DD-Ranking 0.2.0 reads a synthetic folder with torchvision's ImageFolder
                (`metrics/hard_label.py`), which numbers folders by sorted name (wnid folders would not sort in
                ImageWoof's order), and labels its test split by its own class list (= the field's order). It
                applies to that folder only the `custom_train_trans` its user passes (its test split gets
                ToTensor, Normalize, Resize(im_size), CenterCrop(im_size)), so the images are written at its
                im_size (`--size`), resized and centre-cropped as its test images are. Beside them, for its tensor
                API `compute_metrics(image_tensor=..., hard_labels=...)`, images.pt and labels.pt: DD-Ranking
                hands that tensor to the network as it is (a TensorDataset, no transform), so it holds what its
                test images look like: float32, ImageNet mean / std, Resize + CenterCrop to its im_size (default
                128 for ImageNette / ImageWoof, 224 for ImageNet-1K: `get_dataset`), class-major; labels int64.

An export is a copy: the source folder is never moved or written. `export.json` (at the top, where no
evaluator looks for classes) records the layout, the source and the class table.

Run: python -m tools.export out/imagewoof_lgd_ipc100_seed0 --layout ddranking --out out/woof_ddranking
"""
import os

import torch

from data import (
    DATASETS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    class_table,
    get_spec,
    normalise,
    resize_crop,
    resolve_data_dir,
    with_view,
)
from ground.common import (
    ArgumentParser,
    UserError,
    copy_file,
    git_commit,
    print0,
    require,
    run_cli,
    save_json,
    save_png,
    save_torch,
)
from ground.folder import check_classes, check_not_busy, distilled_folder, run_folder_of, run_info, set_files
from ground.images import load_image, numeric_order

LAYOUTS = ("rded", "ddranking")
DDRANKING_SIZE = {"imagenette": 128, "imagewoof": 128, "imagenet": 224}  # DD-Ranking's default im_size
MAX_TENSOR_BYTES = 4 * 2**30  # images.pt above this is not written (ImageNet-1K at IPC 50 would be ~30 GB)


def class_folder(c):
    """RDED's and DD-Ranking's folder of class c: five digits, so sorted order is class order up to 100000."""
    return f"{c:05d}"


def export_set(run_dir, spec, layout, out, size=None):
    """Copy the set of a run folder (or a bare `<class name>/*.png` folder) to `out` in `layout`; returns the number
    of images. ddranking: the class folders hold the images at `size` (default DD-Ranking's im_size), resized and
    centre-cropped as its own test split is (Resize + CenterCrop), beside images.pt / labels.pt."""
    if layout not in LAYOUTS:
        raise UserError(f"unknown --layout {layout} (choose from {', '.join(LAYOUTS)})")
    if layout == "ddranking" and spec.name not in DDRANKING_SIZE:
        raise UserError(f"DD-Ranking has no {spec.name} dataset (it knows ImageNette, ImageWoof, ImageNet-1K)")
    if layout == "rded" and size is not None:  # RDED's loader crops and resizes by itself: a copy keeps the images
        raise UserError("--size applies to --layout ddranking only (RDED resizes the images itself, so --layout rded "
                        "copies them as they are)")
    folder = distilled_folder(run_dir)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UserError(f"--out {out} exists and is not an empty folder (an export never writes over anything)")
    if run_folder_of(os.path.join(out, "x")) is not None:
        raise UserError(f"--out {out} is inside the run folder {run_folder_of(os.path.join(out, 'x'))}, whose files "
                        f"are that run's: export elsewhere")
    if os.path.abspath(out).startswith(os.path.abspath(folder) + os.sep):
        raise UserError(f"--out {out} is inside the set {folder}; export it elsewhere")
    paths, labels, _ = set_files(run_dir, spec)  # the run's whole set, and only it
    by_class = [sorted((p for p, y in zip(paths, labels) if y == c), key=numeric_order)
                for c in range(spec.num_classes)]
    size = size or DDRANKING_SIZE.get(spec.name)
    for c, files in enumerate(by_class):
        for path in files:  # under their own names: the set's index order survives
            target = os.path.join(out, class_folder(c), os.path.basename(path))
            if layout == "rded":
                copy_file(path, target)
            else:  # at the size DD-Ranking reads, so its ImageFolder needs no resize of its own
                save_png(resize_crop(load_image(path, spec.channels), size), target)
    info = dict(layout=layout, source=os.path.abspath(folder), images=len(paths), git_commit=git_commit(),
                class_folders="00000.. = class index (" + ("the order of the run's --classes list" if
                                                          spec.name == "imagenet" and spec.num_classes != 1000 else
                                                          "the field's order") + ")", classes=class_table(spec))
    if layout == "ddranking":
        info.update(folder_images=dict(im_size=size, transform=f"Resize({size}) + CenterCrop({size}), 8-bit PNG"))
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


def main(argv=None):
    p = ArgumentParser(prog="python -m tools.export", description="Copy a distilled set, laid out for RDED or "
                       "DD-Ranking (class c = the field's class c).")
    p.add_argument("source", help="a distill.py run folder or a bare <class>/*.png set")
    p.add_argument("--layout", required=True, choices=LAYOUTS, help="RDED (00000/ ... by class index) or DD-Ranking "
                   "(the same folders + images.pt / labels.pt for its tensor API)")
    p.add_argument("--out", required=True, help="a new folder: the set is copied, never moved")
    p.add_argument("--dataset", default=None, choices=DATASETS, help="default: the run's args.json")
    p.add_argument("--data-dir", default=None, help="ImageFolder root (ImageNet-1K's wnids come from it)")
    p.add_argument("--size", type=int, default=None, help="--layout ddranking: side of images.pt (default: "
                   "DD-Ranking's im_size, 128 ImageNette/ImageWoof, 224 ImageNet-1K)")
    args = p.parse_args(argv)
    require(args.size is None or args.size >= 8, f"--size must be at least 8, got {args.size}")
    if not os.path.isdir(args.source):
        raise UserError(f"{args.source} does not exist")
    check_not_busy(args.source)  # a run still writing its folder would be copied half-done
    info = run_info(args.source)
    if args.dataset and info.get("dataset") and args.dataset != info["dataset"]:
        raise UserError(f"{args.source} is a {info['dataset']} run (its args.json), not {args.dataset}: drop "
                        f"--dataset (a run folder knows its own)")
    spec = get_spec(args.dataset or info.get("dataset", "digits"), res=info.get("res"), classes=info.get("classes"))
    # an export reads the set only: a data tree is checked if given, never fetched
    resolve_data_dir(spec, args.data_dir or info.get("data_dir"), fetch=False)
    check_classes(args.source, class_table(spec))
    n = export_set(args.source, spec, args.layout, args.out, args.size)
    print0(f"exported {n} images of {args.source} for {args.layout}: {args.out} (class c in folder "
           f"{class_folder(0)[:-1]}c, the field's class order; see {args.out}/export.json)")


if __name__ == "__main__":
    run_cli(main)
