"""Shared timing, tagging, CSV and plotting helpers for the scripts in ``benchmarks/``.

Two numbers are measured for every case, side by side (see KERNELS.md, "Timing pitfalls"):

* device time (:func:`bench_device`): on CUDA, CUDA events around each call with the L2 cache
  flushed before it; on the CPU, wall time of each call with the last-level cache flushed before
  it. This is what the kernel costs.
* eager time (:func:`bench_eager`): host wall time per call of back-to-back eager calls. This is
  what a Python caller pays: argument checks, dispatch and launch, or the kernel itself when the
  device is slower than the host.

Iteration counts are always parameters so that a ``--quick`` run only has to pass smaller ones.
Progress goes to ``logging``; only a CLI's final result table is printed.
"""

from __future__ import annotations

import csv
import ctypes
import ctypes.util
import datetime as _dt
import logging
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch

logger = logging.getLogger("benchmarks")

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
REPO_ROOT = BENCH_DIR.parent

# Written before every timed call so that no input is still cached (L2: 50 MB on an H100, 60 MB on
# an H200; last-level cache on the CPU). Sized from the cache when it can be read, never below these.
_MIN_FLUSH_BYTES_CUDA = 256 << 20
_MIN_FLUSH_BYTES_CPU = 64 << 20


# ---- small utilities ------------------------------------------------------------------------

def setup_logging(verbose: bool = False) -> None:
    """Log progress to stderr, leaving stdout for the result table."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def resolve_device(choice: str) -> torch.device:
    """``"auto"`` -> cuda when a GPU is visible, else cpu; ``"cuda"`` without a GPU is an error."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
    return torch.device(choice)


def _as_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def synchronize(device) -> None:
    if _as_device(device).type == "cuda":
        torch.cuda.synchronize(device)


def retain_freed_cpu_memory() -> bool:
    """Make glibc serve large blocks from the heap and keep freed memory; True if it took.

    By default glibc maps every block above its mmap threshold (at most 32 MB) fresh from the
    kernel and unmaps it on free, so each call that allocates a 64 MB output first page-faults
    it in: at 2**24 values that costs more than the kernel (17 ms against 2.4 ms for a float32
    dequantize on a 2-core EPYC). Every implementation pays it equally, but it hides the kernels;
    a long-running process with a caching allocator (jemalloc, tcmalloc) does not pay it.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 1 << 30))


def _cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies over all CPUs from /proc/stat, None where there is none."""
    try:
        with open("/proc/stat", encoding="utf-8") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + (fields[4] if len(fields) > 4 else 0), sum(fields)  # idle + iowait


def others_busy_fraction(interval_s: float = 0.5) -> float | None:
    """Fraction of all CPU time used by other processes over ``interval_s`` (this one sleeps)."""
    before = _cpu_times()
    time.sleep(interval_s)
    after = _cpu_times()
    if before is None or after is None or after[1] == before[1]:
        return None
    return 1.0 - (after[0] - before[0]) / (after[1] - before[1])


def warn_if_busy(device, threshold: float = 0.2) -> float | None:
    """On a CPU run, measure how busy other processes keep the CPUs and warn above ``threshold``.

    Even one busy core slows torch's thread pool down by whole scheduler time slices. Returns the
    busy fraction (None on CUDA or where it cannot be read).
    """
    if _as_device(device).type != "cpu":
        return None
    busy = others_busy_fraction()
    if busy is not None and busy > threshold:
        logger.warning("other processes use %.0f%% of the %d CPUs: CPU timings will be slow and noisy",
                       100 * busy, os.cpu_count() or 0)
    return busy


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class Timing:
    """Median and 20th/80th percentiles of one measurement, in microseconds."""

    median_us: float
    p20_us: float
    p80_us: float
    samples: int
    method: str  # "cuda events", "cpu wall" or "host wall"

    @classmethod
    def from_samples(cls, samples_us: Sequence[float], method: str) -> "Timing":
        return cls(percentile(samples_us, 50), percentile(samples_us, 20), percentile(samples_us, 80),
                   len(samples_us), method)


# ---- timing ---------------------------------------------------------------------------------

_flush_buffers: dict[torch.device, torch.Tensor] = {}


def _cpu_last_level_cache_bytes() -> int:
    """Largest cache of CPU 0 per sysfs (Linux), 0 when unknown."""
    largest = 0
    for size_file in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = size_file.read_text().strip().upper()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            largest = max(largest, int(digits) * scale)
    return largest


def _cache_flush_buffer(device: torch.device) -> torch.Tensor:
    if device not in _flush_buffers:
        if device.type == "cuda":
            cache = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0
            nbytes = max(_MIN_FLUSH_BYTES_CUDA, 4 * cache)
        else:
            nbytes = max(_MIN_FLUSH_BYTES_CPU, 4 * _cpu_last_level_cache_bytes())
        _flush_buffers[device] = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return _flush_buffers[device]


