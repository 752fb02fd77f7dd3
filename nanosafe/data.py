"""
Data for every stage: jsonl readers, the prompt templates, tokenization and collators.
Files are .jsonl or .jsonl.gz (by suffix), one JSON object per line:
  sft         prompt, response
  prompts     prompt [, harmful, category]
  preference  PKU-SafeRLHF: prompt, response_0, response_1, better_response_id,
              safer_response_id, is_response_0_safe, is_response_1_safe
              [, response_{0,1}_harm_category, response_{0,1}_severity_level]
              or HH-RLHF: chosen, rejected (raw '\\n\\nHuman: ...\\n\\nAssistant: ...' text)
A prompt is a string (one user turn) or a dialogue [user, assistant, ..., user].

Two templates (--template): 'safe_rlhf', the official code's 'BEGINNING OF CONVERSATION:
USER: ... ASSISTANT:' text, and 'chat', the tokenizer's own chat template (for
instruction-tuned checkpoints, which were trained on theirs).

Every problem with a file is found when it is loaded, never mid-epoch: readers check
every record, datasets tokenize everything up front, and each problem raises DataError
('path:line: what is wrong, what was expected'). Nothing changes silently:
- a preference pair with an empty answer is an error (--drop_bad drops it); pairs with
  identical answers or contradictory safety labels are kept and counted in a report
  (--drop_bad drops them too), which format_report() prints in one line.
- a prompt that leaves no room for an answer is an error naming its record.
  --truncate_prompts keeps the BOS (if there is one) and the *last* tokens instead, so
  the 'ASSISTANT:' the model answers after survives and the start of the conversation
  goes. It keeps room for the answer: whole if short, at least half of --max_length if
  long, since a pair or an SFT example with its answer cut to a token teaches nothing.
- an over-long answer is cut on the right, EOS always kept as the last token (the
  policy learns to stop there, score models read their score there).
- datasets count what they cut: .n_truncated records, .truncation (a dict) and
  .truncation_report(), one line for the scripts to print.
- load_prompts keeps duplicate prompts; dedupe_prompts drops them (rollout prompts).
"""
from __future__ import annotations

import gzip
import json
import os
import re

import torch

IGNORE_INDEX = -100  # label value the loss skips (torch cross_entropy's ignore_index)

# the template of the official PKU-Alignment/safe-rlhf code
PROMPT_BEGIN = 'BEGINNING OF CONVERSATION: '
PROMPT_USER = 'USER: {input} '
PROMPT_ASSISTANT = 'ASSISTANT:'  # no trailing space: the answer brings its own


class DataError(ValueError):
    """A problem with a data file; the message starts with 'path:line: ' or 'path: '."""


def _show(v, n=60):
    s = repr(v)
    return s if len(s) <= n else s[:n] + '...'

# -----------------------------------------------------------------------------
# reading and checking records

def read_jsonl(path):
    """[(lineno, dict)] for the non-blank lines of a .jsonl or .jsonl.gz file."""
    path = str(path)
    if not os.path.isfile(path):
        raise DataError(f'{path}: no such file')
    rows = []
    try:
        with (gzip.open if path.endswith('.gz') else open)(path, 'rb') as f:
            # read bytes and decode line by line, so even a bad utf-8 byte gets a line number
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode('utf-8')
                except UnicodeDecodeError as e:
                    raise DataError(f'{path}:{lineno}: not valid utf-8 ({e.reason})') from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as e:
                    raise DataError(f'{path}:{lineno}: not valid JSON ({e.msg}, column {e.colno}); '
                                    'expected one JSON object per line') from None
                if not isinstance(obj, dict):
                    raise DataError(f'{path}:{lineno}: expected a JSON object {{...}}, '
                                    f'got a {type(obj).__name__}: {_show(obj)}')
                rows.append((lineno, obj))
    except (OSError, EOFError) as e:  # a broken .gz: BadGzipFile is an OSError, a cut one EOFError
        raise DataError(f'{path}: cannot read the file ({e})') from None
    if not rows:
        raise DataError(f'{path}: empty: no records (expected one JSON object per line)')
    return rows

