"""Trustworthy runs: bad input is refused clearly and up front, non-finite losses are handled,
and nothing foreign is ever unpickled or executed.

Bad input: each kind runs a stage script and checks a non-zero exit, a one-line 'error: ...' on
stderr naming the file (and line) and no traceback, and no checkpoint in --out_dir; a few kinds
are repaired with a printed note instead, and those runs must succeed. The scripts run in forked
children of one server that has done the slow imports once (tests/_helpers.py ForkServer:
the script's own __main__, exit code and streams, ~0.5 s a run instead of ~5 s).
"""

import ast
import builtins
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from _helpers import (
    ENV,
    ROOT,
    ForkServer,
    assert_nothing_written,
    read_jsonl,
    run_script,
    saved_step,
    tiny_args,
    tiny_world,
    write_jsonl,
)

from nanosafe.model import (
    CheckpointError,
    check_same_tokenizer,
    load_policy,
    load_score_model,
    load_trainer_state,
    read_state,
    save_checkpoint,
)
from nanosafe.toy import toy_model, toy_tokenizer


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world(tmp_path_factory)


@pytest.fixture(scope="module")
def fs():
    with ForkServer() as server:
        yield server


def _runner(fs, world, tmp_path, script):
    """run(**flags) -> CompletedProcess of a tiny one-step `script` run into tmp_path/out"""

    def run(**kw):
        return fs.capture(
            script,
            tiny_args(world, script, tmp_path / "out", **dict({"max_steps": 1}, **kw)),
            tmp_path,
        )

    return run


@pytest.fixture
def sft(fs, world, tmp_path):
    return _runner(fs, world, tmp_path, "train_sft.py")


@pytest.fixture
def pm(fs, world, tmp_path):
    return _runner(fs, world, tmp_path, "train_pm.py")


def assert_refused(r, out_dir, *where):
    """non-zero exit, one clear 'error:' line naming `where` (path, path:line), nothing
    half-written"""
    assert r.returncode != 0, f"accepted:\n{r.stdout[-2000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr[-3000:]
    for w in where:
        assert w in errors[0], errors[0]
    assert_nothing_written(out_dir)
    return errors[0]


# -----------------------------------------------------------------------------
# bad data files


@pytest.fixture(scope="module")
def good_sft(world):
    return read_jsonl(world["sft"])[:8]


def _sft_file(tmp_path, good, bad_line, at):
    """the 8 good records with `bad_line` inserted as line `at` (1-based)"""
    rows = good[: at - 1] + [bad_line] + good[at - 1 :]
    return write_jsonl(tmp_path / "bad.jsonl", rows)


def test_malformed_jsonl(sft, tmp_path, good_sft):
    path = _sft_file(tmp_path, good_sft, '{"prompt": "cook pasta how", "response": ', at=3)
    assert_refused(sft(train_data=path), tmp_path / "out", f"{path}:3:", "not valid JSON")


def test_malformed_jsonl_names_the_column(tmp_path):
    from nanosafe.data import DataError
    from nanosafe.data import read_jsonl as read

    cut = '{"prompt": "cook pasta how", "response": '
    path = write_jsonl(tmp_path / "cut.jsonl", [cut])
    with pytest.raises(DataError, match=re.escape(f"{path}:1: not valid JSON")) as e:
        read(path)
    column = int(re.search(r"column (\d+)", str(e.value)).group(1))
    assert column > len(cut.rstrip()), str(e.value)  # where the value is missing, not 'column 1'


def test_missing_field(sft, tmp_path, good_sft):
    path = _sft_file(tmp_path, good_sft, {"prompt": "cook pasta how"}, at=4)
    assert_refused(sft(train_data=path), tmp_path / "out", f"{path}:4:", "missing field 'response'")


def test_wrong_type(sft, tmp_path, good_sft):
    path = _sft_file(tmp_path, good_sft, {"prompt": "cook pasta how", "response": 5}, at=2)
    assert_refused(
        sft(train_data=path),
        tmp_path / "out",
        f"{path}:2:",
        "'response' must be a non-empty string, got 5",
    )


def test_empty_prompt(sft, tmp_path, good_sft):
    path = _sft_file(tmp_path, good_sft, {"prompt": "  ", "response": "boil water"}, at=5)
    assert_refused(
        sft(train_data=path), tmp_path / "out", f"{path}:5:", "'prompt' must be a non-empty string"
    )


