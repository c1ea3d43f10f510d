"""Hardware profiles: link bandwidths and per-op compute times, measured once and cached.

A profile is either measured here (`klotski profile`), written by hand from public figures (the
paper's Env 1 and Env 2 ship in klotski/data/hardware/), or the built-in estimate used when no
cached profile exists. Measured op times are fits at one model's shapes and compute dtype; where
a profile has no fit for an op, the cost model falls back to a roofline over its peak figures.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from klotski.errors import KlotskiError
from klotski.models.spec import EXPERT, WeightKey
from klotski.paths import home
from klotski.runtime.compute_dtype import cpu_flags, cpu_name
from klotski.store.offload import CHECK_CHUNK, READ_CHUNK, check_chunk, chunk_crcs
from klotski.store.tiered import READERS, part_cuts

BUNDLED = {"env1": "env1-rtx3090.json", "env2": "env2-h800.json"}


@dataclass(frozen=True)
class OpFit:
    """seconds = a + b * tokens + c * tokens * context (c only for attention)."""

    a: float
    b: float
    c: float = 0.0

    def __call__(self, tokens: float, context: float = 0.0) -> float:
        return self.a + self.b * tokens + self.c * tokens * context


@dataclass
class HardwareProfile:
    """One machine's links and compute, as the cost model reads them."""

    name: str
    source: str  # "measured" | "estimate from public figures" | "built-in estimate"
    device: str  # "cuda" | "cpu"
    disk_gbps: float  # disk -> host (or -> the device tier on a CPU-only machine), O_DIRECT
    host_to_device_gbps: float | None  # None: the device tier is host memory, no copy needed
    peak_tflops: float  # dense matmul peak in the compute dtype
    efficiency: float  # share of the peak a matmul reaches (roofline fallback only)
    memory_gbps: float  # device memory bandwidth: small batches stream the weights at this rate
    op_overhead_s: float = 20e-6  # fixed cost per op (kernel launches, Python dispatch)
    io_latency_s: float = 50e-6  # fixed cost per transfer
    # The pipeline overlaps reads with compute; on a small CPU machine each slows the other.
    # Measured by `klotski profile` the way the store reads (profile.timed_read) beside the expert
    # op run back to back: op time with reads running / alone, and the disk rate then (None: not
    # measured). A GPU's copy engines do not contend: 1.0 / None there.
    compute_slowdown_under_io: float = 1.0
    disk_gbps_beside_compute: float | None = None
    device_memory: int | None = None
    host_memory: int | None = None
    machine: dict = field(default_factory=dict)
    ops: dict = field(default_factory=dict)  # "<shape key>|<dtype>" -> op name -> OpFit fields
    notes: str = ""

    @property
    def pipeline_disk_gbps(self) -> float:
        """The disk rate a run's reads are predicted at: the harmonic mean of the rates the profile
        read (alone, and beside compute where measured), the same read pattern seconds apart. One
        reading of a second or less held for no run on a disk whose rate moved by a third between
        seconds (0.85-1.39 GB/s alone and 1.09-1.57 beside compute across ten quick profiles of
        2026-12-01, beside compute higher in eight); the harmonic mean is the rate of a fixed
        amount of bytes split evenly over the readings' moments."""
        rates = [r for r in (self.disk_gbps, self.disk_gbps_beside_compute) if r]
        return len(rates) / sum(1.0 / r for r in rates) if rates else self.disk_gbps

    def fits(self, shape_key: str, dtype: torch.dtype) -> dict[str, OpFit]:
        """Measured op fits for these shapes and this dtype (empty when not measured)."""
        raw = self.ops.get(f"{shape_key}|{_dtype_name(dtype)}", {})
        return {op: OpFit(**v) for op, v in raw.items()}

    @property
    def calibrated(self) -> bool:
        """Measured on a machine (this one, when it came from the cache); else an estimate."""
        return self.source == "measured"

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict) -> HardwareProfile:
        known = set(cls.__dataclass_fields__)
        missing = {"name", "disk_gbps", "peak_tflops", "memory_gbps"} - set(data)
        if missing:
            raise KlotskiError(f"hardware profile lacks {', '.join(sorted(missing))}")
        data = {"source": "hand-written", "device": "cuda", "host_to_device_gbps": None, "efficiency": 0.5} | data
        return cls(**{k: v for k, v in data.items() if k in known})


