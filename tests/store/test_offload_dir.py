"""The offload directory is safe to share and to lose: one subdirectory and lock per model, every
read verified, a blob changed mid-run stops the run, vanished blobs are repacked on the next run,
and a full disk during a repack leaves nothing the next run trusts."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from klotski import LLM, SamplingParams
from klotski.checkpoint.reader import Checkpoint
from klotski.errors import KlotskiError, OffloadError
from klotski.models.spec import WeightKey
from klotski.store import offload
from klotski.store.offload import DirLock, OffloadDir, model_dir_name, source_fingerprint
from tests.cli_helpers import assert_one_error, run_cli

PROMPTS = [{"prompt_token_ids": [0, 5, 9, 100 + i, 7 * i + 3][: 2 + i % 4]} for i in range(4)]
GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
# Tight enough that experts are fetched again every step (each blob is read several times per run).
BUDGET = dict(device_memory="420KB", batch_size=2, num_batches=2)
EXPERT = WeightKey(1, "expert", 0)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """Two models of the same shape (so the same blob file names) with different weights."""
    from klotski.commands.create_model import create_model

    a = create_model(tmp_path_factory.mktemp("model-a"), "mixtral", "tiny", layers=2, dtype="bfloat16", seed=1)
    b = create_model(tmp_path_factory.mktemp("model-b"), "mixtral", "tiny", layers=2, dtype="bfloat16", seed=2)
    return a, b


@pytest.fixture(scope="module")
def alone(models) -> dict[Path, list[list[int]]]:
    """Each model's tokens run alone, all resident."""
    return {m: [o.outputs[0].token_ids for o in LLM(str(m)).generate(PROMPTS, GREEDY)] for m in models}


def _tokens(model, off, **kw) -> list[list[int]]:
    llm = LLM(str(model), offload_dir=str(off), **(BUDGET | kw))
    try:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
    finally:
        llm.store.close()


def _subdir(model, off) -> Path:
    ckpt = Checkpoint.open(model)
    return Path(off) / model_dir_name(ckpt, source_fingerprint(ckpt))


def _cli(model, off, *extra) -> list[str]:
    return [
        sys.executable,
        "-m",
        "klotski",
        "generate",
        "--model",
        str(model),
        "--offload-dir",
        str(off),
        "--device-memory",
        "420KB",
        "--batch-size",
        "2",
        "--num-batches",
        "2",
        "--max-tokens",
        "5",
        "--ignore-eos",
        "--json",
        *extra,
        *[a for p in PROMPTS for a in ("--prompt", "x" * len(p["prompt_token_ids"]))],
    ]


def _env() -> dict:
    return os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(offload.__file__).parents[2])}


