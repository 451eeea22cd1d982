"""Exports (tools/export.py) that other evaluators (RDED, DD-Ranking) label right: class c holds exactly the images of
the field's class c, at the size each reads, and only the run's whole set."""
import json
import os

import pytest
import torch
import torchvision

from conftest import FIELD_WOOF, cli, file_hashes, one_error_line
from data import (
    get_spec,
    load_image,
    normalise,
    resize_crop,
    with_view,
)
from ground.common import save_png
from tools import export
from tools.export import class_folder


def woof_set(folder, per_class=2):
    """A bare <wnid>/*.png set (IGD's unpadded names) whose every image is different."""
    for c, wnid in enumerate(FIELD_WOOF):
        for i in range(per_class):
            g = torch.Generator().manual_seed(100 * c + i)
            save_png(torch.rand(3, 16, 16, generator=g), str(folder / wnid / f"{i}.png"))
    return folder


@pytest.mark.parametrize("layout", ["rded", "ddranking"])
def test_exports_give_class_c_exactly_the_images_of_class_c(tmp_path, capsys, layout):
    """Read back with torchvision's ImageFolder (what DD-Ranking uses) and with RDED's rule (folder
    str(c).zfill(5) is class c): label c holds exactly the images of the field's class c. The source is untouched."""
    source = woof_set(tmp_path / "set")
    before = file_hashes(source)
    out = tmp_path / layout
    assert cli(export.main, [source, "--dataset", "imagewoof", "--layout", layout, "--out", out],
               capsys)[0] == 0
    assert file_hashes(source) == before  # a copy: nothing moved, nothing written into the source
    if layout == "ddranking":  # the images at DD-Ranking's im_size (128), resized and cropped as its test split
        for path in before:
            save_png(resize_crop(load_image(str(source / path)), 128), str(tmp_path / "resized" / path))
        before = file_hashes(tmp_path / "resized")
        assert torchvision.datasets.ImageFolder(str(out))[0][0].size == (128, 128)
    hashes = file_hashes(out, ".png")
    folder = torchvision.datasets.ImageFolder(str(out))
    for c, wnid in enumerate(FIELD_WOOF):
        expected = sorted(h for p, h in before.items() if p.startswith(wnid + os.sep))
        labelled_c = sorted(hashes[os.path.relpath(p, out)] for p, y in folder.samples if y == c)
        assert labelled_c == expected and len(expected) == 2
        assert sorted(hashes[f"{str(c).zfill(5)}/{n}"] for n in os.listdir(out / str(c).zfill(5))) == expected
        assert class_folder(c) == str(c).zfill(5)
    if layout == "ddranking":  # its tensor API: what its test images look like, labels class-major
        images, labels = torch.load(out / "images.pt"), torch.load(out / "labels.pt")
        assert images.shape == (20, 3, 128, 128) and images.dtype == torch.float32
        assert labels.tolist() == [c for c in range(10) for _ in range(2)]
        view = with_view(get_spec("imagewoof"), res=128, crop_ratio=1.0)  # ImageNet mean / std
        x = load_image(str(source / FIELD_WOOF[3] / "1.png"))
        assert torch.allclose(images[7], normalise(resize_crop(x, 128)[None], view)[0], atol=1e-6)
    else:
        assert not (out / "images.pt").exists()
    info = json.loads((out / "export.json").read_text())
    assert info["layout"] == layout and [r["wnid"] for r in info["classes"]] == FIELD_WOOF
    # an export never writes over anything
    one_error_line(*cli(export.main, [source, "--dataset", "imagewoof", "--layout", layout, "--out", out],
                        capsys), "is not an empty folder")


def test_size_is_refused_with_rded_which_resizes_by_itself(dit_run, tmp_path, capsys):
    one_error_line(*cli(export.main, [dit_run, "--layout", "rded", "--size", 64, "--out", tmp_path / "x"],
                        capsys), "--size applies to --layout ddranking only")
    assert not (tmp_path / "x").exists()
