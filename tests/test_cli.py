"""Every flag of every CLI (distill, evaluate, results, train_prior, bench) is checked before any work: one `error:` line,
exit code 1, nothing written, nothing trained."""
import json
import os

import pytest

import bench
import distill
import evaluate
import results
import train_prior
from conftest import cli, one_error_line


@pytest.mark.parametrize("main,argv,fragment", [
    (results.main, ["ablation", "--jobs", "0"], "--jobs must be at least 1, got 0"),
    (results.main, ["ablation", "--jobs", "-3"], "--jobs must be at least 1, got -3"),
    (results.main, ["nosuchtable"], "invalid choice: 'nosuchtable'"),
    (results.main, ["robustness"], "run `python results.py transfer` first"),
    (train_prior.main, ["--per-class", "0"], "--per-class must be at least 1, got 0"),
    (train_prior.main, ["--per-class", "-5"], "--per-class must be at least 1, got -5"),
    (train_prior.main, ["--cfg-scale", "nan"], "--cfg-scale must be a finite number >= 1, got nan"),
    (bench.main, ["--batch-size", "0"], "--batch-size must be at least 1"),
    (bench.main, ["--repeats", "0"], "--repeats must be at least 1, got 0"),
    (bench.main, ["--size", "huge"], "invalid choice: 'huge'"),
    (evaluate.main, ["--export", ".", "--layout", "minimax", "--out", "x"], "invalid choice: 'minimax'"),
    (distill.main, ["--method", "mtt"], "invalid choice: 'mtt'"),
    (distill.main, ["--ipc", "ten"], "invalid int value: 'ten'"),
    (distill.main, ["--igd-checkpoints", "²"], "--igd-checkpoints must be 'auto' or indices"),
    (distill.main, ["--method", "igd", "--igd-checkpoints", "0,99"], "the surrogate's trajectory has snapshots 0..30"),
    (distill.main, ["--device", "meta"], "unknown --device 'meta'"),
])
def test_every_cli_refuses_bad_flags_before_any_work(tmp_path, monkeypatch, capsys, main, argv, fragment):
    monkeypatch.chdir(tmp_path)
    one_error_line(*cli(main, argv, capsys), fragment)
    assert os.listdir(tmp_path) == []  # nothing written, nothing trained (no out/cache, no out/results)


def test_a_failed_download_names_its_url_size_and_layout_and_the_fix_runs_in_the_same_folder(
        tmp_path, monkeypatch, capsys, latent_prior, fake_woof):
    import data

    def offline(url, download_root, md5=None):
        raise OSError("no route to host")
    monkeypatch.setattr(data, "download_and_extract_archive", offline)
    monkeypatch.chdir(tmp_path)
    argv = ["--dataset", "imagewoof", "--method", "dit", "--no-preflight", "--ipc", 1, "--steps", 2, "--prior",
            latent_prior, "--res", 16, "--out-dir", tmp_path / "run"]
    one_error_line(*cli(distill.main, argv, capsys), "could not download imagewoof from "
                   "https://s3.amazonaws.com/fast-ai-imageclas/imagewoof2.tgz (about 1.3 GB",
                   "--data-dir DIR with DIR/train/<wnid>/*.JPEG and DIR/val/<wnid>/*.JPEG")
    assert not (tmp_path / "run").exists() and not os.listdir(tmp_path / "out" / "data")  # no args.json, no debris
    assert cli(distill.main, argv + ["--data-dir", fake_woof], capsys)[0] == 0  # the corrected command, same folder
    assert json.loads((tmp_path / "run" / "args.json").read_text())["data_dir"] == str(fake_woof)
