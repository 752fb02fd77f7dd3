"""nanosafe: Safe RLHF in a few small files. See README.md."""

# the floors the code really needs, checked once at import (transformers 4.55 fails on
# DynamicCache(config=...) and from_pretrained(dtype=...); found in a throwaway venv)
import sys as _sys

if _sys.version_info < (3, 10):
    raise ImportError(f"nanosafe needs Python >= 3.10 (found {_sys.version.split()[0]})")


def _check_transformers(minimum=(4, 56)):
    import transformers
    found = tuple(int(x) for x in transformers.__version__.split(".")[:2] if x.isdigit())
    if found < minimum:
        raise ImportError(f"nanosafe needs transformers >= {'.'.join(map(str, minimum))} "
                          f"(found {transformers.__version__}): pip install -U 'transformers>=4.56'")


_check_transformers()
