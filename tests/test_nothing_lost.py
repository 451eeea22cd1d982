"""Nothing lost, by design: one mode per command and results only where they belong (evaluate.py); nothing written
before every input is loaded and checked (a refused start leaves its folder as it was, and the corrected command
then runs in it); finished files verified by their sha256 (ground/folder.py manifests), damage named with the way
out, and the way out restoring the same bytes."""
import errno
import json
import os
import shutil

import pytest
import torch

import distill
import evaluate
from conftest import LGD, cli, dit_argv, file_hashes, make_tiny_pixel_prior, one_error_line, tree
from ground.common import save_png

# ----------------------------------------------------------------------------- one mode per command


@pytest.mark.parametrize("second", [["--redundancy", "RUN"], ["--validity", "RUN"], ["--real-ipc", 2],
                                    ["--compare", "RUN"]])
def test_two_modes_in_one_evaluate_command_are_refused_before_anything_runs(dit_run, tmp_path, capsys, second):
    run = shutil.copytree(dit_run, tmp_path / "run")
    before = file_hashes(run)
    argv = ["--distilled", run] + [run if a == "RUN" else a for a in second]
    one_error_line(*cli(evaluate.main, argv, capsys), "one mode per command", "--distilled and " + second[0])
    assert file_hashes(run) == before


def test_a_result_never_lands_in_another_run(dit_run, tmp_path, capsys):
    a, b = shutil.copytree(dit_run, tmp_path / "a"), shutil.copytree(dit_run, tmp_path / "b")
    (b / "eval.json").write_text(json.dumps(dict(acc_mean=0.5)))
    before = file_hashes(b)
    one_error_line(*cli(evaluate.main, ["--distilled", a, "--out", b, "--runs", 1, "--epochs", 1], capsys),
                   "another run's folder", "drop --out")
    assert file_hashes(b) == before
    # a fresh --out folder takes the result, with what it describes written inside
    assert cli(evaluate.main, ["--distilled", a, "--out", tmp_path / "fresh", "--runs", 1, "--epochs", 1],
               capsys)[0] == 0
    assert json.loads((tmp_path / "fresh" / "eval.json").read_text())["subject"] == str(a)