def bench_device(fn: Callable[[], object], *, warmup: int, iters: int, flush_l2: bool = True,
                 device=None) -> Timing:
    """Time ``fn()`` on the device, per call.

    CUDA: one pair of events around each call on the current stream, the L2 flushed (a large
    ``zero_`` on the same stream) before each call and outside the timed region. The flush also
    keeps the GPU busy while the host enqueues the call, so the events see the kernel, not the
    host's gap before it; without the flush a call cheaper than its host path is timed as the
    host path. CPU: ``time.perf_counter`` around each call (method "cpu wall"), the last-level
    cache likewise flushed before each call when ``flush_l2`` (a 2**22-value float32 input is
    16 MB, inside a 32 MB L3, and would otherwise be timed faster than the memory allows).
    """
    if iters < 1:
        raise ValueError("bench_device: iters must be >= 1")
    device = _as_device(device)
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        flush = _cache_flush_buffer(device) if flush_l2 else None
        samples = []
        for _ in range(iters):
            if flush is not None:
                flush.zero_()
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e6)
        return Timing.from_samples(samples, "cpu wall")

    with torch.cuda.device(device):
        flush = _cache_flush_buffer(device) if flush_l2 else None
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        torch.cuda.synchronize(device)
        for i in range(iters):
            if flush is not None:
                flush.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize(device)
        samples = [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]  # ms -> us
    return Timing.from_samples(samples, "cuda events")


def bench_eager(fn: Callable[[], object], *, warmup: int, iters: int, repeats: int = 5, device=None) -> Timing:
    """Host wall time per call of ``iters`` back-to-back eager calls, over ``repeats`` repeats.

    On CUDA the device is synchronized before the first and after the last call of a repeat, so a
    call whose kernel outlasts its host path is counted at the kernel's speed (the launch queue
    fills up); for small inputs this is the Python, dispatch and launch cost per call.
    """
    if iters < 1 or repeats < 1:
        raise ValueError("bench_eager: iters and repeats must be >= 1")
    device = _as_device(device)
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        synchronize(device)
        samples.append((time.perf_counter() - t0) * 1e6 / iters)
    return Timing.from_samples(samples, "host wall")


