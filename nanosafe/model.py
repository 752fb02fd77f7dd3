"""
Models, tokenizers and checkpoints.

- `load_policy`: any local AutoModelForCausalLM folder (no hub, trust_remote_code only on request)
- `ScoreModel`: a reward or cost model, stored as a Hugging Face AutoModelForSequenceClassification
  folder with one label (what TRL, OpenRLHF and reward-bench load), read per token: its head
  gives a score at every position (what the critics need), and a sequence's score is the score
  at its last non-pad token (what the preference losses and PPO use).
- `save_checkpoint` / `load_trainer_state`: atomic Hugging Face folders plus a small JSON of
  nanosafe state, weights only through safetensors, trainer state through weights_only loads.

The pad token is always distinct from EOS: with pad == eos the EOS gets masked as padding
and the score is read one token early. The toy world's tokenizer and Llama live in toy.py.
"""

import copy
import json
import os
import shutil

import torch
import torch.nn as nn
import transformers
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from nanosafe import fsdp
from nanosafe.generate import position_ids_from_mask as position_ids  # skip left padding

# the floor the code needs: 4.55 fails on DynamicCache(config=...) and from_pretrained(dtype=...)
if tuple(int(x) for x in transformers.__version__.split(".")[:2] if x.isdigit()) < (4, 56):
    raise ImportError(f"nanosafe needs transformers >= 4.56 (found {transformers.__version__}): "
                      f"pip install -U 'transformers>=4.56'")

transformers.utils.logging.set_verbosity_error()  # no reports of the lm_head a score model drops
transformers.utils.logging.disable_progress_bar()

STATE_FILE, TRAINER_FILE = "nanosafe.json", "trainer_state.pt"


class CheckpointError(ValueError):
    """A checkpoint that is missing, half-written, or of the wrong kind."""

# -----------------------------------------------------------------------------
# tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    if not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
        # transformers would fall through to a sentencepiece traceback that blames the wrong thing
        raise CheckpointError(f"{path}: no tokenizer in the folder (none of "
                              f"{', '.join(TOKENIZER_FILES)}); save the model's tokenizer beside "
                              f"its "
                              f"weights: tokenizer.save_pretrained('{path}')")
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True,
                                            trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:200]
        raise CheckpointError(f"{path}: the tokenizer does not load ({type(e).__name__}: {first})"
                              ) from None
    tok.padding_side = "left"  # only matters for tok(...) calls; our collators pad explicitly
    return tok


def ensure_pad_token(tok, model=None) -> bool:
    """Give the tokenizer a pad token distinct from EOS (adding one and growing the embeddings
    if needed). Returns True when something was added."""
    if tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id:
        return False
    found = "no pad token" if tok.pad_token_id is None else "pad == eos"
    tok.add_special_tokens({"pad_token": "<pad>"})
    if model is not None:
        if model.get_input_embeddings().weight.shape[0] < len(tok):
            model.resize_token_embeddings(len(tok))
        model.config.pad_token_id = tok.pad_token_id
    print(f"note: the tokenizer had {found}; "
          f"added <pad> (id {tok.pad_token_id}) and resized the embeddings to {len(tok)}")
    return True


def check_vocab(model, tok, where: str):
    """A checkpoint trained with another vocabulary would read garbage ids: refuse it."""
    n_emb = model.get_input_embeddings().weight.shape[0]
    if n_emb < len(tok):
        raise CheckpointError(f"{where}: the model has {n_emb} embedding rows but its tokenizer "
                              f"has {len(tok)} tokens: a checkpoint from a different vocabulary")


def check_same_tokenizer(tok_a, tok_b, where_a: str, where_b: str):
    if tok_a.get_vocab() != tok_b.get_vocab() or tok_a.eos_token_id != tok_b.eos_token_id:
        raise CheckpointError(f"{where_a} and {where_b} use different tokenizers: the policy's "
                              f"token ids would mean other words to the reward/cost model. Train "
                              f"them from the same base.")

# -----------------------------------------------------------------------------
# models


