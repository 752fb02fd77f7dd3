"""
LoRA (--lora_rank): peft's adapters injected into a model in place, so it keeps its class,
forward and checkpoint layout. peft is an optional dependency, imported only when asked for.

Under LoRA the reference policy is the actor with its adapters off (`adapters_off`): one
backbone in memory, not two. Checkpoints hold the adapters merged in (plain HF folders);
a resume reloads the base folder plus the adapters saved in the trainer state.
"""

import torch

from nanosafe.model import CheckpointError, ScoreModel, unwrap


def lora_layers(model) -> list:
    """(name, layer) of every LoRA-wrapped layer of a policy or ScoreModel (peft's layers,
    found by what they have)."""
    return [(n, m) for n, m in unwrap(model).named_modules()
            if hasattr(m, "get_delta_weight") and hasattr(m, "base_layer")]


def add_lora(model, rank: int, alpha: float = 0, targets=None):
    """LoRA adapters (B = 0 at the start, so the model's outputs do not change) on every linear
    layer of a policy (not its output projection) or a ScoreModel (not its head, which trains
    whole), or on the modules named in `targets`. Only the adapters (and a score head) train."""
    try:
        import peft
    except ImportError:
        raise CheckpointError("--lora_rank needs peft, an optional dependency: pip install peft"
                              ) from None
    score = isinstance(model, ScoreModel)
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=0.0,
                          target_modules=list(targets) if targets else "all-linear",
                          exclude_modules=["score"] if score else None)
    peft.inject_adapter_in_model(cfg, unwrap(model))
    if not lora_layers(model):
        raise CheckpointError(f"--lora_targets {targets}: no such linear layers in "
                              f"{type(unwrap(model)).__name__}")
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n or (score and n.startswith("hf.score.")))
    return model


class adapters_off:
    """Run a LoRA model as its base model (the adapters switched off); a no-op for any other
    model. Under LoRA the reference policy is the actor inside this block."""

    def __init__(self, model):
        self.model, self.layers = model, [m for _, m in lora_layers(model)]

    def __enter__(self):
        self.training = self.model.training
        if self.layers:  # the reference runs in eval mode, as a separate frozen model would
            self.model.eval()
        for m in self.layers:
            m.enable_adapters(False)

    def __exit__(self, *exc):
        for m in self.layers:
            m.enable_adapters(True)
        if self.layers:
            self.model.train(self.training)


def lora_state(model) -> dict:
    """The trained tensors of a LoRA model (its adapters, a score model's head): what a resume
    needs beside the base folder."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_lora_state(model, state: dict, where: str):
    params = dict(model.named_parameters())
    if set(state) != {n for n, p in params.items() if p.requires_grad}:
        raise CheckpointError(f"{where}: its LoRA state does not match this model's adapters "
                              f"(different --lora_rank or --lora_targets?)")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def merged_weights(model) -> dict | None:
    """LoRA: the base weights with each adapter's delta (scale · B·A) added, under the plain HF
    names (no peft wrappers), so the saved folder loads with AutoModelFor... alone. None
    without LoRA."""
    layers = lora_layers(model)
    if not layers:
        return None
    hf = unwrap(model)
    # the unadapted tensors are the model's own (save_pretrained only reads them): no copy of
    # the whole model per checkpoint
    out = {k.replace(".base_layer.", "."): v for k, v in hf.state_dict().items()
           if ".lora_" not in k}
    with torch.no_grad():
        for name, m in layers:
            out[f"{name}.weight"] = m.base_layer.weight + m.get_delta_weight(m.active_adapters[0])
    return out
