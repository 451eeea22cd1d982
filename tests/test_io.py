"""Every write of a run goes through one door (common.atomic_write): whole or not at all, a full disk named by the file,
a recomputed file checked against the one on disk."""
import errno
import os
import resource

import pytest
import torch

import common


@pytest.mark.parametrize("write", [
    lambda path: common.save_torch(torch.randn(100_000), path),                      # torch's zip writer
    lambda path: common.save_png(torch.rand(3, 400, 400), path),                       # PIL
    lambda path: common.save_json({"x": "y" * 400_000}, path),                         # text
    lambda path: common.save_grid(torch.rand(4, 3, 200, 200), path, ["a", "b"], ["0", "1"]),
])
@pytest.mark.parametrize("limit", [300 * 1024, 100])  # the issue's `ulimit -f 300`, and a limit below any header
def test_every_write_that_runs_out_of_room_says_disk_full_and_names_the_file(tmp_path, write, limit):
    path = str(tmp_path / "sub" / "file.bin")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        with pytest.raises(OSError) as info:
            write(path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert info.value.errno == errno.ENOSPC and info.value.filename == path
    assert common.os_error_line(info.value) == f"disk full: {path}"
    assert os.listdir(tmp_path / "sub") == []  # no temporary, no half file


def test_a_verified_write_keeps_equal_bytes_and_names_a_difference(tmp_path):
    path = str(tmp_path / "x.pt")
    common.save_torch(torch.arange(5.0), path)
    before = os.stat(path).st_mtime_ns
    common.save_torch(torch.arange(5.0), path, verify=True)  # the same bytes: nothing rewritten
    assert os.stat(path).st_mtime_ns == before
    with pytest.raises(common.Mismatch, match="x.pt is not what this run computes"):
        common.save_torch(torch.arange(5.0) + 1e-7, path, verify=True)
    assert torch.equal(torch.load(path), torch.arange(5.0)) and os.listdir(tmp_path) == ["x.pt"]
