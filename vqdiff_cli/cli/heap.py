"""The C heap of a command that runs a model: memory that torch frees is kept for its next tensors, not given back.

By default glibc's malloc gives every block above its mmap threshold (128 KiB, rising to at most 32 MiB as such
blocks are freed) a mapping of its own, unmapped again on free, and returns the free top of its heap to the kernel.
A transformer forward on the CPU allocates and frees hundreds of megabytes of activations per block (the ITHQ
feed-forward's hidden states alone are 46 MB, above any threshold), so every forward touched fresh pages that the
kernel had to zero and map: 2.3 to 2.8 million page faults per ITHQ forward measured in `vqdiff generate`, and about
1.4 to 1.8 million in diffusers (BENCHMARKS.md, "End to end, whole processes"). With mmap and trimming off, the
heap grows once to the peak the run needs and is reused from then on (9 thousand faults in the second forward).

Process-wide, so only the CLI calls it, once per command and after the model is loaded (a first load converts
gigabytes of weights, memory that should go back to the OS); the library never changes the process's allocator.
"""

from __future__ import annotations

import ctypes
import platform

# mallopt(3) parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
NO_TRIMMING = -1  # M_TRIM_THRESHOLD of -1: never trim the heap's top


def keep_freed_memory() -> bool:
    """Make glibc's malloc serve every allocation from its heap and never trim it; False where the C library is not
    glibc (musl, macOS, Windows), which is then left as it is."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, NO_TRIMMING))
