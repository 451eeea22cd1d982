"""
Starting a distill.py run safely: every input checked before the run folder is claimed, the folder claimed (its
lock), the sampler batch settled, the preflight run or reused, the settings recorded, and the folder released
whatever happens. distill.py calls start_run and does the work inside it; nothing here is the method.
"""
import contextlib
import os
import shlex

import torch

from data import EMBEDDED, check_images, class_table, resolve_data_dir
from ground.common import UserError, all_gather, all_reduce_sum, barrier, is_main, print0, wait_for_rank0
from ground.folder import (
    changed_settings,
    check_classes,
    check_run_folder,
    claim_run_folder,
    preflight_path,
    record_args,
    seed_set_files,
    write_classes,
)
from mgd3 import uses_mgd3
from reference import mode_members, reference_model
from tools.checks import mode_count, result_args
from tools.env import print_environment
from tools.preflight import eta_line, load_passing, report, run_preflight


@contextlib.contextmanager
def start_run(args, spec, device, argv, world, batch_given, load_prior, configs):
    """`with start_run(...) as (prior, passed):` the run folder is this run's inside the block (rank 0 holds its lock).

    load_prior(args, spec, device) -> the run's prior; configs: (guidance, IGD guidance, sampler) for the preflight.
    Yields the prior (loaded before the claim: loading it is its check) and the passing preflight (None without
    one).
    """
    record = run_record(args, spec, world)
    must = result_args(record)  # every setting of this command (what a rerun into the folder must keep)
    # every input is loaded and checked before the folder is claimed, so a refused start leaves the folder as it was:
    # the folder and the settings of a run already in it (read only), the prior (an embedded one is built into the
    # shared cache first; loading it checks it against the dataset), the seed set, the reference model, the data
    # (downloaded now if it must be, every image opened).
    earlier = check_settings(args, record)
    # the CPU threads: the user's, else the run's own (another count trains other students on a CPU), else torch's
    if args.threads is None:
        args.threads = earlier.get("threads") or torch.get_num_threads()
    torch.set_num_threads(args.threads)
    # the sampler batch: the user's, else the run's own (a resume, or a preflight of a run that exists), else a
    # passing preflight's of these settings, else the preset's
    settings = {key: record[key] for key in must if key not in SETTLED}
    passed = load_passing(args.out_dir, settings)
    if not batch_given and earlier:
        args.batch_size = earlier.get("batch_size", args.batch_size)
    elif not batch_given and passed is not None:
        args.batch_size = passed["sampler_batch"]
    fixed = batch_given or bool(earlier)  # the preflight checks this batch instead of searching one
    record.update(batch_size=args.batch_size, threads=args.threads)
    changed_settings(args.out_dir, record, must)
    check_classes(args.out_dir, class_table(spec), resume=True)
    prior = load_prior(args, spec, device)
    if is_main():  # ImageNette / ImageWoof without --data-dir: fetched (once, shared) before the folder is claimed
        resolve_data_dir(spec, args.data_dir)
    target = resolve_data_dir(spec, args.data_dir, fetch=False)
    wait_for_rank0(target, "the dataset") if target is not None else barrier()
    check_inputs(args, spec, device)
    record["command"] = shlex.join(["python", "distill.py", *argv])  # what finishes this run (evaluate/export say it)
    release = claim(args.out_dir)
    try:
        wanted = args.preflight if args.preflight is not None else args.dataset not in EMBEDDED
        if wanted and passed is None:  # before args.json: a failed one leaves no settings to resume or refuse
            passed = preflight(args, spec, prior, device, configs, settings, fixed, world)
            if not fixed:
                args.batch_size = record["batch_size"] = passed["sampler_batch"]
        elif passed is not None:  # its checks stand for this run
            print0(f"preflight: passed earlier ({preflight_path(args.out_dir)}), reused: {eta_line(passed)}")
        if passed is not None and args.batch_size != passed["sampler_batch"]:
            print0(f"sampler batch {args.batch_size} ({'--batch-size' if batch_given else 'the run in ' + args.out_dir}"
                   f"), not the preflight's {passed['sampler_batch']}")
        if is_main():
            record_args(args.out_dir, record, must)
            write_classes(args.out_dir, class_table(spec))  # what class c is, for every reader of the folder
        barrier()  # important! no rank writes before rank 0 has tidied the folder and checked the settings
        yield prior, passed
    finally:
        release()


def run_record(args, spec, world):
    """The settings args.json records for this command (what a rerun into the folder must match)."""
    return dict(vars(args), data_dir=resolve_data_dir(spec, args.data_dir, fetch=False),
                out_dir=os.path.abspath(args.out_dir), world_size=world,
                student_world=world if args.method == "lgd" else 1)


SETTLED = ("batch_size", "threads")  # settled by start_run (the user's, else the run's own), then checked


def check_settings(args, record):
    """The folder is one a run may use, and a run already in it has these settings (the sampler batch and the threads
    aside: they are settled after): its args.json (read only), or {} for a new folder. --dry-run refuses what the run
    would."""
    check_run_folder(args.out_dir)
    return changed_settings(args.out_dir, record, {k: v for k, v in result_args(record).items() if k not in SETTLED})


def preflight(args, spec, prior, device, configs, settings, fixed, world):
    """The preflight (tools/preflight.py) on every rank, after the machine's lines (tools/env.py; not the hub's: the
    prior is loaded); the batch every rank fits, one report, one verdict for all."""
    if is_main():
        print_environment(args.out_dir, hub=False)
    result, images = run_preflight(args, spec, prior, device, resolve_data_dir(spec, args.data_dir), *configs,
                                   settings, fixed, world)
    result["sampler_batch"] = min(all_gather(result["sampler_batch"]))
    failures = [f for f in all_gather(result["failure"]) if f is not None]
    report(result, images, spec, args.out_dir)
    if failures:  # every rank stops with the same line
        raise UserError(f"preflight: {failures[0]}")
    return result


def check_inputs(args, spec, device, data=True):
    """The user's files, read before anything is written: every seed-set image the run will take (at the size the
    prior generates, once it is loaded), the reference, every image of the data tree, enough of them for MGD3's
    modes. data: False for --dry-run, which reads no data (a tree not there yet is the download its plan names)."""
    if args.method == "lgd" and args.seed_set not in ("dit", "igd", "mgd3"):
        seed_set_files(args.seed_set, spec, args.stage_ipc)
    if args.reference is not None:
        reference_model(spec, args.reference_arch, None, device, path=args.reference)
    data_dir = resolve_data_dir(spec, args.data_dir, fetch=False)
    if not data or not (spec.name in EMBEDDED or os.path.isdir(data_dir)):
        return
    if data_dir is not None:
        check_images(spec, data_dir)
    if uses_mgd3(args.method, args.seed_set):
        mode_members(spec, data_dir, *mode_count(args))  # a class with fewer images than modes; a tree downloaded
        # later is checked when the modes are computed


def claim(out_dir):
    """Rank 0 claims the run folder (ground.folder.claim_run_folder); every rank learns whether it may go on."""
    release, error = (lambda: None), None
    if is_main():
        try:
            release = claim_run_folder(out_dir)
        except (UserError, OSError) as e:
            error = e
    if all_reduce_sum(int(error is not None)):  # all ranks stop together instead of waiting at a barrier
        raise error if error is not None else UserError(f"rank 0 could not claim {out_dir}")
    return release
