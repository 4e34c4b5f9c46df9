"""One hand-written decoder-only transformer that covers GPT-2 and OPT.

The families differ in a few switches (activation, position offset, pre/post layer norm, an
embedding projection) held in `GPTConfig`, and in Hugging Face's weight names, one table per family
(`HF_NAMES`). The rest is shared:
    model = GPT.from_pretrained("gpt2")          # a hub id or a local Hugging Face directory
    logits = model(input_ids, attention_mask)    # (B, T, V); model.generate(...) samples, KV-cached
"""
import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from files import atomic_write
from hf_files import read_tensors, resolve_checkpoint, weight_files

gelu_tanh = functools.partial(F.gelu, approximate="tanh")  # what GPT-2 calls "gelu_new"
ACTIVATIONS = {"gelu_new": gelu_tanh, "gelu_pytorch_tanh": gelu_tanh, "gelu": F.gelu,
               "relu": F.relu}


@dataclass
class GPTConfig:
    model_type: str = "gpt2"        # "gpt2" or "opt": the weight-name table and config.json dialect
    vocab_size: int = 50257
    n_positions: int = 1024         # longest sequence the learned position table covers
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    ffn_dim: int = 3072
    activation: str = "gelu_new"    # GPT-2: GELU with the tanh approximation; OPT: ReLU
    pos_offset: int = 0             # OPT's position table has 2 extra rows in front (from fairseq)
    embed_dim: int = 0              # OPT-350m embeds in 512 dims, projected to 1024; 0: n_embd
    pre_norm: bool = True           # LN before attention/MLP (GPT-2, OPT >= 1.3b); after: OPT-350m
    final_norm: bool = True         # a layer norm after the last block
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    pad_token_id: int = 50256

    def __post_init__(self):
        for name in ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd", "ffn_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        if self.model_type not in HF_NAMES:
            raise ValueError(f"unknown model_type {self.model_type!r}: expected {sorted(HF_NAMES)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}: try {sorted(ACTIVATIONS)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        self.embed_dim = self.embed_dim or self.n_embd


# --- The network ----------------------------------------------------------------------------------


class Linear(nn.Module):
    """y = x @ weight + bias, weight stored (in, out) as GPT-2's checkpoints store it (nn.Linear:
    (out, in)). CPU speed-up: sampling multiplies a few rows by each matrix per step, and a CPU GEMM
    streams this layout ~1.5x faster (results/benchmarks.md). The math is nn.Linear's."""
    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):  # (..., in) -> (..., out)
        return F.linear(x, self.weight.t(), self.bias)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = Linear(cfg.n_embd, 3 * cfg.n_embd)  # one matmul for q, k and v, not three
        self.proj = Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x, mask, cache=None, cache_pos=0):  # x: (B, T, C), mask: (B, 1, T, S) or None
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, D)
        if cache is not None:  # write this step's keys/values into the cache, attend to all so far
            cache[0][:, :, cache_pos:cache_pos + T] = k
            cache[1][:, :, cache_pos:cache_pos + T] = v
            k, v = cache[0][:, :, :cache_pos + T], cache[1][:, :, :cache_pos + T]
        # is_causal lets PyTorch pick its fused kernel when there is no padding to mask out
        causal = mask is None and cache is None
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.pre_norm = cfg.pre_norm
        self.ln_attn = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.ln_mlp = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.fc_in = Linear(cfg.n_embd, cfg.ffn_dim)
        self.fc_out = Linear(cfg.ffn_dim, cfg.n_embd)
        self.act = ACTIVATIONS[cfg.activation]

    def forward(self, x, mask, cache=None, cache_pos=0):
        if self.pre_norm:  # x + f(LN(x)): GPT-2 and most OPT sizes
            x = x + self.attn(self.ln_attn(x), mask, cache, cache_pos)
            return x + self.fc_out(self.act(self.fc_in(self.ln_mlp(x))))
        x = self.ln_attn(x + self.attn(x, mask, cache, cache_pos))  # LN(x + f(x)): OPT-350m
        return self.ln_mlp(x + self.fc_out(self.act(self.fc_in(x))))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        E, C = cfg.embed_dim, cfg.n_embd  # E != C: OPT-350m, which projects its embeddings
        self.tok_emb = nn.Embedding(cfg.vocab_size, E)
        self.pos_emb = nn.Embedding(cfg.n_positions + cfg.pos_offset, C)
        self.proj_in = nn.Linear(E, C, bias=False) if E != C else nn.Identity()
        self.proj_out = nn.Linear(C, E, bias=False) if E != C else nn.Identity()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(C, eps=cfg.layer_norm_eps) if cfg.final_norm else nn.Identity()
        # No output matrix of its own: the head reuses tok_emb.weight (tied, as in both families).
        # GPT-2's init: N(0, 0.02), residual projections scaled by 1/sqrt(2L)
        for name, p in self.named_parameters():
            if p.dim() == 2:  # (biases start at zero, layer norms at the identity)
                deep = name.endswith(("attn.proj.weight", "fc_out.weight"))
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer) if deep else 0.02)

    def forward(self, input_ids, attention_mask=None, *, cache=None, cache_pos=0, positions=None,
                last_only=False):
        """input_ids (B, T) -> float32 logits (B, T, V). attention_mask (B, S) is 1 on real tokens
        and covers the cache and the new tokens (S = cache_pos + T). Positions count real tokens
        only, so a left- or right-padded row gets the same logits as the unpadded one. last_only:
        logits of the last position only (sampling)."""
        (B, T), mask, device = input_ids.shape, None, input_ids.device
        if attention_mask is not None and not bool(attention_mask.all()):
            attention_mask, S = attention_mask.bool(), attention_mask.shape[1]
            if positions is None:  # position = number of real tokens before this one
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            causal = torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)  # (T, S)
            # A padding query would see no key at all (a softmax over nothing is NaN); letting every
            # query see itself (the diagonal, causal.triu(S - T)) keeps its unused output finite
            # without changing any real position. mask: (B, 1, T, S)
            mask = ((causal & attention_mask[:, None, :]) | causal.triu(diagonal=S - T))[:, None]
        elif cache is not None and T > 1:  # unpadded prefill into a cache: causal mask written out
            mask = torch.ones(T, cache_pos + T, dtype=torch.bool, device=device).tril(cache_pos)
        if positions is None:
            positions = torch.arange(cache_pos, cache_pos + T, device=device).expand(B, T)
        x = self.proj_in(self.tok_emb(input_ids))  # (B, T, C)
        x = x + self.pos_emb(positions + self.cfg.pos_offset)
        for i, block in enumerate(self.blocks):
            x = block(x, mask, None if cache is None else cache[i], cache_pos)
        x = self.proj_out(self.ln_f(x[:, -1:] if last_only else x))
        # CPU speed-up when sampling: the same product, the tall (V, C) head read in slices, which a
        # CPU GEMM streams faster (25 -> 16 ms a step at B=8)
        if x.shape[1] == 1 and x.device.type == "cpu":
            return torch.cat([F.linear(x, w) for w in self.tok_emb.weight.split(1024)], -1).float()
        return F.linear(x, self.tok_emb.weight).float()  # (B, T, V), or (B, 1, V)

    # --- Sampling with a pre-allocated KV cache ---------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens=256, temperature=1.0,
                 top_k=0, top_p=1.0, no_repeat_ngram_size=0, eos_token_id=None, generator=None, allowed=None):
        """Sample up to max_new_tokens after left-padded prompts (B, T0) -> the new tokens only
        (B, <=N). temperature=0 is greedy. A finished row is padded with EOS; the loop ends when
        every row has emitted EOS. `generator` (a torch.Generator on the model's device, or a list
        of one per row) makes sampling reproducible. `allowed` (V,) bool: the only ids that may be
        emitted (None: all; the rows of an embedding wider than its tokenizer are not tokens)."""
        B, T0 = input_ids.shape
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        if bool((attention_mask.sum(1) + max_new_tokens > self.cfg.n_positions).any()):
            raise ValueError(f"prompt + max_new_tokens exceeds the model's {self.cfg.n_positions} positions")
        S, H, L = T0 + max_new_tokens, self.cfg.n_head, self.cfg.n_layer
        # (L, k/v, B, H, S, D): allocated once, so decoding never copies a growing cache
        cache = self.tok_emb.weight.new_empty(L, 2, B, H, S, self.cfg.n_embd // H)
        future = attention_mask.new_zeros(B, max_new_tokens, dtype=torch.bool)
        mask = torch.cat([attention_mask.bool(), future], 1)  # (B, S), opened token by token
        next_pos = attention_mask.long().sum(1, keepdim=True)  # (B, 1): each row's next position
        seen = [_NgramIndex(no_repeat_ngram_size, row[m.bool()].tolist())
                for row, m in zip(input_ids, attention_mask)] if no_repeat_ngram_size > 0 else []
        logits = self(input_ids, mask[:, :T0], cache=cache, last_only=True)[:, -1]  # (B, V)
        finished, new_tokens = torch.zeros(B, dtype=torch.bool, device=input_ids.device), []
        banned = None if allowed is None else ~allowed.to(logits.device)
        for step in range(max_new_tokens):
            if banned is not None:
                logits = logits.masked_fill(banned, float("-inf"))
            for row, index in enumerate(seen):  # forbid tokens that would repeat a row's n-gram
                logits[row, index.banned()] = float("-inf")
            token = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
            if eos_token_id is not None:
                token = token.masked_fill(finished, eos_token_id)
                finished |= token == eos_token_id
            new_tokens.append(token)
            for index, t in zip(seen, token.tolist()):
                index.add(t)
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            mask[:, T0 + step] = True
            logits = self(token[:, None], mask[:, :T0 + step + 1], cache=cache,
                          cache_pos=T0 + step, positions=next_pos)[:, -1]
            next_pos = next_pos + 1
        return torch.stack(new_tokens, 1) if new_tokens else input_ids.new_zeros(B, 0)

    # --- Hugging Face checkpoints -----------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path, dtype=None, device=None):
        """Load a local Hugging Face directory or a hub id (downloaded into the standard cache)."""
        pick = lambda files: ["config.json", *weight_files(files, name_or_path)]
        directory = resolve_checkpoint(name_or_path, pick)
        try:
            cfg = config_from_hf(json.loads(Path(directory, "config.json").read_text()))
        except FileNotFoundError:
            raise FileNotFoundError(f"missing config.json in {directory}") from None
        except (KeyError, json.JSONDecodeError) as e:
            bad = f"lacks the field {e}" if isinstance(e, KeyError) else f"is not valid JSON ({e})"
            raise ValueError(f"config.json in {directory} {bad}") from None
        except ValueError as e:  # an unknown model_type, a size that is no whole number, not an object
            raise ValueError(f"config.json in {directory} {e}") from None
        with torch.device("meta"):  # no memory yet: each tensor is made once, in `dtype`, as read
            model = cls(cfg)
        shapes = {name: t.shape for name, t in model.state_dict().items()}
        hf_keys_of = {name: _hf_names(cfg, name) for name in shapes}  # ours -> the checkpoint's
        needed = {key for hf_keys in hf_keys_of.values() for key in hf_keys}
        found = {}
        for key, tensor in read_tensors(directory):
            for prefix in ("transformer.", "model.decoder.", "model.", "decoder."):  # either way
                key = key.removeprefix(prefix)
            if key in needed:  # skips lm_head (tied) and GPT-2's stored causal-mask buffers
                found[key] = tensor.to(dtype=dtype or torch.float32, copy=True)
        state = {}
        for name, hf_keys in hf_keys_of.items():
            if missing := [k for k in hf_keys if k not in found]:
                raise ValueError(f"checkpoint {directory} lacks weights {missing} (for {name})")
            tensor = torch.cat([found.pop(k) for k in hf_keys])
            if name.endswith(TRANSPOSED[cfg.model_type]):
                tensor = tensor.t().contiguous()
            if tensor.shape != shapes[name]:
                raise ValueError(f"config/weights shape mismatch in {directory}: "
                                 f"{'+'.join(hf_keys)} has shape {tuple(tensor.shape)}, "
                                 f"config.json implies {tuple(shapes[name])}")
            state[name] = tensor
        model.load_state_dict(state, assign=True)
        return model.to(device).eval() if device is not None else model.eval()

    def save_pretrained(self, out_dir):
        """Write config.json + model.safetensors with Hugging Face's names, as transformers does."""
        from safetensors.torch import save_file
        os.makedirs(out_dir, exist_ok=True)
        prefix, tensors = HF_PREFIX[self.cfg.model_type], {}
        for name, tensor in self.state_dict().items():
            hf_keys = _hf_names(self.cfg, name)
            if name.endswith(TRANSPOSED[self.cfg.model_type]):
                tensor = tensor.t()
            for key, part in zip(hf_keys, tensor.chunk(len(hf_keys))):  # un-fuse OPT's q, k, v
                tensors[prefix + key] = part.detach().contiguous().cpu()
        atomic_write(os.path.join(out_dir, "model.safetensors"),
                     lambda tmp: save_file(tensors, tmp, {"format": "pt"}))
        config = json.dumps(config_to_hf(self.cfg), indent=2)
        atomic_write(os.path.join(out_dir, "config.json"), lambda tmp: Path(tmp).write_text(config))


def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """One token per row of logits (B, V): greedy at temperature 0, else top-k / nucleus sampled."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:  # keep the k largest logits
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # mass before it exceeds top_p; top-1 stays
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    # CPU speed-up: inverse-CDF sampling, one uniform number per row (torch.multinomial: several
    # times slower)
    cdf = logits.softmax(-1).cumsum_(-1)
    if isinstance(generator, (list, tuple)):  # one per row: its draws do not depend on its batch
        u = torch.cat([torch.rand(1, 1, generator=g, device=cdf.device) for g in generator])
    else:
        u = torch.rand(len(cdf), 1, generator=generator, device=cdf.device)
    token = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)[:, 0]
    return token.clamp_(max=cdf.shape[-1] - 1)  # zero-mass tokens never won


class _NgramIndex:
    """A row's (n-1)-grams -> the tokens that followed them: a repeated n-gram is banned in O(1)."""
    def __init__(self, n, tokens):
        self.n, self.tokens, self.next = n, [], {}
        for t in tokens:
            self.add(t)

    def add(self, token):
        self.tokens.append(token)
        if len(self.tokens) >= self.n:
            context = tuple(self.tokens[len(self.tokens) - self.n:-1])
            self.next.setdefault(context, set()).add(token)

    def banned(self):  # the tokens that would complete an n-gram this row already contains
        return list(self.next.get(tuple(self.tokens[len(self.tokens) - self.n + 1:]), ()))


# --------------------------------------------------------------------------------------------------
# Names and configs: everything that differs between the families' Hugging Face checkpoints

# Our module -> the Hugging Face module (without the "transformer." / "model.decoder." prefix); the
# parameter suffix (.weight / .bias) is the same on both sides. A list is fused by us along the
# output dim (OPT's q, k, v).
HF_NAMES = {
    "gpt2": {"tok_emb": "wte", "pos_emb": "wpe", "ln_f": "ln_f",
             "blocks.{i}.ln_attn": "h.{i}.ln_1", "blocks.{i}.attn.qkv": "h.{i}.attn.c_attn",
             "blocks.{i}.attn.proj": "h.{i}.attn.c_proj", "blocks.{i}.ln_mlp": "h.{i}.ln_2",
             "blocks.{i}.fc_in": "h.{i}.mlp.c_fc", "blocks.{i}.fc_out": "h.{i}.mlp.c_proj"},
    "opt": {"tok_emb": "embed_tokens", "pos_emb": "embed_positions", "ln_f": "final_layer_norm",
            "proj_in": "project_in", "proj_out": "project_out",
            "blocks.{i}.ln_attn": "layers.{i}.self_attn_layer_norm",
            "blocks.{i}.attn.qkv": ["layers.{i}.self_attn.q_proj", "layers.{i}.self_attn.k_proj",
                                    "layers.{i}.self_attn.v_proj"],
            "blocks.{i}.attn.proj": "layers.{i}.self_attn.out_proj",
            "blocks.{i}.ln_mlp": "layers.{i}.final_layer_norm",
            "blocks.{i}.fc_in": "layers.{i}.fc1", "blocks.{i}.fc_out": "layers.{i}.fc2"},
}
HF_PREFIX = {"gpt2": "transformer.", "opt": "model.decoder."}
# Our Linear stores weight (in, out) as GPT-2's Conv1D does; OPT's nn.Linear stores (out, in).
TRANSPOSED = {"gpt2": (),
              "opt": ("attn.qkv.weight", "attn.proj.weight", "fc_in.weight", "fc_out.weight")}


def _hf_names(cfg, name):
    """Our parameter name -> its Hugging Face name(s): GPT-2's for blocks.3.fc_in.weight is
    [h.3.mlp.c_fc.weight]."""
    module, leaf = name.rsplit(".", 1)
    layer = module.split(".")[1] if module.startswith("blocks.") else ""
    hf_modules = HF_NAMES[cfg.model_type][module.replace(f"blocks.{layer}.", "blocks.{i}.", 1)]
    hf_modules = hf_modules if isinstance(hf_modules, list) else [hf_modules]
    return [f"{t.format(i=layer)}.{leaf}" for t in hf_modules]


def config_from_hf(hf):
    """A Hugging Face config.json (as a dict) -> GPTConfig."""
    if not isinstance(hf, dict):
        raise ValueError(f"holds a JSON {type(hf).__name__}, not an object of settings")
    kind = hf.get("model_type")
    if kind == "gpt2":
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            raise ValueError("GPT-2 variants with scale_attn_by_inverse_layer_idx or "
                             "reorder_and_upcast_attn are unsupported")
        eos = hf.get("eos_token_id", 50256)  # GPT-2 pads with EOS
        return GPTConfig("gpt2", hf["vocab_size"], hf["n_positions"], hf["n_layer"], hf["n_head"],
                         hf["n_embd"], hf.get("n_inner") or 4 * hf["n_embd"],
                         hf.get("activation_function", "gelu_new"),
                         layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                         bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    if kind == "opt":
        if not hf.get("enable_bias", True) or not hf.get("layer_norm_elementwise_affine", True):
            raise ValueError("OPT variants without biases or layer-norm affine parameters are unsupported")
        pre_norm = hf.get("do_layer_norm_before", True)
        return GPTConfig("opt", hf["vocab_size"], hf["max_position_embeddings"],
                         hf["num_hidden_layers"], hf["num_attention_heads"], hf["hidden_size"],
                         hf["ffn_dim"], hf.get("activation_function", "relu"), pos_offset=2,
                         embed_dim=hf.get("word_embed_proj_dim") or hf["hidden_size"],
                         pre_norm=pre_norm,
                         final_norm=pre_norm and not hf.get("_remove_final_layer_norm", False),
                         bos_token_id=hf.get("bos_token_id", 2),
                         eos_token_id=hf.get("eos_token_id", 2),
                         pad_token_id=hf.get("pad_token_id", 1))
    raise ValueError(f"has model_type {kind!r}: tempkd loads {', '.join(map(repr, HF_NAMES))} checkpoints")


def config_to_hf(cfg):
    """GPTConfig -> the config.json that transformers writes for the same model."""
    common = {"model_type": cfg.model_type, "vocab_size": cfg.vocab_size,
              "activation_function": cfg.activation, "bos_token_id": cfg.bos_token_id,
              "eos_token_id": cfg.eos_token_id, "tie_word_embeddings": True}
    if cfg.model_type == "gpt2":
        return {**common, "architectures": ["GPT2LMHeadModel"], "n_positions": cfg.n_positions,
                "n_ctx": cfg.n_positions, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
                "n_embd": cfg.n_embd, "n_inner": cfg.ffn_dim,
                "layer_norm_epsilon": cfg.layer_norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
                "attn_pdrop": 0.0}
    return {**common, "architectures": ["OPTForCausalLM"],
            "max_position_embeddings": cfg.n_positions,
            "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "hidden_size": cfg.n_embd, "ffn_dim": cfg.ffn_dim, "word_embed_proj_dim": cfg.embed_dim,
            "do_layer_norm_before": cfg.pre_norm,
            "_remove_final_layer_norm": cfg.pre_norm and not cfg.final_norm,
            "pad_token_id": cfg.pad_token_id, "dropout": 0.0, "attention_dropout": 0.0,
            "activation_dropout": 0.0, "layerdrop": 0.0}
