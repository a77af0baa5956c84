"""A guard for native libraries that do not get along in one process.

usearch's wheel links its own copy of libstdc++ statically and exports its symbols; a C++ library loaded after it
that uses the system's libstdc++ (ONNX Runtime 1.23 and later) then crashes in its locale set-up: ``import
usearch.index; import onnxruntime`` ends in SIGSEGV. Loading the system's libstdc++ with RTLD_GLOBAL first, before
usearch can be imported, makes every later library bind to that one (``tests/test_runtime.py`` checks the order
that crashed). Costs nothing where it is already loaded; does nothing off Linux.
"""

from __future__ import annotations

import ctypes
import os
import sys


def load_libstdcxx_globally() -> bool:
    """Load ``libstdc++.so.6`` into the global symbol namespace; False where there is none (not Linux/glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        ctypes.CDLL("libstdc++.so.6", mode=os.RTLD_GLOBAL)
    except OSError:
        return False
    return True
