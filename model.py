"""One hand-written decoder-only transformer for GPT-2, OPT, Llama (3.x, and SmolLM2), Qwen2/2.5 and Qwen3.

The families differ in data, not in code paths: switches in `GPTConfig` (LayerNorm or RMSNorm, learned
positions or RoPE, a plain or a gated MLP, grouped-query attention, q/k norms, biases, a tied or untied
head), one weight-name table per family (`HF_NAMES`) and one config.json table per family (`HF_CONFIGS`).
The rest is shared:
    model = GPT.from_pretrained("gpt2")          # a hub id or a local Hugging Face directory
    logits = model(input_ids, attention_mask)    # (B, T, V); model.generate(...) samples, KV-cached
"""
import functools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import lora
from files import atomic_write
from hf_files import read_tensors, resolve_checkpoint, weight_files

gelu_tanh = functools.partial(F.gelu, approximate="tanh")  # what GPT-2 calls "gelu_new"
ACTIVATIONS = {"gelu_new": gelu_tanh, "gelu_pytorch_tanh": gelu_tanh, "gelu": F.gelu, "relu": F.relu,
               "silu": F.silu}


@dataclass
class GPTConfig:
    model_type: str = "gpt2"        # the weight-name table and config.json dialect (HF_NAMES, HF_CONFIGS)
    vocab_size: int = 50257         # rows of the embedding (may exceed the tokenizer's tokens: padding)
    n_positions: int = 1024         # longest sequence: the learned position table, or RoPE's trained length
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    ffn_dim: int = 3072
    activation: str = "gelu_new"    # GPT-2: GELU with the tanh approximation; OPT: ReLU; Llama/Qwen: SiLU
    n_kv_head: int = 0              # grouped-query attention: key/value heads (0: n_head)
    head_dim: int = 0               # 0: n_embd // n_head (Qwen3 sets it: 128)
    norm: str = "layernorm"         # "layernorm" (weight and bias) or "rmsnorm" (weight only, in float32)
    norm_eps: float = 1e-5
    positions: str = "learned"      # "learned" (a position table) or "rope" (rotary, half-rotation layout)
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)  # Llama 3: factor, low/high_freq_factor, original_max_...
    gated_mlp: bool = False         # SwiGLU: down(act(gate(x)) * up(x)) instead of fc_out(act(fc_in(x)))
    bias: bool = True               # biases on the attention output and the MLP
    qkv_bias: bool = True           # biases on q, k, v (Qwen2 has these, Llama none)
    qk_norm: bool = False           # RMSNorm on each head's q and k before RoPE (Qwen3)
    tie_embeddings: bool = True     # the output head is the embedding (else its own lm_head)
    pos_offset: int = 0             # OPT's position table has 2 extra rows in front (from fairseq)
    embed_dim: int = 0              # OPT-350m embeds in 512 dims, projected to 1024; 0: n_embd
    pre_norm: bool = True           # norm before attention/MLP (all but OPT-350m)
    final_norm: bool = True         # a norm after the last block
    bos_token_id: int | None = 50256
    eos_token_id: int | list | None = 50256  # Llama 3 instruct models list several
    pad_token_id: int | None = 50256

    def __post_init__(self):
        for name in ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd", "ffn_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        if self.model_type not in HF_NAMES:
            raise ValueError(f"unknown model_type {self.model_type!r}: expected {sorted(HF_NAMES)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}: try {sorted(ACTIVATIONS)}")
        if not self.head_dim and self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        self.n_kv_head = self.n_kv_head or self.n_head
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        self.head_dim = self.head_dim or self.n_embd // self.n_head
        self.embed_dim = self.embed_dim or self.n_embd


# --- The network ----------------------------------------------------------------------------------


