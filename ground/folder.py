"""
A folder a run owns: the run folder of distill.py. This file is the only one that knows its layout; the stage
loop reaches it through ground/run.py, evaluate.py and the other tools through the functions below.

  DIR/args.json                              the settings (+ git commit and command of every start); marks a run
  DIR/classes.json                           class index -> wnid, prior label, readable name (data.class_table)
  DIR/stage_<k>/images/<class>/<index>.png   T_{k+1}: indices k*stage_ipc .. (k+1)*stage_ipc - 1
  DIR/stage_<k>/latents/<class>/<index>.pt   the final latent of each kept image (the memory M_c)
  DIR/stage_<k>/records/<class>/<index>.json what candidate selection saw for that image (its candidates' scores)
  DIR/stage_<k>/student.pt, student.json     theta_k and the exact list of files it was trained on
  DIR/stage_<k>/grid.png, log.json           this increment (one row per class); the stage's records summed up
  DIR/stage_<k>/done.json                    written last: the stage is complete, with the sha256 of every file
  DIR/distilled/<class>/<index>.png          the set; DIR/grid.png its picture (DIR/latents/: --method igd's)
  DIR/set.json                               written last: the sha256 of every file of the set
  DIR/eval.json, redundancy.json/.png, ...   written by evaluate.py; DIR/preflight.json/.png by the preflight
  out/<dataset>_<method>_ipc<N>_seed<S>      the default DIR (out/<dataset>_real_ipc<N>_seed<S>: random real)

Four rules keep it safe:
  - a lock: a run holds `DIR/.lgd-lock` (ground/locks.py: an flock the kernel drops when the process dies, even
    on kill -9, so a killed run's lock is simply taken by the next one);
  - settings: a rerun into a folder must use the settings that shaped its files (args.json);
  - temporaries: every write goes to `.<name>.lgd-tmp-<pid>` and is renamed into place (ground.common.atomic_write);
    whoever holds a folder's lock removes the temporaries a killed run left there, and nothing else;
  - content: a finished stage and a finished set record the sha256 of every file they made; whoever reads them
    (a resume, evaluate.py, the export) checks the files against it and names the damaged ones with the command
    that makes them again (the run is deterministic: deleting them and rerunning restores the same bytes).
"""
import glob
import hashlib
import os
import shlex
import time
from collections import Counter

from PIL import Image, UnidentifiedImageError

from ground.common import (
    TEMPORARY,
    UserError,
    check_output_file,
    existing_folder,
    file_sha256,
    git_commit,
    is_main,
    load_json,
    print0,
    quoted,
    save_json,
    stamp_of,
)
from ground.images import list_image_folder, load_image, numeric_order
from ground.locks import LOCK, Lock, holder_line, live_holder, lock_owner, remove_stale_temporaries

ARGS = "args.json"      # the settings of the run; its presence marks an lgd run folder


# ----------------------------------------------------------------------------- layout (the table above)

def stage_dir(out_dir, k): return os.path.join(out_dir, f"stage_{k}")
def done_path(out_dir, k): return os.path.join(stage_dir(out_dir, k), "done.json")  # written last: stage k complete
def image_path(folder, spec, c, index): return os.path.join(folder, spec.class_names()[c], f"{index:05d}.png")
def latent_path(folder, spec, c, index): return os.path.join(folder, spec.class_names()[c], f"{index:05d}.pt")
def record_path(folder, spec, c, index): return os.path.join(folder, spec.class_names()[c], f"{index:05d}.json")
def stage_images(out_dir, k): return os.path.join(stage_dir(out_dir, k), "images")
def stage_latents(out_dir, k): return os.path.join(stage_dir(out_dir, k), "latents")
def stage_records(out_dir, k): return os.path.join(stage_dir(out_dir, k), "records")
def student_path(out_dir, k): return os.path.join(stage_dir(out_dir, k), "student.pt")  # its file list beside it
def stage_log_path(out_dir, k): return os.path.join(stage_dir(out_dir, k), "log.json")
def set_manifest_path(out_dir): return os.path.join(out_dir, "set.json")
def distilled_dir(out_dir): return os.path.join(out_dir, "distilled")
def run_latents(out_dir): return os.path.join(out_dir, "latents")  # a one-pass set's final latents (its M_c)
def args_path(out_dir): return os.path.join(out_dir, ARGS)
def classes_path(out_dir): return os.path.join(out_dir, "classes.json")
def redundancy_path(out_dir): return os.path.join(out_dir, "redundancy.json")
def heatmap_path(out_dir): return os.path.join(out_dir, "redundancy.png")
def grid_path(out_dir): return os.path.join(out_dir, "grid.png")
def igd_path(out_dir): return os.path.join(out_dir, "igd.json")
def preflight_path(out_dir, suffix="json"): return os.path.join(out_dir, f"preflight.{suffix}")
def default_run_dir(dataset, method, ipc, seed): return os.path.join("out", f"{dataset}_{method}_ipc{ipc}_seed{seed}")
def default_real_dir(dataset, ipc, seed): return os.path.join("out", f"{dataset}_real_ipc{ipc}_seed{seed}")