def load_profile(spec: str | Path) -> HardwareProfile:
    """A profile from a JSON file or a bundled name (env1, env2)."""
    if str(spec) in BUNDLED and not Path(spec).exists():
        res = resources.files("klotski") / "data" / "hardware" / BUNDLED[str(spec)]
        return HardwareProfile.from_dict(json.loads(res.read_text()))
    path = Path(spec)
    if not path.is_file():
        raise KlotskiError(
            f"hardware profile {path} not found; pass a JSON written by `klotski profile` "
            f"or one of {', '.join(BUNDLED)}"
        )
    try:
        return HardwareProfile.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise KlotskiError(f"{path} is not a hardware profile ({exc})") from None


def builtin_estimate(device: str = "cpu", dtype: torch.dtype | None = None) -> HardwareProfile:
    """The roofline estimate (`--hardware builtin`): this project's CPU figures, or a generic GPU.

    Only when asked for: on some machines it predicted 12x the measured tokens/s."""
    uncalibrated = (
        "uncalibrated: this project's figures (docs/planner.md), not this machine's; --hardware auto measures"
    )
    if device == "cpu":
        # The figures of docs/planner.md ("Built-in estimate"): the low end of what this project's
        # machine measured (disk, fp32 over upcast weights, bf16 as stored); with fp32's figure for
        # bf16 compute, plans predicted a tenth of the measured tokens/s.
        half = dtype in (torch.bfloat16, torch.float16)
        return HardwareProfile(
            "built-in cpu",
            "built-in estimate",
            "cpu",
            disk_gbps=1.4,
            host_to_device_gbps=None,
            peak_tflops=0.37 if half else 0.032,
            efficiency=1.0,
            memory_gbps=5.0,
            op_overhead_s=100e-6,
            io_latency_s=200e-6,
            machine=machine_fingerprint(),
            notes=uncalibrated,
        )
    return HardwareProfile(
        "built-in gpu",
        "built-in estimate",
        "cuda",
        disk_gbps=2.0,
        host_to_device_gbps=20.0,
        peak_tflops=100.0,
        efficiency=0.5,
        memory_gbps=1000.0,
        machine=machine_fingerprint(),
        notes="uncalibrated: a generic PCIe 4.0 GPU, not this machine; --hardware auto measures",
    )


