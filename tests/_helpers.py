"""Helpers for the trustworthy-runs tests (test_trust.py, test_ddp.py, test_resume.py).

- `tiny_world`: a tiny toy policy folder and small SFT / preference files, built once per session
- `run_script`: a stage script through subprocess, one thread, tiny settings
- `ForkServer`: runs a stage script in forked children of one process that has already paid
  for the slow imports (torch, transformers: ~4 s here), so a test can kill 20 runs at random
  points in seconds. `python tests/_helpers.py --fork-server` is that process.

Stage 3 (train_ppo_lag.py) plugs in the same way: add its flags to `tiny_args` and its
checkpoint files to `load_weights`; `run_script`, `ForkServer` and `run_torchrun` take any script.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(
    os.environ,
    OMP_NUM_THREADS="1",
    MKL_NUM_THREADS="1",
    TOKENIZERS_PARALLELISM="false",
    PYTHONUNBUFFERED="1",
    PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
)
for _k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(_k, None)  # a test run from inside torchrun must still start plain processes

# tiny settings every stage run shares; a test adds --out_dir, --max_steps, ...
SFT = {"max_length": 48, "batch_size": 4, "gold_samples": 0}
PM = {"max_length": 48, "batch_size": 4, "kind": "cost"}


def flags(**kw) -> list:
    """flags(max_steps=3, resume=True) -> ['--max_steps', '3', '--resume']; None and False are left
    out."""
    out = []
    for k, v in kw.items():
        if v is None or v is False:
            continue
        out += [f"--{k}"] if v is True else [f"--{k}", str(v)]
    return out


def tiny_args(world: dict, script: str, out_dir, **kw) -> list:
    """Flags for a tiny run of `script` on the tiny world; kw overrides the defaults."""
    if script == "train_sft.py":
        base = dict(SFT, model=world["policy"], train_data=world["sft"], data_dir=world["data_dir"])
    elif script == "train_pm.py":
        base = dict(PM, model=world["policy"], train_data=world["pref"], data_dir=world["data_dir"])
    else:
        raise ValueError(f"no tiny settings for {script} yet")
    return flags(**dict(base, out_dir=out_dir, **kw))


def run_script(
    script: str, args: list, timeout: float = 300, env: dict = None
) -> subprocess.CompletedProcess:
    """`python script args...` from the repository root, one thread, output captured as text."""
    return subprocess.run(
        [sys.executable, script, *map(str, args)],
        cwd=ROOT,
        env=env or ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# -----------------------------------------------------------------------------
# the tiny world: built once per session, shared by the three test files


def tiny_world(tmp_path_factory) -> dict:
    """{'policy', 'sft', 'pref', 'data_dir'}: a tiny random toy policy (~0.16M params) and 64 SFT
    records / 64 preference pairs of the toy world (seed 0). Cached under the session's base temp
    folder, so the three files' session fixtures build it once."""
    base = tmp_path_factory.getbasetemp() / "trust_world"
    world = {
        "policy": str(base / "policy"),
        "sft": str(base / "sft.jsonl"),
        "pref": str(base / "pref.jsonl"),
        "data_dir": str(base / "toy_unused"),
    }  # never written: every run names its files
    if (base / "done").exists():
        return world
    from nanosafe import toy
    from nanosafe.model import save_checkpoint
    from nanosafe.toy import toy_model, toy_tokenizer

    base.mkdir(exist_ok=True)
    tok = toy_tokenizer()
    save_checkpoint(world["policy"], toy_model(tok, "tiny", seed=0), tok, {"kind": "policy"})
    records = toy.make_dataset(seed=0)
    # every 50th record: many prompts, a fixed selection
    toy.write_jsonl(world["sft"], records["sft_train"][::50][:64])
    toy.write_jsonl(world["pref"], records["pref_train"][::150][:64])
    (base / "done").touch()
    return world


def write_jsonl(path, rows) -> str:
    """rows: dicts (dumped as JSON) or raw strings (written as they are), one per line."""
    with open(path, "w") as f:
        f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    return str(path)


def read_jsonl(path) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# -----------------------------------------------------------------------------
# checkpoints


def load_weights(ckpt) -> dict:
    """Every tensor of a checkpoint folder's safetensors files, as {file/name: tensor}."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(ckpt).glob("*.safetensors")):
        out.update({f"{f.name}/{k}": v for k, v in load_file(str(f)).items()})
    assert out, f"{ckpt}: no safetensors files"
    return out


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), f"different tensors: {sorted(set(a) ^ set(b))}"
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def saved_step(ckpt) -> int:
    """The step in a checkpoint's nanosafe.json, -1 when there is no (readable) checkpoint yet."""
    try:
        with open(Path(ckpt) / "nanosafe.json") as f:
            return json.load(f).get("step", -1)
    except (OSError, ValueError):
        return -1


