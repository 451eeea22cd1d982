"""The stage loop (curriculum.py) as a run lives it: killed at any moment and rerun, it ends in the very files of a run
that was never killed."""
import json
import os
import shutil

import pytest
import torch

import distill
from conftest import cli, file_hashes, one_error_line, tree


def lgd_argv(prior, out, *extra):
    return ["--dataset", "digits", "--prior", prior, "--ipc", 4, "--stage-ipc", 2, "--steps", 6, "--guide-from", 0,
            "--guide-until", 5, "--student-epochs", 2, "--reference-epochs", 1, "--no-eval", "--out-dir", out, *extra]


@pytest.fixture(scope="module")
def uninterrupted(pixel_prior, tmp_path_factory):
    """An LGD run that was never killed (stages 0 and 1: T_1 unguided, T_2 guided): every rerun must end in its bytes."""
    root = tmp_path_factory.mktemp("uninterrupted")
    cwd = os.getcwd()
    os.chdir(root)  # theta*'s cache lands under this folder's out/cache
    try:
        code = distill.main([str(a) for a in lgd_argv(pixel_prior, root / "ref")])
    finally:
        os.chdir(cwd)
    assert code is None
    return root


def cut(run, spec):
    """Delete what a kill at a given moment would not have written yet (paths relative to the run folder)."""
    for path in spec:
        target = run / path
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            os.remove(target)


CLASS_FILES = ["images/{c}/{i:05d}.png", "latents/{c}/{i:05d}.pt", "records/{c}/{i:05d}.json"]
STAGE_1_UNFINISHED = ["stage_1/done.json", "stage_1/log.json", "stage_1/grid.png", "distilled", "grid.png"] + \
    [f"stage_1/{f.format(c=c, i=3)}" for c in range(10) for f in CLASS_FILES]


@pytest.mark.parametrize("killed", [
    # the issue's moment: slot 2 of stage 1 being written, class 9's latent saved, its record and PNG not
    ["stage_1/images/9/00002.png", "stage_1/records/9/00002.json"],
    # the first file of that chunk written (class 0's latent), nothing else
    [f"stage_1/{f.format(c=c, i=2)}" for c in range(10) for f in CLASS_FILES if not (c == 0 and "latents" in f)],
    # the README's remedy for a damaged latent of the stage being sampled: delete it and its PNG
    ["stage_1/latents/5/00002.pt", "stage_1/images/5/00002.png"],
])
def test_a_rerun_after_a_kill_at_any_moment_is_byte_identical(uninterrupted, pixel_prior, tmp_path, monkeypatch,
                                                              capsys, killed):
    monkeypatch.chdir(uninterrupted)  # the same theta* cache
    run = tmp_path / "run"
    shutil.copytree(uninterrupted / "ref", run)
    cut(run, killed + STAGE_1_UNFINISHED)
    assert cli(distill.main, lgd_argv(pixel_prior, run), capsys)[0] == 0
    expected = {k: v for k, v in file_hashes(uninterrupted / "ref").items() if k != "args.json"}
    assert {k: v for k, v in file_hashes(run).items() if k != "args.json"} == expected


def test_a_file_that_is_not_what_the_rerun_computes_is_named(uninterrupted, pixel_prior, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(uninterrupted)
    run = tmp_path / "run"
    shutil.copytree(uninterrupted / "ref", run)
    torch.save(torch.zeros(1, 8, 8), run / "stage_1" / "latents" / "3" / "00002.pt")  # edited by hand
    cut(run, ["stage_1/images/9/00002.png"] + STAGE_1_UNFINISHED)  # killed: slot 2 is recomputed and checked
    code, lines = cli(distill.main, lgd_argv(pixel_prior, run), capsys)
    one_error_line(code, lines, "stage_1/latents/3/00002.pt is not what this run computes",
                   f"delete {run / 'stage_1'} and the later stages")


def test_a_full_disk_is_one_line_naming_the_file_and_the_rerun_completes(uninterrupted, pixel_prior, tmp_path,
                                                                        monkeypatch, capsys):
    import resource
    monkeypatch.chdir(uninterrupted)
    run = tmp_path / "run"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (300 * 1024, hard))  # `ulimit -f 300`: the student (600 kB) won't fit
    try:
        code, lines = cli(distill.main, lgd_argv(pixel_prior, run), capsys)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    one_error_line(code, lines, f"error: disk full: {run / 'stage_1' / 'student.pt'}")
    assert not [f for f in tree(run) if "lgd-tmp" in f]  # the half-written temporary is gone
    assert cli(distill.main, lgd_argv(pixel_prior, run), capsys)[0] == 0  # with room again, the rerun completes
    mine = ("args.json", "stage_1/student.json")  # paths of this folder inside (the student's file list)
    expected = {k: v for k, v in file_hashes(uninterrupted / "ref").items() if k not in mine}
    assert {k: v for k, v in file_hashes(run).items() if k not in mine} == expected


