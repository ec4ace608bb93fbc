"""Plan 1: an adapter f that lets a standard-trained model run on a KA cache.

A KA cache offers later tokens the past attention outputs a_j where standard attention used the values v_j.
The adapter maps each output back towards value space before it is used as a value:

    a_i = sum_{j<i} w_ij f(a_j) + w_ii v_i,    f = f_{layer, head}

If f(a_j) = v_j exactly, KA computes standard attention. The adapter here is, per layer and query head,

    f(a) = a @ M + b   (+ mlp(a) = W2 gelu(W1 LayerNorm(a)), one small MLP per layer, optional)

initialized to the identity (M = I, b = 0, W2 = 0), so an untrained adapter is plain KA, exactly. Fitting it
(least squares, distillation) is study code: `ka_hf.study.fit_adapters`. This module is what a user needs to load
and apply one.

Why the recursion: with f inside the recursion, the outputs solve A = W_s f(A) + D V. For the affine f that is
still linear in A, and a `KACache(adapter=...)` computes a multi-token chunk exactly by blocks: the past through
fused attention over f(A_past), each block's own rows by a terminating Neumann sum (KA-SPEC §3.1,
`ka_hf.ops.ka_attention_adapted`; differentiable, so distillation uses it). With the residual MLP f is nonlinear:
the same blocks, the past fused, the block's own rows token by token (`ka_hf.ops.ka_attention_mapped`).
Decoding one token at a time costs the same as plain KA.

Files: `save_adapter(adapter, dir)` writes adapter.safetensors + adapter_config.json (shape, base model, how it
was fitted); `load_adapter(dir)` reads them back. Use: `KACache(adapter=load_adapter(dir))`.
"""

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .architectures import num_kv_heads
from .errors import KAError

WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT = "ka_hf-adapter"


def attention_shape(config) -> dict:
    """num_layers, num_heads, num_kv_heads, head_dim of a model config (what an adapter must agree with)."""
    num_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    return dict(
        num_layers=config.num_hidden_layers, num_heads=num_heads, num_kv_heads=num_kv_heads(config), head_dim=head_dim
    )


_FINGERPRINT_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")