def require_stage(path: str, command: str):
    """A checkpoint an earlier stage writes, or one error line naming the command that makes it."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint. Run the earlier stage first: "
                              f"python {command}")


def read_state(path: str) -> dict:
    p = os.path.join(path, STATE_FILE)
    return json.load(open(p)) if os.path.exists(p) else {}


def trained_from_scratch(path) -> bool:
    """Is the policy at `path` the toy world's kind, trained from scratch by train_sft.py (or a
    later stage of one), rather than a pretrained checkpoint? No path: train_sft.py's fresh toy
    model; a folder that does not exist yet: the toy pipeline's default (out/sft), which the
    stage then asks for. Follows each nanosafe stage's --model back to the first SFT's start."""
    for _ in range(16):  # sft <- rm/cm or ppo_lag <- a later round: a few links at most
        if path is None or not os.path.isdir(path):
            return True
        state = read_state(path)
        if not state:  # no nanosafe.json: a checkpoint from elsewhere, pretrained
            return False
        parent = (state.get("args") or {}).get("model")
        if state.get("stage") == "sft":
            if parent is None:
                return True
            if not read_state(parent):  # started from a checkpoint from elsewhere (or not here)
                return False
        path = parent  # an SFT from a nanosafe SFT (the dialogue experiment's) is of its kind
    return False


def resolve_template(requested, *folders) -> str:
    """The prompt template a stage uses: --template if given, else the one its input checkpoints
    recorded, else 'safe_rlhf'. Inputs that disagree, or a --template that contradicts them, are
    refused: a reward model trained under one template scores prompts of another as garbage."""
    recorded = {f: read_state(f).get("template") for f in folders}
    recorded = {f: t for f, t in recorded.items() if t}
    if len(set(recorded.values())) > 1:
        raise CheckpointError("the checkpoints were trained under different prompt templates: "
                              + ", ".join(f"{f} with --template {t}" for f, t in recorded.items()))
    found = next(iter(recorded.values()), None)
    if requested and found and requested != found:
        f = next(iter(recorded))
        raise CheckpointError(f"--template {requested}, but {f} was trained with --template "
                              f"{found}; drop --template (a later stage takes its inputs' "
                              f"template) or retrain with {requested}")
    return requested or found or "safe_rlhf"


def is_score_folder(path: str) -> bool:
    """An AutoModelForSequenceClassification folder (its config.json's architectures)."""
    p = os.path.join(path, "config.json")
    archs = (json.load(open(p)).get("architectures") or []) if os.path.exists(p) else []
    return any(a.endswith("ForSequenceClassification") for a in archs)


def checkpoint_kind(path: str) -> str:
    """'policy', 'reward', 'cost', or 'score' for a sequence-classification folder that nanosafe
    did not write (it may serve as either); a plain HF causal-LM folder counts as a policy."""
    kind = read_state(path).get("kind")
    if kind is None:
        kind = "score" if is_score_folder(path) else "policy"
    return kind


def _check_folder(path: str, what: str):
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint folder ({what})")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise CheckpointError(f"{path}: not a Hugging Face model folder (no config.json) ({what})")
    if not any(f.endswith(".safetensors") for f in os.listdir(path)):
        raise CheckpointError(f"{path}: no *.safetensors weights ({what}). nanosafe never "
                              f"unpickles weights: convert the checkpoint with "
                              f"save_pretrained(..., safe_serialization=True)")


def load_policy(path: str, dtype=torch.float32, trust_remote_code: bool = False):
    """(model, tokenizer) from a local causal-LM folder. Refuses a reward/cost model."""
    _check_folder(path, "policy")
    kind = checkpoint_kind(path)
    if kind != "policy":
        raise CheckpointError(f"{path}: this is a {kind} model (a score model), not a policy. Pass "
                              f"it as --reward_model / --cost_models, and a policy (e.g. out/sft) "
                              f"as --model.")
    tok = load_tokenizer(path, trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                 trust_remote_code=trust_remote_code,
                                                 use_safetensors=True)
    ensure_pad_token(tok, model)
    check_vocab(model, tok, path)
    return model, tok


def last_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last non-pad token, for left and right padding alike."""
    L = attention_mask.shape[1]
    return L - 1 - attention_mask.long().flip(-1).argmax(-1)


class ScoreModel(nn.Module):
    """A reward or cost model: an HF sequence-classification model, read per token.
    The score of a sequence is the score at its last non-pad token (the EOS, since pad != eos):
    the same number `AutoModelForSequenceClassification` gives, so the folder works in other
    tools. One output (num_labels 1) gives scores [B, L] and end scores [B]; a K-output cost
    model (one per harm category, named in config.id2label) gives [B, L, K] and [B, K]."""

    def __init__(self, hf, kind: str):
        super().__init__()
        n = getattr(hf.config, "num_labels", 0)
        if not n >= 1 or not isinstance(getattr(hf, "score", None), nn.Linear):
            raise CheckpointError(f"a score model needs a linear 'score' head with num_labels >= "
                                  f"1; got {type(hf).__name__} with num_labels {n}")
        self.hf, self.kind = hf, kind
        self.config = hf.config

    @property
    def backbone(self):
        return getattr(self.hf, self.hf.base_model_prefix)

    @property
    def head(self):
        return self.hf.score

    @property
    def names(self) -> list:
        """one name per output: a K-output model's categories, [] for a one-output model"""
        if self.config.num_labels == 1:
            return []
        return [self.config.id2label[i] for i in range(self.config.num_labels)]

    def forward(self, input_ids, attention_mask):
        """-> (scores [B, L], end_scores [B]); with K outputs [B, L, K], [B, K]"""
        # the head over every position, as the HF forward does before it pools the last non-pad
        # token; positions come from the mask, so left padding scores as right padding does
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids(attention_mask), use_cache=False
                          ).last_hidden_state
        scores = self.head(h).float()
        if scores.shape[-1] == 1:
            scores = scores.squeeze(-1)
        rows = torch.arange(scores.shape[0], device=scores.device)
        end = scores[rows, last_index(attention_mask)]
        return scores, end

    @classmethod
    def from_policy(cls, policy, kind: str, labels=None, generator=None):
        """A fresh head on a causal LM's backbone (its weights copied): how a score model starts.
        labels: one name per output (default: one output)."""
        cfg = copy.deepcopy(policy.config)
        cfg.architectures = None
        cfg.num_labels = len(labels) if labels else 1
        if labels:
            cfg.id2label = dict(enumerate(labels))
            cfg.label2id = {n: i for i, n in enumerate(labels)}
        hf = AutoModelForSequenceClassification.from_config(cfg, dtype=policy.dtype)
        backbone = getattr(policy, policy.base_model_prefix)
        getattr(hf, hf.base_model_prefix).load_state_dict(backbone.state_dict())
        return cls(_init_head(hf, generator), kind)


