"""Process memory: heap pages freed while building a session, given back to the operating system.

In the base layer so the runtime and the low-memory session builder share it without importing each other.
"""

from __future__ import annotations


def release_free_heap() -> None:
    """Give the heap pages freed while decoding back to the OS (glibc only; a no-op elsewhere).

    Building a session allocates and frees several copies of the weights;
    glibc keeps such freed heap memory mapped unless asked to trim it.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