# (test, what it expects) pairs for _field
TEXT = (lambda v: isinstance(v, str) and v.strip() != '', 'a non-empty string')
PROMPT = (lambda v: TEXT[0](v) or isinstance(v, list) and len(v) % 2 == 1 and all(map(TEXT[0], v)),
          'a non-empty string, or a list of non-empty strings '
          'user, assistant, ..., user (odd length)')
STRING = (lambda v: isinstance(v, str), 'a string')
ID = (lambda v: type(v) is int and v in (0, 1), '0 or 1')  # type() is int: true/false are not ids
BOOL = (lambda v: isinstance(v, bool), 'true or false')
INT = (lambda v: type(v) is int, 'an integer')
CATEGORIES = (lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(b, bool)
                                                    for k, b in v.items()),
              'an object of category name -> true/false')


def _field(obj, key, where, check, optional=False):
    """obj[key] after checking it; an optional field may be absent or null (-> None)"""
    ok, expected = check
    if key not in obj or (optional and obj[key] is None):
        if optional:
            return None
        raise DataError(f"{where}: missing field '{key}' (expected {expected})")
    if not ok(obj[key]):
        raise DataError(f"{where}: field '{key}' must be {expected}, got {_show(obj[key])}")
    return obj[key]


def load_sft(path):
    """SFT records: prompt (string or dialogue), response (non-empty string)."""
    records = []
    for lineno, obj in read_jsonl(path):
        where = f'{path}:{lineno}'
        _field(obj, 'prompt', where, PROMPT)
        _field(obj, 'response', where, TEXT)
        records.append(dict(obj, _where=where))
    return records


def load_prompts(path):
    """Prompt-only records for rollouts and evaluation: prompt [, harmful, category]."""
    records = []
    for lineno, obj in read_jsonl(path):
        where = f'{path}:{lineno}'
        _field(obj, 'prompt', where, PROMPT)
        _field(obj, 'harmful', where, BOOL, optional=True)
        _field(obj, 'category', where, (TEXT[0], 'a non-empty string or null'), optional=True)
        records.append(dict(obj, _where=where))
    return records


def dedupe_prompts(records):
    """-> (records, n_dropped): records whose 'prompt' repeats an earlier one's are dropped, the
    first kept, the order kept, so a prompt repeated in a file is not sampled for rollouts more
    often than the others. (the official PromptOnlyDataset dedupes too, keeping the last copy.)
    a dialogue is compared as a tuple of its turns (a string as a one-turn dialogue), exactly;
    a scripted dialogue (a 'dialogue' spec, nanosafe/dialogue.py) by its spec too."""
    seen, kept = set(), []
    for r in records:
        key = (_prompt_key(r['prompt']), json.dumps(r.get('dialogue'), sort_keys=True))
        if key not in seen:
            seen.add(key)
            kept.append(r)
    return kept, len(records) - len(kept)


def _prompt_key(prompt):
    # a string is the same prompt as the one-turn dialogue [string]; lists are not hashable
    return (prompt,) if isinstance(prompt, str) else tuple(prompt)

# -----------------------------------------------------------------------------
# preference pairs: PKU-SafeRLHF or HH-RLHF, told apart by the file's first record

PKU_FIELDS = ('prompt', 'response_0', 'response_1', 'better_response_id', 'safer_response_id',
              'is_response_0_safe', 'is_response_1_safe')
_HH_SPLIT = re.compile(r'\n\n(Human|Assistant): ?')


def _pku_pair(obj, where):
    _field(obj, 'prompt', where, PROMPT)
    for i in (0, 1):
        _field(obj, f'response_{i}', where, STRING)  # empty answers: checked by the caller
        _field(obj, f'is_response_{i}_safe', where, BOOL)
        _field(obj, f'response_{i}_harm_category', where, CATEGORIES, optional=True)
        _field(obj, f'response_{i}_severity_level', where, INT, optional=True)
    _field(obj, 'better_response_id', where, ID)
    _field(obj, 'safer_response_id', where, ID)
    return dict(obj)


