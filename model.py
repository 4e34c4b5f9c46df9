"""One hand-written decoder-only transformer that covers GPT-2 and OPT.

The families differ in a few switches (activation, position offset, pre/post layer norm, an embedding projection)
held in `GPTConfig`, and in Hugging Face's weight names, one table per family (`HF_NAMES`). The rest is shared:
    model = GPT.from_pretrained("gpt2")          # a hub id or a local Hugging Face directory
    logits = model(input_ids, attention_mask)    # (B, T, V); model.generate(...) samples with a KV cache
"""
import functools
import json
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

gelu_tanh = functools.partial(F.gelu, approximate="tanh")  # what GPT-2 calls "gelu_new"
ACTIVATIONS = {"gelu_new": gelu_tanh, "gelu_pytorch_tanh": gelu_tanh, "gelu": F.gelu, "relu": F.relu}


@dataclass
class GPTConfig:
    model_type: str = "gpt2"        # "gpt2" or "opt": picks the weight-name table and the config.json dialect
    vocab_size: int = 50257
    n_positions: int = 1024         # longest sequence the learned position table covers
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    ffn_dim: int = 3072
    activation: str = "gelu_new"    # GPT-2: GELU with the tanh approximation; OPT: ReLU
    pos_offset: int = 0             # OPT's position table has 2 extra rows in front (a fairseq padding heritage)
    embed_dim: int = 0              # OPT-350m embeds tokens in 512 dims and projects to 1024; 0 = n_embd
    pre_norm: bool = True           # layer norm before attention/MLP (GPT-2, OPT >= 1.3b); after for OPT-350m
    final_norm: bool = True         # a layer norm after the last block
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    pad_token_id: int = 50256

    def __post_init__(self):
        if self.model_type not in HF_NAMES:
            raise ValueError(f"unknown model_type {self.model_type!r}: tempkd supports {sorted(HF_NAMES)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}: expected one of {sorted(ACTIVATIONS)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        self.embed_dim = self.embed_dim or self.n_embd


# --- The network ------------------------------------------------------------------------------------------------


class Linear(nn.Module):
    """y = x @ weight + bias, weight stored (in, out) as GPT-2's checkpoints store it (nn.Linear: (out, in)).
    CPU speed-up: sampling multiplies a few rows by each matrix per step, and a CPU GEMM streams this layout ~1.5x
    faster (results/benchmarks.md). The math is nn.Linear's."""
    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.empty(n_in, n_out)), nn.Parameter(torch.zeros(n_out))

    def forward(self, x):  # (..., in) -> (..., out)
        return F.linear(x, self.weight.t(), self.bias)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = Linear(cfg.n_embd, 3 * cfg.n_embd)  # one matmul for q, k and v: faster than three
        self.proj = Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x, mask, cache=None, cache_pos=0):  # x: (B, T, C), mask: (B, 1, T, S) bool or None
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, D)
        if cache is not None:  # write this step's keys/values into the pre-allocated cache, attend to all so far
            cache[0][:, :, cache_pos:cache_pos + T] = k
            cache[1][:, :, cache_pos:cache_pos + T] = v
            k, v = cache[0][:, :, :cache_pos + T], cache[1][:, :, :cache_pos + T]
        # is_causal lets PyTorch pick its fused kernel when there is no padding to mask out
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and cache is None)
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
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.pos_emb = nn.Embedding(cfg.n_positions + cfg.pos_offset, cfg.n_embd)
        project = cfg.embed_dim != cfg.n_embd
        self.proj_in = nn.Linear(cfg.embed_dim, cfg.n_embd, bias=False) if project else nn.Identity()
        self.proj_out = nn.Linear(cfg.n_embd, cfg.embed_dim, bias=False) if project else nn.Identity()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps) if cfg.final_norm else nn.Identity()
        # No separate output matrix: the head reuses tok_emb.weight (weight tying, as both families do).
        for name, p in self.named_parameters():  # GPT-2's init: N(0, 0.02); residual projections scaled by 1/sqrt(2L)
            if p.dim() == 2:  # (biases start at zero, layer norms at the identity)
                deep = name.endswith(("attn.proj.weight", "fc_out.weight"))
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer) if deep else 0.02)

    def forward(self, input_ids, attention_mask=None, *, cache=None, cache_pos=0, positions=None, last_only=False):
        """input_ids (B, T) -> float32 logits (B, T, V). attention_mask (B, S) is 1 on real tokens and covers the
        cache and the new tokens (S = cache_pos + T). Positions count real tokens only, so a left- or right-padded
        row gets the same logits as the unpadded one. last_only: logits of the last position only (sampling)."""
        (B, T), mask = input_ids.shape, None
        if attention_mask is not None and not bool(attention_mask.all()):
            attention_mask, S = attention_mask.bool(), attention_mask.shape[1]
            if positions is None:  # position = number of real tokens before this one
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            causal = torch.ones(T, S, dtype=torch.bool, device=input_ids.device).tril(diagonal=S - T)  # (T, S)
            # A padding query would see no key at all (a softmax over nothing is NaN); letting every query see itself
            # (the diagonal, causal.triu(S - T)) keeps its unused output finite without changing any real position.
            mask = ((causal & attention_mask[:, None, :]) | causal.triu(diagonal=S - T))[:, None]  # (B, 1, T, S)
        elif cache is not None and T > 1:  # unpadded prefill into a cache: causal mask written out
            mask = torch.ones(T, cache_pos + T, dtype=torch.bool, device=input_ids.device).tril(diagonal=cache_pos)
        if positions is None:
            positions = torch.arange(cache_pos, cache_pos + T, device=input_ids.device).expand(B, T)
        x = self.proj_in(self.tok_emb(input_ids)) + self.pos_emb(positions + self.cfg.pos_offset)  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, mask, None if cache is None else cache[i], cache_pos)
        x = self.proj_out(self.ln_f(x[:, -1:] if last_only else x))
        if x.shape[1] == 1 and x.device.type == "cpu":  # CPU speed-up when sampling: the same product, the tall
            # (V, C) head read in slices, which a CPU GEMM streams faster (25 -> 16 ms a step at B=8)
            return torch.cat([F.linear(x, w) for w in self.tok_emb.weight.split(1024)], -1).float()
        return F.linear(x, self.tok_emb.weight).float()  # (B, T, V), or (B, 1, V)

    # --- Sampling with a pre-allocated KV cache ------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens=256, temperature=1.0, top_k=0, top_p=1.0,
                 no_repeat_ngram_size=0, eos_token_id=None, generator=None):
        """Sample up to max_new_tokens after left-padded prompts (B, T0) -> the new tokens only (B, <=N).
        temperature=0 is greedy. A finished row is padded with EOS; the loop ends when every row has emitted EOS.
        `generator` (a torch.Generator on the model's device, or a list of one per row) makes sampling
        reproducible."""
        B, T0 = input_ids.shape
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        if bool((attention_mask.sum(1) + max_new_tokens > self.cfg.n_positions).any()):
            raise ValueError(f"prompt + max_new_tokens exceeds the model's {self.cfg.n_positions} positions")
        S, H, L = T0 + max_new_tokens, self.cfg.n_head, self.cfg.n_layer
        # (L, k/v, B, H, S, D): allocated once, so decoding never copies a growing cache
        cache = self.tok_emb.weight.new_empty(L, 2, B, H, S, self.cfg.n_embd // H)
        mask = torch.cat([attention_mask.bool(), attention_mask.new_zeros(B, max_new_tokens, dtype=torch.bool)], 1)
        next_pos = attention_mask.long().sum(1, keepdim=True)  # (B, 1): the position of each row's next token
        seen = [_NgramIndex(no_repeat_ngram_size, row[m.bool()].tolist()) for row, m in zip(input_ids, attention_mask)] \
            if no_repeat_ngram_size > 0 else []
        logits = self(input_ids, mask[:, :T0], cache=cache, last_only=True)[:, -1]  # (B, V)
        finished, new_tokens = torch.zeros(B, dtype=torch.bool, device=input_ids.device), []
        for step in range(max_new_tokens):
            for row, index in enumerate(seen):  # forbid tokens that would repeat an n-gram of this row
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

    # --- Hugging Face checkpoints ---------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path, dtype=None, device=None):
        """Load a local Hugging Face directory or a hub id (downloaded into the standard cache)."""
        directory = resolve_checkpoint(name_or_path, lambda files: ["config.json", *weight_files(files, name_or_path)])
        try:
            cfg = config_from_hf(json.loads(Path(directory, "config.json").read_text()))
        except FileNotFoundError:
            raise FileNotFoundError(f"missing config.json in {directory}") from None
        except (KeyError, json.JSONDecodeError) as e:
            problem = f"lacks the field {e}" if isinstance(e, KeyError) else f"is not valid JSON ({e})"
            raise ValueError(f"config.json in {directory} {problem}") from None
        with torch.device("meta"):  # no memory yet: each tensor is materialised once, in `dtype`, as it is read
            model = cls(cfg)
        shapes = {name: t.shape for name, t in model.state_dict().items()}
        hf_keys_of = {name: _hf_names(cfg, name) for name in shapes}  # ours -> the checkpoint's name(s)
        needed = {key for hf_keys in hf_keys_of.values() for key in hf_keys}
        found = {}
        for key, tensor in _read_tensors(directory):
            for prefix in ("transformer.", "model.decoder.", "model.", "decoder."):  # keys come either way
                key = key.removeprefix(prefix)
            if key in needed:  # skips lm_head (tied) and GPT-2's stored causal-mask buffers
                found[key] = tensor.to(dtype=dtype or torch.float32, copy=True)
        state = {}
        for name, hf_keys in hf_keys_of.items():
            if missing := [k for k in hf_keys if k not in found]:
                raise ValueError(f"checkpoint {directory} lacks weights {missing} (needed for {name})")
            tensor = torch.cat([found.pop(k) for k in hf_keys])
            if name.endswith(TRANSPOSED[cfg.model_type]):
                tensor = tensor.t().contiguous()
            if tensor.shape != shapes[name]:
                raise ValueError(f"config/weights shape mismatch in {directory}: {'+'.join(hf_keys)} has shape "
                                 f"{tuple(tensor.shape)}, config.json implies {tuple(shapes[name])}")
            state[name] = tensor
        model.load_state_dict(state, assign=True)
        return model.to(device).eval() if device is not None else model.eval()

    def save_pretrained(self, out_dir):
        """Write config.json + model.safetensors with Hugging Face's names (loadable by transformers)."""
        from safetensors.torch import save_file
        from data import atomic_write
        os.makedirs(out_dir, exist_ok=True)
        prefix, tensors = HF_PREFIX[self.cfg.model_type], {}
        for name, tensor in self.state_dict().items():
            hf_keys = _hf_names(self.cfg, name)
            if name.endswith(TRANSPOSED[self.cfg.model_type]):
                tensor = tensor.t()
            for key, part in zip(hf_keys, tensor.chunk(len(hf_keys))):  # un-fuse OPT's q, k, v
                tensors[prefix + key] = part.detach().contiguous().cpu()
        atomic_write(os.path.join(out_dir, "model.safetensors"), lambda tmp: save_file(tensors, tmp, {"format": "pt"}))
        config = json.dumps(config_to_hf(self.cfg), indent=2)
        atomic_write(os.path.join(out_dir, "config.json"), lambda tmp: Path(tmp).write_text(config))


def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """Pick one token per row from logits (B, V): greedy at temperature 0, else top-k / nucleus sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:  # keep the k largest logits
        logits = logits.masked_fill(logits < torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:], -math.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # mass before a token already exceeds top_p; the top-1 always stays
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    # CPU speed-up: inverse-CDF sampling, one uniform number per row (torch.multinomial: several times slower)
    cdf = logits.softmax(-1).cumsum_(-1)
    if isinstance(generator, (list, tuple)):  # one generator per row: a row's draws do not depend on its batch
        u = torch.cat([torch.rand(1, 1, generator=g, device=cdf.device) for g in generator]) * cdf[:, -1:]
    else:
        u = torch.rand(len(cdf), 1, generator=generator, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp_(max=cdf.shape[-1] - 1)  # zero-mass tokens never won


class _NgramIndex:
    """For one row: (n-1)-gram -> the tokens that followed it, so a repeated n-gram can be banned in O(1)."""
    def __init__(self, n, tokens):
        self.n, self.tokens, self.next = n, [], {}
        for t in tokens:
            self.add(t)

    def add(self, token):
        self.tokens.append(token)
        if len(self.tokens) >= self.n:
            self.next.setdefault(tuple(self.tokens[len(self.tokens) - self.n:-1]), set()).add(token)

    def banned(self):  # the tokens that would complete an n-gram this row already contains
        return list(self.next.get(tuple(self.tokens[len(self.tokens) - self.n + 1:]), ()))


# --------------------------------------------------------------------------------------------------------------------
# Names, configs and files: everything that differs between the families' Hugging Face checkpoints

# Our module -> the Hugging Face module (without the "transformer." / "model.decoder." prefix); the parameter
# suffix (.weight / .bias) is the same on both sides. A list is fused by us along the output dim (OPT's q, k, v).
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
            "blocks.{i}.attn.proj": "layers.{i}.self_attn.out_proj", "blocks.{i}.ln_mlp": "layers.{i}.final_layer_norm",
            "blocks.{i}.fc_in": "layers.{i}.fc1", "blocks.{i}.fc_out": "layers.{i}.fc2"},
}
HF_PREFIX = {"gpt2": "transformer.", "opt": "model.decoder."}
# Our Linear stores weight (in, out) as GPT-2's Conv1D does; OPT's nn.Linear stores (out, in), so OPT's are transposed.
TRANSPOSED = {"gpt2": (), "opt": ("attn.qkv.weight", "attn.proj.weight", "fc_in.weight", "fc_out.weight")}


def _hf_names(cfg, name):
    """Our parameter name -> its Hugging Face name(s): blocks.3.fc_in.weight -> [h.3.mlp.c_fc.weight] for GPT-2."""
    module, leaf = name.rsplit(".", 1)
    layer = module.split(".")[1] if module.startswith("blocks.") else ""
    hf_modules = HF_NAMES[cfg.model_type][module.replace(f"blocks.{layer}.", "blocks.{i}.", 1)]
    return [f"{t.format(i=layer)}.{leaf}" for t in (hf_modules if isinstance(hf_modules, list) else [hf_modules])]


def config_from_hf(hf):
    """A Hugging Face config.json (as a dict) -> GPTConfig."""
    kind = hf.get("model_type")
    if kind == "gpt2":
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            raise ValueError("GPT-2 variants with scale_attn_by_inverse_layer_idx/reorder_and_upcast_attn are unsupported")
        eos = hf.get("eos_token_id", 50256)  # GPT-2 pads with EOS
        return GPTConfig("gpt2", hf["vocab_size"], hf["n_positions"], hf["n_layer"], hf["n_head"], hf["n_embd"],
                         hf.get("n_inner") or 4 * hf["n_embd"], hf.get("activation_function", "gelu_new"),
                         layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5), bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    if kind == "opt":
        if not hf.get("enable_bias", True) or not hf.get("layer_norm_elementwise_affine", True):
            raise ValueError("OPT variants without biases or layer-norm affine parameters are unsupported")
        pre_norm = hf.get("do_layer_norm_before", True)
        return GPTConfig("opt", hf["vocab_size"], hf["max_position_embeddings"], hf["num_hidden_layers"],
                         hf["num_attention_heads"], hf["hidden_size"], hf["ffn_dim"], hf.get("activation_function", "relu"),
                         pos_offset=2, embed_dim=hf.get("word_embed_proj_dim") or hf["hidden_size"], pre_norm=pre_norm,
                         final_norm=pre_norm and not hf.get("_remove_final_layer_norm", False),
                         bos_token_id=hf.get("bos_token_id", 2), eos_token_id=hf.get("eos_token_id", 2),
                         pad_token_id=hf.get("pad_token_id", 1))
    raise ValueError(f"unknown model_type {kind!r} in config.json: tempkd loads 'gpt2' and 'opt' checkpoints")


def config_to_hf(cfg):
    """GPTConfig -> the config.json that transformers writes for the same model."""
    common = {"model_type": cfg.model_type, "vocab_size": cfg.vocab_size, "activation_function": cfg.activation,
              "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "tie_word_embeddings": True}
    if cfg.model_type == "gpt2":
        return {**common, "architectures": ["GPT2LMHeadModel"], "n_positions": cfg.n_positions, "n_ctx": cfg.n_positions,
                "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd, "n_inner": cfg.ffn_dim,
                "layer_norm_epsilon": cfg.layer_norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    return {**common, "architectures": ["OPTForCausalLM"], "max_position_embeddings": cfg.n_positions,
            "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "hidden_size": cfg.n_embd,
            "ffn_dim": cfg.ffn_dim, "word_embed_proj_dim": cfg.embed_dim, "do_layer_norm_before": cfg.pre_norm,
            "_remove_final_layer_norm": cfg.pre_norm and not cfg.final_norm, "pad_token_id": cfg.pad_token_id,
            "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0, "layerdrop": 0.0}


def resolve_checkpoint(name_or_path, pick, repo_type="model"):
    """A local directory is used as is; anything else is a hub id, and `pick(repo_files)` chooses the files to
    download (into the standard Hugging Face cache, with a progress bar). Returns a local directory."""
    if os.path.isdir(name_or_path):
        return name_or_path
    elif looks_local(name_or_path):  # never ask the hub for a mistyped local path
        raise FileNotFoundError(f"directory {name_or_path!r} does not exist")
    import huggingface_hub
    try:
        files = [s.rfilename for s in huggingface_hub.repo_info(name_or_path, repo_type=repo_type).siblings]
    except Exception as e:  # offline, unknown repo, ...: one message instead of a deep HTTP traceback
        raise FileNotFoundError(f"{name_or_path!r} is neither a local directory nor a reachable hub {repo_type} "
                                f"({type(e).__name__}: {e})") from e
    to_download = pick(files)
    paths = [huggingface_hub.hf_hub_download(name_or_path, f, repo_type=repo_type) for f in to_download]
    return paths[0][:-len(to_download[0])].rstrip(os.sep)  # the snapshot folder that holds them all


def looks_local(name):  # a path, not a hub id ("gpt2", "owner/name"): /.., ./.., a/b/c, or in a folder here
    return os.path.isabs(name) or name.startswith(".") or name.count("/") > 1 or os.path.isdir(name.split("/")[0])


def weight_files(files, where):
    """Which weight files to read, from a directory listing or a hub repo's file list: one format, preferring
    safetensors (repos often hold both; downloading both would double the bytes). Shards follow their index."""
    for choice in ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin"):
        if choice in files:
            return [choice] + [f for f in files if choice.endswith(".index.json") and f.startswith(choice.split(".")[0] + "-")]
    raise FileNotFoundError(f"no weights file in {where}: expected model.safetensors, pytorch_model.bin, "
                            "or a sharded model.safetensors.index.json / pytorch_model.bin.index.json")


def _read_tensors(directory):
    """Yield the checkpoint's (name, tensor) pairs one at a time: at most one tensor in the file's dtype is alive."""
    name = weight_files(os.listdir(directory), directory)[0]
    index = json.loads(Path(directory, name).read_text())["weight_map"] if name.endswith(".index.json") else {"": name}
    for path in (os.path.join(directory, shard) for shard in sorted(set(index.values()))):  # an index names the shards
        if not os.path.isfile(path):
            raise FileNotFoundError(f"missing weights shard {path}")
        if path.endswith(".safetensors"):
            from safetensors import safe_open
            try:
                with safe_open(path, framework="pt") as f:
                    yield from ((key, f.get_tensor(key)) for key in f.keys())
            except Exception as e:  # truncated or corrupt file
                raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e
        else:  # only the zip format (torch >= 1.6) can be memory-mapped; the legacy format is read whole
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
            except Exception as e:
                raise ValueError(f"{path} is not a readable PyTorch weights file (truncated or corrupt?): {e}") from e
            yield from state.items()