# -- sharing ---------------------------------------------------------------------------------------------
def test_two_processes_with_different_models_on_one_dir(models, tmp_path):
    """Started together on one --offload-dir, each produces the tokens it produces alone."""
    off = tmp_path / "shared"
    solo = {}
    for m in models:
        proc = subprocess.run(
            _cli(m, tmp_path / f"solo-{m.name}"), capture_output=True, text=True, timeout=300, env=_env()
        )
        assert proc.returncode == 0, proc.stderr
        solo[m] = [row["token_ids"] for row in json.loads(proc.stdout)["outputs"]]
    assert solo[models[0]] != solo[models[1]]  # the test can tell whose weights were used
    procs = [
        subprocess.Popen(_cli(m, off), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
        for m in models
    ]
    for m, proc in zip(models, procs):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert [row["token_ids"] for row in json.loads(out)["outputs"]] == solo[m]
    assert sorted(p.name for p in off.iterdir() if p.is_dir()) == sorted(_subdir(m, off).name for m in models)


def test_in_process_two_models_share_a_dir(models, alone, tmp_path):
    for m in models:
        assert _tokens(m, tmp_path / "off") == alone[m]
    for m in models:  # again, now reusing the blobs each wrote
        assert _tokens(m, tmp_path / "off") == alone[m]


def test_a_second_process_waits_for_a_repack_then_reads(models, alone, tmp_path):
    """While another process holds the model's lock exclusive (repacking), a run waits and says so;
    once it is released, the run goes on and produces the right tokens. Deterministic: this test
    holds the lock itself."""
    model, off = models[0], tmp_path / "off"
    off.mkdir()
    lock = DirLock(off / f"{_subdir(model, off).name}.lock")
    assert lock.try_exclusive()
    proc = subprocess.Popen(_cli(model, off), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        line = proc.stderr.readline()
        assert "waiting for another klotski process repacking" in line
        assert proc.poll() is None and not _subdir(model, off).exists()  # nothing written under the lock
    finally:
        lock.close()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    solo = subprocess.run(_cli(model, tmp_path / "solo"), capture_output=True, text=True, timeout=300, env=_env())
    assert json.loads(out)["outputs"] == json.loads(solo.stdout)["outputs"]


def test_a_lock_held_too_long_is_a_clear_error(capsys, models, tmp_path, monkeypatch):
    model, off = models[0], tmp_path / "off"
    off.mkdir()
    lock = DirLock(off / f"{_subdir(model, off).name}.lock")
    assert lock.try_exclusive()
    monkeypatch.setattr(offload, "LOCK_WAIT_S", 0.2)
    try:
        code, _, err = run_cli(
            capsys,
            "generate",
            "--model",
            str(model),
            "--offload-dir",
            str(off),
            "--prompt",
            "Hi",
            "--device-memory",
            "420KB",
            "--batch-size",
            "1",
            "--num-batches",
            "1",
        )
    finally:
        lock.close()
    assert_one_error(code, err, "locked by another klotski process", "give another --offload-dir")


def test_never_repacks_under_a_reader(models, tmp_path, monkeypatch):
    """A reader holds the dir shared; a blob vanishes; a second opener must not repack under it."""
    model, off = models[0], tmp_path / "off"
    ckpt = Checkpoint.open(model)
    reader = OffloadDir.prepare(ckpt, off)
    (reader.path / reader.blobs[EXPERT].file).unlink()
    manifest = (reader.path / "manifest.json").stat().st_mtime_ns
    monkeypatch.setattr(offload, "STALE_WAIT_S", 0.2)
    with pytest.raises(OffloadError, match="needs repacking .* another klotski process is reading it"):
        OffloadDir.prepare(ckpt, off)
    assert (reader.path / "manifest.json").stat().st_mtime_ns == manifest
    assert not (reader.path / reader.blobs[EXPERT].file).exists()
    reader.close()
    again = OffloadDir.prepare(ckpt, off)  # the reader is gone: now it is repacked
    assert (again.path / again.blobs[EXPERT].file).exists()
    again.close()


def test_readers_share(models, tmp_path):
    ckpt = Checkpoint.open(models[0])
    first = OffloadDir.prepare(ckpt, tmp_path / "off")
    second = OffloadDir.prepare(ckpt, tmp_path / "off", wait_s=0.5)  # shared with the first, no wait
    assert first.path == second.path and first.lock.held == second.lock.held == "shared"
    first.close(), second.close()


# -- damage during a run ----------------------------------------------------------------------------------
def _overwrite_after_first_read(monkeypatch, key: WeightKey, how: str):
    """Between the first and the second read of `key`: damage its blob (the run is paused there,
    on the reader thread, by the store's after-read hook)."""
    seen = []

    def hook(self, read_key):
        if read_key != key or seen:
            return
        seen.append(read_key)
        blob = self.path / self.blobs[key].file
        if how == "overwrite":
            with open(blob, "r+b") as f:  # same size, same inode: a stat would not notice
                f.seek(100)
                f.write(b"\x55" * 64)
        elif how == "vanish-blob":
            blob.unlink()
        else:
            shutil.rmtree(self.path)

    monkeypatch.setattr(OffloadDir, "after_read", hook)
    return seen


@pytest.mark.parametrize(
    "how,words", [("overwrite", "fails its checksum"), ("vanish-blob", "has vanished"), ("vanish-dir", "has vanished")]
)
def test_damage_mid_run_stops_it_and_the_next_run_repacks(models, alone, tmp_path, monkeypatch, how, words):
    model, off = models[0], tmp_path / "off"
    seen = _overwrite_after_first_read(monkeypatch, EXPERT, how)
    with pytest.raises(OffloadError, match=words):
        _tokens(model, off)
    assert seen
    monkeypatch.setattr(OffloadDir, "after_read", None)
    assert _tokens(model, off) == alone[model]  # "the next run repacks it" is true


@pytest.mark.parametrize("split", [False, True], ids=["whole", "in-parts"])
def test_every_read_is_verified_not_only_the_first(models, alone, tmp_path, monkeypatch, split):
    from klotski.store import tiered

    if split:
        monkeypatch.setattr(tiered, "SPLIT_MIN", 1)
    _overwrite_after_first_read(monkeypatch, EXPERT, "overwrite")
    with pytest.raises(OffloadError, match="changed on disk"):
        _tokens(models[0], tmp_path / "off")


def test_an_embedding_row_changed_mid_run_is_caught(models, tmp_path, monkeypatch):
    """The embedding table is read by rows: a row a prompt looks up, changed after the first step."""
    embed = WeightKey(None, "embed")

    def hook(self, key):
        if key == embed and not hook.done:
            hook.done = True
            table = next(t for t in self.blobs[embed].tensors if t.name == "weight")
            row = table.nbytes // table.shape[0]
            with open(self.path / self.blobs[embed].file, "r+b") as f:
                f.seek(table.offset + 5 * row)  # token 5 is in every prompt... and generated tokens follow
                f.write(b"\x33" * row)

    hook.done = False
    monkeypatch.setattr(OffloadDir, "after_read", hook)
    llm = LLM(str(models[0]), offload_dir=str(tmp_path / "off"), device_memory="300KB", batch_size=1, num_batches=1)
    try:
        assert llm.store.placement[embed] == "disk"
        with pytest.raises(OffloadError, match="fails its checksum"):
            llm.generate([{"prompt_token_ids": [5, 9]}, {"prompt_token_ids": [5, 7]}], GREEDY)
    finally:
        llm.store.close()


def test_cli_blob_overwritten_mid_run_one_line_and_earlier_results_intact(capsys, models, tmp_path, monkeypatch):
    model, off = models[0], tmp_path / "off"
    out_file = tmp_path / "out.jsonl"
    out_file.write_text('{"id": "earlier"}\n')
    _overwrite_after_first_read(monkeypatch, EXPERT, "overwrite")
    code, out, err = run_cli(
        capsys,
        "generate",
        "--model",
        str(model),
        "--offload-dir",
        str(off),
        "--prompt",
        "Hello",
        "--prompt",
        "The river",
        "--device-memory",
        "420KB",
        "--batch-size",
        "1",
        "--num-batches",
        "2",
        "--max-tokens",
        "4",
        "--output",
        str(out_file),
    )
    assert_one_error(code, err, "fails its checksum", "next run repacks it")
    assert out_file.read_text() == '{"id": "earlier"}\n' and "tok/s" not in out


# -- lost or half-written ----------------------------------------------------------------------------------
def test_a_vanished_blob_is_repacked_alone(models, alone, tmp_path):
    model, off = models[0], tmp_path / "off"
    assert _tokens(model, off) == alone[model]
    sub = _subdir(model, off)
    stamps = {p.name: p.stat().st_mtime_ns for p in sub.glob("*.bin")}
    (sub / "L0.attn.bin").unlink()
    assert _tokens(model, off) == alone[model]
    after = {p.name: p.stat().st_mtime_ns for p in sub.glob("*.bin")}
    assert after.keys() == stamps.keys()
    assert [n for n in stamps if after[n] != stamps[n]] == ["L0.attn.bin"]


@pytest.mark.parametrize("damage", ["truncate", "torn-manifest", "stale-tmp"])
def test_damage_between_runs_is_repaired(models, alone, tmp_path, damage):
    model, off = models[0], tmp_path / "off"
    _tokens(model, off)
    sub = _subdir(model, off)
    if damage == "truncate":
        os.truncate(sub / "L1.expert3.bin", 100)
    elif damage == "torn-manifest":
        (sub / "manifest.json").write_text('{"version": 2, "blobs": [')
    else:
        (sub / "L0.moe.bin.999.tmp").write_bytes(b"half")
    assert _tokens(model, off) == alone[model]


@pytest.mark.parametrize("fail_at", [0, 3, "manifest"], ids=["first-blob", "fourth-blob", "manifest"])
def test_full_disk_during_repack(capsys, models, alone, tmp_path, monkeypatch, fail_at):
    """ENOSPC on a write: one line, no *.tmp left, no manifest trusted; the next run repacks."""
    model, off = models[0], tmp_path / "off"
    real_write = offload._os_write
    writes = []

    def write(fd, data):
        manifest = os.readlink(f"/proc/self/fd/{fd}").split("/")[-1].startswith("manifest.json")
        if (fail_at == "manifest" and manifest) or (fail_at != "manifest" and len(writes) == fail_at):
            real_write(fd, bytes(data[: len(data) // 2]))  # half a file on disk, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        writes.append(fd)
        return real_write(fd, data)

    monkeypatch.setattr(offload, "_os_write", write)
    code, out, err = run_cli(
        capsys,
        "generate",
        "--model",
        str(model),
        "--offload-dir",
        str(off),
        "--prompt",
        "Hello",
        "--device-memory",
        "420KB",
        "--batch-size",
        "1",
        "--num-batches",
        "1",
    )
    assert_one_error(
        code,
        err,
        "ran out of disk space or inodes",
        "nothing half-written is kept",
        "free space or choose another --offload-dir",
    )
    sub = _subdir(model, off)
    assert not list(sub.glob("*.tmp")) and not (sub / "manifest.json").exists()
    monkeypatch.setattr(offload, "_os_write", real_write)
    assert _tokens(model, off) == alone[model]


def test_no_inodes_at_create(models, tmp_path, monkeypatch):
    real_open = offload._os_open

    def no_inodes(path, flags, mode=0o777):
        if str(path).endswith(".tmp") and "L0" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, flags, mode)

    monkeypatch.setattr(offload, "_os_open", no_inodes)
    with pytest.raises(OffloadError, match="ran out of disk space or inodes"):
        OffloadDir.prepare(Checkpoint.open(models[0]), tmp_path / "off")


@pytest.mark.parametrize("field,words", [("f_bavail", "free but repacking needs"), ("f_favail", "free inodes")])
def test_too_little_room_is_said_before_writing(capsys, models, tmp_path, monkeypatch, field, words):
    real = os.statvfs

    class Fake:
        def __init__(self, st):
            self._st = st

        def __getattr__(self, name):
            return 1 if name == field else getattr(self._st, name)

    monkeypatch.setattr(offload.os, "statvfs", lambda p: Fake(real(p)))
    code, _, err = run_cli(
        capsys,
        "generate",
        "--model",
        str(models[0]),
        "--offload-dir",
        str(tmp_path / "off"),
        "--prompt",
        "Hello",
        "--device-memory",
        "420KB",
        "--batch-size",
        "1",
        "--num-batches",
        "1",
    )
    line = assert_one_error(code, err, words, "--offload-dir")
    assert "0.00" not in line
    assert not list((tmp_path / "off").glob("*/*.bin"))


def test_a_changed_checkpoint_gets_its_own_subdirectory_and_the_old_one_goes(models, tmp_path):
    src = shutil.copytree(models[0], tmp_path / "ckpt")
    first = _subdir(src, tmp_path / "off")
    _tokens(src, tmp_path / "off")
    other = _subdir(models[1], tmp_path / "off")
    _tokens(models[1], tmp_path / "off")
    os.utime(src / "model.safetensors", (time.time() + 100, time.time() + 100))
    second = _subdir(src, tmp_path / "off")
    assert second != first
    _tokens(src, tmp_path / "off")
    assert second.is_dir() and not first.exists() and other.is_dir()  # another model's blobs stay


def test_an_old_subdirectory_in_use_is_not_pruned(models, tmp_path):
    src = shutil.copytree(models[0], tmp_path / "ckpt")
    reader = OffloadDir.prepare(Checkpoint.open(src), tmp_path / "off")
    os.utime(src / "model.safetensors", (time.time() + 100, time.time() + 100))
    OffloadDir.prepare(Checkpoint.open(src), tmp_path / "off").close()
    assert (reader.path / "manifest.json").is_file()  # still read by `reader`: left alone
    reader.close()


def test_an_unusable_offload_dir_is_one_line(capsys, models, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_cli(
        capsys,
        "generate",
        "--model",
        str(models[0]),
        "--offload-dir",
        str(blocker / "sub"),
        "--prompt",
        "Hello",
        "--device-memory",
        "420KB",
        "--batch-size",
        "1",
        "--num-batches",
        "1",
    )
    assert_one_error(code, err, "is not writable", "choose another --offload-dir")


def test_errors_are_klotski_errors():
    assert issubclass(OffloadError, KlotskiError)


def test_a_part_that_finds_its_blob_set_aside_reports_the_damage(models, tmp_path):
    """A blob read in parts on two threads: the part that finds the damage sets the blob aside, and a
    part that opens it after that reports the same damage, not a vanished file (which thread's error
    reaches the run first is up to the schedule)."""
    import mmap

    off = OffloadDir.prepare(Checkpoint.open(models[0]), tmp_path / "off")
    blob = off.blobs[EXPERT]
    path = off.path / blob.file
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(data)
    buf = mmap.mmap(-1, blob.padded)
    half = blob.padded // 2 // blob.chunk * blob.chunk
    with pytest.raises(OffloadError, match="fails its checksum") as first:
        off.read_part(EXPERT, buf, 0, half)
    assert not path.exists()  # set aside
    with pytest.raises(OffloadError) as second:
        off.read_part(EXPERT, buf, half, blob.padded)
    assert str(second.value) == str(first.value)


@pytest.mark.parametrize("how", ["vanish", "flip"])
def test_a_failed_read_leaves_no_view_on_its_buffer(models, tmp_path, how):
    """While the error is still held (the run keeps the first part's error; its traceback keeps the
    reading frame alive), the buffer it read into can be unmapped: the pool unmaps free buffers to
    make room, and a view left in that frame made it raise BufferError (seen in a fresh-clone CI run:
    test_failed_reads_stop_the_run[vanish-vanished-in-parts])."""
    import mmap

    off = OffloadDir.prepare(Checkpoint.open(models[0]), tmp_path / "off")
    blob = off.blobs[EXPERT]
    path = off.path / blob.file
    if how == "vanish":
        path.unlink()
    else:
        data = bytearray(path.read_bytes())
        data[10] ^= 0xFF
        path.write_bytes(data)
    buf = mmap.mmap(-1, blob.padded)
    with pytest.raises(OffloadError) as held:
        off.read_part(EXPERT, buf, 0, blob.padded)
    assert held.value.__traceback__ is not None
    buf.close()  # BufferError ("cannot close exported pointers exist") with a view left behind
