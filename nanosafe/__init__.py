"""nanosafe: Safe RLHF in a few small files. See README.md."""

# the Python floor, checked once at import (X | None in dataclass fields is evaluated at run
# time); the transformers floor is checked in model.py, which imports it anyway
import sys as _sys

if _sys.version_info < (3, 10):
    raise ImportError(f"nanosafe needs Python >= 3.10 (found {_sys.version.split()[0]})")