class Linear(nn.Module):
    """y = x @ weight + bias, weight stored (in, out) as GPT-2's checkpoints store it (nn.Linear:
    (out, in)). CPU speed-up: sampling multiplies a few rows by each matrix per step, and a CPU GEMM
    streams this layout ~1.5x faster (results/benchmarks.md). The math is nn.Linear's."""
    def __init__(self, n_in, n_out, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out)) if bias else None
        self.lora = None  # a LoRA student's low-rank update (lora.py)

    def forward(self, x):  # (..., in) -> (..., out)
        y = F.linear(x, self.weight.t(), self.bias)
        return y if self.lora is None else self.lora(x, y)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 as transformers does (Llama, Qwen)."""
    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def norm(cfg, dim):
    return RMSNorm(dim, cfg.norm_eps) if cfg.norm == "rmsnorm" else nn.LayerNorm(dim, eps=cfg.norm_eps)


def rope_frequencies(cfg):
    """RoPE's inverse frequencies (head_dim / 2,), with Llama 3's long-context scaling when configured:
    low frequencies (long wavelengths) divided by `factor`, high ones kept, a smooth ramp between."""
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim)
    if not cfg.rope_scaling:
        return inv_freq
    factor, low, high = (cfg.rope_scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor"))
    context = cfg.rope_scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < context / high) & ~(wavelen > context / low)
    return torch.where(medium, smoothed, scaled)


def apply_rope(x, cos, sin):
    """Rotate each head's (x1, x2) halves by the position's angles: the half-rotation layout of the
    Hugging Face weights (no permutation of q/k rows). x (B, H, T, D), cos/sin (B, 1, T, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        # one matmul for q, k and v, not three; k and v have n_kv_head heads (grouped-query attention)
        self.qkv = Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=cfg.qkv_bias)
        self.proj = Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x, mask, rope=None, cache=None, cache_pos=0):  # x: (B, T, C), mask: (B, 1, T, S) or None
        B, T, _ = x.shape
        H, KV, D = self.n_head, self.n_kv_head, self.head_dim
        heads = self.qkv(x).view(B, T, H + 2 * KV, D)
        if self.q_norm is not None:  # Qwen3: each head's q and k normalised, before RoPE
            heads = torch.cat([self.q_norm(heads[:, :, :H]), self.k_norm(heads[:, :, H:H + KV]), heads[:, :, H + KV:]], 2)
        q, k, v = heads.transpose(1, 2).split([H, KV, KV], dim=1)  # (B, H, T, D), (B, KV, T, D) x 2
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:  # write this step's keys/values into the cache, attend to all so far
            cache[0][:, :, cache_pos:cache_pos + T] = k
            cache[1][:, :, cache_pos:cache_pos + T] = v
            k, v = cache[0][:, :, :cache_pos + T], cache[1][:, :, :cache_pos + T]
        if KV != H:  # each key/value head serves H // KV query heads (SDPA's enable_gqa needs torch >= 2.5)
            k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
        # is_causal lets PyTorch pick its fused kernel when there is no padding to mask out
        causal = mask is None and cache is None
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.proj(y.transpose(1, 2).reshape(B, T, H * D))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.pre_norm, self.gated = cfg.pre_norm, cfg.gated_mlp
        self.ln_attn = norm(cfg, cfg.n_embd)
        self.attn = Attention(cfg)
        self.ln_mlp = norm(cfg, cfg.n_embd)
        self.fc_in = Linear(cfg.n_embd, (2 if cfg.gated_mlp else 1) * cfg.ffn_dim, bias=cfg.bias)  # gated: gate, up
        self.fc_out = Linear(cfg.ffn_dim, cfg.n_embd, bias=cfg.bias)
        self.act = ACTIVATIONS[cfg.activation]

    def mlp(self, x):
        if self.gated:  # SwiGLU (Llama, Qwen): down(silu(gate(x)) * up(x))
            gate, up = self.fc_in(x).chunk(2, dim=-1)
            return self.fc_out(self.act(gate) * up)
        return self.fc_out(self.act(self.fc_in(x)))

    def forward(self, x, mask, rope=None, cache=None, cache_pos=0):
        if self.pre_norm:  # x + f(norm(x)): every family but OPT-350m
            x = x + self.attn(self.ln_attn(x), mask, rope, cache, cache_pos)
            return x + self.mlp(self.ln_mlp(x))
        x = self.ln_attn(x + self.attn(x, mask, rope, cache, cache_pos))  # LN(x + f(x)): OPT-350m
        return self.ln_mlp(x + self.mlp(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        E, C = cfg.embed_dim, cfg.n_embd  # E != C: OPT-350m, which projects its embeddings
        self.tok_emb = nn.Embedding(cfg.vocab_size, E)
        self.pos_emb = nn.Embedding(cfg.n_positions + cfg.pos_offset, C) if cfg.positions == "learned" else None
        self.proj_in = nn.Linear(E, C, bias=False) if E != C else nn.Identity()
        self.proj_out = nn.Linear(C, E, bias=False) if E != C else nn.Identity()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = norm(cfg, C) if cfg.final_norm else nn.Identity()
        # The head: tok_emb.weight itself when tied (GPT-2, OPT, small Qwen and Llama 3.2), else its own
        self.lm_head = None if cfg.tie_embeddings else nn.Parameter(torch.empty(cfg.vocab_size, E))
        self.checkpointing = False  # activation checkpointing of the blocks while training (--activation-checkpointing)
        self.lora_settings = None   # (rank, alpha) of a LoRA student (lora.py)
        self.compiled_blocks = None  # torch.compile'd blocks, for the training step's forwards (train.py --compile)
        if cfg.positions == "rope":  # a buffer, not a parameter: made from the config, never saved
            self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)
        # GPT-2's init: N(0, 0.02), residual projections scaled by 1/sqrt(2L)
        for name, p in self.named_parameters():
            if p.dim() == 2:  # (biases start at zero, norms at the identity)
                deep = name.endswith(("attn.proj.weight", "fc_out.weight"))
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer) if deep else 0.02)

    @property
    def head(self):
        """The output matrix (V, E)."""
        return self.tok_emb.weight if self.lm_head is None else self.lm_head

    def forward(self, input_ids, attention_mask=None, *, cache=None, cache_pos=0, positions=None,
                last_only=False, head=None):
        """input_ids (B, T) -> float32 logits (B, T, V). attention_mask (B, S) is 1 on real tokens
        and covers the cache and the new tokens (S = cache_pos + T). Positions count real tokens
        only, so a left- or right-padded row gets the same logits as the unpadded one. last_only:
        logits of the last position only (sampling). head: fn(hidden (B, T, E), head weight (V, E)),
        returned instead of the logits (training's fused loss, train.py: loss_step)."""
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
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions + self.cfg.pos_offset)
        else:  # RoPE's angles for these positions, in float32, then in the activations' dtype
            angles = positions[..., None].float() * self.inv_freq.float()  # (B, T, D/2)
            angles = torch.cat((angles, angles), dim=-1)[:, None]            # (B, 1, T, D)
            rope = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        # compiled blocks for the training step's forwards only (a head function; lengths in a few buckets)
        blocks = self.compiled_blocks if head is not None and self.compiled_blocks else self.blocks
        for i, block in enumerate(blocks):
            if self.checkpointing and torch.is_grad_enabled() and cache is None:  # keep only each block's input
                x = torch.utils.checkpoint.checkpoint(block, x, mask, rope, use_reentrant=False)  # recomputed in backward
            else:
                x = block(x, mask, rope, None if cache is None else cache[i], cache_pos)
        x = self.proj_out(self.ln_f(x[:, -1:] if last_only else x))
        if head is not None:  # called here, inside forward, so that under FSDP the head's weight is gathered
            return head(x, self.head)
        # CPU sampling: the tall (V, C) head read in slices, which a CPU GEMM streams faster (25 -> 16 ms a step)
        if x.shape[1] == 1 and x.device.type == "cpu":
            return torch.cat([F.linear(x, w) for w in self.head.split(1024)], -1).float()
        return F.linear(x, self.head).float()  # (B, T, V), or (B, 1, V)

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
        S, L = T0 + max_new_tokens, self.cfg.n_layer
        # (L, k/v, B, KV heads, S, D): allocated once, so decoding never copies a growing cache
        cache = self.tok_emb.weight.new_empty(L, 2, B, self.cfg.n_kv_head, S, self.cfg.head_dim)
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
            logits = self(token[:, None], mask[:, :T0 + step + 1], cache=cache, cache_pos=T0 + step, positions=next_pos)[:, -1]
            next_pos = next_pos + 1
        return torch.stack(new_tokens, 1) if new_tokens else input_ids.new_zeros(B, 0)

    # --- Hugging Face checkpoints -----------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path, dtype=None, device=None):
        """Load a local Hugging Face directory or a hub id (downloaded into the standard cache)."""
        directory = resolve_checkpoint(name_or_path, lambda files: ["config.json", *weight_files(files, name_or_path)])
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
            if key in needed:  # skips a tied lm_head and GPT-2's stored causal-mask buffers
                found[key] = tensor.to(dtype=dtype or torch.float32, copy=True)
        state = {}
        for name, hf_keys in hf_keys_of.items():
            if missing := [k for k in hf_keys if k not in found]:
                raise ValueError(f"checkpoint {directory} lacks weights {missing} (for {name})")
            tensor = torch.cat([found.pop(k) for k in hf_keys])  # fused along the output dim (q, k, v; gate, up)
            if name.endswith(TRANSPOSED[cfg.model_type]):
                tensor = tensor.t().contiguous()
            if tensor.shape != shapes[name]:
                raise ValueError(f"config/weights shape mismatch in {directory}: {'+'.join(hf_keys)} has shape "
                                 f"{tuple(tensor.shape)}, config.json implies {tuple(shapes[name])}")
            state[name] = tensor
        model.load_state_dict(state, assign=True)
        if cfg.positions == "rope":  # buffers made on the meta device are made again, for real
            model.inv_freq = rope_frequencies(cfg)
        return model.to(device).eval() if device is not None else model.eval()

    def save_pretrained(self, out_dir):
        """Write config.json + model.safetensors with the family's Hugging Face names, as transformers does."""
        from safetensors.torch import save_file
        os.makedirs(out_dir, exist_ok=True)
        tensors = {}
        for name, tensor in lora.merged_state(self).items():  # a LoRA student's updates merged into its weights
            if name == "inv_freq":
                continue
            hf_keys = _hf_names(self.cfg, name)
            if name.endswith(TRANSPOSED[self.cfg.model_type]):
                tensor = tensor.t()
            sizes = _fused_sizes(self.cfg, name) if len(hf_keys) > 1 else [tensor.shape[0]]
            for key, part in zip(hf_keys, tensor.split(sizes)):  # un-fuse q, k, v and gate, up
                prefix = "" if key.startswith("lm_head") else HF_PREFIX[self.cfg.model_type]
                tensors[prefix + key] = part.detach().contiguous().cpu()
        atomic_write(os.path.join(out_dir, "model.safetensors"), lambda tmp: save_file(tensors, tmp, {"format": "pt"}))
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

