"""Peak memory of a block of code: allocated CUDA memory on a GPU, resident memory (RSS) of the process on a CPU."""

import ctypes
import ctypes.util
import gc
import re
from pathlib import Path

import torch

PROC_STATUS = Path("/proc/self/status")


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", PROC_STATUS.read_text(), re.MULTILINE).group(1))


def _make_rss_track_allocations() -> None:
    """Have glibc hand freed memory back to the system, so the resident set follows the memory in use.

    glibc keeps freed blocks for reuse: a block reused from earlier work does not raise the resident set, and by
    default blocks over 128 KiB stop going straight back to the system once large ones have been freed.
    """
    libc = ctypes.util.find_library("c")
    if libc:
        libc = ctypes.CDLL(libc)
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD, fixed: larger blocks are mapped and unmapped on free
        libc.malloc_trim(0)  # return what is free now


class PeakMemory:
    """`with PeakMemory() as peak: ...`; then peak.bytes is the most memory in use during the block beyond what
    was in use when it began (None where it cannot be measured: a CPU without Linux's /proc).

    On a CPU the process's high-water mark is reset at the start (Linux /proc/self/clear_refs), so the peak is this
    block's own; it includes the runtime's own allocations (thread buffers, kernel caches), as a GPU allocator's
    peak does not.
    """

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        self.bytes = None
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        elif PROC_STATUS.exists():
            _make_rss_track_allocations()
            Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak resident set to the current one
            self.start = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.start
        elif PROC_STATUS.exists():
            self.bytes = _status_kib("VmHWM") * 1024 - self.start
