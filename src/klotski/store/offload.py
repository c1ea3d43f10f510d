"""The offload directory: the checkpoint repacked once into one aligned blob per weight unit.

Fetching an expert is then one sequential read of one file (O_DIRECT where the filesystem
allows it, buffered otherwise). A manifest records each blob's tensors, size and CRC32, and a
fingerprint of the source checkpoint, so an unchanged checkpoint is never repacked twice.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from klotski.checkpoint.reader import Checkpoint, check_finite, read_tensor
from klotski.errors import KlotskiError, OffloadError
from klotski.models.spec import WeightKey
from klotski.paths import home

FORMAT_VERSION = 1
ALIGN = 4096  # O_DIRECT needs offsets, lengths and buffers aligned to the logical block size
TENSOR_ALIGN = 64


# One pread per 16 MiB of a blob: a whole-blob pread queues hundreds of MB in the device queue,
# and a small read issued behind it (an embedding row) waits for all of them; in 16 MiB pieces it
# waits for at most a piece per stream.
READ_CHUNK = 16 * 2**20
ROW_READERS = 16  # concurrent row reads (embedding lookups off the device)
ROW_READ_COST = 64 * 1024  # bytes of sequential reading one random row read is worth
_ROW_POOL: ThreadPoolExecutor | None = None
_ROW_POOL_LOCK = threading.Lock()


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
    """One weight unit on disk: its file, padded size, payload size and checksum."""

    key: WeightKey
    file: str
    nbytes: int  # payload bytes
    padded: int  # file size (multiple of ALIGN)
    crc32: int
    tensors: tuple[BlobTensor, ...]


def round_up(n: int, align: int = ALIGN) -> int:
    """n rounded up to a multiple of align."""
    return (n + align - 1) // align * align


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


def default_offload_dir(checkpoint: Checkpoint) -> Path:
    """$KLOTSKI_HOME/offload/<name>-<hash of the checkpoint's path>."""
    digest = zlib.crc32(str(checkpoint.path.resolve()).encode())
    return home() / "offload" / f"{checkpoint.path.name}-{digest:08x}"