def _hh_turns(text, key, where):
    """raw HH-RLHF text -> (turns, merged). a run of one speaker is one turn: a few HH
    dialogues repeat '\\n\\nAssistant:'; merged says this one did."""
    parts = _HH_SPLIT.split(text)  # [before, role, text, role, text, ...]
    if parts[0].strip() or len(parts) < 3 or parts[1] != 'Human':
        raise DataError(f"{where}: field '{key}' must start with '\\n\\nHuman: ', "
                        f"got {_show(text)}")
    roles, segments = [], []
    for role, seg in zip(parts[1::2], parts[2::2]):
        if roles and roles[-1] == role:
            segments[-1].append(seg)
        else:
            roles.append(role)
            segments.append([seg])
    if roles[-1] != 'Assistant':
        raise DataError(f"{where}: field '{key}' must end with an '\\n\\nAssistant: ' answer")
    turns = ['\n\n'.join(s.strip() for s in segs if s.strip()) for segs in segments]
    return turns, len(roles) < len(parts) // 2


def _hh_pair(obj, where):
    c, merged_c = _hh_turns(_field(obj, 'chosen', where, STRING), 'chosen', where)
    r, merged_r = _hh_turns(_field(obj, 'rejected', where, STRING), 'rejected', where)
    if c[:-1] != r[:-1]:
        k = next((i for i, (a, b) in enumerate(zip(c, r)) if a != b), min(len(c), len(r)) - 1)
        raise DataError(f"{where}: 'chosen' and 'rejected' must share the conversation before "
                        f"their final answers; they differ at turn {k + 1}")
    # HH has only a relative judgement, so: chosen is response 0, better and (in
    # harmless-base) safer; no absolute safety labels (None)
    pair = dict(prompt=c[0] if len(c) == 2 else c[:-1], response_0=c[-1], response_1=r[-1],
                better_response_id=0, safer_response_id=0,
                is_response_0_safe=None, is_response_1_safe=None)
    return pair, merged_c or merged_r


def load_preference(path, drop_bad=False):
    """Preference pairs in the PKU-SafeRLHF schema -> (records, report).

    HH-RLHF files become the same schema: the prompt is every turn before the final
    answer, response_0/1 the chosen/rejected final answers, better_response_id =
    safer_response_id = 0 (in harmless-base, chosen is the more harmless answer; for
    helpful-base files only better_response_id means anything, so don't train a cost
    model on them), is_response_i_safe = None (HH has no absolute safety labels, so the
    cost model's sign term must be off).

    report: path, format, n (pairs read), lists of 'path:line' for pairs with an empty
    answer or turn (an error unless drop_bad), identical answers, contradictory safety
    labels (the safer answer labelled unsafe, the other safe) and HH turns merged;
    dropped (how many drop_bad removed).
    """
    rows = read_jsonl(path)
    lineno, first = rows[0]
    if 'chosen' in first and 'rejected' in first:
        fmt, parse = 'hh-rlhf', _hh_pair
        names = "chosen's final answer", "rejected's final answer", 'a turn before them'
    elif 'response_0' in first:
        fmt, parse = 'pku-saferlhf', lambda obj, where: (_pku_pair(obj, where), False)
        names = 'response_0', 'response_1', 'a turn of the prompt'
    else:
        raise DataError(f'{path}:{lineno}: unknown preference format: expected PKU-SafeRLHF '
                        f'fields ({", ".join(PKU_FIELDS)}) or HH-RLHF fields (chosen, rejected), '
                        f'got {sorted(first)}')
    report = dict(path=str(path), format=fmt, n=len(rows), empty=[], identical=[],
                  contradictory=[], merged=[], dropped=0)
    records = []
    for lineno, obj in rows:
        where = f'{path}:{lineno}'
        pair, merged = parse(obj, where)
        pair['_where'] = where
        if merged:
            report['merged'].append(where)
        turns = [pair['prompt']] if isinstance(pair['prompt'], str) else pair['prompt']
        answers = pair['response_0'].strip(), pair['response_1'].strip()
        safe = pair['is_response_0_safe'], pair['is_response_1_safe']
        s = pair['safer_response_id']
        empty = [n for n, a in zip(names, answers) if not a]
        if not all(t.strip() for t in turns):
            empty.append(names[2])
        bad = None
        if empty:
            if not drop_bad:
                raise DataError(f'{where}: {empty[0]} is empty (expected non-empty text); '
                                'pass --drop_bad to drop such pairs')
            bad = 'empty'
        elif answers[0] == answers[1]:
            bad = 'identical'
        elif safe[s] is False and safe[1 - s] is True:
            bad = 'contradictory'
        if bad:
            report[bad].append(where)
        if bad and drop_bad:
            report['dropped'] += 1
        else:
            records.append(pair)
    if not records:
        raise DataError(f'{path}: no pairs left after dropping {report["dropped"]} bad ones')
    return records, report


