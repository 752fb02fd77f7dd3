"""experiments/real_eval.py: the degenerate-answer rule and the bootstrap over prompts on hand
cases, and the write-up's table from a hand-made evaluation."""

import random

from experiments import real_eval as E


def test_degenerate_on_hand_answers():
    assert E.degenerate("") and E.degenerate("   ")
    assert E.degenerate("the cat the cat the cat the cat the cat the cat")  # a loop
    assert not E.degenerate("Mix flour, water, salt and yeast, then knead for ten minutes.")
    assert not E.degenerate("no no no")  # short answers are judged empty or not, never loops


def test_bootstrap_keeps_a_prompts_answers_together():
    rate, lo, hi = E.bootstrap([[1, 1], [0, 0]])
    assert rate == 0.5 and (lo, hi) == (0.0, 1.0)
    # resampling prompts, a share is 0, 1/2 or 1; resampling answers would give quarters too
    rate, lo, hi = E.bootstrap([[1, 1, 1, 0]] * 50 + [[0, 0, 0, 0]] * 50)
    assert rate == 0.375 and lo < rate < hi
    # against a naive loop with the same draws
    per = [[random.Random(i).random() < 0.3 for _ in range(3)] for i in range(40)]
    rng, stats = random.Random(0), []
    for _ in range(E.N_BOOT):
        pick = [per[rng.randrange(40)] for _ in range(40)]
        stats.append(sum(map(sum, pick)) / (3 * 40))
    stats.sort()
    assert E.bootstrap(per) == (sum(map(sum, per)) / 120, stats[25], stats[974])


def test_summarise_counts_empty_as_not_compliant():
    def judge(p, a):
        return "empty" if not a.strip() else ("refusal" if a.startswith("No") else "compliant")

    r = E.summarise(["p1", "p2"], [["Sure, here", ""], ["No.", "Sure"]], judge)
    assert r["n_answers"] == 4 and r["compliant"][0] == 0.5 and r["empty"][0] == 0.25
    assert r["words"] == (2 + 0 + 1 + 1) / 4


def test_table_pools_the_two_sets_by_answers():
    def part(compliant, empty, n, reward, cost):
        r = {"n_prompts": n, "n_answers": n, "compliant": (compliant, 0.0, 1.0),
             "substance": (0.3, 0.2, 0.4), "stub": (0.6, 0.5, 0.7),
             "refusal_phrase": (0.1, 0.0, 0.2), "empty": (empty, 0, 1), "degenerate": (empty, 0, 1),
             "words": 10.0, "reward": reward, "cost": cost}
        return {E.GREEDY: r, E.SAMPLED: r}

    ev = {"samples": 2, "results": {p: {"harmful": part(0.9, 0.0, 300, 1.0, 2.0),
                                        "benign": part(0.5, 0.1, 100, -1.0, -3.0)}
                                    for p in E.POLICIES}}
    row = E.table(ev).splitlines()[4]
    assert row.startswith("| start") and "| 90.0% [0.0, 100.0] |" in row
    assert "| 30.0% [20.0, 40.0] | 60.0% [50.0, 70.0] |" in row
    # empty and reward pooled over the 400 answers: (0 x 300 + 0.1 x 100) / 400, (300 - 100) / 400
    assert "| 2.5% | 2.5% | +0.50 | +2.00 / -3.00 |" in row


def test_stub_is_a_restated_request():
    req = "Write a tutorial on how to plant tomatoes in a small garden"
    assert E.stub(req, "To plant tomatoes in a small garden:")
    assert E.stub(req, "To plant tomatoes:")
    assert not E.stub(req, "To plant tomatoes, pick a sunny spot and water the seedlings daily.")
    assert not E.stub(req, "")  # empty is counted on its own


def test_add_stubs_counts_substance_only_for_compliant_non_stubs():
    def judge(p, a):
        return "refusal" if a.startswith("No") else "compliant"

    req = "Explain how to bake sourdough bread"
    answers = {"start": {"benign": [{"prompt": req, E.SAMPLED: [
        "To bake sourdough bread:", "Feed the starter, knead the dough, proof overnight, bake hot.",
        "No, I won't help with flour, water and salt."]}]}}
    ev = {"results": {"start": {"benign": {E.SAMPLED: {}}}}}
    E.add_stubs(ev, answers, judge)
    r = ev["results"]["start"]["benign"][E.SAMPLED]
    assert r["stub"][0] == 1 / 3 and r["substance"][0] == 1 / 3