def _init_head(hf, generator=None):
    # std 1/sqrt(hidden + 1): initial scores of order 1, whatever the width (HF's default is 0.02)
    std = 1 / (hf.config.get_text_config().hidden_size + 1) ** 0.5
    nn.init.normal_(hf.score.weight, std=std, generator=generator)
    return hf


def load_score_model(path: str, kind: str = None, init_from_policy: bool = False,
                     dtype=torch.float32, trust_remote_code: bool = False, labels=None,
                     generator=None):
    """(ScoreModel, tokenizer) from an AutoModelForSequenceClassification folder (a nanosafe reward
    / cost model, or one made elsewhere). With init_from_policy a causal-LM folder (e.g. out/sft)
    gives the backbone and a fresh head: one output, or one per name in `labels` (seeded by
    `generator`)."""
    _check_folder(path, f"{kind or 'score'} model")
    found = checkpoint_kind(path)
    if found == "policy" and not init_from_policy:
        raise CheckpointError(f"{path}: this is a policy, not a {kind or 'score'} model (not an "
                              f"AutoModelForSequenceClassification folder). Train one first: "
                              f"python train_pm.py --kind {kind or 'reward'}")
    if kind is not None and found not in ("policy", "score", kind):
        raise CheckpointError(f"{path}: this is a {found} model, expected a {kind} model")
    tok = load_tokenizer(path, trust_remote_code)
    kw = dict(dtype=dtype, local_files_only=True, trust_remote_code=trust_remote_code,
              use_safetensors=True)
    if found == "policy":  # a fresh head on the policy's backbone
        names = {"num_labels": 1}
        if labels:
            names = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                     "label2id": {n: i for i, n in enumerate(labels)}}
        hf = AutoModelForSequenceClassification.from_pretrained(path, **names, **kw)
        hf = _init_head(hf, generator)
    else:
        hf = AutoModelForSequenceClassification.from_pretrained(path, **kw)
        n = hf.config.num_labels
        # a 2-class classifier is not 2 costs
        if n != 1 and (kind == "reward" or read_state(path).get("categories") is None):
            raise CheckpointError(f"{path}: a {kind or 'score'} model needs num_labels 1 (one "
                                  f"score per sequence), got {n}; a cost model with one output "
                                  f"per harm category is made by train_pm.py --kind cost "
                                  f"--categories")
    ensure_pad_token(tok, hf)
    hf.config.pad_token_id = tok.pad_token_id  # HF's own forward finds the last token through it
    check_vocab(hf, tok, path)
    return ScoreModel(hf, kind or ("reward" if found in ("policy", "score") else found)), tok


def unwrap(model):
    """the transformers model itself: a policy, or the one inside a ScoreModel"""
    return model.hf if isinstance(model, ScoreModel) else model


def gradient_checkpointing(model):
    """Turn on transformers' gradient checkpointing (non-reentrant) for a policy or a ScoreModel;
    it acts only in training mode, so sampling keeps its KV cache."""
    hf = unwrap(model)
    kw = {"use_reentrant": False}
    if hasattr(hf, "activation_checkpointing_enable"):  # its name from transformers 5.2x on
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    return model