def format_report(report):
    """one line: what load_preference found and did"""
    def part(key, what):
        wheres = report[key]
        return f'{len(wheres)} {what}' + (f' (first: {wheres[0]})' if wheres else '')
    parts = [part('empty', 'with an empty answer'), part('identical', 'with identical answers'),
             part('contradictory', 'with contradictory safety labels')]
    if report['merged']:
        parts.append(part('merged', 'with repeated-speaker turns merged'))
    return (f"{report['path']}: {report['n']} pairs ({report['format']}), " + ', '.join(parts) +
            f"; dropped {report['dropped']}, kept {report['n'] - report['dropped']}")

# -----------------------------------------------------------------------------
# templates and tokenization

# 'safe_rlhf': the official code's text template; 'chat': the tokenizer's own chat template
TEMPLATES = ('safe_rlhf', 'chat')


def format_response(response):
    # the official code appends answers right after 'ASSISTANT:'; we add one space so
    # BPE tokenizers see ' word', the form words take mid-text. earlier assistant turns
    # get it too, so a dialogue's history looks like what the model generates
    return ' ' + response.strip()


def _turns(prompt):
    turns = [prompt] if isinstance(prompt, str) else list(prompt)
    if len(turns) % 2 != 1:
        raise ValueError(f'a dialogue alternates user, assistant, ..., user turns, so it has an '
                         f'odd number of them; got {len(turns)}')
    return turns


def format_prompt(prompt, eos_token):
    """template text for one user turn or a dialogue [user, assistant, ..., user]; it ends
    with 'ASSISTANT:', where the answer begins. turns are stripped: the template owns the
    whitespace around them."""
    out = [PROMPT_BEGIN]
    for i, turn in enumerate(_turns(prompt)):
        if i % 2 == 0:
            out.append(PROMPT_USER.format(input=turn.strip()) + PROMPT_ASSISTANT)
        else:
            out.append(format_response(turn) + eos_token)
    return ''.join(out)


def chat_messages(prompt):
    """prompt -> chat messages [{'role': 'user', 'content': ...}, {'role': 'assistant', ...}, ...];
    turns stripped, like an answer the model generates"""
    return [{'role': ('user', 'assistant')[i % 2], 'content': turn.strip()}
            for i, turn in enumerate(_turns(prompt))]


def check_template(tok, template):
    if template not in TEMPLATES:
        raise DataError(f'--template {template}: unknown template; '
                        f'expected one of {", ".join(TEMPLATES)}')
    if template == 'chat' and not getattr(tok, 'chat_template', None):
        name = f' {tok.name_or_path}' if getattr(tok, 'name_or_path', '') else ''
        raise DataError(f'--template chat: the tokenizer{name} has no chat template; use '
                         '--template safe_rlhf, or a tokenizer with a chat template')


def prompt_text(tok, prompt, template='safe_rlhf'):
    """the text a prompt becomes, ending where the answer begins. safe_rlhf: format_prompt's
    (the BOS, if the tokenizer adds one, is added to the ids, not written here); chat: the
    tokenizer's chat template with its generation prompt, special tokens and all."""
    check_template(tok, template)
    if template == 'safe_rlhf':
        return format_prompt(prompt, tok.eos_token)
    return tok.apply_chat_template(chat_messages(prompt), add_generation_prompt=True,
                                   tokenize=False)


def answer_text(response, template='safe_rlhf'):
    """the text an answer is encoded from; its EOS follows as a token. chat: no leading space,
    as the generation prompt ends where the answer starts (after 'assistant\\n' in ChatML)"""
    return format_response(response) if template == 'safe_rlhf' else response.strip()