def test_a_damaged_record_names_its_way_out_and_a_deleted_one_is_recomputed(uninterrupted, pixel_prior, tmp_path,
                                                                           monkeypatch, capsys):
    monkeypatch.chdir(uninterrupted)
    run = tmp_path / "run"
    shutil.copytree(uninterrupted / "ref", run)
    cut(run, STAGE_1_UNFINISHED[:3] + ["distilled", "grid.png"])  # killed before stage 1's done.json
    record = run / "stage_1" / "records" / "2" / "00002.json"
    record.write_text(record.read_text()[:40])  # truncated
    one_error_line(*cli(distill.main, lgd_argv(pixel_prior, run), capsys), f"image record {record} is not valid JSON",
                   "delete it and rerun the same command")
    os.remove(record)  # the remedy: its image is sampled again in the same batch, the record rewritten
    assert cli(distill.main, lgd_argv(pixel_prior, run), capsys)[0] == 0
    log = json.loads((run / "stage_1" / "log.json").read_text())
    assert log["images_logged"] == 20 and (run / "stage_1" / "log.json").read_bytes() == \
        (uninterrupted / "ref" / "stage_1" / "log.json").read_bytes()


def test_a_finished_stages_image_that_is_not_the_runs_is_refused(uninterrupted, pixel_prior, tmp_path, monkeypatch,
                                                                 capsys):
    from common import save_png
    monkeypatch.chdir(uninterrupted)
    run = tmp_path / "run"
    shutil.copytree(uninterrupted / "ref", run)
    cut(run, ["stage_1", "distilled", "grid.png"])
    save_png(torch.rand(3, 8, 8), str(run / "stage_0" / "images" / "6" / "00001.png"))  # recoloured
    one_error_line(*cli(distill.main, lgd_argv(pixel_prior, run), capsys),
                   "stage 0: ", "6/00001.png is 8x8 colour, not the run's 8x8 grey", "delete")


def test_a_seed_set_image_of_another_mode_or_size_is_passed_over(tmp_path, capsys):
    from common import save_png
    from curriculum import seed_set_files
    from data import get_spec
    for c in range(10):
        for i in range(3):
            save_png(torch.rand(1, 8, 8), str(tmp_path / "seed" / str(c) / f"{i}.png"))
    save_png(torch.rand(3, 8, 8), str(tmp_path / "seed" / "2" / "0.png"))  # recoloured
    save_png(torch.rand(1, 12, 12), str(tmp_path / "seed" / "5" / "1.png"))  # resized
    chosen = seed_set_files(str(tmp_path / "seed"), get_spec("digits"), 2)
    assert [os.path.basename(p) for p in chosen[2]] == ["1.png", "2.png"]
    assert [os.path.basename(p) for p in chosen[5]] == ["0.png", "2.png"]
    note = capsys.readouterr().out
    assert "2 images of seed set" in note and "2/0.png" in note and "5/1.png" in note


def test_with_random_views_a_rerun_recomputes_the_whole_stage_and_ends_in_the_same_bytes(uninterrupted, pixel_prior,
                                                                                         tmp_path, monkeypatch, capsys):
    """--guidance-views 2 draws its views from one stream per stage, batch after batch: a rerun cannot skip the
    batches already written (the stream would start elsewhere), so it recomputes them and checks their bytes."""
    monkeypatch.chdir(uninterrupted)
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert cli(distill.main, lgd_argv(pixel_prior, ref, "--guidance-views", 2, "--batch-size", 9), capsys)[0] == 0
    shutil.copytree(ref, run)
    cut(run, STAGE_1_UNFINISHED)  # slot 2 written (in 4 batches of 3 classes), slot 3 not
    assert cli(distill.main, lgd_argv(pixel_prior, run, "--guidance-views", 2, "--batch-size", 9), capsys)[0] == 0
    mine = ("args.json", "stage_1/student.json")
    assert {k: v for k, v in file_hashes(run).items() if k not in mine} == \
        {k: v for k, v in file_hashes(ref).items() if k not in mine}
