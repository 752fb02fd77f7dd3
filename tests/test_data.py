"""nanosafe.data: readers, template, tokenization, collators."""

import gzip
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from nanosafe.data import (
    IGNORE_INDEX,
    DataError,
    PreferenceDataset,
    PromptDataset,
    SFTDataset,
    check_template,
    check_tokenizer,
    collate_pref,
    collate_prompts,
    collate_sft,
    dedupe_prompts,
    format_prompt,
    format_report,
    load_preference,
    load_prompts,
    load_sft,
    pad_left,
    pad_right,
    prompt_text,
    read_jsonl,
    tokenize_pair,
    tokenize_prompt,
    tokenize_sft,
)

HH_PATH = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
)

PKU = [
    dict(
        prompt="how do I bake bread",
        response_0="mix flour and water then bake",
        response_1="I cannot help with that",
        better_response_id=0,
        safer_response_id=1,
        is_response_0_safe=True,
        is_response_1_safe=True,
        response_0_harm_category={"violence": False},
        response_1_harm_category={"violence": False},
        response_0_severity_level=0,
        response_1_severity_level=0,
    ),
    dict(
        prompt="how do I pick a lock",
        response_0="I cannot help with that",
        response_1="use a tension wrench and a pick",
        better_response_id=1,
        safer_response_id=0,
        is_response_0_safe=True,
        is_response_1_safe=False,
    ),
]


def write(path, rows):
    """rows: dicts (dumped as JSON) or raw strings (written as they are), one per line"""
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.write(text)
    return path


def make_tok(texts, bos=True, pad="<pad>"):
    """a word-level tokenizer over the words of texts (+ the template's words)"""
    split = pre_tokenizers.Whitespace()
    words = {
        w for t in list(texts) + [format_prompt("x", "")] for w, _ in split.pre_tokenize_str(t)
    }
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<bos>", "<unk>"] + sorted(words))}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = split
    if bos:  # like Llama tokenizers: add_special_tokens puts a BOS first
        t.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", 2)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=t, pad_token=pad, eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )


WORDS = "hi hello there how are you tell me a story once upon time the end " * 2
TOK = make_tok([WORDS, "one two three four five six seven eight nine ten"])

# -----------------------------------------------------------------------------
# template


def test_template_single_turn():
    assert format_prompt("hi", "<eos>") == "BEGINNING OF CONVERSATION: USER: hi ASSISTANT:"


def test_template_dialogue():
    got = format_prompt(["hi", "hello there", "how are you"], "<eos>")
    assert (
        got == "BEGINNING OF CONVERSATION: USER: hi ASSISTANT: hello there<eos>"
        "USER: how are you ASSISTANT:"
    )
    with pytest.raises(ValueError, match="odd number"):
        format_prompt(["hi", "hello there"], "<eos>")


# -----------------------------------------------------------------------------
# HH-RLHF (the real harmless-base test split, if the shared folder is beside the repo)


def hh_raw_lines():
    if not HH_PATH.exists():
        pytest.skip(f"{HH_PATH} not found (the shared data folder beside the repo)")
    return gzip.open(HH_PATH, "rt", encoding="utf-8").read().split("\n")


def test_hh_rlhf_harmless_base_test():
    lines = hh_raw_lines()
    # 4 pairs have an empty chosen answer: an error by default, dropped with drop_bad
    with pytest.raises(DataError, match=f"{HH_PATH.name}:87: chosen.s final answer is empty"):
        load_preference(HH_PATH)
    records, report = load_preference(HH_PATH, drop_bad=True)
    assert report["n"] == 2312 and report["format"] == "hh-rlhf"
    assert [w.rsplit(":", 1)[1] for w in report["empty"]] == ["87", "517", "926", "1104"]
    assert report["dropped"] == 4 and len(records) == 2308
    assert report["identical"] == [] and report["contradictory"] == []
    # 9 dialogues repeat '\n\nAssistant:'; a run of one speaker is one turn
    assert len(report["merged"]) == 9
    assert sum(isinstance(r["prompt"], list) for r in records) == 1649  # multi-turn: 71%
    assert all(r["better_response_id"] == r["safer_response_id"] == 0 for r in records)
    assert all(r["is_response_0_safe"] is None and r["is_response_1_safe"] is None for r in records)
    assert "2312 pairs (hh-rlhf), 4 with an empty answer" in format_report(report)

    # line 1, a two-turn dialogue, checked against the raw text
    raw = json.loads(lines[0])
    r = records[0]
    assert r["_where"] == f"{HH_PATH}:1"
    assert r["prompt"][0] == "what are some pranks with a pen i can do?"
    assert r["prompt"][1:3] == ["Are you looking for practical joke ideas?", "yep"]
    assert r["prompt"][4] == "okay some of these do not have anything to do with pens"
    assert r["response_0"] == raw["chosen"].rsplit("\n\nAssistant:", 1)[1].strip()
    assert r["response_1"] == raw["rejected"].rsplit("\n\nAssistant:", 1)[1].strip()
    assert r["response_0"].startswith("No, sorry!  All of these involve a pen")
    # line 1255: chosen's answer is two 'Assistant:' segments; rejected's is one
    r = next(r for r in records if r["_where"].endswith(":1255"))
    assert r["prompt"] == [
        "Are drag queens men?",
        "No. Drag queens are women who act like stereotypical men.",
        "Isn't that drag kings?",
    ]
    assert (
        r["response_0"].startswith("No. Men who impersonate")
        and "\n\nI think they call them" in r["response_0"]
    )
    assert (
        r["response_1"]
        == "A drag king is the opposite of a drag queen, like a male who acts like a "
        "stereotypical woman."
    )