def check_tokenizer(tok):
    if tok.eos_token_id is None:
        raise ValueError('the tokenizer has no eos token; every response must end with one')
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        got = ('no pad token' if tok.pad_token_id is None
               else f'pad token == eos token (id {tok.eos_token_id})')
        raise ValueError(f"the tokenizer has {got}. nanosafe needs a pad token distinct from eos: "
                         "masks built from 'id != pad' would hide every real EOS, so the policy "
                         "never learns to stop and score models read their score one token early. "
                         "add one, e.g. tok.add_special_tokens({'pad_token': '<pad>'}), and resize "
                         "the model's embeddings")


def _adds_bos(tok):
    ids = tok('a', add_special_tokens=True)['input_ids']
    return tok.bos_token_id is not None and ids[:1] == [tok.bos_token_id]


class Encoder:
    """text -> token ids without special tokens, memoised. Texts given up front are encoded in
    one batch call: a data set repeats its prompts many times, and the Rust tokenizer is far
    faster on a list (the 97k toy pairs load in 5.6 s instead of 23 s). One Encoder per data
    set, so a tokenizer changed later (a pad token added) never meets a stale cache."""

    def __init__(self, tok, texts=()):
        self.tok = tok
        self.bos = [tok.bos_token_id] if _adds_bos(tok) else []
        texts = list(dict.fromkeys(texts))
        ids = tok(texts, add_special_tokens=False)['input_ids'] if texts else []
        self.cache = dict(zip(texts, ids))
        self.prompts = {}  # (prompt, template) -> prompt_text: a chat template renders in ~20 us

    def __call__(self, text):
        if text not in self.cache:
            self.cache[text] = self.tok(text, add_special_tokens=False)['input_ids']
        return self.cache[text]

    def prompt(self, prompt, template):
        """prompt_text, memoised"""
        key = (_prompt_key(prompt), template)
        if key not in self.prompts:
            self.prompts[key] = prompt_text(self.tok, prompt, template)
        return self.prompts[key]


def _prompt_ids(tok, prompt, max_len, truncate, where, limit, enc, template):
    """(ids, n_cut): the prompt's ids and how many tokens truncation took from them. prompt and
    answer are tokenized apart, so the prompt tokens here are exactly the ones generation
    starts from."""
    # safe_rlhf: we add the BOS the tokenizer would; chat: the template writes its special tokens
    ids = (enc.bos if template == 'safe_rlhf' else []) + enc(enc.prompt(prompt, template))
    if len(ids) <= max_len:
        return ids, 0
    if not truncate:
        raise DataError(f'{where}: prompt is {len(ids)} tokens, over the limit of {max_len} '
                        f'({limit}); raise the limit, shorten the prompt, or pass '
                        '--truncate_prompts to keep only its last tokens')
    head = ids[:1] if tok.bos_token_id is not None and ids[:1] == [tok.bos_token_id] else []
    if max_len <= len(head):
        raise ValueError(f'{limit} leaves no room for a prompt')
    return head + ids[len(ids) - (max_len - len(head)):], len(ids) - max_len  # [BOS] + last tokens


def _answer_ids(tok, response, enc, template):
    return enc(answer_text(response, template)) + [tok.eos_token_id]


def _fit(answer, room):
    """(ids, cut): the answer cut on the right to `room` tokens, its EOS kept last"""
    if len(answer) <= room:
        return answer, False
    return answer[:room - 1] + answer[-1:], True


def tokenize_prompt(tok, prompt, max_prompt_length, truncate=False, where='<prompt>',
                    template='safe_rlhf'):
    """ids of the prompt's template text, ending where the answer begins; safe_rlhf: [BOS if the
    tokenizer adds one] + format_prompt's text"""
    limit = f'--max_prompt_length {max_prompt_length}'
    return _prompt_ids(tok, prompt, max_prompt_length, truncate, where, limit, enc=Encoder(tok),
                       template=template)[0]