def place(model, device, attn_implementation: str = "auto"):
    """model.to(device) with the attention kernel for that device; a policy or a ScoreModel."""
    hf = unwrap(model)
    if attn_implementation == "auto":
        attn_implementation = "eager" if torch.device(device).type == "cpu" else None
    if attn_implementation and hf.config._attn_implementation != attn_implementation:
        hf.set_attn_implementation(attn_implementation)
    return model.to(device)


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())

# -----------------------------------------------------------------------------
# checkpoints: written to a temporary folder, then renamed into place


def save_checkpoint(out_dir: str, model, tok, state: dict, trainer_state: dict = None,
                    extra: dict = None, weights: dict = None):
    """Write an HF folder (safetensors + tokenizer) + nanosafe.json (+ trainer_state.pt for resume,
    + extra sub-models as {subfolder: (model, tok, state)}) atomically: a crash mid-save leaves
    the previous checkpoint intact and never a half-written one where a loader would look.
    `weights`: {"": the model's, subfolder: an extra's} state dicts from plain_weights (FSDP
    gathered, LoRA merged), so the folders are always plain HF folders."""
    tmp, old = out_dir.rstrip("/") + ".tmp", out_dir.rstrip("/") + ".old"
    weights = weights or {}
    shutil.rmtree(tmp, ignore_errors=True)
    _save_model(tmp, model, tok, state, weights.get(""))
    for sub, (m, t, s) in (extra or {}).items():
        _save_model(os.path.join(tmp, sub), m, t, s, weights.get(sub))
    if trainer_state is not None:
        torch.save(trainer_state, os.path.join(tmp, TRAINER_FILE))
    if os.path.exists(out_dir):
        # files the run keeps beside its checkpoint (metrics.jsonl, figures) come along as hard
        # links: the same file under both names, so nothing is lost whenever a crash hits.
        # the old checkpoint's own files never do (a stale trainer_state.pt would resume wrong)
        for name in os.listdir(out_dir):
            src, dst = os.path.join(out_dir, name), os.path.join(tmp, name)
            if not os.path.exists(dst) and not _checkpoint_file(src):
                if os.path.isdir(src):
                    shutil.copytree(src, dst, copy_function=os.link)
                else:
                    os.link(src, dst)
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)  # the commit point
    shutil.rmtree(old, ignore_errors=True)


CHECKPOINT_FILES = {"config.json", "generation_config.json", "tokenizer.json",
                    "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                    "tokenizer.model", "added_tokens.json", "chat_template.jinja", STATE_FILE,
                    TRAINER_FILE}


def _checkpoint_file(path) -> bool:
    """Written by save_checkpoint: weights, configs, tokenizer, state, and sub-model folders."""
    name = os.path.basename(path)
    if os.path.isdir(path):
        return os.path.exists(os.path.join(path, "config.json"))
    return (name in CHECKPOINT_FILES or name.endswith(".safetensors")
            or name.endswith(".safetensors.index.json"))


def plain_weights(model) -> dict | None:
    """The weights to save when the model in memory is not a plain HF model: under FSDP its
    shards gathered (every rank must call this; rank 0 saves), under LoRA its adapters merged
    into the base weights. None otherwise (save_pretrained reads the model itself)."""
    from nanosafe.lora import merged_weights
    sd = fsdp.full_state_dict(model)
    if sd is not None and isinstance(model, ScoreModel):  # the ScoreModel wrapper is the FSDP root
        sd = {k.removeprefix("hf."): v for k, v in sd.items()}
    return sd if sd is not None else merged_weights(model)


def _save_model(path, model, tok, state, weights=None):
    os.makedirs(path, exist_ok=True)
    unwrap(model).save_pretrained(path, safe_serialization=True, state_dict=weights)
    tok.save_pretrained(path)
    with open(os.path.join(path, STATE_FILE), "w") as f:
        json.dump(state, f, indent=1)


def recover_checkpoint(out_dir: str):
    """If a crash hit between the two renames of save_checkpoint, put the previous one back."""
    old = out_dir.rstrip("/") + ".old"
    if not os.path.exists(out_dir) and os.path.exists(old):
        os.rename(old, out_dir)


def load_trainer_state(out_dir: str) -> dict:
    """The optimiser / RNG / step state saved beside the weights (weights_only: nothing is
    unpickled)."""
    recover_checkpoint(out_dir)
    p = os.path.join(out_dir, TRAINER_FILE)
    if not os.path.exists(p):
        raise CheckpointError(f"{out_dir}: nothing to resume from (no {TRAINER_FILE}: a finished "
                              f"run keeps its optimiser state only with --save_optimizer); run "
                              f"without --resume")
    try:
        return torch.load(p, weights_only=True, map_location="cpu")
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        raise CheckpointError(f"{p}: not a nanosafe trainer state, refused ({type(e).__name__}: "
                              f"{str(e).splitlines()[0]})") from e
