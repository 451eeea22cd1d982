"""
The run as the method sees it: the one seam between the stage loop (curriculum.py) and the run folder.

The stage loop decides what is sampled and asks the run in a sentence each (`run.stage_done(k)`, `run.increment(k)`,
`run.blocks(...)`, `run.pending(...)`, `run.store(...)`, `run.save_student(...)`, `run.finish_stage(k)`,
`run.write_set(...)`); everything that keeps a many-hour run safe happens here, out of its way:

  resume        a finished stage is skipped (after checking it is still whole); an interrupted batch is computed
                again exactly as the uninterrupted run cut it (a sample depends on its batch in the last float
                bits), only its missing files are written, and those already on disk must come out the same bytes;
  memory        on out-of-memory the sampler batch is halved and the batch retried (images are seeded one by one,
                so the set is unchanged up to float rounding);
  records       each guided image's record (ground/records.py) is written with it; a stage's log.json sums them up;
  pictures      a grid per stage and for the set, progress bars;
  ranks         under torchrun, class blocks are dealt round-robin to the ranks; rank 0 writes what is shared.

Paths come from ground/folder.py, writes go through ground/common.py (atomic, verified on resume, disk full named).
"""
import contextlib
import glob
import json
import os

import torch
from tqdm import tqdm

from ground.common import (
    TEMPORARY,
    Mismatch,
    UserError,
    all_gather,
    barrier,
    copy_file,
    file_sha256,
    free_memory,
    is_main,
    load_json,
    load_or_none,
    load_saved,
    out_of_memory,
    print0,
    quoted,
    remove_path,
    save_grid,
    save_json,
    save_png,
    save_torch,
)
from ground.folder import (
    check_set,
    damage_line,
    damaged,
    distilled_dir,
    done_path,
    grid_path,
    igd_path,
    image_path,
    increment_folder,
    latent_path,
    manifest,
    record_path,
    run_latents,
    set_manifest_path,
    stage_dir,
    stage_images,
    stage_latents,
    stage_log_path,
    stage_records,
    student_path,
    update_args,
)
from ground.images import load_image
from ground.records import image_record, log_line, summarise_records