# -- the cache ---------------------------------------------------------------------------------
def machine_fingerprint(disk_dir: str | Path | None = None) -> dict:
    """What a measured profile is valid for: CPU model and flags, cores and threads, memory, torch,
    GPU, and the filesystem the disk tier reads from (`disk_dir`, else the profiles directory).

    No hostname: a container's changes every session on the same hardware, and two hosts of one
    machine type may share a profile; a different CPU, flag set or disk makes a new one."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu_name(),
        "cpu_flags": cpu_flags(_read_text("/proc/cpuinfo")),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": _mem_total(),
        "torch": torch.__version__,
        "gpu": gpu,
        "disk": disk_identity(disk_dir or profiles_dir()),
    }


def _mem_total() -> int | None:
    for line in _read_text("/proc/meminfo").splitlines():
        if line.startswith("MemTotal"):
            return int(line.split()[1]) * 1024
    return None


def disk_identity(directory: str | Path) -> dict:
    """The device and filesystem holding `directory` (its nearest existing ancestor, since an
    offload dir is made only when the store first fills it): st_dev as major:minor, and the
    /proc/mounts entry (source, type, mount point) with the longest matching mount point."""
    path = existing_ancestor(directory)
    dev = _st_dev(path)
    mount = {"source": None, "fstype": None, "mount_point": None}
    best = -1
    for line in _read_text("/proc/mounts").splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = str(path) == point or str(path).startswith(point.rstrip("/") + "/")
        if inside and len(point) > best:
            best, mount = len(point), {"source": fields[0], "fstype": fields[2], "mount_point": point}
    return {"st_dev": f"{os.major(dev)}:{os.minor(dev)}"} | mount


def existing_ancestor(directory: str | Path) -> Path:
    path = Path(directory).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _st_dev(path: Path) -> int:
    return os.stat(path).st_dev


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:  # not Linux, or a sandbox without /proc
        return ""


def profiles_dir() -> Path:
    return home() / "profiles"


def cache_path(shape_key: str, dtype: torch.dtype, device: str, disk_dir: str | Path | None = None) -> Path:
    """$KLOTSKI_HOME/profiles/<device>-<dtype>-<hash of the machine fingerprint and shapes>.json."""
    m = machine_fingerprint(disk_dir)
    digest = zlib.crc32(json.dumps([m, shape_key, _dtype_name(dtype), device], sort_keys=True).encode())
    return profiles_dir() / f"{device}-{_dtype_name(dtype)}-{digest:08x}.json"


def cached_profile(
    shape_key: str, dtype: torch.dtype, device: str, disk_dir: str | Path | None = None
) -> tuple[HardwareProfile, Path] | None:
    """The measured profile for this machine, disk, shapes and dtype, if one was saved."""
    path = cache_path(shape_key, dtype, device, disk_dir)
    if not path.is_file():
        return None
    try:
        return HardwareProfile.from_dict(json.loads(path.read_text())), path
    except (json.JSONDecodeError, KlotskiError, TypeError):
        return None  # a stale or broken cache entry is remeasured, not fatal


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- measuring links -----------------------------------------------------------------------------
@contextlib.contextmanager
def scratch_file(directory: str | Path | None, size: int, chunk: int, prefix: str):
    """A fresh file of size // chunk random chunks, synced to disk, removed afterwards.

    In `directory`'s nearest existing ancestor (an offload dir is made by the store, not here),
    else the profiles directory where that is not writable."""
    fd, name = _mkstemp(existing_ancestor(directory or profiles_dir()), prefix)
    try:
        # One random block (at most 16 MiB) written over and over: an expert blob can be 350 MiB.
        block = np.random.default_rng(0).integers(0, 255, min(chunk, 16 << 20), dtype=np.uint8).tobytes()
        with os.fdopen(fd, "wb") as f:
            left = size // chunk * chunk
            while left > 0:
                f.write(block[: min(left, len(block))])
                left -= min(left, len(block))
            f.flush()
            os.fsync(f.fileno())
        yield name
    finally:
        os.unlink(name)


def _mkstemp(directory: Path, prefix: str) -> tuple[int, str]:
    try:
        return tempfile.mkstemp(dir=directory, prefix=prefix, suffix=".bin")
    except OSError:  # a read-only or foreign offload dir: measure beside the profiles instead
        profiles_dir().mkdir(parents=True, exist_ok=True)
        return tempfile.mkstemp(dir=profiles_dir(), prefix=prefix, suffix=".bin")


def store_ranges(size: int, blob: int, readers: int, split: bool) -> list[list[tuple[int, int]]]:
    """Per reader thread, the byte ranges it reads of a file of size // blob blobs, as the store's
    reader threads share them: each thread its part of every blob, cut where the store cuts an
    expert blob of that size (`split`: store.tiered.reads_in_parts), or every readers-th whole blob."""
    blobs = [(k * blob, (k + 1) * blob) for k in range(max(size // blob, 1))]
    if not split:
        return [blobs[i::readers] or blobs[:1] for i in range(readers)]
    cuts = part_cuts(blob, readers, check_chunk(WeightKey(0, EXPERT, 0), blob))
    return [[(lo + a, lo + b) for lo, _ in blobs] for a, b in zip(cuts, cuts[1:])]


def timed_read(name: str, size: int, blob: int, readers: int = READERS, split: bool = True) -> tuple[float, str]:
    """Disk -> memory GB/s reading `size` bytes of `name` as the store reads blobs of `blob` bytes:
    `readers` threads at once, O_DIRECT preads of READ_CHUNK, every checksum chunk hashed
    (`store_ranges` says which thread reads what); (GB/s, method)."""
    start = time.perf_counter()
    with _reading(name, size, blob, readers, split) as lanes:
        while sum(r.bytes for r in lanes) < size and all(r.running for r in lanes):
            time.sleep(0.002)
    return sum(r.bytes for r in lanes) / (time.perf_counter() - start) / 1e9, lanes[0].method


@contextlib.contextmanager
def _reading(name: str, size: int, blob: int, readers: int, split: bool):
    """The reader threads of `store_ranges`, running; on the way out every one is stopped and
    joined, and the first error one of them met is raised."""
    lanes = [_Reader(name, ranges) for ranges in store_ranges(size, blob, readers, split)]
    with contextlib.ExitStack() as stack:
        for lane in lanes:
            stack.enter_context(lane)
        yield lanes


class _Reader:
    """A thread that reads its byte ranges of a file over and over, as one of the store's reader
    threads reads blobs (O_DIRECT, READ_CHUNK per pread, each checksum chunk hashed with the
    store's hash), until stopped."""

    def __init__(self, name: str, ranges: list[tuple[int, int]]):
        import threading

        self.name, self.ranges = name, ranges
        self.bytes, self.seconds, self.method, self.running = 0, 0.0, "O_DIRECT", True
        self.error: BaseException | None = None  # what stopped the thread, raised by __exit__
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        try:
            self._read()
        except BaseException as exc:  # noqa: BLE001 - handed to the measuring thread by __exit__
            self.error = exc
        finally:
            self.running = False

    def _read(self) -> None:
        piece = min(READ_CHUNK, max(hi - lo for lo, hi in self.ranges))
        buf = mmap.mmap(-1, piece)  # page-aligned, as O_DIRECT needs
        view = memoryview(buf)
        try:
            fd = os.open(self.name, os.O_RDONLY | os.O_DIRECT)
        except (OSError, AttributeError):  # tmpfs and some filesystems refuse O_DIRECT
            fd, self.method = os.open(self.name, os.O_RDONLY), "buffered after fadvise(DONTNEED)"
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        start = time.perf_counter()
        try:
            while not self._stop.is_set():
                for lo, hi in self.ranges:
                    at = lo
                    while at < hi and not self._stop.is_set():
                        n = os.preadv(fd, [view[: min(piece, hi - at)]], at)
                        if n <= 0:
                            return
                        chunk_crcs(view[:n], n, CHECK_CHUNK)  # the store checks every byte it reads
                        at += n
                        self.bytes += n
                        self.seconds = time.perf_counter() - start  # up to the last completed read
        finally:
            view.release()
            os.close(fd)
            buf.close()

    def __enter__(self) -> _Reader:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self.error is not None:
            raise self.error

    @property
    def gbps(self) -> float:
        return self.bytes / max(self.seconds, 1e-9) / 1e9


def measure_contention(
    op,
    size: int,
    blob: int,
    seconds: float = 0.5,
    readers: int = READERS,
    *,
    path: str,
    split: bool = True,
) -> dict:
    """How much disk reads slow `op` (a compute callable), and the disk rate beside it.

    `readers` threads read `path` (a file of `size` bytes, blobs of `blob` bytes) as the store's
    reader threads do (see `timed_read`). Returns {"compute_slowdown_under_io": op time with the
    readers running / alone (>= 1), "disk_gbps_beside_compute": the readers' total rate while
    `op` runs back to back}.
    """
    op()  # warm-up
    alone = _op_times(op, seconds)
    with _reading(path, size, blob, readers, split) as lanes:
        busy = _op_times(op, seconds)
        least = 2 * min(hi - lo for lane in lanes for lo, hi in lane.ranges)  # two whole parts a lane
        while min(r.bytes for r in lanes) < least and all(r.running for r in lanes):
            busy += _op_times(op, 0.0)
    return {
        "compute_slowdown_under_io": max(1.0, float(np.median(busy) / np.median(alone))),
        "disk_gbps_beside_compute": sum(r.gbps for r in lanes),
    }


def _op_times(op, seconds: float) -> list[float]:
    """Each call's time, calling `op` back to back for about `seconds` (at least 3 calls)."""
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 3:
        start = time.perf_counter()
        op()
        times.append(time.perf_counter() - start)
    return times


def measure_host_to_device(size: int = 256 << 20, reps: int = 3) -> float | None:
    """Pinned host -> device copy bandwidth (GB/s) on CUDA; None without a GPU."""
    if not torch.cuda.is_available():
        return None
    src = torch.empty(size, dtype=torch.uint8).pin_memory()
    dst = torch.empty(size, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return size * reps / (time.perf_counter() - start) / 1e9