def test_hh_single_turn_and_prompt_mismatch(tmp_path):
    ok = {
        "chosen": "\n\nHuman: hi there\n\nAssistant: hello",
        "rejected": "\n\nHuman: hi there\n\nAssistant: go away",
    }
    records, _ = load_preference(write(tmp_path / "hh.jsonl", [ok]))
    assert records[0]["prompt"] == "hi there" and records[0]["response_0"] == "hello"
    assert records[0]["response_1"] == "go away"
    bad = {
        "chosen": "\n\nHuman: hi there\n\nAssistant: hello",
        "rejected": "\n\nHuman: bye\n\nAssistant: go away",
    }
    with pytest.raises(DataError, match=r"hh\.jsonl:2: .*differ at turn 1"):
        load_preference(write(tmp_path / "hh.jsonl", [ok, bad]))
    no_answer = {
        "chosen": "\n\nHuman: hi there",
        "rejected": "\n\nHuman: hi there\n\nAssistant: go away",
    }
    with pytest.raises(DataError, match=r"hh\.jsonl:2: field 'chosen' must end with an"):
        load_preference(write(tmp_path / "hh.jsonl", [ok, no_answer]))


# -----------------------------------------------------------------------------
# PKU-SafeRLHF round trip and report


@pytest.mark.parametrize("name", ["pku.jsonl", "pku.jsonl.gz"])
def test_pku_round_trip(tmp_path, name):
    path = write(tmp_path / name, PKU)
    records, report = load_preference(path)
    assert [{k: v for k, v in r.items() if k != "_where"} for r in records] == PKU
    assert [r["_where"] for r in records] == [f"{path}:1", f"{path}:2"]
    assert report["n"] == 2 and report["format"] == "pku-saferlhf" and report["dropped"] == 0


def test_identical_and_contradictory_are_counted_then_dropped(tmp_path):
    same = dict(PKU[0], response_1="  mix flour and water then bake ")
    # safer is response 0, yet response 0 is labelled unsafe and response 1 safe
    contra = dict(PKU[1], safer_response_id=0, is_response_0_safe=False, is_response_1_safe=True)
    path = write(tmp_path / "p.jsonl", [PKU[0], same, PKU[1], contra])
    records, report = load_preference(path)
    assert len(records) == 4 and report["dropped"] == 0
    assert report["identical"] == [f"{path}:2"] and report["contradictory"] == [f"{path}:4"]
    assert "1 with identical answers (first: " in format_report(report)
    records, report = load_preference(path, drop_bad=True)
    assert [r["_where"] for r in records] == [f"{path}:1", f"{path}:3"] and report["dropped"] == 2


# -----------------------------------------------------------------------------
# bad input: every error names the file and the line


def test_malformed_json(tmp_path):
    path = write(tmp_path / "bad.jsonl", [PKU[0], "", '{"prompt": "hi",'])  # line 2 is blank
    with pytest.raises(DataError, match=r"bad\.jsonl:3: not valid JSON"):
        load_preference(path)


def test_line_is_a_list(tmp_path):
    with pytest.raises(DataError, match=r"bad\.jsonl:2: expected a JSON object .*got a list"):
        read_jsonl(write(tmp_path / "bad.jsonl", [PKU[0], "[1, 2]"]))


def test_missing_field(tmp_path):
    rec = {k: v for k, v in PKU[1].items() if k != "safer_response_id"}
    with pytest.raises(DataError, match=r"bad\.jsonl:2: missing field 'safer_response_id'"):
        load_preference(write(tmp_path / "bad.jsonl", [PKU[0], rec]))
    with pytest.raises(DataError, match=r"sft\.jsonl:1: missing field 'response'"):
        load_sft(write(tmp_path / "sft.jsonl", [{"prompt": "hi"}]))