class OffloadDir:
    """A repacked checkpoint: manifest + blobs; reads blobs into caller-provided aligned buffers."""

    def __init__(self, path: Path, blobs: dict[WeightKey, Blob], verify: str = "first"):
        self.path = path
        self.blobs = blobs
        self.verify = verify  # "first": check each blob's CRC on its first read; "always"; "never"
        self._verified: set[WeightKey] = set()
        self._lock = threading.Lock()
        self._direct = hasattr(os, "O_DIRECT")

    # -- creating -------------------------------------------------------------------------
    @classmethod
    def prepare(cls, checkpoint: Checkpoint, path: str | os.PathLike, keys: list[WeightKey] | None = None,
                progress: bool = False) -> OffloadDir:
        """Open the offload dir for this checkpoint, repacking it first when missing or stale."""
        path = Path(path)
        keys = keys if keys is not None else checkpoint.spec.weight_keys()
        fingerprint = source_fingerprint(checkpoint)
        existing = cls._load_manifest(path, fingerprint)
        if existing is not None and all(k in existing.blobs for k in keys):
            return existing
        cls._check_room(checkpoint, path, keys)
        blobs = {}
        total = sum(checkpoint.unit_nbytes(k) for k in keys)
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"repacking into {path}", file=sys.stderr,
                  disable=not progress) as bar:
            for key in keys:
                blobs[key] = cls._write_blob(checkpoint, path, key)
                bar.update(blobs[key].nbytes)
        manifest = {"version": FORMAT_VERSION, "source": str(checkpoint.path), "fingerprint": fingerprint,
                    "blobs": [cls._blob_json(b) for b in blobs.values()]}
        tmp = path / "manifest.json.tmp"
        tmp.write_text(json.dumps(manifest))
        os.replace(tmp, path / "manifest.json")
        return cls(path, blobs)

    @staticmethod
    def _check_room(checkpoint: Checkpoint, path: Path, keys: list[WeightKey]) -> None:
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".write-test"
            probe.write_bytes(b"x")
            probe.unlink()
        except OSError as exc:
            raise KlotskiError(
                f"offload dir {path} is not writable ({exc.strerror}); choose another --offload-dir"
            ) from None
        need = sum(round_up(checkpoint.unit_nbytes(k) + TENSOR_ALIGN * 16, ALIGN) for k in keys)
        free = shutil.disk_usage(path).free
        if free < need:
            raise KlotskiError(f"offload dir {path} has {free / 1e9:.2f} GB free but repacking needs "
                               f"{need / 1e9:.2f} GB; free space or choose another --offload-dir")

    @staticmethod
    def _write_blob(checkpoint: Checkpoint, path: Path, key: WeightKey) -> Blob:
        refs = checkpoint.units[key]
        offsets, payload = blob_layout([(name, ref.nbytes) for name, ref in refs.items()])
        buf = bytearray(round_up(max(payload, 1), ALIGN))
        tensors = []
        for (name, off), ref in zip(offsets, refs.values()):
            data = read_tensor(ref)
            check_finite(data, f"{key}.{name}", ref.path)  # the bytes pass through here once anyway
            buf[off: off + ref.nbytes] = data.contiguous().view(torch.uint8).numpy().tobytes()
            tensors.append(BlobTensor(name, off, ref.dtype, tuple(ref.shape)))
        fname = f"{key_name(key)}.bin"
        tmp = path / (fname + ".tmp")
        tmp.write_bytes(buf)
        os.replace(tmp, path / fname)
        return Blob(key, fname, payload, len(buf), zlib.crc32(memoryview(buf)[:payload]), tuple(tensors))

    @staticmethod
    def _blob_json(b: Blob) -> dict:
        return {"layer": b.key.layer, "part": b.key.part, "expert": b.key.expert, "file": b.file, "nbytes": b.nbytes,
                "padded": b.padded, "crc32": b.crc32,
                "tensors": [[t.name, t.offset, str(t.dtype).removeprefix("torch."), list(t.shape)] for t in b.tensors]}

    @classmethod
    def _load_manifest(cls, path: Path, fingerprint: list) -> OffloadDir | None:
        manifest = path / "manifest.json"
        if not manifest.is_file():
            return None
        try:
            data = json.loads(manifest.read_text())
        except json.JSONDecodeError:
            return None  # a torn manifest: repack
        if data.get("version") != FORMAT_VERSION or data.get("fingerprint") != fingerprint:
            return None
        blobs = {}
        for b in data["blobs"]:
            key = WeightKey(b["layer"], b["part"], b["expert"])
            tensors = tuple(BlobTensor(n, o, getattr(torch, d), tuple(s)) for n, o, d, s in b["tensors"])
            blobs[key] = Blob(key, b["file"], b["nbytes"], b["padded"], b["crc32"], tensors)
        return cls(path, blobs)

    # -- reading --------------------------------------------------------------------------
    def read_into(self, key: WeightKey, buf) -> dict[str, torch.Tensor]:
        """Read one blob into an aligned host buffer (one sequential read); return tensor views on it."""
        self.read_raw(key, buf)
        return self.views(self.blobs[key], buf)

    def read_raw(self, key: WeightKey, buf) -> None:
        """Read and check one blob's bytes into an aligned host buffer (mmap or pinned tensor)."""
        blob = self.blobs[key]
        self.check_read(key, buf, self._read(self.path / blob.file, buf, blob.padded))

    def read_part(self, key: WeightKey, buf, start: int, end: int) -> int:
        """Read bytes [start, end) of a blob (start aligned) into the same range of buf; bytes got.
        Parts of one blob read on several threads at once; `check_read` once all have landed."""
        return self._read(self.path / self.blobs[key].file, buf, end, start)

    def check_read(self, key: WeightKey, buf, got: int) -> None:
        """A blob's bytes are all in buf (`got` of them read) and match its checksum."""
        blob = self.blobs[key]
        file = self.path / blob.file
        if got < blob.nbytes:
            raise OffloadError(f"offload blob {file} is truncated ({got} of {blob.nbytes} bytes); "
                               f"delete {self.path} to repack it")
        self._check(blob, buf, file)

    def read_rows(self, key: WeightKey, name: str, rows: list[int]) -> torch.Tensor:
        """Rows of one tensor of a blob ([len(rows), ...]): the embedding lookup of a step reads a
        few KB per token, not the whole table.

        One small pread per row, ROW_READERS at a time (a lone small read waits out the disk's
        latency, so one by one they would add up every step). When the rows would cost more than
        reading the tensor, it is scanned once in 2 MiB chunks instead (a long prefill).
        """
        blob = self.blobs[key]
        tensor = next((t for t in blob.tensors if t.name == name), None)
        if tensor is None:
            raise OffloadError(f"offload blob {self.path / blob.file} has no tensor {name!r}; delete {self.path} "
                               "to repack it")
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
            raise OffloadError(f"offload blob {file} has vanished; the offload dir was removed during the run. "
                               f"Re-run to repack it") from None

        def read(i: int, r: int) -> None:
            if os.preadv(fd, [view[i * row:(i + 1) * row]], tensor.offset + r * row) != row:
                raise OffloadError(f"offload blob {file} is truncated; delete {self.path} to repack it")

        try:
            self._verify_whole(blob, fd, file)
            if len(rows) * ROW_READ_COST >= tensor.nbytes:
                self._scan_rows(fd, tensor, row, rows, view, file)
            elif len(rows) == 1:
                read(0, rows[0])
            else:
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead around each row
                for f in [_row_pool().submit(read, i, r) for i, r in enumerate(rows)]:
                    f.result()
        except OSError as exc:
            raise OffloadError(f"reading offload blob {file} failed: {exc.strerror}") from None
        finally:
            os.close(fd)
        return out

    def _scan_rows(self, fd: int, tensor: BlobTensor, row: int, rows: list[int], view, file: Path,
                   chunk: int = 2 * 2**20) -> None:
        """Copy `rows` (sorted) out of one sequential pass over the tensor."""
        per = max(chunk // row, 1)
        want = {r: i for i, r in enumerate(rows)}
        for first in range(0, tensor.shape[0], per):
            inside = [r for r in range(first, min(first + per, tensor.shape[0])) if r in want]
            if not inside:
                continue
            data = os.pread(fd, (inside[-1] - first + 1) * row, tensor.offset + first * row)
            for r in inside:
                i, at = want[r], (r - first) * row
                if len(data) < at + row:
                    raise OffloadError(f"offload blob {file} is truncated; delete {self.path} to repack it")
                view[i * row:(i + 1) * row] = data[at:at + row]

    def _verify_whole(self, blob: Blob, fd: int, file: Path, chunk: int = 2 * 2**20) -> None:
        """The checksum of a blob read only in parts: streamed 2 MiB at a time (never the whole blob
        in memory), once under verify="first"."""
        with self._lock:
            if self.verify == "never" or (self.verify == "first" and blob.key in self._verified):
                return
        crc, done = 0, 0
        while done < blob.nbytes and (data := os.pread(fd, min(chunk, blob.nbytes - done), done)):
            crc, done = zlib.crc32(data, crc), done + len(data)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # leave the page cache as it was
        if done < blob.nbytes:
            raise OffloadError(f"offload blob {file} is truncated ({done} of {blob.nbytes} bytes); "
                               f"delete {self.path} to repack it")
        if crc != blob.crc32:
            raise OffloadError(f"offload blob {file} fails its checksum (corrupt); delete {self.path} to repack it")
        with self._lock:
            self._verified.add(blob.key)

    def views(self, blob: Blob, buf) -> dict[str, torch.Tensor]:
        """Tensor views over a blob's bytes in a buffer, host or device (no copy)."""
        raw = buf if isinstance(buf, torch.Tensor) else torch.frombuffer(buf, dtype=torch.uint8, count=blob.padded)
        return {t.name: raw[t.offset: t.offset + t.nbytes].view(t.dtype).view(t.shape) for t in blob.tensors}

    def _check(self, blob: Blob, buf, file: Path) -> None:
        with self._lock:
            if self.verify == "never" or (self.verify == "first" and blob.key in self._verified):
                return
        data = buf.numpy().data if isinstance(buf, torch.Tensor) else memoryview(buf)
        if zlib.crc32(data[: blob.nbytes]) != blob.crc32:
            raise OffloadError(f"offload blob {file} fails its checksum (corrupt); delete {self.path} to repack it")
        with self._lock:
            self._verified.add(blob.key)

    def _read(self, file: Path, buf, length: int, start: int = 0) -> int:
        """pread bytes [start, length) of a blob: O_DIRECT when possible (no page-cache copy), else
        buffered; returns the bytes read."""
        view = (buf.numpy().data if isinstance(buf, torch.Tensor) else memoryview(buf))[:length]
        try:
            fd = os.open(file, os.O_RDONLY | (os.O_DIRECT if self._direct else 0))
        except FileNotFoundError:
            raise OffloadError(f"offload blob {file} has vanished; the offload dir was removed during the run. "
                               f"Re-run to repack it") from None
        except OSError:
            self._direct = False  # the filesystem refuses O_DIRECT (tmpfs, some overlays)
            return self._read(file, buf, length, start)
        try:
            done = start
            while done < length:
                n = os.preadv(fd, [view[done:min(done + READ_CHUNK, length)]], done)
                if n == 0:
                    break
                done += n
            return done - start
        except OSError as exc:
            if self._direct and exc.errno == 22:  # EINVAL: O_DIRECT not supported for this file
                self._direct = False
                return self._read(file, buf, length, start)
            raise OffloadError(f"reading offload blob {file} failed: {exc.strerror}") from None
        finally:
            os.close(fd)