def test_empty_response(sft, tmp_path, good_sft):
    path = _sft_file(tmp_path, good_sft, {"prompt": "cook pasta how", "response": ""}, at=6)
    assert_refused(
        sft(train_data=path),
        tmp_path / "out",
        f"{path}:6:",
        "'response' must be a non-empty string",
    )


LONG_PROMPT = {"prompt": " ".join(["pasta"] * 80), "response": "boil water"}


def test_overlong_prompt_is_an_error_naming_its_line(sft, tmp_path, good_sft):
    path = _sft_file(tmp_path, good_sft, LONG_PROMPT, at=7)
    err = assert_refused(sft(train_data=path), tmp_path / "out", f"{path}:7:", "over the limit")
    assert "truncate_prompts" in err  # says how to proceed


def test_overlong_prompt_trains_with_truncate_prompts(sft, tmp_path, good_sft):
    path = _sft_file(tmp_path, good_sft, LONG_PROMPT, at=7)
    r = sft(train_data=path, truncate_prompts=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "train 9 examples" in r.stdout and saved_step(tmp_path / "out") == 1


def test_broken_eval_file_is_refused_before_training(sft, tmp_path, good_sft):
    path = _sft_file(tmp_path, good_sft, "[1, 2]", at=8)
    assert_refused(sft(eval_data=path), tmp_path / "out", f"{path}:8:", "expected a JSON object")


def test_empty_file(sft, tmp_path):
    path = write_jsonl(tmp_path / "empty.jsonl", [])
    assert_refused(sft(train_data=path), tmp_path / "out", f"{path}:", "empty")


def test_nonexistent_path(sft, tmp_path):
    path = str(tmp_path / "no_such.jsonl")
    assert_refused(sft(train_data=path), tmp_path / "out", f"{path}: no such file")


def test_nonexistent_path_through_a_plain_subprocess(world, tmp_path):
    """the same refusal with the real interpreter start (not a fork of the test server)"""
    path = str(tmp_path / "no_such.jsonl")
    r = run_script(
        "train_sft.py",
        tiny_args(world, "train_sft.py", tmp_path / "out", max_steps=1, train_data=path),
    )
    assert_refused(r, tmp_path / "out", f"{path}: no such file")
    assert r.returncode == 1


def test_preference_pair_with_an_empty_answer(pm, tmp_path, world):
    rows = read_jsonl(world["pref"])[:6]
    rows[3] = dict(rows[3], response_1="  ")
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    assert_refused(pm(train_data=path), tmp_path / "out", f"{path}:4:", "response_1 is empty")


@pytest.mark.parametrize("drop_bad", [False, True])
def test_contradictory_and_identical_pairs_are_reported_and_dropped_on_request(
    pm, tmp_path, world, drop_bad
):
    def ok(r):  # different answers, and the safer one is not the only one labelled unsafe
        safer, other = (
            r[f"is_response_{r['safer_response_id']}_safe"],
            r[f"is_response_{1 - r['safer_response_id']}_safe"],
        )
        return r["response_0"] != r["response_1"] and not (safer is False and other is True)

    clean = [r for r in read_jsonl(world["pref"]) if ok(r)][:12]
    rows = (
        clean[:2] + [dict(clean[2], response_1=clean[2]["response_0"])] + clean[3:4]
    )  # line 3: identical answers
    rows += [
        dict(clean[4], safer_response_id=0, is_response_0_safe=False, is_response_1_safe=True)
    ] + clean[5:]  # line 5
    rows += clean[2:3] + clean[4:5]  # 14 pairs
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    r = pm(train_data=path, drop_bad=drop_bad)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (
        f"{path}: 14 pairs (pku-saferlhf), 0 with an empty answer, "
        f"1 with identical answers (first: {path}:3), "
        f"1 with contradictory safety labels (first: {path}:5); "
    ) in r.stdout
    kept = 12 if drop_bad else 14
    assert f"dropped {14 - kept}, kept {kept}" in r.stdout and f"| {kept} pairs |" in r.stdout


# (--thresholds vs --cost_models counts: tests/test_e2e.py::test_thresholds_must_match_cost_models)

# -----------------------------------------------------------------------------
# checkpoints and tokenizers


def _word_tokenizer(vocab: dict, pad_token=None):
    """a toy-style word-level tokenizer over `vocab` (word -> id), without a pad token unless
    given"""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token=pad_token,
    )