def eval_path(out_dir, arch=None):
    """eval.json for the run's own (guiding) architecture; eval_<arch>.json for another (cross-architecture); the
    same for validity (judged by theta* of that architecture)."""
    return os.path.join(out_dir, "eval.json" if arch is None else f"eval_{arch}.json")


def validity_path(out_dir, arch=None): return os.path.join(out_dir, "validity.json" if arch is None else
                                                           f"validity_{arch}.json")


def cross_eval_paths(out_dir):
    """{arch: path} of a run folder's cross-architecture evaluations."""
    return {os.path.basename(p)[len("eval_"):-len(".json")]: p for p in glob.glob(os.path.join(out_dir, "eval_*.json"))}


def increment_folder(images_dir):
    """What to delete so that an increment is sampled again: its stage folder with the later stages (they were
    built on it), or the set of a one-pass method (with its latents)."""
    parent, name = os.path.split(os.path.normpath(images_dir))
    if name == "images" and os.path.basename(parent).startswith("stage_"):
        return f"{quoted(parent)} and the later stages"
    latents = run_latents(parent)
    return f"{quoted(images_dir)} and {quoted(latents)}" if os.path.isdir(latents) else quoted(images_dir)


def is_run_folder(folder):
    return os.path.exists(args_path(folder))


def run_folder_of(path):
    """The run folder a path lies in (the nearest folder above it with an args.json), or None."""
    folder = os.path.dirname(os.path.abspath(path))
    while True:
        if is_run_folder(folder):
            return folder
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent


def check_output(path, flag, kind):
    """The one rule for a file a flag names (--markdown, --json, --out): lgd writes a new file, or a file of the kind
    it wrote there before (stamped `kind`), never a file inside a run folder (they are that run's) nor over a file
    another command made. Checked before the work that fills it, with its writability (check_output_file)."""
    run = run_folder_of(path)
    if run is not None:
        raise UserError(f"{flag} {path} is inside the run folder {run}, whose files are that run's: give a path "
                        f"outside it")
    if os.path.isfile(path) and stamp_of(path) != kind:
        raise UserError(f"{flag} {path} exists and was not written by {kind}: lgd writes over nothing it did not "
                        f"make; give a new file name")
    check_output_file(path, flag)


def distilled_folder(run_dir):
    """A run folder holds its set in distilled/ (refused while the run has not written it); a bare ImageFolder
    is the set itself."""
    inner = distilled_dir(run_dir)
    if os.path.isdir(inner) or not is_run_folder(run_dir):
        return inner if os.path.isdir(inner) else run_dir
    raise UserError(f"run folder {run_dir} has no distilled/ yet: the run has not finished ({finish_hint(run_dir)})")


def finish_hint(run_dir):
    """The command that finishes a run folder's set: the one args.json recorded, on this folder (a copied or moved run
    is finished where it is now, not where it was made), quoted to run as printed."""
    command = run_info(run_dir).get("command")
    if not command:
        return "rerun the distill.py command that made it to finish it"
    words, kept = shlex.split(command), []
    while words:  # every --out-dir the command gave, replaced by this folder
        word = words.pop(0)
        if word == "--out-dir":
            words.pop(0)
        elif not word.startswith("--out-dir="):
            kept.append(word)
    return f"finish it with: {shlex.join([*kept, '--out-dir', run_dir])}"


def image_header(path):
    """(width, height, channels) of an image file, read from its header (nothing decoded)."""
    try:
        with Image.open(path) as im:
            return im.width, im.height, 1 if im.mode in ("1", "L", "I", "F", "I;16") else 3
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise UserError(f"cannot read image {path}: {e.__class__.__name__}") from None


def _describe(header):
    w, h, c = header
    return f"{w}x{h} {'grey' if c == 1 else 'colour'}"


