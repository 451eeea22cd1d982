"""
ground: what the method stands on. It imports nothing of the method or the protocol (only torch, PIL and tqdm), so
a reader of guidance.py and curriculum.py may ignore it. Nothing here runs at import.

  common.py     errors as one line, the CLI wrapper, device and torchrun, seeds, atomic writes (disk full named)
  images.py     image files on disk: one PNG per image in <root>/<class>/, read back by path
  locks.py      flock locks: one run per folder, one builder per shared-cache entry
  folder.py     the run folder: its layout (the only file that builds its paths), settings, the set a run holds
  run.py        the run as the stage loop sees it: which stages are done, where an increment's files go, resume
                byte for byte, out-of-memory retries, grids
  records.py    what candidate selection chose, image by image, and each stage's log
"""