def test_real_baselines_carry_their_seed_and_never_replace_another_draw(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for seed in (0, 1):
        assert cli(evaluate.main, ["--dataset", "digits", "--real-ipc", 2, "--seed", seed, "--runs", 1, "--epochs", 1],
                   capsys)[0] == 0
    results = {seed: json.loads((tmp_path / "out" / f"digits_real_ipc2_seed{seed}" / "eval.json").read_text())
               for seed in (0, 1)}
    assert [results[s]["draw_seed"] for s in (0, 1)] == [0, 1]
    # seed 1's result into seed 0's folder: refused, seed 0's result kept
    one_error_line(*cli(evaluate.main, ["--dataset", "digits", "--real-ipc", 2, "--seed", 1, "--runs", 1, "--epochs",
                                        1, "--out", tmp_path / "out" / "digits_real_ipc2_seed0"], capsys),
                   "not results of digits: 2 random real images per class, draw seed 1")
    assert json.loads((tmp_path / "out" / "digits_real_ipc2_seed0" / "eval.json").read_text()) == results[0]


def test_compare_shows_each_runs_dataset(tmp_path, capsys):
    for name, dataset in (("a", "digits"), ("b", "mnist")):
        os.makedirs(tmp_path / name)
        result = dict(dataset=dataset, method="dit", ipc=10, arch="convnet", acc_mean=0.9, acc_std=0.0, best_mean=0.9,
                      best_std=0.0, runs=3)
        (tmp_path / name / "eval.json").write_text(json.dumps(result))
    out = []
    assert cli(evaluate.main, ["--compare", tmp_path / "a", tmp_path / "b", "--markdown", tmp_path / "c.md"], capsys,
               out)[0] == 0
    lines = (tmp_path / "c.md").read_text().splitlines()[1:]  # under the stamp line
    assert lines[0].startswith("| dataset |") and lines[2].startswith("| digits |") and lines[3].startswith("| mnist |")


def test_an_unwritable_place_is_one_line_with_a_remedy_that_works(dit_run, tmp_path, capsys, monkeypatch):
    run = shutil.copytree(dit_run, tmp_path / "run")
    (tmp_path / "afile").write_text("")
    one_error_line(*cli(evaluate.main, ["--compare", run, "--markdown", tmp_path / "afile" / "x.md"], capsys),
                   "afile is a file, not a folder")
    def read_only(folder):  # a read-only mount (root writes through file modes, so it is simulated)
        raise OSError(errno.EROFS, "Read-only file system", os.path.join(folder, ".write-check.lgd-tmp-1"))
    monkeypatch.setattr(evaluate, "check_writable", read_only)
    one_error_line(*cli(evaluate.main, ["--distilled", run, "--runs", 1, "--epochs", 1], capsys),
                   f"cannot write in {run} (Read-only file system): give --out NEWDIR")
    monkeypatch.undo()
    assert cli(evaluate.main, ["--distilled", run, "--runs", 1, "--epochs", 1, "--out", tmp_path / "new"],
               capsys)[0] == 0


def test_every_next_line_a_run_prints_works_as_printed(pixel_prior, tmp_path, capsys, monkeypatch):
    """distill.py ends by naming what to run next; each such line runs as printed, for a guided run, a run evaluated
    with another architecture, and a one-increment set (where a redundancy cut has nothing to compare)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(evaluate, "epochs_for_ipc", lambda *a, **k: 1)  # the evaluation's 3 students: one epoch
    base = [*LGD[:-1], "--prior", pixel_prior]
    for extra in ([], ["--eval-arch", "mlp"], ["--method", "dit", "--ipc", 1]):
        out = []
        assert cli(distill.main, [*base, *extra, "--out-dir", tmp_path / f"run{len(extra)}"], capsys, out)[0] == 0
        nexts = [line.split("next: ", 1)[1].split("   (")[0] for line in out[0].splitlines() if "next: " in line]
        assert nexts or extra == ["--eval-arch", "mlp"]
        for line in nexts:
            script, *argv = line.split()[1:]
            main = {"evaluate.py": evaluate.main, "distill.py": distill.main}[script]
            assert cli(main, argv, capsys)[0] == 0, line


# ----------------------------------------------------------------------------- nothing written before all is loaded

def refusals(tmp_path, pixel_prior, latent_prior):
    """{case: (flags that are refused, a fragment of the refusal, the corrected flags)} on a digits LGD run."""
    small = make_tiny_pixel_prior(str(tmp_path / "small"))  # 8 px: a prior whose config is then damaged below
    os.remove(os.path.join(small, "transformer", "config.json"))
    broken = make_tiny_pixel_prior(str(tmp_path / "broken"))
    with open(os.path.join(broken, "scheduler", "scheduler_config.json"), "w") as f:
        f.write("{not json")
    big = tmp_path / "seed32"
    for c in range(10):
        save_png(torch.rand(1, 32, 32), str(big / str(c) / "00000.png"))
    ok = ["--prior", pixel_prior]
    return {
        "prior without a config": (["--prior", small], "could not load the DiT", ok),
        "broken scheduler json": (["--prior", broken], "could not load the scheduler", ok),
        "an RGB prior for grey digits": (["--prior", latent_prior], "3-channel images", ok),
        "data dir on digits": (["--prior", pixel_prior, "--data-dir", tmp_path], "--data-dir", ok),
        "a 32 px seed set into an 8 px run": (["--prior", pixel_prior, "--seed-set", big], "32x32", ok),
    }


CASES = ["prior without a config", "broken scheduler json", "an RGB prior for grey digits", "data dir on digits",
         "a 32 px seed set into an 8 px run"]


@pytest.mark.parametrize("case", CASES)
def test_a_refused_start_leaves_the_folder_as_it_was_and_the_corrected_command_runs_there(
        case, tmp_path, pixel_prior, latent_prior, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad, fragment, good = refusals(tmp_path, pixel_prior, latent_prior)[case]
    run = tmp_path / "run"
    code, lines = cli(distill.main, [*LGD, *bad, "--out-dir", run], capsys)
    one_error_line(code, lines, fragment)
    assert "rm -r" not in lines[-1]  # no cache advice: the cache is not the cause
    assert not run.exists()  # a new folder: not made
    assert cli(distill.main, [*LGD, *good, "--out-dir", run], capsys)[0] == 0
    if case == CASES[0]:  # and a finished run refuses it too, untouched (its settings may be what differs first)
        before = file_hashes(run)
        one_error_line(*cli(distill.main, [*LGD, *bad, "--out-dir", run], capsys))
        assert file_hashes(run) == before


def test_cache_advice_only_where_the_cache_is_the_cause(pixel_prior, tmp_path, capsys, monkeypatch):
    """The embedded prior is fine and a flag is wrong: the refusal names the flag, and does not tell the user to
    delete the cached prior."""
    import train_prior
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train_prior, "embedded_prior", lambda *a, **k: pixel_prior)  # the cached digits prior
    code, lines = cli(distill.main, [*LGD, "--vae", tmp_path / "nonexistent", "--out-dir", tmp_path / "r"], capsys)
    one_error_line(code, lines, "could not load the VAE", "nonexistent")
    assert "rm -r" not in lines[-1] and not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------- finished files verified by content

@pytest.fixture
def finished_lgd(pixel_prior, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [*LGD, "--prior", pixel_prior, "--out-dir", tmp_path / "run"]
    assert cli(distill.main, argv, capsys)[0] == 0
    return argv, tmp_path / "run", file_hashes(tmp_path / "run")


def unchanged(before, after):
    mine = ("args.json",)  # each start appends itself
    return {k: v for k, v in before.items() if k not in mine} == {k: v for k, v in after.items() if k not in mine}


@pytest.mark.parametrize("damage", ["nan latent", "zero latent", "latent as a dict", "png as text", "student"])
def test_a_damaged_finished_stage_is_named_and_deleting_it_restores_the_same_bytes(finished_lgd, capsys, damage):
    argv, run, before = finished_lgd
    target = {"nan latent": "stage_0/latents/3/00000.pt", "zero latent": "stage_0/latents/3/00000.pt",
              "latent as a dict": "stage_0/latents/3/00000.pt", "png as text": "stage_1/images/5/00001.png",
              "student": "stage_1/student.pt"}[damage]
    path = run / target
    if damage == "png as text":
        path.write_text("not an image")
    elif damage == "student":
        torch.save({"weight": torch.zeros(1)}, path)
    else:
        torch.save({"nan latent": torch.full((1, 8, 8), float("nan")), "zero latent": torch.zeros(1, 8, 8),
                    "latent as a dict": {"z": torch.zeros(1, 8, 8)}}[damage], path)
    stage = target.split("/")[0]
    one_error_line(*cli(distill.main, argv, capsys), f"{stage.replace('_', ' ')}:", target.split("/", 1)[1],
                   "delete them and", "done.json")
    os.remove(path)
    os.remove(run / stage / "done.json")
    assert cli(distill.main, argv, capsys)[0] == 0
    assert unchanged(before, file_hashes(run))


def test_a_recoloured_image_of_the_set_is_copied_again_from_the_stages(finished_lgd, capsys):
    argv, run, before = finished_lgd
    save_png(torch.rand(1, 8, 8), str(run / "distilled" / "2" / "00001.png"))
    one_error_line(*cli(evaluate.main, ["--distilled", run, "--runs", 1, "--epochs", 1], capsys), "2/00001.png",
                   "delete them and rerun")
    out = []
    assert cli(distill.main, argv, capsys, out)[0] == 0
    assert "differed from the stages' and were copied again" in out[0]
    assert unchanged(before, file_hashes(run))


def test_a_damaged_image_of_a_dit_set_is_named_and_deleting_it_restores_it(dit_run, pixel_prior, tmp_path, capsys,
                                                                            monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = shutil.copytree(dit_run, tmp_path / "run")
    before = file_hashes(run)
    save_png(torch.rand(1, 8, 8), str(run / "distilled" / "7" / "00002.png"))
    argv = dit_argv(pixel_prior, run)
    one_error_line(*cli(distill.main, argv, capsys), "7/00002.png", "delete them and rerun")
    one_error_line(*cli(evaluate.main, ["--redundancy", run, "--stage-ipc", 2], capsys), "7/00002.png")
    os.remove(run / "distilled" / "7" / "00002.png")
    assert cli(distill.main, argv, capsys)[0] == 0
    assert unchanged(before, file_hashes(run))


def test_args_json_with_a_setting_missing_is_damage_not_a_default(finished_lgd, capsys):
    argv, run, before = finished_lgd
    settings = json.loads((run / "args.json").read_text())
    del settings["seed"]
    (run / "args.json").write_text(json.dumps(settings))
    one_error_line(*cli(distill.main, argv, capsys), "args.json does not say the run's --seed: damaged")
    assert "seed" not in json.loads((run / "args.json").read_text())  # not rewritten under a default
    assert len(tree(run)) == len(before)


# ----------------------------------------------------------------------------- the side tools

def test_dry_run_refuses_what_the_run_refuses(finished_lgd, capsys):
    argv, run, before = finished_lgd
    one_error_line(*cli(distill.main, [*argv, "--guidance-scale", 3, "--dry-run"], capsys), "holds a run with "
                   "different --guidance-scale")
    out = []
    assert cli(distill.main, [*argv, "--dry-run"], capsys, out)[0] == 0 and "will be skipped" in out[0]


@pytest.mark.parametrize("flags", [["--set", "igd_checkpoints=5,0"], ["--set", "igd_checkpoints=0,0,5"]])
def test_igd_checkpoint_lists_are_strictly_increasing(tmp_path, capsys, flags):
    one_error_line(*cli(distill.main, ["--method", "igd", *flags, "--out-dir", tmp_path / "r"], capsys),
                   "must be strictly increasing")
    assert not (tmp_path / "r").exists()


def test_output_paths_are_checked_before_the_work_and_formats_follow_extensions(tmp_path, capsys):
    import bench
    import train_prior
    (tmp_path / "out").mkdir()
    for main, argv, said in [(train_prior.main, ["--out", tmp_path / "out"], "is a folder"),
                             (train_prior.main, ["--out", tmp_path / "grid.xyz"], "extension '.xyz'"),
                             (bench.main, ["--json", tmp_path / "out"], "--json"),
                             (bench.main, ["--precision", "bf16", "--device", "cpu"], "bf16 is CUDA autocast")]:
        one_error_line(*cli(main, argv, capsys), said)
    assert os.listdir(tmp_path / "out") == []  # nothing trained or written first
    from PIL import Image

    from ground.common import save_grid
    save_grid(torch.rand(2, 1, 8, 8), str(tmp_path / "grid.jpg"), ["a"], ["0", "1"])
    with Image.open(tmp_path / "grid.jpg") as im:
        assert im.format == "JPEG"  # .jpg is a JPEG, not PNG bytes


def test_jobs_are_capped_at_the_cores_with_one_line(monkeypatch, capsys):
    from tools import results
    seen = []

    class Pool:  # the pool the cells would run in: what it was asked for is all this test needs
        def __init__(self, jobs):
            seen.append(jobs)
            raise KeyboardInterrupt
    monkeypatch.setattr(results, "ThreadPoolExecutor", Pool)
    monkeypatch.setattr(results, "fill", lambda *a, **k: None)
    with pytest.raises(KeyboardInterrupt):
        results.main(["main", "--jobs", "1000000"])
    assert seen == [os.cpu_count()]
    assert f"--jobs 1000000 is more than the {os.cpu_count()} cores" in capsys.readouterr().out


# ----------------------------------------------------------------------------- a command writes only what it owns

def test_no_output_flag_writes_into_a_run_folder_or_over_another_commands_file(finished_lgd, tmp_path, capsys):
    """The one rule (ground.folder.check_output) behind every flag that names an output file: a new file, or one of
    the same kind lgd wrote there before; never a file inside a run folder, never a file of another command."""
    import bench
    import train_prior
    from tools import export
    argv, run, before = finished_lgd
    notes = tmp_path / "notes.md"
    notes.write_text("my notes\n")
    for main, flags, said in [
            (evaluate.main, ["--compare", run, "--markdown", run / "args.json"], "inside the run folder"),
            (evaluate.main, ["--compare", run, "--markdown", run / "eval.json"], "inside the run folder"),
            (evaluate.main, ["--compare", run, "--markdown", run / "stage_1" / "done.json"], "inside the run folder"),
            (evaluate.main, ["--compare", run, "--markdown", notes], "was not written by evaluate.py --compare"),
            (train_prior.main, ["--out", run / "grid.png"], "inside the run folder"),
            (bench.main, ["--json", run / "bench.json"], "inside the run folder"),
            (export.main, [run, "--layout", "rded", "--out", run / "export"], "inside the run folder")]:
        one_error_line(*cli(main, flags, capsys), said)
    assert file_hashes(run) == before and notes.read_text() == "my notes\n"
    # its own kind it may replace: a second --compare rewrites the table the first one wrote
    assert cli(evaluate.main, ["--distilled", run, "--runs", 1, "--epochs", 1], capsys)[0] == 0
    table = tmp_path / "table.md"
    for _ in range(2):
        assert cli(evaluate.main, ["--compare", run, "--markdown", table], capsys)[0] == 0
    assert table.read_text().startswith("<!-- written_by: evaluate.py --compare -->")


# ----------------------------------------------------------------------------- the manifest is the authority

def test_a_run_without_its_set_json_is_not_finished_and_its_printed_command_finishes_it(finished_lgd, capsys):
    """set.json deleted (and an image of the set replaced): no evaluation reads the set; the command the refusal
    prints runs as printed, copies the stages' images back (their done.json vouches for them) and seals the set."""
    import shlex
    argv, run, before = finished_lgd
    os.remove(run / "set.json")
    save_png(torch.rand(1, 8, 8), str(run / "distilled" / "4" / "00000.png"))
    code, lines = cli(evaluate.main, ["--distilled", run, "--runs", 1, "--epochs", 1], capsys)
    one_error_line(code, lines, "has no set.json", "finish it with: python distill.py")
    command = shlex.split(lines[-1].split("finish it with: ")[1])
    assert command[:2] == ["python", "distill.py"] and cli(distill.main, command[2:], capsys)[0] == 0
    assert unchanged(before, file_hashes(run))


def test_a_dit_set_without_its_set_json_is_checked_against_what_the_run_computes(dit_run, pixel_prior, tmp_path,
                                                                                  capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = shutil.copytree(dit_run, tmp_path / "run")
    before = file_hashes(run)
    os.remove(run / "set.json")
    save_png(torch.rand(1, 8, 8), str(run / "distilled" / "7" / "00002.png"))
    one_error_line(*cli(distill.main, dit_argv(pixel_prior, run), capsys), "7/00002.png is not what this run computes")
    os.remove(run / "distilled" / "7" / "00002.png")
    assert cli(distill.main, dit_argv(pixel_prior, run), capsys)[0] == 0
    assert unchanged(before, file_hashes(run))


def test_a_result_names_its_set_and_goes_stale_when_the_set_changes(dit_run, tmp_path, capsys):
    """eval.json records the sha256 of the set.json it describes: a set changed since (here a consistent swap of an
    image and its recorded sha256, which the manifest cannot see) makes it stale for --compare, which says how to
    make it again; made again, it is current."""
    from ground.common import file_sha256
    run = shutil.copytree(dit_run, tmp_path / "run")
    assert cli(evaluate.main, ["--distilled", run, "--runs", 1, "--epochs", 1], capsys)[0] == 0
    assert json.loads((run / "eval.json").read_text())["set_sha256"] == file_sha256(run / "set.json")
    save_png(torch.rand(1, 8, 8), str(run / "distilled" / "1" / "00000.png"))
    record = json.loads((run / "set.json").read_text())
    record["files"]["1/00000.png"] = file_sha256(run / "distilled" / "1" / "00000.png")
    (run / "set.json").write_text(json.dumps(record))
    one_error_line(*cli(evaluate.main, ["--compare", run, "--markdown", tmp_path / "c.md"], capsys),
                   "describes another set than", f"python evaluate.py --distilled {run}")
    assert cli(evaluate.main, ["--distilled", run, "--runs", 1, "--epochs", 1], capsys)[0] == 0
    assert cli(evaluate.main, ["--compare", run, "--markdown", tmp_path / "c.md"], capsys)[0] == 0


def test_images_of_another_student_are_made_again_not_mixed(pixel_prior, tmp_path, capsys, monkeypatch):
    """Stage 1 sampled, then killed before its done.json; its student.pt deleted (the remedy for a damaged student)
    and trained again to other bytes (another thread count would do that; here a nudged weight): the images its
    predecessor guided are deleted and made again by the new one, whose sha256 the stage's journal then names."""
    import train_student
    from ground.common import file_sha256
    from ground.run import Run
    monkeypatch.chdir(tmp_path)
    argv = [*LGD, "--prior", pixel_prior, "--out-dir", tmp_path / "run"]
    original = Run.finish_stage

    def killed(self, k):
        if k == 1:
            raise KeyboardInterrupt
        return original(self, k)
    monkeypatch.setattr(Run, "finish_stage", killed)
    assert cli(distill.main, argv, capsys)[0] == 130
    monkeypatch.setattr(Run, "finish_stage", original)
    first = (tmp_path / "run" / "stage_1" / "images" / "3" / "00001.png").read_bytes()
    os.remove(tmp_path / "run" / "stage_1" / "student.pt")
    trained = train_student.Trainer.train

    def another(self, *args, **kwargs):
        model = trained(self, *args, **kwargs)
        with torch.no_grad():
            next(model.parameters()).add_(0.5)
        return model
    monkeypatch.setattr(train_student.Trainer, "train", another)
    out = []
    assert cli(distill.main, argv, capsys, out)[0] == 0
    assert out[0].count("was made by another student") == 10  # every image of the stage's one slot
    assert (tmp_path / "run" / "stage_1" / "images" / "3" / "00001.png").read_bytes() != first
    assert json.loads((tmp_path / "run" / "stage_1" / "done.json").read_text())["files"]["student.pt"] == \
        file_sha256(tmp_path / "run" / "stage_1" / "student.pt")


# ----------------------------------------------------------------------------- the thread count is a setting

def test_the_thread_count_is_recorded_and_a_resume_keeps_it(finished_lgd, capsys):
    argv, run, before = finished_lgd
    settings = json.loads((run / "args.json").read_text())
    assert settings["threads"] == torch.get_num_threads()
    out = []
    assert cli(distill.main, [*argv, "--dry-run", "json"], capsys, out)[0] == 0
    assert json.loads(out[0])["threads"] == settings["threads"]
    other = settings["threads"] + 1
    one_error_line(*cli(distill.main, [*argv, "--threads", other], capsys), "different --threads",
                   f"--threads {settings['threads']!r} -> {other!r}")
    torch.set_num_threads(other)  # the machine's default changed: a resume takes the run's own
    try:
        assert cli(distill.main, argv, capsys)[0] == 0 and torch.get_num_threads() == settings["threads"]
    finally:
        torch.set_num_threads(settings["threads"])


# ----------------------------------------------------------------------------- printed commands work as printed

def test_every_printed_command_works_for_a_folder_with_a_space_and_a_quote(pixel_prior, tmp_path, capsys,
                                                                           monkeypatch):
    """A run in `with space/k1 'copy'`: its next: lines run as printed (through a shell's word splitting), and in a
    copy of the folder the finish command a refusal prints acts on the copy, not on the run it was copied from."""
    import shlex
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(evaluate, "epochs_for_ipc", lambda *a, **k: 1)
    run = tmp_path / "with space" / "k1 'copy'"
    out = []
    assert cli(distill.main, [*LGD[:-1], "--prior", pixel_prior, "--out-dir", run], capsys, out)[0] == 0
    nexts = [line.split("next: ", 1)[1].split("   (")[0] for line in out[0].splitlines() if "next: " in line]
    assert len(nexts) == 2
    for line in nexts:
        script, *args = shlex.split(line)[1:]
        assert cli({"evaluate.py": evaluate.main}[script], args, capsys)[0] == 0, line
    copy = shutil.copytree(run, tmp_path / "a 'second' copy")
    os.remove(copy / "set.json")
    before = file_hashes(run)
    code, lines = cli(evaluate.main, ["--distilled", copy, "--runs", 1], capsys)
    command = shlex.split(lines[-1].split("finish it with: ")[1])
    assert command[-2:] == ["--out-dir", str(copy)] and cli(distill.main, command[2:], capsys)[0] == 0
    assert (copy / "set.json").exists() and file_hashes(run) == before


def test_a_one_pass_set_cut_into_unequal_increments_is_refused_at_the_start(tmp_path, capsys):
    one_error_line(*cli(distill.main, ["--method", "dit", "--ipc", 4, "--stage-ipc", 3, "--out-dir", tmp_path / "r"],
                        capsys), "--ipc 4 is not a multiple of --stage-ipc 3")
    assert not (tmp_path / "r").exists()