def _tokenizer_without_pad(pad_token=None):
    """the toy tokenizer rebuilt with no '<pad>' in its vocabulary; pad_token='<eos>' makes
    pad == eos"""
    words = [
        w
        for w, _ in sorted(toy_tokenizer().get_vocab().items(), key=lambda x: x[1])
        if w != "<pad>"
    ]
    return _word_tokenizer({w: i for i, w in enumerate(words)}, pad_token)


class Payload:
    """unpickling this creates the file `path`: proof that a pickle was executed"""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (builtins.open, (self.path, "w"))


@pytest.fixture(scope="module")
def folders(world, tmp_path_factory):
    """policy-like folders that are wrong in one way each"""
    base = tmp_path_factory.mktemp("folders")
    tok = toy_tokenizer()
    out = {
        k: str(base / k)
        for k in ("cost_model", "no_pad", "pad_eos", "small_vocab", "pickle_only", "no_tokenizer")
    }
    sm, stok = load_score_model(world["policy"], kind="cost", init_from_policy=True)
    save_checkpoint(out["cost_model"], sm, stok, {"kind": "cost"})
    for name, pad in (("no_pad", None), ("pad_eos", "<eos>")):
        t = _tokenizer_without_pad(pad)
        save_checkpoint(out[name], toy_model(t, "tiny"), t, {"kind": "policy"})
    m = toy_model(tok, "tiny")
    m.resize_token_embeddings(len(tok) - 5)
    save_checkpoint(out["small_vocab"], m, tok, {"kind": "policy"})
    save_checkpoint(out["pickle_only"], toy_model(tok, "tiny"), tok, {"kind": "policy"})
    os.remove(os.path.join(out["pickle_only"], "model.safetensors"))
    toy_model(tok, "tiny").save_pretrained(
        out["no_tokenizer"]
    )  # weights and config, no tokenizer files
    out["sentinel"] = str(base / "PICKLE_RAN")
    torch.save(
        {"model.embed_tokens.weight": Payload(out["sentinel"])},
        os.path.join(out["pickle_only"], "pytorch_model.bin"),
    )
    return out


@pytest.mark.parametrize("case,found", [("no_pad", "no pad token"), ("pad_eos", "pad == eos")])
def test_tokenizer_without_a_distinct_pad_gets_one_with_a_note(
    sft, tmp_path, folders, case, found, capsys
):
    """documented (nanosafe/model.py): the pad token is always distinct from EOS; loading adds one,
    grows the embeddings and says so; the run trains and saves the repaired tokenizer"""
    r = sft(model=folders[case])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"note: the tokenizer had {found}; added <pad>" in r.stdout
    model, tok = load_policy(str(tmp_path / "out"))
    assert "note:" not in capsys.readouterr().out  # the saved checkpoint needs no repair
    assert tok.pad_token == "<pad>" and tok.pad_token_id != tok.eos_token_id
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)


def test_model_folder_without_a_tokenizer(sft, tmp_path, folders):
    assert_refused(
        sft(model=folders["no_tokenizer"]),
        tmp_path / "out",
        folders["no_tokenizer"],
        "no tokenizer in the folder",
    )


def test_score_model_passed_as_policy(sft, tmp_path, folders):
    err = assert_refused(
        sft(model=folders["cost_model"]), tmp_path / "out", folders["cost_model"], "not a policy"
    )
    assert "cost model" in err


def test_policy_passed_as_score_model(pm, tmp_path, world):
    r = pm(model=world["policy"], eval_only=True, eval_data=world["pref"])
    assert_refused(
        r,
        tmp_path / "out",
        world["policy"],
        "this is a policy, not a",
        "AutoModelForSequenceClassification",
    )


def test_checkpoint_from_a_different_vocabulary(sft, tmp_path, folders):
    assert_refused(
        sft(model=folders["small_vocab"]),
        tmp_path / "out",
        folders["small_vocab"],
        f"{len(toy_tokenizer()) - 5} embedding rows",
        "different vocabulary",
    )