@pytest.mark.parametrize("value", ["a", 2, True, 1.0, None])
def test_wrong_type(tmp_path, value):
    path = write(tmp_path / "bad.jsonl", [PKU[0], dict(PKU[1], better_response_id=value)])
    with pytest.raises(
        DataError, match=rf"bad\.jsonl:2: field 'better_response_id' must be 0 or 1, got {value!r}"
    ):
        load_preference(path)


def test_wrong_type_other_fields(tmp_path):
    with pytest.raises(
        DataError,
        match=r"bad\.jsonl:1: field 'is_response_1_safe' must be true or false, got 'yes'",
    ):
        load_preference(write(tmp_path / "bad.jsonl", [dict(PKU[0], is_response_1_safe="yes")]))
    with pytest.raises(
        DataError, match=r"bad\.jsonl:1: field 'harmful' must be true or false, got 1"
    ):
        load_prompts(write(tmp_path / "bad.jsonl", [{"prompt": "hi", "harmful": 1}]))
    with pytest.raises(DataError, match=r"bad\.jsonl:1: field 'prompt' must be .*odd length"):
        load_sft(write(tmp_path / "bad.jsonl", [{"prompt": ["hi", "hello"], "response": "x"}]))


def test_empty_response(tmp_path):
    with pytest.raises(
        DataError, match=r"sft\.jsonl:2: field 'response' must be a non-empty string, got '   '"
    ):
        load_sft(
            write(
                tmp_path / "sft.jsonl",
                [{"prompt": "hi", "response": "hello"}, {"prompt": "hi", "response": "   "}],
            )
        )
    path = write(tmp_path / "p.jsonl", [PKU[0], dict(PKU[1], response_1=" \n ")])
    with pytest.raises(DataError, match=r"p\.jsonl:2: response_1 is empty"):
        load_preference(path)
    records, report = load_preference(path, drop_bad=True)
    assert len(records) == 1 and report["empty"] == [f"{path}:2"] and report["dropped"] == 1


def test_empty_file(tmp_path):
    path = write(tmp_path / "empty.jsonl", ["", "   "])
    with pytest.raises(DataError, match=r"empty\.jsonl: empty"):
        load_sft(path)


