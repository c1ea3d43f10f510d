"""The offload directory: the checkpoint repacked once into one aligned blob per weight unit.

Fetching an expert is then one sequential read of one file (O_DIRECT where the filesystem
allows it, buffered otherwise). Safe to share and to lose, in SQLite's spirit:

- Each model gets its own subdirectory, named by a fingerprint of the source checkpoint (path,
  file names, sizes, mtimes), so two models given one `--offload-dir` never read each other's blobs.
- An fcntl lock per subdirectory: readers hold it shared for as long as they use the blobs; a
  repack needs it exclusive, so nothing is ever repacked under a reader. A second process waits
  while another repacks, then reads what it wrote.
- Every blob read is verified: the manifest holds a checksum per chunk of each blob (4 MiB at
  most, 64 KiB for the row-read embedding table), checked on the reader thread as each piece
  lands. The checksum is xxh3-64 (cheaper than zlib's CRC32: benchmarks/offload_checksum.py
  measures both), CRC32 where the xxhash package is missing.
  A blob that changed under a run stops the run and is set aside, so the next run repacks it.
- A repack writes each blob to a temporary file, fsyncs and renames it, and writes the manifest
  (the completion marker) last the same way: a full disk, exhausted inodes or a crash leave
  nothing the next run trusts, and missing or wrong-sized blobs are repacked on the next run.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import sys
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from klotski.checkpoint.reader import Checkpoint, check_finite, read_tensor
from klotski.config import format_bytes
from klotski.errors import KlotskiError, OffloadError
from klotski.models.spec import EMBED, WeightKey
from klotski.paths import home

_xxh3: Callable[..., int] | None
try:
    from xxhash import xxh3_64_intdigest as _xxh3
except ImportError:  # an install without the xxhash wheel: CRC32, slower but always there
    _xxh3 = None

HASH = "xxh3_64" if _xxh3 is not None else "crc32"
_HASHES: dict[str, Callable[..., int]] = {"crc32": zlib.crc32} | ({"xxh3_64": _xxh3} if _xxh3 is not None else {})

FORMAT_VERSION = 2
ALIGN = 4096  # O_DIRECT needs offsets, lengths and buffers aligned to the logical block size
TENSOR_ALIGN = 64

# One pread per 16 MiB of a blob: a whole-blob pread queues hundreds of MB in the device queue,
# and a small read issued behind it (an embedding row) waits for all of them; in 16 MiB
# pieces it waits for at most a piece per stream.
READ_CHUNK = 16 * 2**20
# Checksum granularity: at most 64 chunks per blob below 256 MiB, 4 MiB chunks above (a
# divisor of READ_CHUNK, so each piece read is checked while it is in cache); the embedding
# table is read by rows, so its chunks are small enough (64 KiB at most) to check per row read.
CHECK_CHUNK = 4 * 2**20
ROW_CHECK_CHUNK = 64 * 1024
ROW_READERS = 16  # concurrent row reads (embedding lookups off the device)
ROW_READ_COST = 64 * 1024  # bytes of sequential reading one random row read is worth
ROW_WINDOW = 16  # row reads in flight at once (the planner's simulator counts a latency per window)
LOCK_WAIT_S = float(os.environ.get("KLOTSKI_OFFLOAD_WAIT_S", 1800))  # waiting for another process's repack
STALE_WAIT_S = 5.0  # a dir that needs repacking while another process reads it: give up after this
_ROW_POOL: ThreadPoolExecutor | None = None
_ROW_POOL_LOCK = threading.Lock()
_FULL = (errno.ENOSPC, errno.EDQUOT)
# The repack's file writes and creates, as seams: tests make them fail with ENOSPC (a full disk,
# no inodes) at a chosen point without filling a real disk.
_os_write = os.write
_os_open = os.open


def _row_pool() -> ThreadPoolExecutor:
    global _ROW_POOL
    with _ROW_POOL_LOCK:
        if _ROW_POOL is None:
            _ROW_POOL = ThreadPoolExecutor(ROW_READERS, thread_name_prefix="klotski-rows")
        return _ROW_POOL


@dataclass(frozen=True, slots=True)
class BlobTensor:
    """One tensor inside a blob."""

    name: str
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True, slots=True)
class Blob:
    """One weight unit on disk: its file, padded size, payload size and per-chunk checksums."""

    key: WeightKey
    file: str
    nbytes: int  # payload bytes
    padded: int  # file size (multiple of ALIGN)
    chunk: int  # checksum granularity (a power of two, >= ALIGN)
    crcs: tuple[int, ...]  # HASH of payload bytes [i * chunk, min((i + 1) * chunk, nbytes))
    tensors: tuple[BlobTensor, ...]


def round_up(n: int, align: int = ALIGN) -> int:
    """n rounded up to a multiple of align."""
    return (n + align - 1) // align * align


def check_chunk(key: WeightKey, nbytes: int) -> int:
    """The checksum chunk of a blob: a power of two from ALIGN up (see CHECK_CHUNK)."""
    cap, pieces = (ROW_CHECK_CHUNK, 4096) if key.part == EMBED else (CHECK_CHUNK, 64)
    chunk = ALIGN
    while chunk < cap and chunk * pieces < nbytes:
        chunk *= 2
    return chunk


def chunk_crcs(data, nbytes: int, chunk: int) -> tuple[int, ...]:
    view, digest = memoryview(data), _HASHES[HASH]
    return tuple(digest(view[i : min(i + chunk, nbytes)]) for i in range(0, max(nbytes, 1), chunk))


def blob_layout(units: list[tuple[str, int]]) -> tuple[list[tuple[str, int]], int]:
    """Offsets of each tensor (aligned) and the payload size."""
    offsets, pos = [], 0
    for name, nbytes in units:
        pos = round_up(pos, TENSOR_ALIGN)
        offsets.append((name, pos))
        pos += nbytes
    return offsets, pos


def key_name(key: WeightKey) -> str:
    """File-name-safe text for a key."""
    return str(key)


def source_fingerprint(checkpoint: Checkpoint) -> list:
    """Names, sizes and mtimes of the checkpoint's files: changes when the checkpoint does."""
    files = sorted({ref.path for unit in checkpoint.units.values() for ref in unit.values()})
    out = [["config.json", (checkpoint.path / "config.json").stat().st_size]]
    for f in files:
        st = os.stat(f)
        out.append([os.path.basename(f), st.st_size, int(st.st_mtime)])
    return out