def test_resume_with_nothing_to_resume(sft, tmp_path):
    (tmp_path / "out").mkdir()
    assert_refused(sft(resume=True), tmp_path / "out", str(tmp_path / "out"))


def test_policy_and_critic_tokenizers_must_match():
    a, b = toy_tokenizer(), toy_tokenizer()
    check_same_tokenizer(a, b, "out/sft", "out/cm")  # same vocabulary: fine
    b.add_tokens(["zebra"])
    with pytest.raises(CheckpointError, match="out/sft and out/cm use different tokenizers"):
        check_same_tokenizer(a, b, "out/sft", "out/cm")
    vocab = toy_tokenizer().get_vocab()
    x, y = sorted(vocab)[-2:]
    vocab[x], vocab[y] = vocab[y], vocab[x]  # the same words, two ids swapped
    with pytest.raises(CheckpointError):
        check_same_tokenizer(a, _word_tokenizer(vocab, "<pad>"), "out/sft", "out/cm")


# -----------------------------------------------------------------------------
# safe loading: weights only through safetensors, trainer state only through weights_only


def test_pickled_trainer_state_is_refused_not_executed(world, tmp_path):
    ckpt, sentinel = tmp_path / "ckpt", tmp_path / "PICKLE_RAN"
    model, tok = load_policy(world["policy"])
    save_checkpoint(
        str(ckpt),
        model,
        tok,
        {"kind": "policy", "step": 1},
        {"step": 1, "optimizer": {}, "rng": []},
    )
    torch.save({"step": 1, "optimizer": Payload(sentinel), "rng": []}, ckpt / "trainer_state.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        load_trainer_state(str(ckpt))
    assert not sentinel.exists()


def test_pickled_weights_are_never_loaded(folders):
    for load in (
        lambda p: load_policy(p),
        lambda p: load_score_model(p, kind="cost", init_from_policy=True),
    ):
        with pytest.raises(Exception, match="safetensors"):
            load(folders["pickle_only"])
    assert not os.path.exists(folders["sentinel"])


def test_pickle_only_checkpoint_is_refused_clearly(sft, tmp_path, folders):
    r = sft(model=folders["pickle_only"])
    assert not os.path.exists(folders["sentinel"])
    assert_refused(r, tmp_path / "out", folders["pickle_only"], "safetensors")


def _sources():
    return sorted(ROOT.glob("*.py")) + sorted((ROOT / "nanosafe").glob("*.py"))


def test_no_remote_code_and_every_torch_load_is_weights_only():
    files = _sources()
    assert any(f.name == "train_sft.py" for f in files) and any(
        f.parent.name == "nanosafe" for f in files
    )
    for f in files:
        src = f.read_text()
        assert not re.search(r"trust_remote_code\s*=\s*True", src), f"{f}: trust_remote_code=True"
        assert not re.search(
            r"^\s*(import pickle|from pickle|import dill|import joblib)", src, re.M
        ), f"{f}: pickle"
        assert not re.search(r"from torch import[^\n]*\bload\b", src), (
            f"{f}: torch.load under another name"
        )
        for node in ast.walk(ast.parse(src)):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
            ):
                kw = {k.arg: k.value for k in node.keywords}
                assert (
                    isinstance(kw.get("weights_only"), ast.Constant)
                    and kw["weights_only"].value is True
                ), f"{f}:{node.lineno}: torch.load without weights_only=True"
            if isinstance(node, ast.Call) and any(
                k.arg == "use_safetensors" for k in node.keywords
            ):
                v = next(k.value for k in node.keywords if k.arg == "use_safetensors")
                assert isinstance(v, ast.Constant) and v.value is True, (
                    f"{f}:{node.lineno}: use_safetensors not True"
                )


# -----------------------------------------------------------------------------
# non-finite losses: a wrapper makes cross_entropy return nan on chosen calls (one call per step
# here)

NAN_WRAPPER = '''\
"""train_sft.py with torch.nn.functional.cross_entropy returning nan on the calls in NAN_CALLS"""
import os, runpy, sys
import torch
bad = {int(i) for i in os.environ["NAN_CALLS"].split(",")}
real, calls = torch.nn.functional.cross_entropy, [0]

def cross_entropy(*args, **kwargs):
    out = real(*args, **kwargs)
    calls[0] += 1
    return out * float("nan") if calls[0] - 1 in bad else out

torch.nn.functional.cross_entropy = cross_entropy
sys.argv[0] = "train_sft.py"
runpy.run_path("train_sft.py", run_name="__main__")
'''


