"""Bad flags and inputs, as a new user types them: each is refused with exactly one `error:` line
that names the flag (or the file and line), no traceback, a non-zero exit (2 for a flag refused at
parse time, as argparse's own), and nothing written to --out_dir. The scripts run in forked
children of one server that did the slow imports once (tests/_helpers.py ForkServer)."""

from pathlib import Path

import pytest
from _helpers import ForkServer, assert_nothing_written, tiny_world, write_jsonl

SFT, PM, PPO, GRPO = "train_sft.py", "train_pm.py", "train_ppo_lag.py", "train_grpo_lag.py"
SAMPLE, EVAL = "sample.py", "nanosafe/evaluate.py"

# (script, flags, exit code, what the one error line must contain); "{out}" is the run's --out_dir,
# "{ckpt}" a folder holding a checkpoint, "{bad}" a data file whose line 3 is not JSON
CASES = [
    (SFT, ["--batch_size", "0"], 2, "--batch_size 0"),
    (SFT, ["--batch_size", "-1"], 2, "--batch_size -1"),
    (SFT, ["--max_steps", "0"], 2, "--max_steps 0"),
    (SFT, ["--max_steps", "-3"], 2, "--max_steps -3"),
    (SFT, ["--max_step", "2"], 2, "--max_step"),
    (SFT, ["--device", "gpu"], 2, "--device"),
    (SFT, ["--device", "cuda"], 2, "--device cuda"),
    (SFT, ["--lr", "-1"], 2, "--lr -1"),
    (SFT, ["--grad_accum", "0"], 2, "--grad_accum 0"),
    (SFT, ["--max_length", "1"], 2, "--max_length 1"),
    (SFT, ["--toy_size", "huge"], 2, "--toy_size"),
    (SFT, ["--batch_size", "x"], 2, "--batch_size"),
    (SFT, ["--train_data", "/nonexistent/sft.jsonl"], 1, "/nonexistent/sft.jsonl: no such file"),
    (SFT, ["--train_data", "{bad}"], 1, "{bad}:3:"),
    (SFT, ["--out_dir", "{ckpt}"], 1, "--out_dir"),
    (PM, ["--batch_size", "0"], 2, "--batch_size 0"),
    (PM, ["--kind", "bogus"], 2, "--kind"),
    (PM, ["--max_steps", "-1"], 2, "--max_steps -1"),
    (PM, ["--reg", "-0.1"], 2, "--reg -0.1"),
    (PM, ["--model", "/nonexistent/sft", "--train_data", "{bad}"], 1, "/nonexistent/sft"),
    (PPO, ["--rollout_batch_size", "0"], 2, "--rollout_batch_size 0"),
    (PPO, ["--rollout_batch_size", "-8"], 2, "--rollout_batch_size -8"),
    (PPO, ["--final_eval_samples", "0"], 2, "--final_eval_samples 0"),
    (PPO, ["--temperature", "0"], 2, "--temperature 0"),
    (PPO, ["--top_p", "1.5"], 2, "--top_p 1.5"),
    (PPO, ["--target_unsafe_rate", "2"], 2, "--target_unsafe_rate 2"),
    (PPO, ["--lambda_max", "0"], 2, "--lambda_max 0"),
    (PPO, ["--gamma", "1.5"], 2, "--gamma 1.5"),
    (PPO, ["--algo", "foo"], 2, "--algo"),
    (PPO, ["--minibatch_size", "3"], 1, "minibatch_size (3)"),
    (PPO, ["--model", "/nonexistent/sft"], 1, "/nonexistent/sft: no such checkpoint"),
    (GRPO, ["--group_size", "1"], 2, "--group_size 1"),
    (GRPO, ["--algo", "ppo"], 2, "--algo"),
    (SAMPLE, ["--num_samples", "0"], 2, "--num_samples 0"),
    (SAMPLE, ["--temperature", "-1"], 2, "--temperature -1"),
    (SAMPLE, ["--max_new_tokens", "0"], 2, "--max_new_tokens 0"),
    (SAMPLE, ["--model", "/nonexistent/policy", "hi"], 1, "/nonexistent/policy"),
    (EVAL, ["--compare", "/nonexistent/a", "/nonexistent/b"], 1, "/nonexistent/a"),
    (EVAL, ["--compare", "{ckpt}", "--n_samples", "0"], 2, "--n_samples 0"),
]


def test_the_table_covers_the_issue():
    assert len(CASES) >= 30
    assert {c[0] for c in CASES} == {SFT, PM, PPO, GRPO, SAMPLE, EVAL}


@pytest.fixture(scope="module")
def fs():
    with ForkServer() as server:
        yield server


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    world = tiny_world(tmp_path_factory)
    d = tmp_path_factory.mktemp("bad")
    rows = [{"prompt": "how do i bake bread", "response": "flour yeast"}] * 2
    bad = write_jsonl(d / "bad.jsonl", rows[:2] + ['{"prompt": "cut'] + rows)
    return {"ckpt": Path(world["policy"]), "bad": bad}


@pytest.mark.parametrize("script,args,code,says", CASES,
                         ids=[f"{c[0]}:{' '.join(c[1])}" for c in CASES])
def test_bad_input_is_one_clear_line(fs, inputs, tmp_path, script, args, code, says):
    out = tmp_path / "out"
    fill = {"out": str(out), **{k: str(v) for k, v in inputs.items()}}
    args = [a.format(**fill) for a in args]
    says = says.format(**fill)
    if script in (SFT, PM, PPO, GRPO) and "--out_dir" not in args:
        args += ["--out_dir", str(out)]
    before = sorted(p.name for p in inputs["ckpt"].iterdir())
    r = fs.capture(script, args, tmp_path)
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr[-3000:]
    assert says in errors[0], errors[0]
    assert_nothing_written(out)
    assert sorted(p.name for p in inputs["ckpt"].iterdir()) == before  # the checkpoint untouched