def assert_nothing_written(out_dir):
    """A refused run leaves no checkpoint behind: no folder, or one without weights or state,
    and no temporary folder beside it."""
    out = Path(out_dir)
    for side in (".tmp", ".old"):
        assert not Path(str(out) + side).exists(), f"{out}{side} left behind"
    if out.exists():
        left = [
            p.name
            for p in out.iterdir()
            if p.suffix in (".safetensors", ".pt", ".bin")
            or p.name in ("nanosafe.json", "config.json")
        ]
        assert not left, f"{out}: half-written checkpoint files {left}"


# -----------------------------------------------------------------------------
# DDP


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(
    script: str,
    args: list,
    out_dir,
    final_step: int,
    log_path,
    nproc: int = 2,
    timeout: float = 240,
    exit_grace: float = 15,
):
    """`torchrun --nproc_per_node=nproc script args` on CPU (gloo). Returns (rc, hung, log):
    hung is True when the final checkpoint was written but the launcher had not exited
    `exit_grace` s later (it is then killed, with its workers, and rc is None)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_port",
        str(free_port()),
        script,
        *map(str, args),
    ]
    with open(log_path, "w") as log:
        p = subprocess.Popen(
            cmd, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        t0, done_at, rc = time.monotonic(), None, None
        while rc is None:
            rc = p.poll()
            if rc is not None:
                break
            if done_at is None and saved_step(out_dir) == final_step:
                done_at = time.monotonic()
            if (
                done_at and time.monotonic() - done_at > exit_grace
            ) or time.monotonic() - t0 > timeout:
                os.killpg(p.pid, signal.SIGKILL)  # the launcher's own session: it and its workers
                p.wait()
                break
            time.sleep(0.1)
    return rc, rc is None and done_at is not None, Path(log_path).read_text()


# -----------------------------------------------------------------------------
# fork server: many short runs (and SIGKILLs) without paying for the imports each time


class ForkServer:
    """`with ForkServer() as fs: fs.run('train_sft.py', args, log, kill_after=0.8)` runs the
    script's __main__ (the real one, error handling included) in a fresh forked child and returns
    {'rc': exit code (-9 when killed), 'killed': bool}. The server kills its own unreaped child, so
    the pid it signals is never someone else's."""

    def __enter__(self):
        self.p = subprocess.Popen(
            [sys.executable, __file__, "--fork-server"],
            cwd=ROOT,
            env=ENV,
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert json.loads(self.p.stdout.readline()) == {"ready": True}
        return self

    def run(
        self, script: str, args: list, log_path, kill_after: float = None, err_path=None
    ) -> dict:
        """stdout goes to log_path, stderr too unless err_path is given"""
        req = {
            "script": script,
            "args": list(map(str, args)),
            "log": str(log_path),
            "err": str(err_path or log_path),
            "kill_after": kill_after,
        }
        self.p.stdin.write(json.dumps(req) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        assert line, "the fork server died"
        return json.loads(line)

    def capture(
        self, script: str, args: list, folder, timeout: float = 120
    ) -> subprocess.CompletedProcess:
        """run() with stdout and stderr read back as text, like run_script's result (rc -9: timed
        out)"""
        self.n = getattr(self, "n", 0) + 1
        out, err = Path(folder) / f"fork{self.n}.out", Path(folder) / f"fork{self.n}.err"
        res = self.run(script, args, out, err_path=err, kill_after=timeout)
        return subprocess.CompletedProcess(
            [script, *map(str, args)], res["rc"], out.read_text(), err.read_text()
        )

    def __exit__(self, *exc):
        self.p.stdin.close()
        try:
            self.p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


def _warm_up():
    """transformers 5 imports a model's classes (and torch.distributed.tensor) lazily, on the
    first from_pretrained: ~1.7 s a child would pay before its first step, longer than most of
    test_resume's random kill delays. Load a tiny checkpoint once here, so the children don't."""
    import tempfile

    from nanosafe.model import load_policy, load_score_model, save_checkpoint
    from nanosafe.toy import toy_model, toy_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        d, tok = os.path.join(tmp, "policy"), toy_tokenizer()
        save_checkpoint(d, toy_model(tok, "tiny", seed=0), tok, {"kind": "policy"})
        load_policy(d)
        load_score_model(d, kind="cost", init_from_policy=True)


def _serve_forks():
    """The server side: import the stage scripts once, then one forked child per request."""
    import importlib
    import runpy
    import traceback

    sys.path.insert(0, str(ROOT))
    scripts = ("train_sft", "train_pm", "train_ppo_lag", "train_grpo_lag", "train_dpo", "sample")
    for script in scripts:
        importlib.import_module(script)  # the slow imports, done once; children inherit them

    _warm_up()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the child: become `python script args...`
            code = 1
            try:
                for fd, path in ((1, req["log"]), (2, req["err"])):
                    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), fd)
                sys.argv = [req["script"], *req["args"]]
                runpy.run_path(str(ROOT / req["script"]), run_name="__main__")
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        deadline = None if req["kill_after"] is None else time.monotonic() + req["kill_after"]
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if deadline is not None and time.monotonic() >= deadline:
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                break
            time.sleep(0.002)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "killed": killed}), flush=True)


if __name__ == "__main__" and sys.argv[1:] == ["--fork-server"]:
    _serve_forks()
