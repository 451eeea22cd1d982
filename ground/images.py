"""
Image files on disk, the way every folder lgd reads or writes holds them: one PNG (or JPEG) per image in
<root>/<class>/, names in generation order. A reader of a set (data.py's real splits, a run's stages, a user's seed
folder, an export) lists and opens images here, so an unreadable file is always reported by its path.
"""
import glob
import os
import re

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ground.common import UserError

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")


def load_image(path, channels=None):
    """A file -> (C, H, W) float tensor in [0, 1]; a corrupt file is reported by its path."""
    try:
        with Image.open(path) as im:
            mode = {1: "L", 3: "RGB"}.get(channels) or ("L" if im.mode in ("L", "1") else "RGB")
            im = im.convert(mode)
            x = torch.from_numpy(np.asarray(im).copy())
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise UserError(f"cannot read image {path}: {e.__class__.__name__}") from None
    x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
    return x.float() / 255.0


def class_files(folder):
    """The image files of one class folder, sorted by name (names are global indices: generation order)."""
    return sorted(f for f in glob.glob(os.path.join(folder, "*")) if f.lower().endswith(IMAGE_EXTENSIONS))


def numeric_order(path):
    """Sort key on a file's name that puts IGD's unpadded `2.png` before `10.png` (digit runs compare as numbers);
    zero-padded names (ours) keep their order."""
    parts = re.split(r"(\d+)", os.path.basename(path))
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in parts if part]


def list_image_folder(root, class_names, what="image folder"):
    """(paths, labels) of `root/<class>/*.{png,jpg,jpeg}` for the given classes, in a fixed order.

    Every class must have a folder with at least one image: a missing or empty class would silently
    train (or test) a 9-class problem and report it as 10.
    """
    paths, labels = [], []
    for c, name in enumerate(class_names):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            raise UserError(f"{what} {root} has no folder '{name}' (expected {root}/<class>/*.png|*.JPEG)")
        files = class_files(folder)
        if not files:
            raise UserError(f"{what} {root}: class '{name}' has no images in {folder}")
        paths += files
        labels += [c] * len(files)
    return paths, labels
