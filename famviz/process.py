"""Process-level memory helpers: resident memory (now and peak), and glibc heap settings.

Used by the CLI's stream summary, the benchmark and the app's load test; none of it is model code.
"""

from __future__ import annotations

import resource


def peak_rss_mb() -> float:
    """Peak resident memory of the whole process (model loading included)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def reset_window_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (VmHWM) so a phase's own peak can be read (Linux only)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _status_mb(field: str) -> float | None:
    """A memory figure (kB) of /proc/self/status in MB; None where /proc is not available."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def window_peak_rss_mb() -> float | None:
    """Peak RSS since the last ``reset_window_peak_rss`` (None where /proc is not available)."""
    return _status_mb("VmHWM")


def current_rss_mb() -> float | None:
    """Resident memory of the process now (None where /proc is not available)."""
    return _status_mb("VmRSS")


def trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc), so a peak counts live memory, not old slack."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def steady_heap(threshold: int = 64 * 1024) -> bool:
    """Make glibc serve allocations over ``threshold`` bytes with mmap, so every freed block tensor goes
    back to the OS at once. By default glibc raises that threshold as it goes and the heap fragments:
    a CPU stream's RSS then creeps by a few MB per block (measured: 822 -> 970 MB over 24 blocks on the
    bundled model; flat at 804 MB with this). Process-wide, so it is opt-in: the bench calls it.
    Returns False where it does not apply (not glibc)."""
    import ctypes

    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, threshold))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False