# Our module -> the Hugging Face module (without the "transformer." / "model.decoder." / "model."
# prefix); the parameter suffix (.weight / .bias) is the same on both sides. A list is fused by us along
# the output dim (OPT's and Llama's q, k, v; Llama's gate and up).
_LLAMA_NAMES = {"tok_emb": "embed_tokens", "ln_f": "norm", "lm_head": "lm_head",
                "blocks.{i}.ln_attn": "layers.{i}.input_layernorm",
                "blocks.{i}.attn.qkv": ["layers.{i}.self_attn.q_proj", "layers.{i}.self_attn.k_proj", "layers.{i}.self_attn.v_proj"],
                "blocks.{i}.attn.proj": "layers.{i}.self_attn.o_proj",
                "blocks.{i}.attn.q_norm": "layers.{i}.self_attn.q_norm", "blocks.{i}.attn.k_norm": "layers.{i}.self_attn.k_norm",
                "blocks.{i}.ln_mlp": "layers.{i}.post_attention_layernorm",
                "blocks.{i}.fc_in": ["layers.{i}.mlp.gate_proj", "layers.{i}.mlp.up_proj"], "blocks.{i}.fc_out": "layers.{i}.mlp.down_proj"}
HF_NAMES = {
    "gpt2": {"tok_emb": "wte", "pos_emb": "wpe", "ln_f": "ln_f",
             "blocks.{i}.ln_attn": "h.{i}.ln_1", "blocks.{i}.attn.qkv": "h.{i}.attn.c_attn",
             "blocks.{i}.attn.proj": "h.{i}.attn.c_proj", "blocks.{i}.ln_mlp": "h.{i}.ln_2",
             "blocks.{i}.fc_in": "h.{i}.mlp.c_fc", "blocks.{i}.fc_out": "h.{i}.mlp.c_proj"},
    "opt": {"tok_emb": "embed_tokens", "pos_emb": "embed_positions", "ln_f": "final_layer_norm",
            "proj_in": "project_in", "proj_out": "project_out",
            "blocks.{i}.ln_attn": "layers.{i}.self_attn_layer_norm",
            "blocks.{i}.attn.qkv": ["layers.{i}.self_attn.q_proj", "layers.{i}.self_attn.k_proj", "layers.{i}.self_attn.v_proj"],
            "blocks.{i}.attn.proj": "layers.{i}.self_attn.out_proj",
            "blocks.{i}.ln_mlp": "layers.{i}.final_layer_norm", "blocks.{i}.fc_in": "layers.{i}.fc1", "blocks.{i}.fc_out": "layers.{i}.fc2"},
    "llama": _LLAMA_NAMES, "qwen2": _LLAMA_NAMES, "qwen3": _LLAMA_NAMES,  # SmolLM2 is model_type llama
}
HF_PREFIX = {"gpt2": "transformer.", "opt": "model.decoder.", "llama": "model.", "qwen2": "model.", "qwen3": "model."}
# Our Linear stores weight (in, out) as GPT-2's Conv1D does; the others' nn.Linear stores (out, in).
_LINEARS = ("attn.qkv.weight", "attn.proj.weight", "fc_in.weight", "fc_out.weight")
TRANSPOSED = {"gpt2": (), "opt": _LINEARS, "llama": _LINEARS, "qwen2": _LINEARS, "qwen3": _LINEARS}