def sampler_batches(num_classes, batch, kappa, rank=0, world=1):
    """The classes that share a sampler batch, for one slot: blocks of batch // kappa classes (kappa candidates each),
    dealt round-robin to the ranks. With at least as many blocks as ranks, the blocks do not depend on the number
    of ranks (the same batches: the same bytes as one process). With fewer (10 classes in blocks of 8 on 8 GPUs),
    the classes are cut into min(world, classes) nearly equal blocks instead, so every rank that can have work has
    some; those batches are smaller than one process's, so such a set equals the single-process set up to float
    rounding, and byte for byte any run with the same ranks and batch (the number of ranks is a setting a resume
    keeps). The sampler (Run.blocks) and the preflight's price (tools/preflight.py) both cut batches here."""
    per_block = max(1, batch // kappa)
    blocks = [list(range(c, min(c + per_block, num_classes))) for c in range(0, num_classes, per_block)]
    if len(blocks) < world:
        n = min(world, num_classes)
        edges = [round(j * num_classes / n) for j in range(n + 1)]
        blocks = [list(range(edges[j], edges[j + 1])) for j in range(n)]
    return blocks[rank::world]


def journals(folder):
    """The journals of an increment not finished yet in `folder`, one per rank."""
    return sorted(glob.glob(os.path.join(glob.escape(folder), "journal-*.jsonl")))


class Increment:
    """Where one increment's files go: images (PNG), final latents (the memory M_c; None: not kept) and the records
    of what guidance did (None: not kept), for the image indices of its slots; and its journal, the manifest of an
    increment not finished yet: a line per image this run completed (journal-<rank>.jsonl in `journal_dir`), with the
    sha256 of each of its files and of the student whose score guided it (`student`: its student.pt, or None)."""

    def __init__(self, spec, images_dir, latents_dir, records_dir, indices, name="sampling", journal_dir=None,
                 student=None, rank=0, sealed=None):
        self.spec, self.indices, self.name = spec, indices, name
        self.images_dir, self.latents_dir, self.records_dir = images_dir, latents_dir, records_dir
        self.journal_dir, self.student, self.rank = journal_dir or os.path.dirname(images_dir), student, rank
        self.sealed = sealed  # the manifest of the finished increment (a one-pass set's set.json), once there is one
        self._journal, self._maker = None, None

    def files(self):
        """(paths, labels) of its images, class by class, in index order."""
        pairs = [(image_path(self.images_dir, self.spec, c, i), c) for c in range(self.spec.num_classes)
                 for i in self.indices]
        return [p for p, _ in pairs], [c for _, c in pairs]

    def image_files(self, c, index):
        """The files of image (c, index), the PNG last: its latent, its record (where they are kept), its PNG."""
        return [p for p in (latent_path(self.latents_dir, self.spec, c, index) if self.latents_dir else None,
                            record_path(self.records_dir, self.spec, c, index) if self.records_dir else None,
                            image_path(self.images_dir, self.spec, c, index)) if p is not None]

    def maker(self):
        """The sha256 of the student whose score guides this increment (read once it is trained), or None."""
        if self._maker is None and self.student is not None:
            self._maker = file_sha256(self.student)
        return self._maker

    def journal(self):
        """{(c, index): entry} of every rank's journal (a line cut short by a kill is no entry); of the finished
        increment's manifest once there is one (a finished set rerun is checked, not sampled again)."""
        if self._journal is None and self.sealed is not None and os.path.exists(self.sealed):
            recorded = load_json(self.sealed, what="the set's record", remedy="delete it and rerun the same command")
            self._journal, class_of = {}, {name: c for c, name in enumerate(self.spec.class_names())}
            for name, digest in recorded.get("files", {}).items():  # <class>/<index>.png, relative to the images
                folder, file = os.path.split(name)
                key = (class_of[folder], int(file.split(".")[0]))
                self._journal[key] = dict(student=None, files={
                    os.path.relpath(os.path.join(self.images_dir, name), self.journal_dir): digest})
        if self._journal is None:
            self._journal = {}
            for path in journals(self.journal_dir):
                with open(path) as f:
                    for line in f:
                        try:
                            entry = json.loads(line)
                        except ValueError:
                            continue
                        self._journal[(entry["c"], entry["index"])] = entry
        return self._journal

    def complete(self, c, index):
        """Image (c, index) is done: its files on disk as the journal says this run wrote them, guided by the student
        that guides the increment now. A file the journal vouches for that holds other bytes now is damage, named
        with the way out; an image another student made (its student.pt trained again, to other bytes: another
        thread count, say) is deleted, to be made again rather than mixed in. Without an entry the image is made
        again, and files already on disk must come out the same bytes."""
        entry, paths = self.journal().get((c, index)), self.image_files(c, index)
        if entry is None or not all(os.path.exists(p) for p in paths):
            return False
        if entry.get("student") != self.maker():
            print0(f"{paths[-1]} was made by another student than {self.student}'s: made again")
            for p in paths:
                remove_path(p)
            return False
        bad = [name for name, digest in entry["files"].items()
               if file_sha256(os.path.join(self.journal_dir, name)) != digest]
        if bad:
            raise UserError(damage_line(self.name, self.journal_dir, bad, "delete them and rerun the same command: "
                                        "they are made again, byte for byte"))
        return True

    def latent(self, c, index):
        """A kept image's final latent (a finished stage's were checked by their sha256 before it is read). Unreadable
        in the stage being sampled, deleting it and its PNG makes the rerun sample that batch again (from the same
        seeded noise, in the same batch: the same bytes)."""
        path = latent_path(self.latents_dir, self.spec, c, index)
        png = image_path(self.images_dir, self.spec, c, index)
        return load_saved(path, f"delete it and {quoted(png)}, then rerun the same command to sample that image again")

    def write(self, c, index, latent, image, record, keep=False):
        """An image's files, the latent first and the PNG last (a PNG on disk means the image is complete). A file
        already on disk (a resumed batch) must be the same bytes: it is checked, not written. keep (a CUDA run, whose
        recomputation differs in the last bits and may tip a near tie between two candidates): a file on disk is
        kept unchecked, the missing ones written; what later slots read (M_c) is the disk's, so it stays consistent,
        and the finished stage's sha256 vouches for every file from then on."""
        files = [(save_torch, latent.detach().cpu().clone(), latent_path(self.latents_dir, self.spec, c, index))
                 if self.latents_dir is not None else None,
                 (save_json, record, record_path(self.records_dir, self.spec, c, index))
                 if self.records_dir is not None and record is not None else None,
                 (save_png, image, image_path(self.images_dir, self.spec, c, index))]
        for save, value, path in filter(None, files):
            if not (keep and os.path.exists(path)):
                save(value, path, verify=True)
        entry = dict(c=c, index=index, student=self.maker(), files={
            os.path.relpath(p, self.journal_dir): file_sha256(p) for p in self.image_files(c, index)})
        with open(os.path.join(self.journal_dir, f"journal-{self.rank}.jsonl"), "a") as f:  # after the PNG, whole
            f.write(json.dumps(entry) + "\n")
        self.journal()[(c, index)] = entry

    def record_files(self):
        """The records on disk, in image order (index, then class)."""
        if self.records_dir is None:
            return []
        paths = [record_path(self.records_dir, self.spec, c, i) for i in self.indices
                 for c in range(self.spec.num_classes)]
        return [p for p in paths if os.path.exists(p)]


class Run:
    """A run folder, claimed and checked (distill.py), for the plan it was started with (curriculum.Plan)."""

    def __init__(self, out_dir, spec, plan, batch, rank=0, world=1, tolerant=False):
        self.out_dir, self.spec, self.plan, self.rank, self.world = out_dir, spec, plan, rank, world
        self.tolerant = tolerant  # a nondeterministic device (CUDA): a resumed batch keeps the files on disk
        self.planned = self.batch = batch  # the sampler batch (candidates included); halved on out-of-memory
        self.stages_bar = self.bar = None
        self.kappa, self.failed = 1, False

    # ------------------------------------------------------------------------- increments

    def increment(self, k):
        """T_{k+1}: stage k's images, latents and (guided stages, k >= 1) records, indices k*stage_ipc ..
        (k+1)*stage_ipc - 1."""
        first = k * self.plan.stage_ipc
        return Increment(self.spec, stage_images(self.out_dir, k), stage_latents(self.out_dir, k),
                         stage_records(self.out_dir, k) if k else None, range(first, first + self.plan.stage_ipc),
                         f"stage {k}", stage_dir(self.out_dir, k), student_path(self.out_dir, k) if k else None,
                         self.rank)

    def one_pass(self, latents):
        """The set of a one-pass method (--method dit / igd / mgd3), written straight into distilled/ (IGD keeps its
        final latents too: its memory M_c reads them back)."""
        return Increment(self.spec, distilled_dir(self.out_dir), run_latents(self.out_dir) if latents else None, None,
                         range(self.plan.ipc), "the set", self.out_dir, rank=self.rank,
                         sealed=set_manifest_path(self.out_dir))

    # ------------------------------------------------------------------------- sampling

    def blocks(self, inc, kappa):
        """The blocks of classes that share a sampler batch (kappa candidates each), this rank's, with a progress bar
        over `inc`; when they are done every rank waits for the others. Each increment starts at the planned batch."""
        self.kappa, self.batch = kappa, self.planned
        blocks = sampler_batches(self.spec.num_classes, self.batch, kappa, self.rank, self.world)
        self.bar = tqdm(total=len(inc.indices) * sum(map(len, blocks)), unit="img", disable=not is_main(),
                        desc=inc.name + (f", {kappa} candidates an image" if kappa > 1 else ""), mininterval=2)
        yield from blocks
        self.bar.close()
        barrier()

    def pending(self, inc, block, index):
        """The sampler batches of `block` (classes) at slot `index` whose files are not all on disk yet: batch // kappa
        classes each, cut as the uninterrupted run cut them (a sample depends on its batch in the last float bits). A
        batch that ran out of memory (halved_on_out_of_memory) comes back, with the rest of the block, cut again at
        the halved batch (images are seeded one by one: the same set up to float rounding)."""
        todo = list(block)
        while todo:
            per_batch = max(1, self.batch // self.kappa)
            classes, todo = todo[:per_batch], todo[per_batch:]
            if all([inc.complete(c, index) for c in classes]):  # every class asked: an image of another student
                continue  # is deleted whatever its neighbours are
            self.failed = False
            yield classes
            if self.failed:  # freed here, outside the except: its traceback held the failed step's tensors
                free_memory()
                todo = classes + todo
        self.bar.update(len(block))
        self.bar.set_postfix(img_per_s=f"{self.bar.n / max(1e-9, self.bar.format_dict['elapsed']):.2f}")

    @contextlib.contextmanager
    def halved_on_out_of_memory(self, classes):
        """Around the sampling of one batch: out of memory, the batch is halved (for the rest of the increment) and
        pending gives `classes` back; out of memory at one class, or any other error, goes on."""
        try:
            yield
        except RuntimeError as e:  # torch.OutOfMemoryError, and CUDA / cuBLAS / cuDNN allocation failures
            if not out_of_memory(e) or len(classes) == 1:
                raise
            self.failed, self.batch = True, max(self.kappa, self.batch // 2)
            print(f"out of memory: sampler batch halved to {self.batch} (same images, seeded one by one)")

    def store(self, inc, index, classes, latents, images, candidates):
        """The files of the images of `classes` at slot `index` (candidates: what candidate selection saw, or None). A
        file already on disk must come out the same bytes."""
        try:
            for n, c in enumerate(classes):
                inc.write(c, index, latents[n], images[n],
                          image_record(n, candidates) if candidates is not None else None, keep=self.tolerant)
        except Mismatch as e:  # a file this run wrote earlier is not what it computes now
            raise UserError(f"{e}; rerun where it was written, or delete {increment_folder(inc.images_dir)} to "
                            f"sample it again") from None

    def copy_seed_set(self, inc, files, prior):
        """Stage 0 from a user's folder (ground.folder.seed_set_files: images of the generation size), and each
        image's latent for M_c the VAE encoding of what is stored (posterior mean; the only place lgd encodes)."""
        for c, mine in enumerate(files):
            for index, path in zip(inc.indices, mine):
                if not is_main() or os.path.exists(image_path(inc.images_dir, self.spec, c, index)):
                    continue
                x = load_image(path, self.spec.channels)
                stored = (x.clamp(0, 1) * 255).round() / 255  # what an 8-bit PNG reads back as
                latent = prior.encode((stored[None] * 2 - 1).to(prior.device))[0]
                inc.write(c, index, latent, x, None)
        barrier()

    # ------------------------------------------------------------------------- stages

    def stage_done(self, k):
        """Whether stage k finished in an earlier start (done.json, written last), its files checked against the sha256
        it recorded of each: a damaged file is named with the way out (delete it and done.json, rerun: the stage
        makes it again, byte for byte, and checks the files it keeps)."""
        if self.stages_bar is None:
            self.stages_bar = tqdm(total=self.plan.ipc // self.plan.stage_ipc, desc="LGD stages", unit="stage",
                                   disable=not is_main(), position=0)
        done = done_path(self.out_dir, k)
        if not os.path.exists(done):
            return False
        folder = stage_dir(self.out_dir, k)
        remedy = (f"delete them and {quoted(done)}, then rerun the same command: the stage makes them again, byte for "
                  f"byte")
        recorded = load_json(done, what=f"stage {k}'s record", remedy="delete it and rerun the same command")
        bad = damaged(folder, recorded.get("files", {}))
        if bad:
            raise UserError(damage_line(f"stage {k}", folder, bad, remedy))
        print0(f"stage {k}: done, skipping")
        self.stages_bar.update(1)
        return True

    def saved_student(self, k):
        """theta_k of an earlier start (its state dict), or None; a damaged one is said and trained again (it is a
        seeded function of the stage's images)."""
        path = student_path(self.out_dir, k)
        return load_or_none(path, f"stage {k}'s student") if os.path.exists(path) else None

    def save_student(self, k, model, info):
        """theta_k, with the list of the files it was trained on beside it (so "trained on exactly D_k" is
        checkable after the fact)."""
        if is_main():
            path = student_path(self.out_dir, k)
            # the files relative to the run folder: a copied or moved run still says what its students saw
            info = dict(info, train_files=[os.path.relpath(p, self.out_dir) for p in info["train_files"]])
            save_json(info, path[:-len(".pt")] + ".json")
            save_torch(model.state_dict(), path)
        barrier()

    def finish_stage(self, k):
        """A stage's picture, its log (summed from the records on disk) and last done.json, with the lines it prints."""
        self.batch = min(all_gather(self.batch))  # the batch every rank could run
        if is_main():
            inc = self.increment(k)
            remedy = "delete it and rerun the same command: its image is sampled again in the same batch and checked"
            summary = summarise_records([load_json(p, what="image record", remedy=remedy) for p in inc.record_files()],
                                        self.batch)
            self.grid(inc.images_dir, inc.indices, os.path.join(stage_dir(self.out_dir, k), "grid.png"),
                      f"stage {k}: images {inc.indices[0]}..{inc.indices[-1]} ({'guided' if k else 'seed'}); rows = "
                      f"classes", inc.indices if k else ())
            if k:
                expected = self.spec.num_classes * self.plan.stage_ipc
                if summary["images_logged"] != expected:  # fill leaves no guided image without its record
                    raise UserError(f"stage {k}: {summary['images_logged']} of {expected} images have a record in "
                                    f"{inc.records_dir}; delete {quoted(stage_dir(self.out_dir, k))} and the later "
                                    f"stages to sample them again")
                save_json(summary, stage_log_path(self.out_dir, k))
                print0(log_line(k, summary))
            folder = stage_dir(self.out_dir, k)
            made = [p for p in glob.glob(os.path.join(glob.escape(folder), "**", "*"), recursive=True)
                    if os.path.isfile(p) and not TEMPORARY.match(os.path.basename(p)) and p not in journals(folder)]
            save_json(dict(stage=k, indices=[inc.indices[0], inc.indices[-1] + 1], sampler_batch=self.batch,
                           files=manifest(folder, made)), done_path(self.out_dir, k))
            for path in journals(folder):  # done.json is the stage's manifest now
                remove_path(path)
        self.stages_bar.update(1)
        barrier()

    def write_set(self, paths, labels):
        """D_K -> distilled/<class>/<index>.png (atomic copies of the stages' images, which their sha256 vouched for),
        the evaluator's input, laid out exactly like a --method dit set. A copy that differs from its stage's image
        is copied again."""
        if self.stages_bar is not None:
            self.stages_bar.close()
        if is_main():
            again = 0
            for path, c in zip(paths, labels):
                target = os.path.join(distilled_dir(self.out_dir), self.spec.class_names()[c], os.path.basename(path))
                if not os.path.isfile(target) or file_sha256(target) != file_sha256(path):
                    again += os.path.exists(target)
                    copy_file(path, target)
            if again:
                print0(f"{again} images of {distilled_dir(self.out_dir)} differed from the stages' and were copied "
                       f"again")
        barrier()

    def save_igd_checkpoints(self, info):
        """igd.json: which snapshots of IGD's surrogate guided the sampling, and by which rule."""
        print0(f"IGD checkpoints {info['checkpoints']} of 0..{info['trajectory_length'] - 1} ({info['rule']})")
        if is_main():
            save_json(info, igd_path(self.out_dir))

    # ------------------------------------------------------------------------- the set

    def finish(self, method, guided=()):
        """The set is complete: the sha256 of each of its images into set.json (checked first where an earlier start
        recorded them), the sampler batch it used into args.json, its picture into grid.png."""
        if is_main():
            folder = distilled_dir(self.out_dir)
            planned = [image_path(folder, self.spec, c, i) for c in range(self.spec.num_classes)
                       for i in range(self.plan.ipc)]
            check_set(self.out_dir, "delete them and rerun the same command: they are made again, byte for byte")
            save_json(dict(files=manifest(folder, planned)), set_manifest_path(self.out_dir))
            for path in journals(self.out_dir):  # a one-pass set's: set.json is its manifest now
                remove_path(path)
        update_args(self.out_dir, sampler_batch_used=self.batch)
        self.grid(distilled_dir(self.out_dir), range(self.plan.ipc), grid_path(self.out_dir),
                  f"{method}: {self.plan.ipc} images per class (* = guided); rows = classes", guided)

    def grid(self, folder, indices, path, title, guided=()):
        """Grid PNG of a set folder: one row per class (at most 20), one column per image index (at most 20);
        columns of guided images are marked with '*'."""
        if not is_main():
            return
        classes = range(min(self.spec.num_classes, 20))
        indices = list(indices)[:20]
        images = torch.stack([load_image(image_path(folder, self.spec, c, i), self.spec.channels)
                              for c in classes for i in indices])
        save_grid(images, path, [self.spec.class_names()[c] for c in classes],
                  [f"{i}*" if i in set(guided) else str(i) for i in indices], title)
