"""The profile reads the disk the way the store's reader threads do, so the rate it measures is the
rate a run's reads get (same threads, same split of a blob, same pread size, every byte hashed)."""

from __future__ import annotations

import os

import pytest

from klotski.planner import profile
from klotski.store import offload
from klotski.store.tiered import READERS, SPLIT_MIN

BLOB = 1 << 20


def test_a_large_blob_is_read_in_one_part_per_reader_thread():
    lanes = profile.store_ranges(4 * BLOB, BLOB, 2, split=True)
    assert lanes == [
        [(0, BLOB // 2), (BLOB, 3 * BLOB // 2), (2 * BLOB, 5 * BLOB // 2), (3 * BLOB, 7 * BLOB // 2)],
        [(BLOB // 2, BLOB), (3 * BLOB // 2, 2 * BLOB), (5 * BLOB // 2, 3 * BLOB), (7 * BLOB // 2, 4 * BLOB)],
    ]


def test_small_blobs_are_read_whole_by_alternate_threads():
    lanes = profile.store_ranges(3 * BLOB, BLOB, 2, split=False)
    assert lanes == [[(0, BLOB), (2 * BLOB, 3 * BLOB)], [(BLOB, 2 * BLOB)]]
    # one blob: both threads read it (a thread never idles on an empty list of ranges)
    assert profile.store_ranges(BLOB, BLOB, 2, split=False) == [[(0, BLOB)], [(0, BLOB)]]


def test_the_profile_reads_with_as_many_threads_as_the_store():
    from klotski.store.tiered import TieredStore

    assert TieredStore.__dataclass_fields__["readers"].default == READERS
    assert SPLIT_MIN % offload.ALIGN == 0


@pytest.fixture
def scratch(tmp_path):
    path = tmp_path / "scratch.bin"
    path.write_bytes(os.urandom(4 * BLOB))
    return str(path)


def test_a_timed_read_hashes_every_byte_it_reads_in_store_sized_pieces(scratch, monkeypatch):
    hashed, pieces = [], []
    real = profile.chunk_crcs

    def counting(view, n, chunk):
        hashed.append(n)
        pieces.append(len(view))
        return real(view, n, chunk)

    monkeypatch.setattr(profile, "chunk_crcs", counting)
    monkeypatch.setattr(profile, "READ_CHUNK", BLOB // 4)
    gbps, method = profile.timed_read(scratch, 4 * BLOB, BLOB, readers=2, split=True)
    assert gbps > 0 and method in ("O_DIRECT", "buffered after fadvise(DONTNEED)")
    assert sum(hashed) >= 4 * BLOB  # all of it, each piece checked as it landed
    assert max(pieces) <= BLOB // 4  # no pread bigger than the store's


def test_contention_reads_beside_the_op_until_each_thread_read_two_parts(scratch):
    calls = []
    result = profile.measure_contention(lambda: calls.append(1), 4 * BLOB, BLOB, 0.01, 2, path=scratch)
    assert result["compute_slowdown_under_io"] >= 1.0 and result["disk_gbps_beside_compute"] > 0
    assert len(calls) >= 7  # a warm-up and at least three calls in each phase


def test_reads_are_predicted_at_the_harmonic_mean_of_the_profiles_disk_readings(tiny_shape, io_bound):
    """Alone and beside compute are the same read pattern seconds apart on a drifting disk: a plan
    reads at their harmonic mean, not at whichever was measured last."""
    import dataclasses

    import torch

    from klotski.models.spec import EXPERT, WeightKey
    from klotski.planner.cost import OpCosts
    from klotski.store.tiers import DISK

    both = dataclasses.replace(io_bound, disk_gbps=1.0, disk_gbps_beside_compute=2.0)
    alone = dataclasses.replace(io_bound, disk_gbps=1.0, disk_gbps_beside_compute=None)
    assert both.pipeline_disk_gbps == pytest.approx(4 / 3) and alone.pipeline_disk_gbps == 1.0
    key = WeightKey(0, EXPERT, 0)
    nbytes = tiny_shape.padded(key)
    got = OpCosts(tiny_shape, both, torch.float32).transfer(nbytes, DISK)
    assert got == pytest.approx(both.io_latency_s + nbytes / (4 / 3 * 1e9))


def test_a_reader_that_cannot_read_stops_the_measurement_with_its_error(tmp_path):
    """A reader thread that fails (here: the file is gone) is not waited for forever, nor is its
    rate taken as zero: the measuring call raises what stopped it."""
    with pytest.raises(OSError):
        profile.timed_read(str(tmp_path / "missing.bin"), 4 * BLOB, BLOB, readers=2, split=True)


def test_contention_stops_every_reader_when_one_fails(tmp_path):
    import threading

    before = threading.active_count()
    with pytest.raises(OSError):
        profile.measure_contention(lambda: None, 4 * BLOB, BLOB, 0.01, 2, path=str(tmp_path / "missing.bin"))
    assert threading.active_count() == before