def _hf_names(cfg, name):
    """Our parameter name -> its Hugging Face name(s): GPT-2's for blocks.3.fc_in.weight is
    [h.3.mlp.c_fc.weight]."""
    module, leaf = name.rsplit(".", 1) if "." in name else (name, "weight")
    layer = module.split(".")[1] if module.startswith("blocks.") else ""
    hf_modules = HF_NAMES[cfg.model_type][module.replace(f"blocks.{layer}.", "blocks.{i}.", 1)]
    hf_modules = hf_modules if isinstance(hf_modules, list) else [hf_modules]
    return [f"{t.format(i=layer)}.{leaf}" for t in hf_modules]


def _fused_sizes(cfg, name):
    """How one of our fused tensors splits back into the checkpoint's tensors (along its first dim)."""
    if ".attn.qkv." in name:
        return [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim]
    return [cfg.ffn_dim, cfg.ffn_dim]  # gate, up


# Each family's config.json: our field -> (its key, the value taken when the key is absent; `...`: required,
# None: left as FIXED or GPTConfig's default). FIXED: what a family always is. Reading and writing both use
# these tables.
_LLAMA_KEYS = {"vocab_size": ("vocab_size", ...), "n_positions": ("max_position_embeddings", ...),
               "n_layer": ("num_hidden_layers", ...), "n_head": ("num_attention_heads", ...),
               "n_kv_head": ("num_key_value_heads", 0), "n_embd": ("hidden_size", ...),
               "ffn_dim": ("intermediate_size", ...), "head_dim": ("head_dim", 0), "activation": ("hidden_act", "silu"),
               "norm_eps": ("rms_norm_eps", 1e-6), "tie_embeddings": ("tie_word_embeddings", False),
               "bos_token_id": ("bos_token_id", None), "eos_token_id": ("eos_token_id", None),
               "pad_token_id": ("pad_token_id", None)}