def set_files(run_dir, spec, quiet=False):
    """(paths, labels, image side) of the set a run folder (or a bare ImageFolder) holds, as evaluate and export read
    it.

    A run folder knows its set: `distilled/<class>/<index>.png` for index < --ipc (args.json). A missing image means
    the run has not finished: refused with the command that finishes it. A finished run's images are checked against
    the sha256 it recorded (set.json): a damaged one is refused with the command that makes it again; files that are
    not in the plan (an extra `00099.png`) are named in one notice and left out. A bare ImageFolder has no plan:
    every image is taken, except those of another size or colour mode than the set's, named in one notice and left
    out.
    quiet: the same answer without the notices (a caller that only needs the image side before the real read).
    """
    folder = distilled_folder(run_dir)
    info = run_info(run_dir)
    paths, labels = list_image_folder(folder, spec.class_names(), what="distilled set")
    if not quiet:
        note_extra_folders(folder, spec)
    headers = {p: image_header(p) for p in paths}
    if info.get("ipc"):
        planned = {image_path(folder, spec, c, i): c for c in range(spec.num_classes) for i in range(info["ipc"])}
        missing = [p for p in planned if p not in headers]
        if missing:
            raise UserError(f"{run_dir} holds {len(planned) - len(missing)} of the {len(planned)} images of its set "
                            f"(no {os.path.relpath(missing[0], folder)}, ...): the run has not finished; "
                            f"{finish_hint(run_dir)}")
        if not os.path.exists(set_manifest_path(run_dir)):  # the manifest decides: without it, not finished
            raise UserError(f"{run_dir} has no set.json: its set was never finished (or its record was deleted), so "
                            f"nothing vouches for its images; {finish_hint(run_dir)}")
        check_set(run_dir, f"delete them and rerun the run's command to make them again, byte for byte "
                           f"({finish_hint(run_dir)})")
        extra = sorted(p for p in headers if p not in planned)
        wanted = [(p, c) for p, c in planned.items()]
    else:
        extra, wanted = [], list(zip(paths, labels))
    side = Counter(headers[p][:2] for p, _ in wanted).most_common(1)[0][0]  # the set's own size
    odd = [p for p, _ in wanted if headers[p] != (*side, spec.channels)] if not info.get("ipc") else []
    left_out = extra + odd
    if left_out and not quiet:
        print0(f"note: {len(left_out)} files in {folder} are not the set's and are left out: " +
               ", ".join(f"{os.path.relpath(p, folder)} ({'not in the plan' if p in extra else _describe(headers[p])})"
                         for p in left_out[:5]) + (", ..." if len(left_out) > 5 else ""))
    kept = [(p, c) for p, c in wanted if p not in set(odd)]
    return [p for p, _ in kept], [c for _, c in kept], side[0]


def note_extra_folders(folder, spec):
    """A set folder with folders that are not the dataset's classes (`10/`, `cats/`): they are not read; say so."""
    extra = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)) and not d.startswith(".")
                   and d not in set(spec.class_names()))
    if extra:
        print0(f"note: {folder} holds folders that are not {spec.name} classes, not read: {', '.join(extra)}")


def run_info(run_dir):
    """args.json of a distill.py run folder, or {} for a bare ImageFolder."""
    return load_json(args_path(run_dir), what="run settings") if is_run_folder(run_dir) else {}


def stage_summary(out_dir):
    """[(k, done)] for the stage folders of a run, for --dry-run and the README."""
    stages = sorted(int(d.split("_")[1]) for d in os.listdir(out_dir) if d.startswith("stage_"))
    return [(k, os.path.exists(done_path(out_dir, k))) for k in stages]


def owned_folders(out_dir):
    """The folders a run writes into: the only places its stale temporaries may be removed from."""
    if not os.path.isdir(out_dir):
        return []
    inner = [os.path.join(out_dir, d) for d in os.listdir(out_dir)
             if d.startswith("stage_") or d in ("distilled", "latents")]
    return [out_dir] + [d for d in inner if os.path.isdir(d)]


# ----------------------------------------------------------------------------- the folder is the run's

def check_not_busy(folder):
    """Refuse to read or write a folder a live run is still writing (evaluate.py on a run in progress)."""
    owner = live_holder(folder)
    if owner is not None:
        raise UserError(f"{folder} is being written by a run ({holder_line(owner)}); wait for it to finish (its "
                        f"partial set would be read)")


