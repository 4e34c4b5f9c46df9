"""LoRA students (Hu et al., 2021; `--lora-rank r`): the student's weights stay frozen, and beside
some of its matrices W (stored (in, out), model.Linear) a low-rank update trains:

    y = x W + b + (alpha / r) * x A^T B^T        A (r, in) random, B (out, r) zero

so a new LoRA student starts as its base model exactly, and only A and B get gradients and AdamW
state: r (in + out) numbers per matrix instead of in * out. Targets, as torchtune's KD recipes: the
query and value projections (slices of our fused qkv projection), attention's output projection and
the MLP (gate and up: slices of the fused fc_in); not the embedding or the LM head. When saved,
each update is merged into its weight (W + (alpha / r) (B A)^T), so best/ is an ordinary
checkpoint that transformers loads.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRA(nn.Module):
    """The update of one Linear, on some spans [start, stop) of its output columns, each with its own
    A (r, in) and B (stop - start, r)."""

    def __init__(self, n_in, spans, rank, alpha):
        super().__init__()
        self.spans, self.scale = spans, alpha / rank
        self.A = nn.ParameterList(nn.Parameter(torch.empty(rank, n_in)) for _ in spans)
        self.B = nn.ParameterList(nn.Parameter(torch.zeros(stop - start, rank)) for start, stop in spans)
        for a in self.A:  # nn.Linear's initialisation, as the LoRA paper's code
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def forward(self, x, y):  # x (..., in), y = x W + b (..., out) -> y with the update added
        for (start, stop), a, b in zip(self.spans, self.A, self.B):
            y[..., start:stop] += self.scale * F.linear(F.linear(x, a), b)
        return y

    def delta(self, n_out):
        """The whole update as an (in, out) matrix, to merge into the weight."""
        delta = self.A[0].new_zeros(self.A[0].shape[1], n_out)
        for (start, stop), a, b in zip(self.spans, self.A, self.B):
            delta[:, start:stop] = self.scale * (b @ a).t()
        return delta


def add(model, rank, alpha):
    """Freeze `model` (a GPT) and give its target matrices LoRA updates of rank `rank` (in place;
    A is drawn from torch's global generator). Returns the model."""
    cfg = model.cfg
    model.requires_grad_(False)
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    for block in model.blocks:
        gate_up = [(0, cfg.ffn_dim), (cfg.ffn_dim, 2 * cfg.ffn_dim)] if cfg.gated_mlp else [(0, cfg.ffn_dim)]
        for linear, spans in ((block.attn.qkv, [(0, q), (q + kv, q + 2 * kv)]),  # q and v, not k
                              (block.attn.proj, [(0, cfg.n_embd)]), (block.fc_in, gate_up),
                              (block.fc_out, [(0, cfg.n_embd)])):
            linear.lora = LoRA(linear.weight.shape[0], spans, rank, alpha).to(linear.weight.device)
    model.lora_settings = (rank, alpha)  # what a copy of the model needs to load its state (distributed.py)
    return model


def merged_state(model):
    """model's state dict with each LoRA update merged into its weight, A and B left out (what
    save_pretrained writes); a model without LoRA: its state dict."""
    state = {}
    for name, tensor in model.state_dict().items():
        owner = model.get_submodule(name.rpartition(".")[0])
        if ".lora." not in name:
            merge = getattr(owner, "lora", None) is not None and name.endswith(".weight")
            state[name] = tensor + owner.lora.delta(tensor.shape[1]).to(tensor.dtype) if merge else tensor
    return state