HF_CONFIGS = {
    "gpt2": {"vocab_size": ("vocab_size", ...), "n_positions": ("n_positions", ...), "n_layer": ("n_layer", ...),
             "n_head": ("n_head", ...), "n_embd": ("n_embd", ...), "ffn_dim": ("n_inner", None),
             "activation": ("activation_function", "gelu_new"), "norm_eps": ("layer_norm_epsilon", 1e-5),
             "eos_token_id": ("eos_token_id", 50256)},
    "opt": {"vocab_size": ("vocab_size", ...), "n_positions": ("max_position_embeddings", ...),
            "n_layer": ("num_hidden_layers", ...), "n_head": ("num_attention_heads", ...),
            "n_embd": ("hidden_size", ...), "ffn_dim": ("ffn_dim", ...), "activation": ("activation_function", "relu"),
            "embed_dim": ("word_embed_proj_dim", 0), "pre_norm": ("do_layer_norm_before", True),
            "bos_token_id": ("bos_token_id", 2), "eos_token_id": ("eos_token_id", 2), "pad_token_id": ("pad_token_id", 1)},
    "llama": _LLAMA_KEYS, "qwen2": _LLAMA_KEYS, "qwen3": _LLAMA_KEYS,
}
_ROPE = dict(norm="rmsnorm", positions="rope", gated_mlp=True, bias=False, bos_token_id=None, eos_token_id=None,
             pad_token_id=None)