def _record_prompt_ids(tok, record, answer_len, max_length, truncate, enc, template):
    # kept whole, the prompt need only leave room for one answer token and the EOS; cut, it
    # leaves room for the whole answer (answer_len: ids + EOS) when short, half of max_length
    # when long: a prompt cut to leave a one-token answer would teach nothing
    room = min(answer_len, max_length // 2) if truncate else 2
    less = f'{room} answer tokens' if truncate else 'one answer token and EOS'
    limit = f'--max_length {max_length} less {less}'
    return _prompt_ids(tok, record['prompt'], max_length - room, truncate,
                       record.get('_where', '<record>'), limit, enc, template)


def tokenize_sft(tok, record, max_length, truncate_prompts=False, enc=None, template='safe_rlhf'):
    """input_ids = prompt + answer + EOS; labels = the same with IGNORE_INDEX on the prompt.
    cut_prompt: the tokens truncation took from the prompt; cut_answers: 1 if the answer was cut"""
    enc = enc or Encoder(tok)
    answer = _answer_ids(tok, record['response'], enc, template)
    prompt, cut_p = _record_prompt_ids(tok, record, len(answer), max_length, truncate_prompts,
                                       enc, template)
    answer, cut_a = _fit(answer, max_length - len(prompt))
    return dict(input_ids=prompt + answer, labels=[IGNORE_INDEX] * len(prompt) + answer,
                truncated=bool(cut_p or cut_a), cut_prompt=cut_p, cut_answers=int(cut_a))


def tokenize_pair(tok, record, max_length, truncate_prompts=False, enc=None, template='safe_rlhf'):
    """input_ids_i = prompt + response_i + EOS, plus the labels (is_safe_i: 1, 0 or None)"""
    enc = enc or Encoder(tok)
    a0, a1 = (_answer_ids(tok, record[k], enc, template) for k in ('response_0', 'response_1'))
    # room for the longer answer: the pair compares the two, so neither is cut for the prompt's sake
    prompt, cut_p = _record_prompt_ids(tok, record, max(len(a0), len(a1)), max_length,
                                       truncate_prompts, enc, template)
    (a0, cut_0), (a1, cut_1) = (_fit(a, max_length - len(prompt)) for a in (a0, a1))
    safe = [None if s is None else int(s)
            for s in (record['is_response_0_safe'], record['is_response_1_safe'])]
    return dict(input_ids_0=prompt + a0, input_ids_1=prompt + a1,
                better_response_id=record['better_response_id'],
                safer_response_id=record['safer_response_id'],
                is_safe_0=safe[0], is_safe_1=safe[1], truncated=bool(cut_p or cut_0 or cut_1),
                cut_prompt=cut_p, cut_answers=cut_0 + cut_1)


def _encoder(tok, records, answer_keys, template):
    """An Encoder primed with every distinct prompt and answer text of `records`."""
    prompts = {}
    for r in records:
        key = (_prompt_key(r['prompt']), template)
        if key not in prompts:
            try:
                prompts[key] = prompt_text(tok, r['prompt'], template)
            except ValueError:  # not primed; _prompt_ids raises it again for that record
                pass
    enc = Encoder(tok, list(prompts.values())
                  + [answer_text(r[k], template) for r in records for k in answer_keys])
    enc.prompts.update(prompts)
    return enc


def _truncation(records, prompt_cuts, answers_cut, n_answers, limit):
    """what a dataset cut: prompts (how many), cut_min/max/mean (tokens lost), answers (how many)"""
    paths = dict.fromkeys(r.get('_where', '<records>').rsplit(':', 1)[0] for r in records)
    cuts = [c for c in prompt_cuts if c]
    return dict(path=', '.join(paths), n=len(records), prompts=len(cuts),
                cut_min=min(cuts, default=0), cut_max=max(cuts, default=0),
                cut_mean=sum(cuts) / len(cuts) if cuts else 0.0,
                answers=answers_cut, n_answers=n_answers, limit=limit)


class _Tokenized(torch.utils.data.Dataset):
    # the datasets tokenize everything in __init__, so a bad record fails at load, not mid-epoch
    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def truncation_report(self):
        """one line: what was cut to fit the limit ('' when nothing)"""
        t, parts, limit = self.truncation, [], ' ' + self.truncation['limit']
        if t['answers']:
            parts.append(f"{t['answers']:,} of {t['n_answers']:,} answers cut to fit{limit}")
            limit = ''  # named once, at the end of the line
        if t['prompts']:
            by = f"{t['cut_min']:,}" + (f"-{t['cut_max']:,}" if t['cut_max'] > t['cut_min'] else '')
            mean = f"{t['cut_mean']:,.1f}".removesuffix('.0')
            parts.insert(0, f"{t['prompts']:,} of {t['n']:,} prompts cut to fit{limit} "
                            f"(by {by} tokens, mean {mean})")
        return f"{t['path']}: " + '; '.join(parts) if parts else ''


class SFTDataset(_Tokenized):
    def __init__(self, records, tok, max_length, truncate_prompts=False, template='safe_rlhf'):
        check_tokenizer(tok)
        check_template(tok, template)
        enc = _encoder(tok, records, ['response'], template)
        self.items = [tokenize_sft(tok, r, max_length, truncate_prompts, enc, template)
                      for r in records]
        self.n_truncated = sum(x['truncated'] for x in self.items)
        self.truncation = _truncation(records, [x['cut_prompt'] for x in self.items],
                                      sum(x['cut_answers'] for x in self.items), len(records),
                                      f'--max_length {max_length}')


class PreferenceDataset(_Tokenized):
    def __init__(self, records, tok, max_length, truncate_prompts=False, template='safe_rlhf'):
        check_tokenizer(tok)
        check_template(tok, template)
        enc = _encoder(tok, records, ['response_0', 'response_1'], template)
        self.items = [tokenize_pair(tok, r, max_length, truncate_prompts, enc, template)
                      for r in records]
        self.n_truncated = sum(x['truncated'] for x in self.items)
        self.truncation = _truncation(records, [x['cut_prompt'] for x in self.items],
                                      sum(x['cut_answers'] for x in self.items), 2 * len(records),
                                      f'--max_length {max_length}')


class PromptDataset(_Tokenized):
    """items: the record (prompt, harmful, category, _where, ...) plus its input_ids. prompts for
    rollouts have their own limit: the answer's is --max_new_tokens"""
    def __init__(self, records, tok, max_prompt_length, truncate_prompts=False,
                 template='safe_rlhf'):
        check_tokenizer(tok)
        check_template(tok, template)
        enc = _encoder(tok, records, [], template)
        limit = f'--max_prompt_length {max_prompt_length}'
        self.items, cuts = [], []
        for r in records:
            ids, cut = _prompt_ids(tok, r['prompt'], max_prompt_length, truncate_prompts,
                                   r.get('_where', '<record>'), limit, enc, template)
            self.items.append(dict(r, input_ids=ids))
            cuts.append(cut)
        self.n_truncated = sum(c > 0 for c in cuts)
        self.truncation = _truncation(records, cuts, 0, 0, limit)

# -----------------------------------------------------------------------------
# collators: lists of token ids -> padded LongTensors [B, L] and masks (1 = real token)

def _pad(seqs, pad_id, left):
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(L - len(s), L) if left else slice(0, len(s))
        ids[i, span] = torch.tensor(s, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def pad_left(seqs, pad_id):
    return _pad(seqs, pad_id, left=True)


def pad_right(seqs, pad_id):
    return _pad(seqs, pad_id, left=False)


def collate_sft(batch, pad_id):
    input_ids, attention_mask = pad_right([b['input_ids'] for b in batch], pad_id)
    labels, _ = pad_right([b['labels'] for b in batch], IGNORE_INDEX)  # pads are never learned
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def collate_pref(batch, pad_id):
    # both answers are padded to one length, so a score model can run them as one [2B, L] batch
    B = len(batch)
    ids, mask = pad_right([b[k] for k in ('input_ids_0', 'input_ids_1') for b in batch], pad_id)

    def labels(k):  # -1 marks unknown (HH-RLHF has no is_safe labels)
        return torch.tensor([-1 if b[k] is None else int(b[k]) for b in batch], dtype=torch.long)
    return dict(input_ids_0=ids[:B], mask_0=mask[:B], input_ids_1=ids[B:], mask_1=mask[B:],
                better_response_id=labels('better_response_id'),
                safer_response_id=labels('safer_response_id'),
                is_safe_0=labels('is_safe_0'), is_safe_1=labels('is_safe_1'))


def collate_prompts(batch, pad_id):
    # left padding: every prompt ends at the last column, where generation appends tokens
    input_ids, attention_mask = pad_left([b['input_ids'] for b in batch], pad_id)
    out = dict(input_ids=input_ids, attention_mask=attention_mask)
    for key in dict.fromkeys(k for b in batch for k in b if k != 'input_ids'):
        out[key] = [b.get(key) for b in batch]  # prompt, harmful, category, _where, ... as lists
    return out