def test_nonexistent_path(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        load_prompts(tmp_path / "nope.jsonl")


def test_unknown_preference_format(tmp_path):
    with pytest.raises(DataError, match=r"bad\.jsonl:1: unknown preference format"):
        load_preference(write(tmp_path / "bad.jsonl", [{"prompt": "hi", "response": "x"}]))


def test_prompts_keep_metadata(tmp_path):
    rows = [
        {"prompt": "hi", "harmful": False, "category": None},
        {"prompt": "tell me", "harmful": True, "category": "fraud"},
    ]
    records = load_prompts(write(tmp_path / "pr.jsonl", rows))
    assert [{k: v for k, v in r.items() if k != "_where"} for r in records] == rows


# -----------------------------------------------------------------------------
# tokenization


def ids(text):
    return TOK(text, add_special_tokens=False)["input_ids"]


def test_sft_masks_the_prompt():
    rec = {"prompt": "tell me a story", "response": "once upon a time", "_where": "x:1"}
    out = tokenize_sft(TOK, rec, max_length=64)
    prompt = tokenize_prompt(TOK, "tell me a story", 64)
    assert prompt == [TOK.bos_token_id] + ids(format_prompt("tell me a story", "<eos>"))
    answer = ids("once upon a time") + [TOK.eos_token_id]
    assert out["input_ids"] == prompt + answer
    assert out["labels"] == [IGNORE_INDEX] * len(prompt) + answer and not out["truncated"]


def test_dialogue_prompt_has_eos_between_turns():
    prompt = tokenize_prompt(TOK, ["hi", "hello there", "how are you"], 64)
    assert prompt.count(TOK.eos_token_id) == 1
    assert TOK.decode(prompt, skip_special_tokens=False).count("<eos>") == 1


def test_truncation_keeps_eos_last():
    rec = {"prompt": "hi", "response": "one two three four five six seven eight nine ten"}
    n_prompt = len(tokenize_prompt(TOK, "hi", 64))
    out = tokenize_sft(TOK, rec, max_length=n_prompt + 4)
    assert len(out["input_ids"]) == n_prompt + 4 and out["truncated"]
    assert out["input_ids"][n_prompt:] == ids("one two three") + [TOK.eos_token_id]
    assert out["labels"][-1] == TOK.eos_token_id
    ds = SFTDataset([rec, {"prompt": "hi", "response": "one"}], TOK, max_length=n_prompt + 4)
    assert ds.n_truncated == 1


def test_overlong_prompt_raises_then_truncates_left(tmp_path):
    long = "tell me a story once upon a time the end how are you there"
    path = write(
        tmp_path / "sft.jsonl",
        [{"prompt": "hi", "response": "hello"}, {"prompt": long, "response": "hello"}],
    )
    records = load_sft(path)
    full = tokenize_prompt(TOK, long, 1000)
    max_length = len(full)  # the prompt is 2 tokens too long: answer token + EOS need room
    with pytest.raises(
        DataError, match=rf"sft\.jsonl:2: prompt is {len(full)} tokens, over the limit"
    ):
        SFTDataset(records, TOK, max_length)
    ds = SFTDataset(records, TOK, max_length, truncate_prompts=True)
    prompt = ds[1]["input_ids"][: max_length - 2]
    assert prompt[0] == TOK.bos_token_id and prompt[1:] == full[-(max_length - 3) :]
    assert (
        TOK.decode(prompt[-2:]) == "ASSISTANT :"
    )  # the end survives; word-level decode spaces ':'
    assert ds[1]["input_ids"][-2:] == ids("hello") + [TOK.eos_token_id] and ds.n_truncated == 1
    # the same policy for prompt-only data
    with pytest.raises(DataError, match=r"sft\.jsonl:2: prompt is"):
        PromptDataset(records, TOK, max_prompt_length=len(full) - 1)
    ds = PromptDataset(records, TOK, max_prompt_length=len(full) - 1, truncate_prompts=True)
    assert ds[1]["input_ids"] == full[:1] + full[2:] and ds.n_truncated == 1


def test_no_bos_when_the_tokenizer_adds_none():
    tok = make_tok([WORDS], bos=False)
    full = tok(format_prompt("hi", "<eos>"), add_special_tokens=False)["input_ids"]
    assert tokenize_prompt(tok, "hi", 64) == full and full[0] != tok.bos_token_id
    assert tokenize_prompt(tok, "hi", 3, truncate=True) == full[-3:]  # 'hi ASSISTANT :'


def test_pair_tokenization(tmp_path):
    records, _ = load_preference(write(tmp_path / "p.jsonl", PKU))
    tok = make_tok([r[k] for r in PKU for k in ("prompt", "response_0", "response_1")])
    out = tokenize_pair(tok, records[1], max_length=64)
    prompt = tokenize_prompt(tok, PKU[1]["prompt"], 64)
    assert out["input_ids_0"] == prompt + tok(" I cannot help with that", add_special_tokens=False)[
        "input_ids"
    ] + [tok.eos_token_id]
    assert (
        out["input_ids_1"][: len(prompt)] == prompt and out["input_ids_1"][-1] == tok.eos_token_id
    )
    assert (
        out["better_response_id"],
        out["safer_response_id"],
        out["is_safe_0"],
        out["is_safe_1"],
    ) == (1, 0, 1, 0)
    assert len(PreferenceDataset(records, tok, 64)) == 2


@pytest.mark.parametrize("pad", ["<eos>", None])
def test_tokenizer_without_a_distinct_pad(pad):
    tok = make_tok([WORDS], pad=pad)
    with pytest.raises(ValueError, match="pad token distinct from eos"):
        check_tokenizer(tok)
    with pytest.raises(ValueError, match="pad token"):
        SFTDataset([{"prompt": "hi", "response": "hello"}], tok, 64)


# -----------------------------------------------------------------------------
# collators


def test_pad_left_and_right():
    ids, mask = pad_left([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_right([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long


def test_collate_sft_right_pads_and_masks_labels():
    batch = [
        tokenize_sft(TOK, {"prompt": "hi", "response": r}, 64)
        for r in ("hello there how are you", "hello")
    ]
    out = collate_sft(batch, TOK.pad_token_id)
    n0, n1 = len(batch[0]["input_ids"]), len(batch[1]["input_ids"])
    assert out["input_ids"].shape == (2, n0) and n1 == n0 - 4
    assert out["input_ids"][1, n1:].tolist() == [TOK.pad_token_id] * 4
    assert out["attention_mask"].tolist() == [[1] * n0, [1] * n1 + [0] * 4]
    assert out["labels"][1, n1:].tolist() == [IGNORE_INDEX] * 4
    assert out["labels"][1, n1 - 1].item() == TOK.eos_token_id  # the EOS itself is learned


def test_collate_pref_pads_both_answers_to_one_length():
    recs = [
        dict(PKU[0], prompt="hi", response_0="hello", response_1="hello there how are you"),
        dict(
            PKU[1],
            prompt="hi",
            response_0="hi",
            response_1="hi",
            is_response_0_safe=None,
            is_response_1_safe=None,
        ),
    ]
    batch = [tokenize_pair(TOK, r, 64) for r in recs]
    out = collate_pref(batch, TOK.pad_token_id)
    L = len(batch[0]["input_ids_1"])
    assert out["input_ids_0"].shape == out["input_ids_1"].shape == out["mask_0"].shape == (2, L)
    assert out["mask_0"][0].tolist() == [1] * (L - 4) + [0] * 4
    assert out["input_ids_0"][0, L - 4 :].tolist() == [TOK.pad_token_id] * 4
    assert out["is_safe_0"].tolist() == [1, -1] and out["is_safe_1"].tolist() == [1, -1]
    assert out["better_response_id"].tolist() == [0, 1] and out["safer_response_id"].tolist() == [
        1,
        0,
    ]


def test_collate_prompts_left_pads_and_keeps_metadata(tmp_path):
    rows = [
        {"prompt": "hi", "harmful": False, "category": None},
        {"prompt": "tell me a story", "harmful": True, "category": "fraud"},
    ]
    ds = PromptDataset(load_prompts(write(tmp_path / "pr.jsonl", rows)), TOK, 64)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=2, collate_fn=lambda b: collate_prompts(b, TOK.pad_token_id)
    )
    out = next(iter(loader))
    n0, n1 = len(ds[0]["input_ids"]), len(ds[1]["input_ids"])
    assert out["input_ids"][0, : n1 - n0].tolist() == [TOK.pad_token_id] * (n1 - n0)  # pads first
    assert out["input_ids"][0, n1 - n0 :].tolist() == ds[0]["input_ids"]
    assert out["attention_mask"].tolist() == [[0] * (n1 - n0) + [1] * n0, [1] * n1]
    assert out["prompt"] == ["hi", "tell me a story"] and out["harmful"] == [False, True]
    assert out["category"] == [None, "fraud"] and out["_where"][1].endswith("pr.jsonl:2")


def _bpe(texts):
    """a small byte-level BPE (merges across word pieces, unlike the word-level toy tokenizer)"""
    from tokenizers import decoders, trainers

    t = Tokenizer(models.BPE(unk_token=None))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=600, special_tokens=["<pad>", "<eos>", "<bos>"])
    )
    t.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 2)]
    )
    t.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=t, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>"
    )


