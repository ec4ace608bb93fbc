"""Loading a KA model back: `load_ka_model(path_or_repo)` -> (model, tokenizer, adapter), from a local folder or
a Hub repo made by `examples/push_to_hub.py` (weights, config with its `ka` section, tokenizer, `adapter/`).

With ka_hf imported (this module is part of it) a KA-trained model runs exact KA in every forward and
`generate()` uses a KACache by default; nothing else is needed. `load_ka_model` also loads the tokenizer and
reattaches a plan-1 adapter kept beside the weights.
"""

from pathlib import Path

from .adapters import CONFIG_NAME as ADAPTER_CONFIG
from .adapters import load_adapter
from .errors import KAError
from .preflight import check_local_path

ADAPTER_SUBDIR = "adapter"  # where a published folder keeps its plan-1 adapter


def load_ka_model(path_or_repo: str, **from_pretrained_kwargs):
    """(model, tokenizer or None, adapter or None) from a folder made by push_to_hub's assembly, or a Hub repo of
    one, in eval mode. The tokenizer is loaded when the folder has one; an adapter/ subfolder is reattached: use it
    as `KACache(adapter=adapter)`. Keyword arguments go to from_pretrained (dtype, device_map, ...;
    attn_implementation defaults to "sdpa"); revision, token, cache_dir also pick the snapshot of a Hub repo."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _local_folder(path_or_repo, from_pretrained_kwargs)
    from_pretrained_kwargs.setdefault("attn_implementation", "sdpa")
    model = AutoModelForCausalLM.from_pretrained(str(folder), **from_pretrained_kwargs).eval()
    tokenizer = None
    if (folder / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    adapter = None
    if (folder / ADAPTER_SUBDIR / ADAPTER_CONFIG).is_file():
        parameter = next(model.parameters())
        adapter = load_adapter(folder / ADAPTER_SUBDIR, device=parameter.device, dtype=parameter.dtype)
        adapter.check_model(model)
    return model, tokenizer, adapter


def _local_folder(path_or_repo: str, kwargs: dict) -> Path:
    """A local directory as is; a Hub repo id: its snapshot (downloaded, or from the cache when offline)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled

    if Path(path_or_repo).expanduser().is_dir():
        return Path(path_or_repo).expanduser()
    check_local_path(path_or_repo)  # a path-like name that is not a directory is a typo, not a repo id
    where = {key: kwargs.get(key) for key in ("revision", "token", "cache_dir")}
    try:
        return Path(snapshot_download(path_or_repo, **where))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HFValidationError) as error:
        raise KAError(
            f"cannot load {path_or_repo!r}: not a local folder, and the Hub repo is not available "
            f"({type(error).__name__})"
        ) from None