@pytest.fixture
def nan_run(world, tmp_path):
    wrapper = tmp_path / "nan_sft.py"
    wrapper.write_text(NAN_WRAPPER)

    def run(nan_steps, **kw):
        args = tiny_args(
            world,
            "train_sft.py",
            tmp_path / "out",
            **dict({"batch_size": 8, "ckpt_every": 1, "save_optimizer": True}, **kw),
        )  # 1 micro-batch a step
        return subprocess.run(
            [sys.executable, str(wrapper), *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=dict(ENV, NAN_CALLS=",".join(map(str, nan_steps))),
            timeout=300,
        )

    return run


def _assert_loadable(out) -> int:
    """the checkpoint in `out` loads, is finite, and its weights and trainer state agree; -> its
    step"""
    model, _ = load_policy(str(out))
    step = read_state(str(out))["step"]
    assert load_trainer_state(str(out))["step"] == step
    assert all(torch.isfinite(p).all() for p in model.parameters())
    return step


def test_one_nonfinite_loss_is_skipped_and_training_goes_on(nan_run, tmp_path):
    r = nan_run([2], max_steps=5)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 2: non-finite loss, skipped (1 so far)" in r.stdout
    metrics = read_jsonl(tmp_path / "out" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1, 3, 4]
    assert [m["skipped"] for m in metrics] == [0, 0, 1, 1]
    assert all(math.isfinite(m["loss"]) for m in metrics)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["skipped_steps"] == 1
    assert _assert_loadable(tmp_path / "out") == 5


def test_nonfinite_losses_in_a_row_stop_the_run_and_keep_the_last_checkpoint(nan_run, tmp_path):
    r = nan_run(range(3, 13), max_steps=20)  # NanGuard's patience: 10 in a row
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert "error: 10 non-finite losses in a row: stopping" in r.stderr
    assert not os.path.exists(f"{tmp_path / 'out'}.tmp") and not os.path.exists(
        f"{tmp_path / 'out'}.old"
    )
    assert [m["step"] for m in read_jsonl(tmp_path / "out" / "metrics.jsonl")] == [0, 1, 2]
    # the last good checkpoint is step 3 (a fix that also checkpoints skipped steps may move it up
    # to 12)
    assert 3 <= _assert_loadable(tmp_path / "out") <= 12


def test_a_skipped_last_step_still_writes_the_final_checkpoint(nan_run, tmp_path):
    r = nan_run([5], max_steps=6, ckpt_every=4)
    assert r.returncode == 0, r.stderr[-3000:]
    assert saved_step(tmp_path / "out") == 6  # steps 0-4 trained, 5 skipped: the run is done


def test_a_run_whose_every_step_is_skipped_ends_without_a_traceback(nan_run, tmp_path):
    r = nan_run([0, 1], max_steps=2)
    assert "Traceback" not in r.stderr, r.stderr[-2000:]


def test_chat_template_without_one_in_the_tokenizer(sft, tmp_path, world):
    # the toy tokenizer has no chat template: --template chat is one line naming the flag
    assert_refused(
        sft(template="chat"), tmp_path / "out", "--template chat", "has no chat template"
    )


def test_a_later_stage_refuses_another_template_than_its_input_was_trained_with(
    sft, pm, tmp_path, world
):
    r = sft()
    assert r.returncode == 0, r.stderr[-3000:]
    os.rename(tmp_path / "out", tmp_path / "sft")
    assert read_state(str(tmp_path / "sft"))["template"] == "safe_rlhf"
    err = assert_refused(
        pm(model=tmp_path / "sft", template="chat"),
        tmp_path / "out",
        "--template chat",
        str(tmp_path / "sft"),
    )
    assert "trained with --template safe_rlhf" in err
    r = pm(model=tmp_path / "sft")  # no --template: the input's
    assert r.returncode == 0 and read_state(str(tmp_path / "out"))["template"] == "safe_rlhf"


def test_fsdp_without_torchrun_is_one_clear_error(sft, tmp_path):
    r = sft(fsdp=True)
    assert_refused(r, tmp_path / "out", "--fsdp", "torchrun --nproc_per_node")