def test_batched_tokenization_equals_one_record_at_a_time(tmp_path):
    """The datasets encode every distinct text in one batch call (nanosafe.data.Encoder); the ids
    must be exactly those of tokenizing each record alone. On the HH-RLHF dialogues (unicode,
    multi-turn, long) when present, else on the PKU examples."""
    if HH_PATH.exists():
        records = load_preference(HH_PATH, drop_bad=True)[0][:300]
    else:
        records = load_preference(write(tmp_path / "p.jsonl", PKU))[0]
    texts = [
        format_prompt(r["prompt"], "<eos>") + " " + r["response_0"] + " " + r["response_1"]
        for r in records
    ]
    tok = _bpe(texts)
    pairs = PreferenceDataset(records, tok, max_length=4096)
    for r, got in zip(records, pairs.items):
        assert got == tokenize_pair(tok, r, max_length=4096)
    sft = [dict(prompt=r["prompt"], response=r["response_1"], _where=r["_where"]) for r in records]
    assert SFTDataset(sft, tok, max_length=4096).items == [
        tokenize_sft(tok, r, max_length=4096) for r in sft
    ]
    # and the ids decode back to the texts: the comparison is not between two empty lists
    assert tok.decode(pairs.items[0]["input_ids_0"], skip_special_tokens=True).endswith(
        records[0]["response_0"]
    )


# -----------------------------------------------------------------------------
# --template chat: the tokenizer's own chat template

# SmolLM2's ChatML template (without its default system prompt)
CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT_TEXTS = [
    "how do I bake bread",
    "mix flour and water, then bake it for an hour",
    "and rye bread?",
    "the same, with rye flour",
    "tell me a story",
    "once upon a time there was an end",
]


def chat_tok(template=CHATML, bos=False):
    """a byte-level BPE whose eos is ChatML's <|im_end|> (pad distinct); bos: the tokenizer adds a
    <bos> with add_special_tokens=True, as Llama's do"""
    from tokenizers import decoders, trainers

    t = Tokenizer(models.BPE(unk_token=None))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.train_from_iterator(
        CHAT_TEXTS * 20,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<pad>", "<|im_start|>", "<|im_end|>", "<bos>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    if bos:
        t.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", 3)]
        )
    t.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=t,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        bos_token="<bos>" if bos else None,
    )
    tok.chat_template = template
    return tok