def model_dir_name(checkpoint: Checkpoint, fingerprint: list) -> str:
    """<checkpoint name>-<hash of its resolved path and fingerprint>: one subdirectory per model."""
    ident = json.dumps([FORMAT_VERSION, str(checkpoint.path.resolve()), fingerprint])
    return f"{checkpoint.path.name}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def default_offload_dir(checkpoint: Checkpoint) -> Path:
    """$KLOTSKI_HOME/offload/<name>-<hash of the checkpoint's path>."""
    digest = zlib.crc32(str(checkpoint.path.resolve()).encode())
    return home() / "offload" / f"{checkpoint.path.name}-{digest:08x}"


class DirLock:
    """An fcntl (flock) lock on `<model dir>.lock` beside the model's subdirectory.

    Shared while a process reads the blobs, exclusive while one repacks them. Where the lock file
    cannot be created (a read-only offload dir), there is no writer to exclude and it is a no-op."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None
        self.held: str | None = None
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            try:
                self.fd = os.open(path, os.O_RDONLY)
            except OSError:
                self.fd = None

    def _try(self, mode: int, name: str) -> bool:
        if self.fd is None:
            self.held = name
            return True
        try:
            fcntl.flock(self.fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self.held = name
        return True

    def try_shared(self) -> bool:
        return self._try(fcntl.LOCK_SH, "shared")

    def try_exclusive(self) -> bool:
        return self._try(fcntl.LOCK_EX, "exclusive")

    def downgrade(self) -> None:
        """Exclusive -> shared once a repack is done (readers of the new blobs may join)."""
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_SH)
        self.held = "shared"

    def release(self) -> None:
        if self.fd is not None and self.held:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        self.held = None

    def close(self) -> None:
        self.release()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class OffloadDir:
    """A repacked checkpoint: manifest + blobs; reads blobs into caller-provided aligned buffers,
    verifying every byte read against the manifest's checksums."""

    # Called after every verified blob read with its key (tests pause or damage the dir between reads).
    after_read = None

    def __init__(self, path: Path, blobs: dict[WeightKey, Blob], verify: str = "always", lock: DirLock | None = None):
        self.path = path
        self.blobs = blobs
        self.verify = verify  # "always": every read is checked; "never" (benchmarks only)
        self.lock = lock
        self._verified: set[WeightKey] = set()  # blobs read by rows whose whole checksum was streamed once
        self._lock = threading.Lock()
        self._damage: dict[str, str] = {}  # blob file -> why this process set it aside
        self._direct = hasattr(os, "O_DIRECT")

    def close(self) -> None:
        """Release the directory's lock (the blobs may be repacked by others from now on)."""
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # -- opening and repacking --------------------------------------------------------------
    @classmethod
    def prepare(
        cls,
        checkpoint: Checkpoint,
        path: str | os.PathLike,
        keys: list[WeightKey] | None = None,
        progress: bool = False,
        wait_s: float | None = None,
    ) -> OffloadDir:
        """Open this checkpoint's blobs under `path`, repacking what is missing or stale first.

        Returns holding the model's lock shared; see the module docstring for the protocol."""
        root = Path(path)
        keys = keys if keys is not None else checkpoint.spec.weight_keys()
        fingerprint = source_fingerprint(checkpoint)
        sub = root / model_dir_name(checkpoint, fingerprint)
        cls._make_root(root)
        lock = DirLock(root / f"{sub.name}.lock")
        wait_s = LOCK_WAIT_S if wait_s is None else wait_s
        start, stale_since, told = time.monotonic(), None, False
        try:
            while True:
                if lock.try_shared():
                    existing = cls._load_manifest(sub, fingerprint)
                    missing = cls._missing(sub, existing, keys)
                    if not missing:
                        assert existing is not None  # nothing is missing from a manifest that was read
                        existing.lock = lock  # held shared for as long as this OffloadDir is used
                        return existing
                    lock.release()
                    if lock.try_exclusive():
                        return cls._repack(checkpoint, sub, keys, fingerprint, lock, progress)
                    # Others read this model's dir though it needs repacking (a blob vanished under them).
                    stale_since = stale_since or time.monotonic()
                    if time.monotonic() - stale_since > STALE_WAIT_S:
                        raise OffloadError(
                            f"offload dir {sub} needs repacking ({missing[0]} is missing or damaged) but another "
                            "klotski process is reading it; let that process finish, or give another --offload-dir"
                        )
                else:
                    stale_since = None  # another process holds it exclusive: it is repacking
                    if time.monotonic() - start > wait_s:
                        raise OffloadError(
                            f"offload dir {sub} has been locked by another klotski process for "
                            f"{wait_s:.0f} s; wait for it to finish, or give another --offload-dir"
                        )
                    if not told:
                        print(f"klotski: waiting for another klotski process repacking {sub}", file=sys.stderr)
                        told = True
                time.sleep(0.05)
        except BaseException:
            lock.close()
            raise

    @staticmethod
    def _make_root(root: Path) -> None:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OffloadError(
                f"offload dir {root} is not writable: it cannot be created ({exc.strerror}); "
                "choose another --offload-dir"
            ) from None

    @staticmethod
    def _missing(sub: Path, existing: OffloadDir | None, keys: list[WeightKey]) -> list[WeightKey]:
        """Keys whose blob is not in the manifest or whose file vanished or changed size."""
        if existing is None:
            return list(keys)
        missing = []
        for key in keys:
            blob = existing.blobs.get(key)
            try:
                ok = blob is not None and os.stat(sub / blob.file).st_size == blob.padded
            except OSError:
                ok = False
            if not ok:
                missing.append(key)
        return missing

    @classmethod
    def _repack(
        cls, checkpoint: Checkpoint, sub: Path, keys: list[WeightKey], fingerprint: list, lock: DirLock, progress: bool
    ) -> OffloadDir:
        """With the lock exclusive: write the missing blobs, then the manifest; downgrade to shared."""
        existing = cls._load_manifest(sub, fingerprint)  # re-read: another process may have just repacked
        missing = cls._missing(sub, existing, keys)
        blobs = dict(existing.blobs) if existing is not None else {}
        if missing:
            cls._check_room(checkpoint, sub, missing)
            cls._clean(sub)
            total, done = sum(checkpoint.unit_nbytes(k) for k in missing), 0
            try:
                with tqdm(
                    total=total,
                    unit="B",
                    unit_scale=True,
                    desc=f"repacking into {sub}",
                    file=sys.stderr,
                    disable=not progress,
                ) as bar:
                    for key in missing:
                        blobs[key] = cls._write_blob(checkpoint, sub, key)
                        done += blobs[key].nbytes
                        bar.update(blobs[key].nbytes)
                manifest = {
                    "version": FORMAT_VERSION,
                    "hash": HASH,
                    "source": str(checkpoint.path),
                    "fingerprint": fingerprint,
                    "blobs": [cls._blob_json(b) for b in blobs.values()],
                }
                _write_durably(sub / "manifest.json", json.dumps(manifest).encode())
            except OSError as exc:
                cls._clean(sub)
                raise _write_error(exc, sub, done, total) from None
        lock.downgrade()
        if missing:
            cls._prune_stale(sub, checkpoint)
        return cls(sub, blobs, lock=lock)

    @staticmethod
    def _prune_stale(sub: Path, checkpoint: Checkpoint) -> None:
        """Remove this checkpoint's older subdirectories (repacked before it changed), each only when
        its lock is free: a changed checkpoint does not leave a full copy of its old weights behind."""
        source = str(checkpoint.path)
        for other in sub.parent.glob(f"{checkpoint.path.name}-*"):
            if other == sub or not other.is_dir() or not (other / "manifest.json").is_file():
                continue
            try:
                if json.loads((other / "manifest.json").read_bytes()).get("source") != source:
                    continue
            except (OSError, ValueError, AttributeError):
                continue
            lock = DirLock(other.parent / f"{other.name}.lock")
            try:
                if lock.fd is not None and lock.try_exclusive():
                    shutil.rmtree(other, ignore_errors=True)
            finally:
                lock.close()

    @staticmethod
    def _clean(sub: Path) -> None:
        """Remove leftovers of interrupted repacks and blobs set aside as corrupt (lock exclusive)."""
        for pattern in ("*.tmp", "*.corrupt"):
            for p in sub.glob(pattern):
                p.unlink(missing_ok=True)

    @staticmethod
    def _check_room(checkpoint: Checkpoint, path: Path, keys: list[WeightKey]) -> None:
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".write-test.tmp"
            probe.write_bytes(b"x")
            probe.unlink()
        except OSError as exc:
            raise OffloadError(
                f"offload dir {path} is not writable ({exc.strerror}); choose another --offload-dir"
            ) from None
        need = sum(round_up(checkpoint.unit_nbytes(k) + TENSOR_ALIGN * 16, ALIGN) for k in keys)
        stat = os.statvfs(path)
        free = stat.f_bavail * stat.f_frsize
        if free < need:
            raise OffloadError(
                f"offload dir {path} has {format_bytes(free)} free but repacking needs "
                f"{format_bytes(need)}; free space or choose another --offload-dir"
            )
        if stat.f_files and stat.f_favail < len(keys) + 2:  # f_files 0: the filesystem has no inode limit
            raise OffloadError(
                f"offload dir {path} has {stat.f_favail} free inodes but repacking writes "
                f"{len(keys) + 1} files; free some or choose another --offload-dir"
            )

    @staticmethod
    def _write_blob(checkpoint: Checkpoint, path: Path, key: WeightKey) -> Blob:
        refs = checkpoint.units[key]
        offsets, payload = blob_layout([(name, ref.nbytes) for name, ref in refs.items()])
        buf = bytearray(round_up(max(payload, 1), ALIGN))
        tensors = []
        for (name, off), ref in zip(offsets, refs.values()):
            data = read_tensor(ref)
            check_finite(data, f"{key}.{name}", ref.path)  # the bytes pass through here once anyway
            buf[off : off + ref.nbytes] = data.contiguous().view(torch.uint8).numpy().tobytes()
            tensors.append(BlobTensor(name, off, ref.dtype, tuple(ref.shape)))
        fname = f"{key_name(key)}.bin"
        _write_durably(path / fname, buf, sync_dir=False)  # the manifest's write syncs the directory
        chunk = check_chunk(key, payload)
        return Blob(key, fname, payload, len(buf), chunk, chunk_crcs(buf, payload, chunk), tuple(tensors))

    @staticmethod
    def _blob_json(b: Blob) -> dict:
        return {
            "layer": b.key.layer,
            "part": b.key.part,
            "expert": b.key.expert,
            "file": b.file,
            "nbytes": b.nbytes,
            "padded": b.padded,
            "chunk": b.chunk,
            "crcs": list(b.crcs),
            "tensors": [[t.name, t.offset, str(t.dtype).removeprefix("torch."), list(t.shape)] for t in b.tensors],
        }

    @classmethod
    def _load_manifest(cls, path: Path, fingerprint: list) -> OffloadDir | None:
        """The manifest's blobs, or None when it is missing, torn, of another version or another source."""
        try:
            data = json.loads((path / "manifest.json").read_bytes())
            if (
                data.get("version") != FORMAT_VERSION
                or data.get("fingerprint") != fingerprint
                or data.get("hash") != HASH
            ):
                return None
            blobs = {}
            for b in data["blobs"]:
                key = WeightKey(b["layer"], b["part"], b["expert"])
                tensors = tuple(BlobTensor(n, o, getattr(torch, d), tuple(s)) for n, o, d, s in b["tensors"])
                blobs[key] = Blob(key, b["file"], b["nbytes"], b["padded"], b["chunk"], tuple(b["crcs"]), tensors)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None  # anything the next repack replaces
        return cls(path, blobs)

    # -- reading --------------------------------------------------------------------------
    def read_into(self, key: WeightKey, buf) -> dict[str, torch.Tensor]:
        """Read one blob into an aligned host buffer (one sequential read); return tensor views on it."""
        self.read_raw(key, buf)
        return self.views(self.blobs[key], buf)

    def read_raw(self, key: WeightKey, buf) -> None:
        """Read and check one blob's bytes into an aligned host buffer (mmap or pinned tensor)."""
        blob = self.blobs[key]
        self.check_read(key, buf, self._read(blob, buf, blob.padded))

    def read_part(self, key: WeightKey, buf, start: int, end: int) -> int:
        """Read bytes [start, end) of a blob (start on its checksum chunk grid) into the same range
        of buf, checking the chunks inside; bytes got. Parts of one blob read on several threads at
        once; `check_read` once all have landed."""
        return self._read(self.blobs[key], buf, end, start)

    def check_read(self, key: WeightKey, buf, got: int) -> None:
        """A blob's bytes are all in buf (`got` of them read; each part checked as it landed)."""
        blob = self.blobs[key]
        if got < blob.nbytes:
            raise self._damaged(blob, f"is truncated ({got} of {blob.nbytes} bytes); the run stopped")
        if self.after_read is not None:
            self.after_read(key)

    def _check_chunks(self, blob: Blob, view, base: int, lo: int, hi: int) -> int:
        """Check every chunk that starts at or after `lo` (on the chunk grid) and ends by `hi`, in
        a view holding the blob's bytes from offset `base`; returns where checking must resume
        (a chunk cut short by a short read waits for the rest, or for the length check)."""
        c, digest = blob.chunk, _HASHES[HASH]
        i = lo // c
        while i < len(blob.crcs):
            a, b = i * c, min((i + 1) * c, blob.nbytes)
            if b > hi:
                break
            if self.verify != "never" and digest(view[a - base : b - base]) != blob.crcs[i]:
                self._corrupt(blob, a)
            i += 1
        return i * c

    def _corrupt(self, blob: Blob, at: int):
        raise self._damaged(
            blob, f"fails its checksum at byte {at} (it changed on disk or is corrupt); the run stopped"
        )

    def _damaged(self, blob: Blob, what: str) -> OffloadError:
        """The error for a damaged blob, which is set aside. Remembered before the blob moves: another
        read of it (a blob read in parts, on another thread) that then finds it gone reports this
        damage, not a vanished file, whichever thread gets there first."""
        head = f"offload blob {self.path / blob.file} {what}"
        with self._lock:
            self._damage[blob.file] = head
        message = head + self._set_aside(blob)
        with self._lock:
            self._damage[blob.file] = message
        return OffloadError(message)

    def _vanished(self, blob: Blob) -> OffloadError:
        """A blob's file is gone: set aside as damaged by this process (that error), or removed."""
        with self._lock:
            why = self._damage.get(blob.file)
        return OffloadError(
            why
            or f"offload blob {self.path / blob.file} has vanished (the offload dir was removed during the run); "
            "the run stopped and the next run repacks it"
        )

    def _set_aside(self, blob: Blob) -> str:
        """Move a damaged blob out of the way so the next run repacks it (the message's tail)."""
        try:
            os.replace(self.path / blob.file, self.path / (blob.file + ".corrupt"))
        except OSError:
            return f"; delete {self.path} to repack it"
        return "; the blob was set aside and the next run repacks it"

    def read_rows(self, key: WeightKey, name: str, rows: list[int]) -> torch.Tensor:
        """Rows of one tensor of a blob ([len(rows), ...]): the embedding lookup of a step reads a
        few KB per token, not the whole table.

        Each row is read with the checksum chunks it lies in (64 KiB at most, about what one random
        read costs anyway), and checked; the whole blob's checksum is also streamed once per
        process, so damage to rows no prompt looks up is found too. One pread per chunk run,
        ROW_READERS at a time (a lone small read waits out the disk's latency).
        """
        blob = self.blobs[key]
        tensor = next((t for t in blob.tensors if t.name == name), None)
        if tensor is None:
            raise OffloadError(
                f"offload blob {self.path / blob.file} has no tensor {name!r}; delete {self.path} to repack it"
            )
        count = tensor.shape[0]
        bad = [r for r in rows if not 0 <= r < count]
        if bad:
            raise KlotskiError(
                f"token id {bad[0]} is out of range for {key} ({count} rows); check the prompt's token ids"
            )
        row = tensor.nbytes // count
        out = torch.empty((len(rows), *tensor.shape[1:]), dtype=tensor.dtype)
        view = out.view(-1).view(torch.uint8).numpy().data
        file = self.path / blob.file
        try:
            fd = os.open(file, os.O_RDONLY)
        except FileNotFoundError:
            raise self._vanished(blob) from None
        try:
            self._verify_whole(blob, fd, file)
            if hasattr(os, "posix_fadvise") and len(rows) * ROW_READ_COST < tensor.nbytes:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead around each row
            self._copy_rows(fd, blob, tensor, row, rows, view)
        except OSError as exc:
            raise OffloadError(f"reading offload blob {file} failed: {exc.strerror}") from None
        finally:
            view.release()
            os.close(fd)
        if self.after_read is not None:
            self.after_read(key)
        return out

    def _copy_rows(self, fd: int, blob: Blob, tensor: BlobTensor, row: int, rows: list[int], view) -> None:
        """Read the checksum chunks holding `rows` (runs of adjacent chunks, 2 MiB at most per read),
        check them, and copy the rows out; a window of runs at a time, so memory stays bounded."""
        c = blob.chunk
        spans = [((tensor.offset + r * row) // c, (tensor.offset + (r + 1) * row - 1) // c) for r in rows]
        needed = sorted({i for a, b in spans for i in range(a, b + 1)})
        runs: list[list[int]] = []
        for i in needed:
            if runs and runs[-1][-1] == i - 1 and len(runs[-1]) * c < 2 * 2**20:
                runs[-1].append(i)
            else:
                runs.append([i])
        order = sorted(range(len(rows)), key=lambda j: spans[j][0])
        chunks: dict[int, bytes] = {}
        next_row = 0

        def load(run: list[int]) -> None:
            lo, hi = run[0] * c, min((run[-1] + 1) * c, blob.nbytes)
            data = os.pread(fd, hi - lo, lo)
            if len(data) < hi - lo:
                raise self._damaged(blob, "is truncated")
            self._check_chunks(blob, memoryview(data), lo, lo, hi)
            for i in run:
                chunks[i] = data[i * c - lo : min((i + 1) * c, blob.nbytes) - lo]

        window = ROW_WINDOW
        for w in range(0, len(runs), window):
            group = runs[w : w + window]
            if len(group) == 1:
                load(group[0])
            else:
                for f in [_row_pool().submit(load, run) for run in group]:
                    f.result()
            loaded_to = group[-1][-1]
            while next_row < len(order) and spans[order[next_row]][1] <= loaded_to:
                j = order[next_row]
                a, b = spans[j]
                span = b"".join(chunks[i] for i in range(a, b + 1))
                at = tensor.offset + rows[j] * row - a * c
                view[j * row : (j + 1) * row] = span[at : at + row]
                next_row += 1
            low = spans[order[next_row]][0] if next_row < len(order) else loaded_to + 1
            for i in [i for i in chunks if i < low]:
                del chunks[i]

    def _verify_whole(self, blob: Blob, fd: int, file: Path, piece: int = 2 * 2**20) -> None:
        """The checksum of a blob read only in parts: streamed 2 MiB at a time (never the whole blob
        in memory), once per process."""
        with self._lock:
            if self.verify == "never" or blob.key in self._verified:
                return
        piece = max(piece // blob.chunk, 1) * blob.chunk
        done = 0
        while done < blob.nbytes and (data := os.pread(fd, min(piece, blob.nbytes - done), done)):
            self._check_chunks(blob, memoryview(data), done, done, done + len(data))
            done += len(data)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # leave the page cache as it was
        if done < blob.nbytes:
            raise self._damaged(blob, f"is truncated ({done} of {blob.nbytes} bytes)")
        with self._lock:
            self._verified.add(blob.key)

    def views(self, blob: Blob, buf) -> dict[str, torch.Tensor]:
        """Tensor views over a blob's bytes in a buffer, host or device (no copy)."""
        raw = buf if isinstance(buf, torch.Tensor) else torch.frombuffer(buf, dtype=torch.uint8, count=blob.padded)
        return {t.name: raw[t.offset : t.offset + t.nbytes].view(t.dtype).view(t.shape) for t in blob.tensors}

    def _read(self, blob: Blob, buf, length: int, start: int = 0) -> int:
        """pread bytes [start, length) of a blob, checking each piece's chunks as it lands: O_DIRECT
        when possible (no page-cache copy), else buffered; returns the bytes read."""
        file = self.path / blob.file
        try:
            fd = os.open(file, os.O_RDONLY | (os.O_DIRECT if self._direct else 0))
        except FileNotFoundError:
            raise self._vanished(blob) from None
        except OSError:
            self._direct = False  # the filesystem refuses O_DIRECT (tmpfs, some overlays)
            return self._read(blob, buf, length, start)
        # Released on the way out, error or not: the error's traceback keeps this frame alive, and a
        # view left in it pins the buffer, which the pool then cannot unmap (BufferError) once the
        # failed fetch gave the buffer back.
        view = (buf.numpy().data if isinstance(buf, torch.Tensor) else memoryview(buf))[:length]
        try:
            done = checked = start
            while done < length:
                n = os.preadv(fd, [view[done : min(done + READ_CHUNK, length)]], done)
                if n == 0:
                    break
                done += n
                checked = self._check_chunks(blob, view, 0, checked, done)  # while the piece is in cache
            return done - start
        except OSError as exc:
            if self._direct and exc.errno == errno.EINVAL:  # O_DIRECT not supported for this file
                self._direct = False
                return self._read(blob, buf, length, start)
            raise OffloadError(f"reading offload blob {file} failed: {exc.strerror}") from None
        finally:
            view.release()
            os.close(fd)


def _write_durably(path: Path, data, sync_dir: bool = True) -> None:
    """Write to a temporary file, fsync, rename over `path` (and fsync the directory): a reader sees
    the old file or the whole new one, never a part, and a crash leaves only a *.tmp to clean."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        fd = _os_open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view, done = memoryview(data), 0
            while done < len(view):
                done += _os_write(fd, view[done:])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _write_error(exc: OSError, sub: Path, done: int, total: int) -> OffloadError:
    """A repack's OSError as one line: what ran out, how far it got, and what to do."""
    if exc.errno in _FULL:
        what = "disk space or inodes" if exc.errno == errno.ENOSPC else "disk quota"
        return OffloadError(
            f"offload dir {sub} ran out of {what} while repacking ({format_bytes(done)} of "
            f"{format_bytes(total)} written; nothing half-written is kept); free space or "
            "choose another --offload-dir"
        )
    return OffloadError(
        f"repacking into {sub} failed ({exc.strerror}) after {format_bytes(done)} of "
        f"{format_bytes(total)}; nothing half-written is kept; check the disk or choose another "
        "--offload-dir"
    )
