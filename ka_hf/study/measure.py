"""Wall time with the device synchronized, and peak memory: the one home for "how fast, how big".

    with Timer(device) as timer:
        run()
    timer.seconds

Peak memory is `torch.cuda.max_memory_allocated` on a CUDA device. On CPU it is the process's peak resident set
size: Linux lets a process reset its high-water mark (`/proc/self/clear_refs`), so `reset_peak_memory` makes each
measurement cover only what ran after it ("process peak RSS since reset"); where that is not possible the value
is the peak since the process started (`resource.getrusage(...).ru_maxrss`, KiB on Linux), and
`peak_memory_kind` says so.
"""

import resource
import sys
import time
from pathlib import Path

import torch

CLEAR_REFS = Path("/proc/self/clear_refs")
PROC_STATUS = Path("/proc/self/status")


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def synchronize(device) -> None:
    """Wait for queued device work, so that a clock reading covers it."""
    if _is_cuda(device):
        torch.cuda.synchronize(device)


class Timer:
    """Context manager: `seconds` is the wall time of the block, the device synchronized at both ends."""

    def __init__(self, device="cpu"):
        self.device = device
        self.seconds = 0.0

    def __enter__(self):
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._start
        return False


def reset_peak_memory(device) -> bool:
    """Start a new peak-memory measurement. Returns False when the CPU peak cannot be reset (see module doc)."""
    if _is_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        CLEAR_REFS.write_text("5")  # "5" resets the peak RSS (VmHWM) to the current RSS
        return True
    except OSError:
        return False


def peak_memory_bytes(device) -> int:
    """CUDA max allocated bytes, or the process peak RSS in bytes on CPU."""
    if _is_cuda(device):
        return int(torch.cuda.max_memory_allocated(device))
    peak_kib = _proc_status_kib("VmHWM")
    if peak_kib is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux
    return peak_kib * 1024


def peak_memory_kind(device, reset_worked: bool = True) -> str:
    """What `peak_memory_bytes` measured, in words for a report."""
    if _is_cuda(device):
        return "torch.cuda.max_memory_allocated"
    if reset_worked:
        return "process peak RSS since reset"
    return "process peak RSS since start"


def _proc_status_kib(field: str) -> int | None:
    try:
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])  # "VmHWM:    13648 kB"
    except (OSError, ValueError, IndexError):
        pass
    return None


class TensorPeakMemory:
    """Context manager: `peak_bytes` is the peak of tensor memory allocated inside the block, above what was live
    at its start. CUDA: `torch.cuda.max_memory_allocated`. CPU: torch's own tensor-memory tracker
    (`torch.distributed._tools.mem_tracker.MemTracker`, which follows every tensor storage made and freed), so the
    number is the tensors' bytes, not the process's resident set with the allocator's slack."""

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.peak_bytes = 0

    def __enter__(self):
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            from torch.distributed._tools.mem_tracker import MemTracker

            self._tracker = MemTracker()
            self._tracker.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device) - self._base)
        else:
            self._tracker.__exit__(*exc)
            peaks = self._tracker.get_tracker_snapshot("peak")
            self.peak_bytes = int(sum(peak["Total"] for peak in peaks.values()))
        return False

    @property
    def kind(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated above the start"
        return "peak tensor bytes (torch MemTracker) above the start"


def relative_rmse(x: torch.Tensor, reference: torch.Tensor) -> float:
    """flash-linear-attention's error ratio: RMS(x - reference) / RMS(reference), in float64."""
    x, reference = x.double(), reference.double()
    return ((x - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt()).item()