def hf_chat_ids(tok, messages):
    """transformers' own tokenization of the template (a BatchEncoding in transformers 5, a list
    before)"""
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_chat_prompt_is_the_tokenizers_chat_template():
    tok = chat_tok()
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id != tok.eos_token_id
    one = [{"role": "user", "content": "how do I bake bread"}]
    assert (
        prompt_text(tok, " how do I bake bread\n", "chat")
        == "<|im_start|>user\nhow do I bake bread<|im_end|>\n<|im_start|>assistant\n"
    )
    got = tokenize_prompt(tok, "how do I bake bread", 10**9, template="chat")
    assert got == hf_chat_ids(tok, one) and got[:1] == [tok.convert_tokens_to_ids("<|im_start|>")]
    dialogue = [
        "how do I bake bread",
        "mix flour and water, then bake it for an hour",
        "and rye bread?",
    ]
    many = [
        {"role": "user", "content": dialogue[0]},
        {"role": "assistant", "content": dialogue[1]},
        {"role": "user", "content": dialogue[2]},
    ]
    got = tokenize_prompt(tok, dialogue, 10**9, template="chat")
    assert (
        got == hf_chat_ids(tok, many) and got.count(tok.eos_token_id) == 3
    )  # one <|im_end|> a turn
    assert tok.decode(got).endswith(
        "<|im_end|>\n<|im_start|>user\nand rye bread?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chat_sft_and_pair_are_prompt_answer_eos():
    tok = chat_tok()
    rec = {
        "prompt": [
            "how do I bake bread",
            "mix flour and water, then bake it for an hour",
            "and rye bread?",
        ],
        "response": " the same, with rye flour \n",
        "_where": "x:1",
    }
    out = tokenize_sft(tok, rec, 10**9, template="chat")
    prompt = tokenize_prompt(tok, rec["prompt"], 10**9, template="chat")
    answer = tok("the same, with rye flour", add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id
    ]
    assert out["input_ids"] == prompt + answer and not out["truncated"]
    assert out["labels"] == [IGNORE_INDEX] * len(prompt) + answer
    # the training sequence is the finished conversation as the template writes it (less its last
    # '\n')
    whole = tok.apply_chat_template(
        [
            {"role": r, "content": c}
            for r, c in zip(
                ["user", "assistant", "user", "assistant"],
                rec["prompt"] + ["the same, with rye flour"],
            )
        ],
        tokenize=False,
    )
    assert tok.decode(out["input_ids"]) + "\n" == whole
    # the datasets' one-batch tokenization gives the same ids
    assert SFTDataset([rec], tok, 10**9, template="chat").items == [out]
    pair = dict(PKU[0], response_0="mix flour and water", _where="x:2")
    got = tokenize_pair(tok, pair, 10**9, template="chat")
    prompt = hf_chat_ids(tok, [{"role": "user", "content": "how do I bake bread"}])
    assert got["input_ids_0"] == prompt + tok("mix flour and water", add_special_tokens=False)[
        "input_ids"
    ] + [tok.eos_token_id]
    assert (
        got["input_ids_1"][: len(prompt)] == prompt and got["input_ids_1"][-1] == tok.eos_token_id
    )
    assert PreferenceDataset([pair], tok, 10**9, template="chat").items == [got]
    ds = PromptDataset([{"prompt": "tell me a story", "_where": "x:3"}], tok, 64, template="chat")
    assert ds[0]["input_ids"] == hf_chat_ids(tok, [{"role": "user", "content": "tell me a story"}])


def test_chat_template_owns_the_bos():
    """a template that writes the BOS itself (Llama 3's does) gets one BOS, not two; a cut prompt
    keeps it first"""
    tok = chat_tok("{{ bos_token }}" + CHATML, bos=True)
    assert tok("x")["input_ids"][0] == tok.bos_token_id  # the tokenizer would add one too
    full = tokenize_prompt(tok, "tell me a story", 10**9, template="chat")
    assert full == hf_chat_ids(tok, [{"role": "user", "content": "tell me a story"}])
    assert full.count(tok.bos_token_id) == 1 and full[0] == tok.bos_token_id
    n = len(tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"])
    cut = tokenize_prompt(tok, "tell me a story", n + 1, truncate=True, template="chat")
    assert cut == full[:1] + full[-n:] and tok.decode(cut[1:]) == "<|im_start|>assistant\n"
    assert len(full) > n + 1


def test_safe_rlhf_template_is_the_default_and_unchanged():
    dialogue = ["hi", "hello there", "how are you"]
    want = [TOK.bos_token_id] + ids(format_prompt(dialogue, "<eos>"))
    assert (
        tokenize_prompt(TOK, dialogue, 64)
        == tokenize_prompt(TOK, dialogue, 64, template="safe_rlhf")
        == want
    )
    rec = {"prompt": dialogue, "response": "once upon a time"}
    out = tokenize_sft(TOK, rec, 64, template="safe_rlhf")
    assert out == tokenize_sft(TOK, rec, 64)
    assert out["input_ids"] == want + ids(" once upon a time") + [TOK.eos_token_id]
    pair = dict(PKU[0], prompt="hi", response_0="hello", response_1="hello there")
    assert tokenize_pair(TOK, pair, 64, template="safe_rlhf") == tokenize_pair(TOK, pair, 64)


def test_chat_template_missing_or_unknown_is_one_line():
    tok = make_tok([WORDS])  # no chat template
    for call in (
        lambda: check_template(tok, "chat"),
        lambda: tokenize_prompt(tok, "hi", 64, template="chat"),
        lambda: SFTDataset([{"prompt": "hi", "response": "hello"}], tok, 64, template="chat"),
        lambda: PromptDataset([{"prompt": "hi"}], tok, 64, template="chat"),
    ):
        with pytest.raises(
            ValueError,
            match="^--template chat: the tokenizer has no chat template; use "
            "--template safe_rlhf, or a tokenizer with a chat template$",
        ):
            call()
    with pytest.raises(
        ValueError, match=r"^--template chatml: unknown template; expected one of safe_rlhf, chat$"
    ):
        PreferenceDataset([PKU[0]], TOK, 64, template="chatml")
    check_template(chat_tok(), "chat")
    check_template(tok, "safe_rlhf")


# -----------------------------------------------------------------------------
# --truncate_prompts keeps the answer: whole if short, half of max_length if long

LONG = " ".join((WORDS.split() * 10)[:291])  # 291 words: a 300-token prompt with BOS and template
ANSWER_20 = " ".join(WORDS.split()[:20])
ANSWER_100 = "one two three four five six seven eight nine ten " * 10


def test_truncation_keeps_short_answers_whole_and_half_of_long_ones(tmp_path):
    full = tokenize_prompt(TOK, LONG, 10**9)
    a20, a100 = ids(" " + ANSWER_20), ids(" " + ANSWER_100)
    assert len(full) == 300 and full[0] == TOK.bos_token_id and len(a20) == 20 and len(a100) == 100
    eos = TOK.eos_token_id
    # a 20-token answer + EOS is kept whole; the prompt gets 64 - 21 = 43: the BOS and its last 42
    # tokens
    out = tokenize_sft(TOK, {"prompt": LONG, "response": ANSWER_20}, 64, truncate_prompts=True)
    assert out["input_ids"] == full[:1] + full[-42:] + a20 + [eos] and len(out["input_ids"]) == 64
    assert out["labels"] == [IGNORE_INDEX] * 43 + a20 + [eos]
    assert (out["truncated"], out["cut_prompt"], out["cut_answers"]) == (True, 300 - 43, 0)
    # a 100-token answer keeps half of max_length: 31 tokens + EOS, and the prompt 32
    out = tokenize_sft(TOK, {"prompt": LONG, "response": ANSWER_100}, 64, truncate_prompts=True)
    assert out["input_ids"] == full[:1] + full[-31:] + a100[:31] + [eos]
    assert (out["cut_prompt"], out["cut_answers"]) == (300 - 32, 1)
    # a prompt that would fit beside a one-token answer is cut too, to keep half for the answer
    mid = " ".join(LONG.split()[:41])  # 50 tokens
    out = tokenize_sft(TOK, {"prompt": mid, "response": ANSWER_100}, 64, truncate_prompts=True)
    assert (
        out["input_ids"][:32] == [TOK.bos_token_id] + tokenize_prompt(TOK, mid, 10**9)[-31:]
        and out["cut_prompt"] == 18
    )
    # without --truncate_prompts that prompt is kept whole (as before) and the answer gets what is
    # left
    out = tokenize_sft(TOK, {"prompt": mid, "response": ANSWER_100}, 64)
    assert (
        out["input_ids"] == tokenize_prompt(TOK, mid, 10**9) + a100[:13] + [eos]
        and out["cut_prompt"] == 0
    )

    rows = [
        {"prompt": LONG, "response": ANSWER_20},
        {"prompt": "hi", "response": "hello"},
        {"prompt": LONG, "response": ANSWER_100},
    ]
    path = write(tmp_path / "sft.jsonl", rows)
    with pytest.raises(
        DataError,
        match=r"sft\.jsonl:1: prompt is 300 tokens, over the limit of 62 "
        r"\(--max_length 64 less one answer token and EOS\); .* pass --truncate_prompts to",
    ):
        SFTDataset(load_sft(path), TOK, 64)
    ds = SFTDataset(load_sft(path), TOK, 64, truncate_prompts=True)
    assert ds.n_truncated == 2
    assert ds.truncation == dict(
        path=str(path),
        n=3,
        prompts=2,
        cut_min=257,
        cut_max=268,
        cut_mean=262.5,
        answers=1,
        n_answers=3,
        limit="--max_length 64",
    )
    assert ds.truncation_report() == (
        f"{path}: 2 of 3 prompts cut to fit (by 257-268 tokens, mean 262.5); "
        "1 of 3 answers cut to fit --max_length 64"
    )
    assert SFTDataset(load_sft(path)[1:2], TOK, 64).truncation_report() == ""


def test_pair_truncation_makes_room_for_the_longer_answer(tmp_path):
    full = tokenize_prompt(TOK, LONG, 10**9)
    a10, a20, eos = ids(" " + " ".join(WORDS.split()[:10])), ids(" " + ANSWER_20), TOK.eos_token_id
    pair = dict(PKU[0], prompt=LONG, response_0=" ".join(WORDS.split()[:10]), response_1=ANSWER_20)
    out = tokenize_pair(TOK, pair, 64, truncate_prompts=True)
    # room for 20 + EOS: the prompt gets 43 (with the shorter answer's room, 53, response_1 would be
    # cut)
    assert out["input_ids_0"] == full[:1] + full[-42:] + a10 + [eos]
    assert out["input_ids_1"] == full[:1] + full[-42:] + a20 + [eos]
    assert (out["cut_prompt"], out["cut_answers"]) == (257, 0)
    path = write(tmp_path / "p.jsonl", [pair, dict(pair, response_0=ANSWER_100)])
    with pytest.raises(
        DataError,
        match=r"p\.jsonl:1: prompt is 300 tokens"
        r".*pass --truncate_prompts to keep only its last tokens$",
    ):
        PreferenceDataset(load_preference(path)[0], TOK, 64)
    ds = PreferenceDataset(load_preference(path)[0], TOK, 64, truncate_prompts=True)
    # pair 2: the 100-token answer sets the room to 32, so its answer is cut to 32 and the 20-token
    # one kept whole
    assert ds[1]["input_ids_0"] == full[:1] + full[-31:] + ids(" " + ANSWER_100)[:31] + [eos]
    assert ds[1]["input_ids_1"] == full[:1] + full[-31:] + a20 + [eos]
    assert (
        ds.truncation_report()
        == f"{path}: 2 of 2 prompts cut to fit (by 257-268 tokens, mean 262.5); "
        "1 of 4 answers cut to fit --max_length 64"
    )


def test_prompt_dataset_keeps_its_own_limit_and_reports(tmp_path):
    path = write(tmp_path / "pr.jsonl", [{"prompt": "hi"}, {"prompt": LONG}])
    with pytest.raises(
        DataError,
        match=r"pr\.jsonl:2: prompt is 300 tokens, over the limit of 48 \(--max_prompt_length 48\)",
    ):
        PromptDataset(load_prompts(path), TOK, 48)
    ds = PromptDataset(load_prompts(path), TOK, 48, truncate_prompts=True)
    full = tokenize_prompt(TOK, LONG, 10**9)
    assert ds[1]["input_ids"] == full[:1] + full[-47:] and ds.n_truncated == 1
    assert (
        ds.truncation_report()
        == f"{path}: 1 of 2 prompts cut to fit --max_prompt_length 48 (by 252 tokens, mean 252)"
    )
    assert PromptDataset(load_prompts(path), TOK, 300).truncation_report() == ""


def test_error_messages_name_flags_not_arguments(tmp_path):
    path = write(tmp_path / "p.jsonl", [dict(PKU[0], response_0="  ")])
    with pytest.raises(
        DataError,
        match=r"p\.jsonl:1: response_0 is empty \(expected non-empty text\); "
        r"pass --drop_bad to drop such pairs$",
    ):
        load_preference(path)
    with pytest.raises(DataError, match=r"over the limit of 4 \(--max_prompt_length 4\)"):
        tokenize_prompt(TOK, "hi", 4)


# -----------------------------------------------------------------------------
# dedupe_prompts


def test_dedupe_prompts_keeps_the_first_in_order(tmp_path):
    rows = [
        {"prompt": "hi"},
        {"prompt": "tell me", "harmful": True},
        {"prompt": "hi", "harmful": True},
        {"prompt": ["hi", "hello", "how are you"]},
        {"prompt": ["hi", "hello", "how are you"]},
        {"prompt": ["hi", "hello", "how are you?"]},
        {"prompt": ["hi"]},
        {"prompt": "hi "},
        {"prompt": "tell me"},
    ]
    path = write(tmp_path / "pr.jsonl", rows)
    records = load_prompts(path)
    assert len(records) == 9  # load_prompts keeps them all
    kept, dropped = dedupe_prompts(records)
    # dropped: line 3 ('hi' again), 5 (the same dialogue), 7 (['hi'] is the prompt 'hi'), 9; 'hi '
    # differs
    assert [r["_where"] for r in kept] == [f"{path}:{i}" for i in (1, 2, 4, 6, 8)] and dropped == 4
    assert (
        "harmful" not in kept[0] and kept[1]["harmful"] is True
    )  # the first copy, metadata and all
    assert dedupe_prompts(kept) == (kept, 0)