def time_capped(fn: Callable[[], object], *, warmup: int, iters: int, eager_iters: int, eager_repeats: int,
                max_seconds: float, device) -> dict:
    """Device time and eager time of ``fn``, iteration counts lowered (device calls not below 3)
    so that a slow call (a reference implementation, say) fits in ``max_seconds``, half for each
    measurement (0 = no cap). One synchronized call first estimates the cost; the caller has
    already run ``fn`` once (compiled, autotuned). Returns the row fields of both timings."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    per_call = time.perf_counter() - t0
    half = max_seconds / 2
    if max_seconds > 0 and per_call > 0:
        iters = min(iters, max(3, int(half / per_call)))
        eager_iters = max(1, min(eager_iters, int(half / (per_call * eager_repeats))))
    dev = bench_device(fn, warmup=warmup, iters=iters, device=device)
    eager = bench_eager(fn, warmup=0, iters=eager_iters, repeats=eager_repeats, device=device)
    return {"method": dev.method, "device_us": dev.median_us, "device_us_p20": dev.p20_us,
            "device_us_p80": dev.p80_us, "iters": iters, "eager_us": eager.median_us}


def size_pair(text: str, example: str = "4096x11008") -> tuple[int, int]:
    """argparse type: two positive sizes written ``AxB``."""
    import argparse

    try:
        a, b = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected two sizes like {example}") from None
    if a <= 0 or b <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: sizes must be positive")
    return a, b


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    import argparse

    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a positive integer")
    return value


def measure_copy_bandwidth(device, nbytes: int = 1 << 30, *, warmup: int = 2, iters: int = 10) -> float:
    """Achieved ``dst.copy_(src)`` bandwidth in bytes/s, counting bytes read plus bytes written.

    The median over ``iters`` copies; the buffers are far larger than any cache, so no flush.
    """
    device = _as_device(device)
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timing = bench_device(lambda: dst.copy_(src), warmup=warmup, iters=iters, flush_l2=False, device=device)
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * nbytes / (timing.median_us * 1e-6)


# ---- run tags -------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_commit() -> str:
    """Short HEAD hash, with "-dirty" when the work tree has changes; "unknown" outside a repo."""
    head = _git("rev-parse", "--short", "HEAD")
    if head is None:  # not a repository, no git, or no commit yet
        return "unknown"
    status = _git("status", "--porcelain")
    return head + ("-dirty" if status else "")


def env_tags(device=None) -> dict[str, str]:
    """Tags written on every CSV row: card, date, commit, versions."""
    device = _as_device(device)
    if device.type == "cuda":
        card = torch.cuda.get_device_name(device)
    else:
        card = f"{_cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {
        "card": card,
        # Other processes on the machine skew CPU timings most; the 1-minute load average says how busy it was.
        "load1": f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "unknown",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "torch": torch.__version__,
        "triton": triton_version,
    }


# ---- output ---------------------------------------------------------------------------------

class CsvWriter:
    """Appends result rows to a CSV file, each with ``tags`` (default: :func:`env_tags`) added.

    A new file gets a header. An existing file whose header differs from the new rows' columns is
    moved aside to ``<name>.<timestamp>.csv`` rather than mixed with them.
    """

    def __init__(self, path, tags: Mapping[str, str] | None = None):
        self.path = Path(path)
        self.tags = dict(env_tags() if tags is None else tags)

    def write(self, rows: Iterable[Mapping[str, object]]) -> None:
        rows = list(rows)
        if not rows:
            return
        fields: list[str] = []
        for row in rows:
            fields.extend(k for k in row if k not in fields)
        fields.extend(k for k in self.tags if k not in fields)  # the tags last, after every row's own columns
        rows = [{**row, **self.tags} for row in rows]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, newline="", encoding="utf-8") as f:
                existing = next(csv.reader(f), [])
            if existing != fields:
                stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
                aside = self.path.with_name(f"{self.path.stem}.{stamp}{self.path.suffix}")
                logger.warning("%s has other columns; moved it to %s", self.path, aside)
                self.path.rename(aside)
        new = not self.path.exists() or self.path.stat().st_size == 0
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            if new:
                writer.writeheader()
            writer.writerows(rows)
        logger.info("wrote %d rows to %s", len(rows), self.path)


def plot_bars(rows: Sequence[Mapping[str, object]], path, *, group_key: Callable[[Mapping], str],
              series_key: Callable[[Mapping], str], value_key: str, ylabel: str, title: str,
              tags: Mapping[str, str] | None = None, hline: float | None = None,
              hline_label: str | None = None, marked: Callable[[Mapping], bool] | None = None,
              marked_label: str = "marked", logy: bool = False) -> None:
    """Grouped bar chart: one group per ``group_key(row)``, one bar colour per ``series_key(row)``.

    The card, date and commit from ``tags`` go into the title; ``hline`` draws a reference line
    (e.g. the measured copy bandwidth); bars of rows where ``marked(row)`` is true are hatched
    (e.g. results that failed a check). Uses the Agg backend, so it works without a display.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    tags = env_tags() if tags is None else tags
    groups: list[str] = []
    series: list[str] = []
    values: dict[tuple[str, str], tuple[float, bool]] = {}
    for row in rows:
        g, s = group_key(row), series_key(row)
        if g not in groups:
            groups.append(g)
        if s not in series:
            series.append(s)
        values[(g, s)] = (float(row[value_key]), bool(marked and marked(row)))
    if not groups:
        logger.warning("plot_bars: no rows, no plot")
        return

    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(8.0, 1.2 * len(groups) + 2), 5.5))
    any_marked = False
    handles: list = []
    for i, s in enumerate(series):
        present = [(j, values[(g, s)]) for j, g in enumerate(groups) if (g, s) in values]
        offset = (i - (len(series) - 1) / 2) * width
        bars = ax.bar([j + offset for j, _ in present], [v for _, (v, _) in present], width=width)
        # A plain legend entry per series: the first bar may be hatched.
        handles.append(Patch(facecolor=bars.patches[0].get_facecolor(), label=s))
        for bar, (_, (_, is_marked)) in zip(bars, present):
            if is_marked:
                bar.set_hatch("//")
                bar.set_edgecolor("black")
                any_marked = True
    if hline is not None:
        handles.append(ax.axhline(hline, color="black", linestyle="--", linewidth=1, label=hline_label))
    if any_marked:
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label=marked_label))
    if logy:
        ax.set_yscale("log")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title}\n{tags.get('card', '?')}, {tags.get('date', '?')[:10]}, commit {tags.get('commit', '?')}",
                 fontsize=10)
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3, which="both" if logy else "major")
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path) -> None:
    """Write a matplotlib figure as a PNG (creating the folder) and close it."""
    import matplotlib.pyplot as plt

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    logger.info("wrote plot %s", path)


def fmt_float(v: float) -> str:
    """4 significant digits, without an exponent for values up to 10**9."""
    return f"{v:.0f}" if 1e4 <= abs(v) < 1e9 else f"{v:.4g}"


def format_table(rows: Sequence[Mapping[str, object]], columns: Sequence[tuple[str, str]]) -> str:
    """A plain-text table of ``rows``; ``columns`` are (key, header) pairs. Floats get 4 significant digits."""

    def cell(v) -> str:
        if v is None or v == "":
            return "-"
        if isinstance(v, float):
            return fmt_float(v)
        return str(v)

    body = [[cell(row.get(k)) for k, _ in columns] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, (_, h) in enumerate(columns)]
    lines = ["  ".join(h.ljust(w) for (_, h), w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(lines)