FIXED = {"gpt2": {}, "opt": {"pos_offset": 2}, "llama": dict(_ROPE, qkv_bias=False), "qwen2": dict(_ROPE, qkv_bias=True),
         "qwen3": dict(_ROPE, qkv_bias=False, qk_norm=True)}
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "opt": "OPTForCausalLM", "llama": "LlamaForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# What we cannot represent, refused in one line rather than loaded wrong: (key, the value we support)
UNSUPPORTED = {"gpt2": [("scale_attn_by_inverse_layer_idx", False), ("reorder_and_upcast_attn", False)],
               "opt": [("enable_bias", True), ("layer_norm_elementwise_affine", True)],
               "llama": [("attention_bias", False), ("mlp_bias", False)],
               "qwen2": [("use_sliding_window", False)], "qwen3": [("use_sliding_window", False), ("attention_bias", False)]}


def config_from_hf(hf):
    """A Hugging Face config.json (as a dict) -> GPTConfig, through the family's tables."""
    if not isinstance(hf, dict):
        raise ValueError(f"holds a JSON {type(hf).__name__}, not an object of settings")
    kind = hf.get("model_type")
    if kind not in HF_CONFIGS:
        raise ValueError(f"has model_type {kind!r}: tempkd loads {', '.join(map(repr, HF_CONFIGS))} checkpoints")
    for key, supported in UNSUPPORTED[kind]:
        if hf.get(key, supported) != supported:
            raise ValueError(f"sets {key} = {hf[key]!r}: tempkd's {kind} supports only {supported!r}")
    fields = dict(FIXED[kind])
    for ours, (key, default) in HF_CONFIGS[kind].items():
        value = hf[key] if default is ... else hf.get(key, default)  # a required key missing: KeyError, named
        if value is not None:
            fields[ours] = value
    if kind == "gpt2":  # n_inner null means 4 x n_embd; GPT-2 pads with EOS
        fields["ffn_dim"] = fields.get("ffn_dim") or 4 * fields["n_embd"]
        fields["bos_token_id"] = fields["pad_token_id"] = fields["eos_token_id"]
    if kind == "opt":  # OPT-350m: norms after, no final norm
        fields["final_norm"] = fields["pre_norm"] and not hf.get("_remove_final_layer_norm", False)
    if FIXED[kind].get("positions") == "rope":
        fields.update(_rope_from_hf(hf))
    return GPTConfig(model_type=kind, **fields)


def _rope_from_hf(hf):
    """rope_theta and Llama 3's scaling, from the newer `rope_parameters` or the older `rope_theta` /
    `rope_scaling` keys. Other RoPE types (yarn, dynamic, ...) are refused."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise ValueError(f"uses RoPE type {kind!r}: tempkd supports 'default' and 'llama3'")
    scaling = {}
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        scaling = {k: params[k] for k in keys}
    return {"rope_theta": float(params.get("rope_theta", hf.get("rope_theta", 10000.0))), "rope_scaling": scaling}


def config_to_hf(cfg):
    """GPTConfig -> the config.json that transformers writes for the same model."""
    hf = {"model_type": cfg.model_type, "architectures": [ARCHITECTURES[cfg.model_type]]}
    hf.update({key: getattr(cfg, ours) for ours, (key, _) in HF_CONFIGS[cfg.model_type].items()
               if getattr(cfg, ours) is not None})
    if cfg.model_type == "gpt2":
        hf.update(n_ctx=cfg.n_positions, bos_token_id=cfg.bos_token_id, tie_word_embeddings=True, resid_pdrop=0.0,
                  embd_pdrop=0.0, attn_pdrop=0.0)
    elif cfg.model_type == "opt":
        hf.update(_remove_final_layer_norm=cfg.pre_norm and not cfg.final_norm, tie_word_embeddings=True,
                  dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0)
    else:
        rope = {"rope_type": "llama3" if cfg.rope_scaling else "default", "rope_theta": cfg.rope_theta, **cfg.rope_scaling}
        hf.update(rope_parameters=rope, attention_bias=cfg.qkv_bias if cfg.model_type != "qwen2" else None,
                  attention_dropout=0.0)
        hf = {k: v for k, v in hf.items() if v is not None}
    return hf