def base_record(config) -> dict:
    """What an adapter records about the model it is made for: model_type, name, shape, whether the model runs KA
    (a KA-trained model) and a fingerprint of its architecture (a hash of its defining sizes)."""
    import hashlib

    from .config import KAConfig

    shape = attention_shape(config)
    ka = KAConfig.from_model_config(config)
    defining = {key: getattr(config, key, None) for key in _FINGERPRINT_KEYS} | shape
    fingerprint = hashlib.sha256(json.dumps(defining, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return dict(
        model_type=config.model_type,
        name_or_path=getattr(config, "_name_or_path", ""),
        **shape,
        ka_model=bool(ka is not None and ka.is_ka),
        fingerprint=fingerprint,
    )


def check_base(base: dict, config, where) -> None:
    """KAError unless the adapter's recorded base model (`base`, from adapter_config.json) agrees with `config`:
    shape, model_type, KA-trained or not, architecture fingerprint. Keys an older adapter lacks are not checked."""
    model = base_record(config)
    for key, what in (
        ("num_layers", "layers"),
        ("num_heads", "query heads"),
        ("head_dim", "head size"),
        ("model_type", "model_type"),
        ("ka_model", "KA-trained (config.ka)"),
        ("fingerprint", "architecture fingerprint"),
    ):
        if key in (base or {}) and base[key] != model[key]:
            raise KAError(
                f"the adapter in {where} was fit for a different model ({what}: adapter {base[key]!r}, model "
                f"{model[key]!r}; it was fit for {base.get('name_or_path') or 'an unnamed model'!r}): "
                "fit an adapter for this model with examples/fit_adapter.py"
            )


def read_adapter_config(directory) -> dict:
    """adapter_config.json of a save_adapter directory, checked (files present, JSON, format, sizes), or KAError
    naming the file."""
    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file() or not (directory / WEIGHTS_NAME).is_file():
        raise KAError(
            f"{directory} holds no ka_hf adapter (expected {CONFIG_NAME} and {WEIGHTS_NAME}); "
            "make one with examples/fit_adapter.py"
        )
    path = directory / CONFIG_NAME
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise KAError(
            f"{path} is not valid JSON ({error}): make the adapter again with examples/fit_adapter.py"
        ) from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise KAError(f"{path} is not a ka_hf adapter config (format {found!r})")
    for key in ("num_layers", "num_heads", "head_dim", "mlp_hidden"):
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "mlp_hidden" else 1):
            raise KAError(f"{path}: {key} must be a positive int, got {value!r}")
    if not isinstance(config.get("base_model") or {}, dict):
        raise KAError(f"{path}: base_model must be an object")
    return config


def read_adapter_weights(directory, config: dict) -> dict:
    """adapter.safetensors' tensors, checked against `config`'s names and shapes, or KAError naming the file."""
    from safetensors.torch import load_file

    path = Path(directory) / WEIGHTS_NAME
    try:
        tensors = load_file(str(path))
    except Exception as error:  # safetensors raises its own SafetensorError (not a subclass of anything useful)
        raise KAError(f"{path} is not a readable safetensors file ({error})") from None
    expected = {
        name: tuple(tensor.shape)
        for name, tensor in KAAdapter(
            config["num_layers"], config["num_heads"], config["head_dim"], config["mlp_hidden"]
        )
        .state_dict()
        .items()
    }
    found = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
    if found != expected:
        wrong = sorted(set(found) ^ set(expected)) or [name for name in expected if found[name] != expected[name]]
        raise KAError(
            f"{path} does not match {Path(directory) / CONFIG_NAME} (tensors {wrong[:3]}: expected shapes "
            f"{[expected.get(name) for name in wrong[:3]]}, found {[found.get(name) for name in wrong[:3]]})"
        )
    return tensors


class ResidualMLP(nn.Module):
    """W2 gelu(W1 LayerNorm(a)), W2 zero at init: the original project's kind of adapter, as a correction."""

    def __init__(self, head_dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(head_dim)
        self.up = nn.Linear(head_dim, hidden)
        self.down = nn.Linear(hidden, head_dim)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, outputs):
        return self.down(F.gelu(self.up(self.norm(outputs))))


class KAAdapter(nn.Module):
    """f_{layer, head}(a) = a @ M + b (+ a per-layer residual MLP), identity at init. See the module docstring.

    Implements the KACache adapter contract: `map_outputs(layer_idx, outputs[B, H, n, d]) -> same shape`, and the
    optional `affine_map(layer_idx, outputs_shape) -> (M, b) or None`, which lets a prompt pass solve exactly.
    """

    def __init__(self, num_layers: int, num_heads: int, head_dim: int, mlp_hidden: int = 0, base: dict | None = None):
        super().__init__()
        self.num_layers, self.num_heads, self.head_dim, self.mlp_hidden = num_layers, num_heads, head_dim, mlp_hidden
        self.weight = nn.Parameter(torch.eye(head_dim).repeat(num_layers, num_heads, 1, 1))  # M: [L, H, d, d]
        self.bias = nn.Parameter(torch.zeros(num_layers, num_heads, head_dim))  # b: [L, H, d]
        self.mlp = nn.ModuleList(ResidualMLP(head_dim, mlp_hidden) for _ in range(num_layers)) if mlp_hidden else None
        self.base = dict(base or {})  # the model it was made for: model_type, name_or_path, shape
        self.fit_record: dict = {}  # how it was fitted (written to adapter_config.json)

    @classmethod
    def for_model(cls, model, mlp_hidden: int = 0) -> "KAAdapter":
        """An identity adapter shaped for `model`."""
        base = base_record(model.config)
        adapter = cls(base["num_layers"], base["num_heads"], base["head_dim"], mlp_hidden, base)
        return adapter.to(next(model.parameters()).device)

    @property
    def kind(self) -> str:
        return "affine+mlp" if self.mlp is not None else "affine"

    def check_model(self, model) -> None:
        """KAError unless the model is the kind this adapter was made for: its layers, heads and head size, and,
        when recorded, its model_type, KA-trained or not, and architecture fingerprint."""
        check_base(self.base, model.config, "this KAAdapter")
        shape = attention_shape(model.config)
        mine = dict(num_layers=self.num_layers, num_heads=self.num_heads, head_dim=self.head_dim)
        if any(shape[key] != value for key, value in mine.items()):
            raise KAError(
                f"this adapter was made for a model with {mine} but the model has "
                f"{ {key: shape[key] for key in mine} }: fit an adapter for this model"
            )

    def _check_layer(self, layer_idx: int, num_heads: int, head_dim: int, shape) -> None:
        if not 0 <= layer_idx < self.num_layers or num_heads != self.num_heads or head_dim != self.head_dim:
            raise KAError(
                f"adapter for {self.num_layers} layers x {self.num_heads} heads x {self.head_dim} got "
                f"layer {layer_idx} outputs of shape {tuple(shape)}: wrong model for this adapter"
            )

    def affine_map(self, layer_idx: int, outputs_shape) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(M (H, d, d), b (H, d)) of layer `layer_idx` when f is affine there, f(a) = a @ M[h] + b[h]; None with a
        residual MLP (f is then nonlinear). outputs_shape: the shape (B, H, n, d) of the outputs f will map, checked
        as `map_outputs` checks it. With M and b the prompt pass is one exact solve per block
        (`ka_hf.ops.ka_attention_adapted`) instead of a token loop."""
        self._check_layer(layer_idx, outputs_shape[1], outputs_shape[-1], outputs_shape)
        if self.mlp is not None:
            return None
        return self.weight[layer_idx], self.bias[layer_idx]

    def map_outputs(self, layer_idx: int, outputs: torch.Tensor) -> torch.Tensor:
        self._check_layer(layer_idx, outputs.shape[1], outputs.shape[-1], outputs.shape)
        weight = self.weight[layer_idx].to(outputs)  # [H, d, d], broadcast over batch and tokens
        mapped = outputs @ weight + self.bias[layer_idx, :, None, :].to(outputs)
        if self.mlp is not None:
            mlp = self.mlp[layer_idx]
            mapped = mapped + mlp(outputs.to(mlp.up.weight.dtype)).to(outputs.dtype)
        return mapped

    def config_dict(self) -> dict:
        return dict(
            format=FORMAT,
            version=1,
            kind=self.kind,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            mlp_hidden=self.mlp_hidden,
            base_model=self.base,
            fit=self.fit_record,
        )


def save_adapter(adapter: KAAdapter, directory) -> Path:
    """Write adapter.safetensors and adapter_config.json to `directory`; returns it."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in adapter.state_dict().items()}
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": FORMAT})
    (directory / CONFIG_NAME).write_text(json.dumps(adapter.config_dict(), indent=2) + "\n")
    return directory


def load_adapter(directory, device=None, dtype=None) -> KAAdapter:
    """The adapter saved in `directory` (by `save_adapter`), in eval mode; KAError naming the file when a file is
    missing, corrupt or does not match the other."""
    directory = Path(directory)
    config = read_adapter_config(directory)
    tensors = read_adapter_weights(directory, config)
    adapter = KAAdapter(
        config["num_layers"], config["num_heads"], config["head_dim"], config["mlp_hidden"], config.get("base_model")
    )
    adapter.fit_record = config.get("fit", {})
    adapter.load_state_dict(tensors)
    return adapter.to(device=device, dtype=dtype).eval()