def claim_run_folder(out_dir):
    """Make `out_dir` this run's, before any work: returns a function that releases it.

    Refuses a file, and a non-empty folder that is not an lgd run (no args.json): a run never writes into, or
    tidies, a folder of someone else's. Then takes the lock, so of two runs started at once into one folder
    exactly one proceeds. Creating the lock file is also the check that the folder is writable.
    """
    check_run_folder(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    lock = Lock(os.path.join(out_dir, LOCK))
    if not lock.acquire():
        raise UserError(f"{out_dir} is in use by another run ({holder_line(lock_owner(lock.path))}); wait for it "
                        f"or use another --out-dir")
    remove_stale_temporaries(owned_folders(out_dir))  # ours now: a killed run's half-written files go
    return lock.release


def check_run_folder(out_dir):
    """What claim_run_folder refuses, checked without writing anything (a refused start leaves the folder as it was)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out-dir {out_dir} is a file, not a folder")
    if os.path.isdir(out_dir):
        ours = {LOCK, "preflight.json", "preflight.png"}  # a failed preflight leaves these, and no args.json
        foreign = [n for n in os.listdir(out_dir) if n not in ours and not TEMPORARY.match(n)]
        if foreign and not is_run_folder(out_dir):
            raise UserError(f"--out-dir {out_dir} is not empty and holds no {ARGS}: not an lgd run folder "
                            f"(choose a new or empty folder)")
        owner = live_holder(out_dir)
        if owner is not None:
            raise UserError(f"{out_dir} is in use by another run ({holder_line(owner)}); wait for it or use another "
                            f"--out-dir")
    # writable: a file made and removed in the folder (or in the nearest folder above it that exists), before any
    # prior is built or loaded
    probe = existing_folder(out_dir)
    check = os.path.join(probe, f".write-check.lgd-tmp-{os.getpid()}")
    try:
        os.close(os.open(check, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644))
        os.remove(check)
    except OSError as e:
        raise UserError(f"--out-dir {out_dir}: cannot write in {probe} ({e.strerror}); choose a writable place") \
            from None


# ----------------------------------------------------------------------------- settings

def changed_settings(out_dir, args, must_match):
    """The run already in out_dir (its args.json) after checking that `args` keeps every setting of must_match; {} for a
    new folder."""
    path = args_path(out_dir)
    if not os.path.exists(path):
        return {}
    old = load_json(path, what="run settings")
    if not isinstance(old, dict):
        raise UserError(f"{path} is not an lgd args.json; move it away or use another --out-dir")
    changed = [k for k in must_match if k in old and old[k] != args.get(k)]
    if changed:  # said first: a run of other settings (another method's keys missing from it is no damage)
        details = ", ".join(f"{must_match[k]} {old[k]!r} -> {args.get(k)!r}" for k in changed[:4])
        raise UserError(f"{out_dir} holds a run with different {', '.join(must_match[k] for k in changed)} "
                        f"({details}); use another --out-dir or the same settings to resume")
    lost = [flag for key, flag in must_match.items() if key not in old]
    if lost:  # damage, not defaults: a setting read as its default would continue another run
        raise UserError(f"{path} does not say the run's {', '.join(lost[:4])}: damaged, or written by an older lgd "
                        f"(finish it with that commit); restore it from a copy, or start again with another --out-dir")
    return old


def record_args(out_dir, args, must_match):
    """Write `args` (a dict) to args.json, or check a resumed run's against it.

    must_match: {key: flag name} of the settings that change the images; a rerun with another value would
    mix two runs' stages. Each start is appended to `starts` (time, git commit), so a resumed folder says
    which code made it.
    """
    old = changed_settings(out_dir, args, must_match)
    starts = old.get("starts", []) if old else []
    if old:
        args = dict(old, **args)  # keeps what the run recorded while it ran (e.g. the sampler batch used)
    start = dict(time=time.strftime("%Y-%m-%d %H:%M:%S"), git_commit=git_commit())
    save_json(dict(args, git_commit=start["git_commit"], starts=starts + [start]), args_path(out_dir))


def update_args(out_dir, **values):
    """Add what a run learned while running (e.g. the sampler batch that fitted) to args.json."""
    if is_main():
        save_json(dict(load_json(args_path(out_dir), what="run settings"), **values), args_path(out_dir))


def check_classes(folder, table, resume=False):
    """A run folder numbers its classes once (classes.json); it must be the dataset's class table here
    (data.class_table), or every class would be scored against another class's logit. resume: a run folder
    written before classes.json existed numbered its classes by sorted wnid; resuming it is refused where the
    field's order differs (ImageWoof)."""
    path = classes_path(folder)
    key = lambda rows: [(r["index"], r["wnid"], r["prior_label"]) for r in rows]
    if os.path.exists(path):
        saved = key(load_json(path, what="class table"))
        if saved != key(table):
            c = next((i for i, (a, b) in enumerate(zip(saved, key(table))) if a != b), min(len(saved), len(table)))
            there = saved[c][1:] if c < len(saved) else "absent"
            here = key(table)[c][1:] if c < len(table) else "absent"
            raise UserError(f"{folder} numbers its classes differently from this dataset: class {c} is {there} "
                            f"there (wnid, prior label) and {here} here ({path}); use the data it was made with, or "
                            f"another folder")
    elif resume and is_run_folder(folder) and [r["wnid"] for r in table] != sorted(r["wnid"] for r in table):
        raise UserError(f"{folder} was made before lgd numbered this dataset in the field's class order (it has "
                        f"no classes.json: its stages number classes by sorted wnid); use another --out-dir")


def write_classes(folder, table):
    if is_main() and not os.path.exists(classes_path(folder)):
        save_json(table, classes_path(folder))


# ----------------------------------------------------------------------------- damage

def manifest(folder, paths):
    """{path relative to folder: sha256} of the given files: what a finished stage or set records of itself."""
    return {os.path.relpath(p, folder): file_sha256(p) for p in sorted(paths)}


def damaged(folder, recorded):
    """The files of a manifest ({relative path: sha256}) that are missing from folder or hold other bytes."""
    return [name for name, digest in recorded.items()
            if not os.path.isfile(os.path.join(folder, name)) or file_sha256(os.path.join(folder, name)) != digest]


def set_sha256(run_dir):
    """What a result describes, by content: the sha256 of a run's set.json (the sha256 of every image of its set), or
    of a bare set's files, name by name. A result whose set_sha256 is not the folder's any more is stale."""
    if os.path.exists(set_manifest_path(run_dir)):
        return file_sha256(set_manifest_path(run_dir))
    folder = distilled_folder(run_dir)
    names = sorted(os.path.relpath(os.path.join(r, f), folder) for r, _, fs in os.walk(folder) for f in fs)
    return hashlib.sha256(repr([(n, file_sha256(os.path.join(folder, n))) for n in names]).encode()).hexdigest()


def check_set(run_dir, remedy):
    """A finished set's images against the sha256 its set.json recorded (nothing to check before it is written); the
    damaged ones are refused in one line with `remedy`."""
    record = set_manifest_path(run_dir)
    if not os.path.exists(record):
        return
    folder = distilled_dir(run_dir)
    bad = damaged(folder, load_json(record, what="the set's record", remedy="delete it and rerun the run's command")
                  .get("files", {}))
    if bad:
        raise UserError(damage_line(f"the set of {run_dir}", folder, bad, remedy))


def damage_line(what, folder, bad, remedy):
    """One line naming the damaged files of `what` and the way out."""
    names = ", ".join(quoted(os.path.join(folder, name)) for name in bad[:3]) + (", ..." if len(bad) > 3 else "")
    return f"{what}: {len(bad)} files are missing or not what the run made ({names}); {remedy}"


def seed_set_files(seed_dir, spec, stage_ipc):
    """[choice] `--seed-set PATH`: the first stage_ipc images per class of a user's set, in numeric name order
    (IGD writes `0.png .. 99.png` unpadded; plain sorting would take 0, 1, 10, 11, ...). Images of another colour mode
    than the dataset's, or of another size than the set's own, are not its images: named in one notice and passed
    over. Every file taken is read once here, so a bad seed set is refused before a run folder is claimed. Returns
    [[path] per class]."""
    paths, labels = list_image_folder(seed_dir, spec.class_names(), what="seed set")
    headers = {p: image_header(p) for p in paths}
    side = Counter(h[:2] for h in headers.values()).most_common(1)[0][0]  # the set's own size
    odd = [p for p in paths if headers[p] != (*side, spec.channels)]
    if odd:
        print0(f"note: {len(odd)} images of seed set {seed_dir} are not {side[0]}x{side[1]} "
               f"{'grey' if spec.channels == 1 else 'colour'} like the rest and are passed over: "
               + ", ".join(os.path.relpath(p, seed_dir) for p in odd[:5]) + (", ..." if len(odd) > 5 else ""))
    chosen = []
    for c in range(spec.num_classes):
        mine = sorted((p for p, y in zip(paths, labels) if y == c and p not in set(odd)), key=numeric_order)
        if len(mine) < stage_ipc:
            raise UserError(f"seed set {seed_dir} has {len(mine)} usable images of class {spec.class_names()[c]}, "
                            f"needs --stage-ipc {stage_ipc}")
        for path in mine[:stage_ipc]:
            load_image(path, spec.channels)  # unreadable: one line naming the file
        chosen.append(mine[:stage_ipc])
    if side[0] != spec.image_size or side[1] != spec.image_size:
        raise UserError(f"seed set {seed_dir} holds {side[0]}x{side[1]} images; this run generates {spec.image_size}x"
                        f"{spec.image_size} (give a seed set made by this prior, or by one of the same resolution)")
    return chosen
