"""Hugging Face checkpoint files, the plumbing under model.py's from_pretrained (and data.py's
tokenizers): where a checkpoint's files are (a local directory, or a hub download into the standard
cache), which weight files to read (safetensors or PyTorch .bin, whole or sharded), and reading them
one tensor at a time."""
import json
import os
import zipfile
from pathlib import Path

import torch


def resolve_checkpoint(name_or_path, pick, repo_type="model"):
    """A local directory is used as is; anything else is a hub id, and `pick(repo_files)` chooses
    the files to download (into the standard Hugging Face cache, with a progress bar). Returns a
    local directory."""
    if os.path.isdir(name_or_path):
        return name_or_path
    elif looks_local(name_or_path):  # never ask the hub for a mistyped local path
        raise FileNotFoundError(f"directory {name_or_path!r} does not exist")
    import huggingface_hub
    try:
        info = huggingface_hub.repo_info(name_or_path, repo_type=repo_type)
    except Exception as e:  # offline, unknown repo, ...: one line, not a deep HTTP traceback
        if type(e).__name__ == "GatedRepoError" or " 401 " in f" {e} ":
            raise FileNotFoundError(f"{name_or_path!r} is a gated repository (401): accept its license on "
                                    f"https://huggingface.co/{name_or_path}, then log in (`hf auth login`, or set "
                                    "HF_TOKEN)") from e
        raise FileNotFoundError(f"{name_or_path!r} is neither a local directory nor a reachable "
                                f"hub {repo_type} ({type(e).__name__}: {e})") from e
    to_download = pick([s.rfilename for s in info.siblings])
    paths = [huggingface_hub.hf_hub_download(name_or_path, f, repo_type=repo_type) for f in to_download]
    return paths[0][:-len(to_download[0])].rstrip(os.sep)  # the snapshot folder that holds them all


def looks_local(name):
    """A path, not a hub id ("gpt2", "owner/name"): /.., ./.., a/b/c, or in a folder here."""
    return (os.path.isabs(name) or name.startswith(".") or name.count("/") > 1
            or os.path.isdir(name.split("/")[0]))


def weight_files(files, where):
    """Which weight files to read, from a directory listing or a hub repo's file list: one format,
    preferring safetensors (repos often hold both; downloading both would double the bytes). Shards
    follow their index."""
    for choice in ("model.safetensors.index.json", "model.safetensors",
                   "pytorch_model.bin.index.json", "pytorch_model.bin"):
        if choice in files:
            shard_prefix = choice.split(".")[0] + "-"  # model-00001-of-00003.safetensors
            shards = [f for f in files if f.startswith(shard_prefix)]
            return [choice] + (shards if choice.endswith(".index.json") else [])
    raise FileNotFoundError(f"no weights file in {where}: expected model.safetensors, "
                            "pytorch_model.bin, or a sharded model.safetensors.index.json / "
                            "pytorch_model.bin.index.json")


def read_tensors(directory):
    """Yield the checkpoint's (name, tensor) pairs one at a time: at most one tensor in the file's
    dtype is alive."""
    name = weight_files(os.listdir(directory), directory)[0]
    index = {"": name}
    if name.endswith(".index.json"):  # an index names the shards
        index = json.loads(Path(directory, name).read_text())["weight_map"]
    for path in (os.path.join(directory, shard) for shard in sorted(set(index.values()))):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"missing weights shard {path}")
        if path.endswith(".safetensors"):
            from safetensors import safe_open
            try:
                with safe_open(path, framework="pt") as f:
                    yield from ((key, f.get_tensor(key)) for key in f.keys())
            except Exception as e:  # truncated or corrupt file
                raise ValueError(f"{path} is not a readable safetensors file (truncated or "
                                 f"corrupt?): {e}") from e
        else:  # only the zip format (torch >= 1.6) can be memory-mapped; legacy ones are read whole
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
            except Exception as e:
                raise ValueError(f"{path} is not a readable PyTorch weights file (truncated or "
                                 f"corrupt?): {e}") from e
            yield from state.items()
