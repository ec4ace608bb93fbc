"""Plan 1: an adapter f that lets a standard-trained model run on a KA cache.

A KA cache offers later tokens the past attention outputs a_j where standard attention used the values v_j.
The adapter maps each output back towards value space before it is used as a value:

    a_i = sum_{j<i} w_ij f(a_j) + w_ii v_i,    f = f_{layer, head}

If f(a_j) = v_j exactly, KA computes standard attention. The adapter here is, per layer and query head,

    f(a) = a @ M + b   (+ mlp(a) = W2 gelu(W1 LayerNorm(a)), one small MLP per layer, optional)

initialized to the identity (M = I, b = 0, W2 = 0), so an untrained adapter is plain KA, exactly. Two ways to
fit it, the base model frozen:

- `fit_adapter_least_squares`: closed form. Run the frozen model with standard attention, collect per head the
  weights, the outputs A (what the cache would hold) and the values V (what standard attention used; with GQA
  the kv head of the group) and solve a ridge least squares from A to V: on the attention-weighted sums each
  token receives from its past (default), or token by token (target="values").
- `distill_adapter`: end to end. Minimize KL(standard logits || KA+adapter logits) through the exact KA
  recursion, with gradients to M, b (and the MLP).

Why the recursion: with f inside the recursion, the outputs solve A = W_s f(A) + D V. For a general (or
nonlinear) f that is no longer one triangular solve, so a `KACache(adapter=...)` computes multi-token chunks
token by token (`ka_hf.ops.ka_attention_naive(value_map=...)`): exact, differentiable, slower than parallel KA
(see docs/training.md for the measured cost). Decoding one token at a time costs the same as plain KA.

Files: `save_adapter(adapter, dir)` writes adapter.safetensors + adapter_config.json (shape, base model, how it
was fitted); `load_adapter(dir)` reads them back. Use: `KACache(adapter=load_adapter(dir))`.
"""

import functools
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .cache import KACache
from .errors import KAError
from .integration import Captured, capture_attention, ka_spec

WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT = "ka_hf-adapter"


def attention_shape(config) -> dict:
    """num_layers, num_heads, num_kv_heads, head_dim of a model config (what an adapter must agree with)."""
    num_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    return dict(num_layers=config.num_hidden_layers, num_heads=num_heads,
                num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads, head_dim=head_dim)


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

    Implements the KACache adapter contract: `map_outputs(layer_idx, outputs[B, H, n, d]) -> same shape`.
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
        shape = attention_shape(model.config)
        base = dict(model_type=model.config.model_type, name_or_path=getattr(model.config, "_name_or_path", ""),
                    **shape)
        adapter = cls(shape["num_layers"], shape["num_heads"], shape["head_dim"], mlp_hidden, base)
        return adapter.to(next(model.parameters()).device)

    @property
    def kind(self) -> str:
        return "affine+mlp" if self.mlp is not None else "affine"

    def check_model(self, model) -> None:
        """KAError unless the model's layers, heads and head size are the ones this adapter was made for."""
        shape = attention_shape(model.config)
        mine = dict(num_layers=self.num_layers, num_heads=self.num_heads, head_dim=self.head_dim)
        if any(shape[key] != value for key, value in mine.items()):
            raise KAError(f"this adapter was made for a model with {mine} but the model has "
                          f"{ {key: shape[key] for key in mine} }: fit an adapter for this model")

    def map_outputs(self, layer_idx: int, outputs: torch.Tensor) -> torch.Tensor:
        if not 0 <= layer_idx < self.num_layers or outputs.shape[1] != self.num_heads or \
                outputs.shape[-1] != self.head_dim:
            raise KAError(f"adapter for {self.num_layers} layers x {self.num_heads} heads x {self.head_dim} got "
                          f"layer {layer_idx} outputs of shape {tuple(outputs.shape)}: wrong model for this adapter")
        weight = self.weight[layer_idx].to(outputs)  # [H, d, d], broadcast over batch and tokens
        mapped = outputs @ weight + self.bias[layer_idx, :, None, :].to(outputs)
        if self.mlp is not None:
            mlp = self.mlp[layer_idx]
            mapped = mapped + mlp(outputs.to(mlp.up.weight.dtype)).to(outputs.dtype)
        return mapped

    def config_dict(self) -> dict:
        return dict(format=FORMAT, version=1, kind=self.kind, num_layers=self.num_layers, num_heads=self.num_heads,
                    head_dim=self.head_dim, mlp_hidden=self.mlp_hidden, base_model=self.base, fit=self.fit_record)


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
    """The adapter saved in `directory` (by `save_adapter`), in eval mode."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file() or not (directory / WEIGHTS_NAME).is_file():
        raise KAError(f"{directory} holds no ka_hf adapter (expected {CONFIG_NAME} and {WEIGHTS_NAME}); "
                      "make one with examples/fit_adapter.py")
    config = json.loads((directory / CONFIG_NAME).read_text())
    if config.get("format") != FORMAT:
        raise KAError(f"{directory / CONFIG_NAME} is not a ka_hf adapter config (format {config.get('format')!r})")
    adapter = KAAdapter(config["num_layers"], config["num_heads"], config["head_dim"], config["mlp_hidden"],
                        config.get("base_model"))
    adapter.fit_record = config.get("fit", {})
    adapter.load_state_dict(load_file(str(directory / WEIGHTS_NAME)))
    return adapter.to(device=device, dtype=dtype).eval()


def _batches(batches):
    """Accept tensors [B, T] or dicts with input_ids (and attention_mask)."""
    for batch in batches:
        if isinstance(batch, dict):
            yield batch["input_ids"], batch.get("attention_mask")
        else:
            yield batch, None


def _check_standard_model(model) -> None:
    if ka_spec(model.config) is not None:
        raise KAError("this model runs KA attention already (config.ka); adapters map a standard-trained model's "
                      "cached outputs to values: use a standard-trained model")


# ---------------------------------------------------------------------------------------------------------
# (a) the closed-form fit


def fit_adapter_least_squares(model, batches, adapter: KAAdapter | None = None, target: str = "attention",
                              ridge: float = 1e-4, progress: bool = False) -> KAAdapter:
    """Fit M, b of every layer and head in closed form on the frozen standard model's own activations.

    target="values": min sum_j ||f(a_j) - v_j||^2, token by token (f(A) = V makes KA equal standard attention).
    target="attention" (default): min sum_i ||sum_{j<i} w_ij f(a_j) - sum_{j<i} w_ij v_j||^2 with the standard
        weights w: the same least squares from A to V, on the attention-weighted sums that actually reach each
        token's output (what a token receives from its past under KA vs under standard attention). Tokens that
        receive much attention count more; errors that average out do not count.
    batches: tensors [B, T] of token ids (or dicts with input_ids/attention_mask; padded positions are left out).
    ridge: relative L2 penalty on M (times the mean of the features' squared norms per dimension). Returns the
    adapter (a new identity adapter when none is given; an MLP, if present, is left as it is).
    """
    if target not in ("attention", "values"):
        raise KAError(f"target={target!r}: use 'attention' or 'values'")
    _check_standard_model(model)
    adapter = adapter if adapter is not None else KAAdapter.for_model(model)
    adapter.check_model(model)
    shape = attention_shape(model.config)
    group, d = shape["num_heads"] // shape["num_kv_heads"], shape["head_dim"]
    gram = torch.zeros(shape["num_layers"], shape["num_heads"], d + 1, d + 1, dtype=torch.float64)
    cross = torch.zeros(shape["num_layers"], shape["num_heads"], d + 1, d, dtype=torch.float64)
    tokens = 0
    for input_ids, attention_mask in tqdm(_batches(batches), desc="least squares", disable=not progress):
        keep = None if attention_mask is None else attention_mask.bool().cpu()
        for layer, captured in capture_attention(model, input_ids, attention_mask).items():
            features, targets = _regression_rows(captured, group, target)
            x, y = _rows(features, keep), _rows(targets, keep)  # [H, N, d + 1], [H, N, d]
            gram[layer] += x.transpose(-1, -2) @ x
            cross[layer] += x.transpose(-1, -2) @ y
        tokens += int(keep.sum()) if keep is not None else input_ids.numel()
    if tokens == 0:
        raise KAError("no tokens to fit the adapter on: pass at least one batch of token ids")
    penalty = torch.ones(d + 1, dtype=torch.float64)
    penalty[d] = 0.0  # the bias is not shrunk
    scale = gram[..., :d, :d].diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)[..., None, None]
    solution = torch.linalg.solve(gram + ridge * scale * torch.diag(penalty), cross)  # [L, H, d + 1, d]
    with torch.no_grad():
        adapter.weight.copy_(solution[..., :d, :])
        adapter.bias.copy_(solution[..., d, :])
    adapter.fit_record = dict(adapter.fit_record, least_squares=dict(target=target, tokens=tokens, ridge=ridge))
    return adapter


def _regression_rows(captured: Captured, group: int, target: str):
    """Features [B, H, T, d + 1] (with the bias column) and targets [B, H, T, d] of one layer."""
    outputs, values = captured.outputs, captured.values.repeat_interleave(group, dim=1)  # V of each query head
    if target == "values":
        return torch.cat([outputs, torch.ones_like(outputs[..., :1])], dim=-1), values
    earlier = captured.weights.tril(-1)  # w_ij for j < i: what token i takes from its past
    features = torch.cat([earlier @ outputs, earlier.sum(-1, keepdim=True)], dim=-1)
    return features, earlier @ values


def _rows(tensor, keep):
    """[B, H, T, k] -> [H, N, k] float64 over the kept (unpadded) positions."""
    tensor = tensor.to("cpu", torch.float64).transpose(0, 1)  # [H, B, T, k]
    if keep is None:
        return tensor.reshape(tensor.shape[0], -1, tensor.shape[-1])
    return tensor[:, keep]


# ---------------------------------------------------------------------------------------------------------
# (b) end-to-end distillation


def kl_to_standard(model, adapter: KAAdapter | None, input_ids, attention_mask=None, teacher_logits=None,
                   layers=None) -> torch.Tensor:
    """Mean over (unpadded) tokens of KL(standard-attention logits || KA(+adapter) logits) of `model`."""
    if teacher_logits is None:
        with torch.no_grad():
            teacher_logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    cache = KACache(layers=layers, adapter=adapter)
    student_logits = model(input_ids=input_ids, attention_mask=attention_mask, cache=cache).logits
    kl = F.kl_div(F.log_softmax(student_logits.float(), -1), F.log_softmax(teacher_logits.float(), -1),
                  log_target=True, reduction="none").sum(-1)
    if attention_mask is None:
        return kl.mean()
    keep = attention_mask.to(kl.dtype)
    return (kl * keep).sum() / keep.sum()


def distill_adapter(model, adapter: KAAdapter, batches, steps: int, lr: float = 1e-3, layers=None,
                    progress: bool = True) -> list[dict]:
    """Train the adapter (model frozen) to minimize KL(standard logits || KA+adapter logits) for `steps` steps.

    batches: a list of token-id tensors [B, T] (or dicts with input_ids/attention_mask), cycled through.
    Gradients flow through the exact KA recursion of the KACache. Returns the history [{step, kl, seconds}].
    """
    _check_standard_model(model)
    adapter.check_model(model)
    batches = list(_batches(batches))
    if not batches or steps < 1:
        raise KAError("distillation needs at least one batch and one step")
    model.eval()
    model.requires_grad_(False)
    adapter.train()
    optimizer = torch.optim.Adam(adapter.parameters(), lr=lr)
    device = next(model.parameters()).device
    history, started = [], time.perf_counter()
    bar = tqdm(range(steps), desc="distill adapter", disable=not progress)
    for step in bar:
        input_ids, attention_mask = batches[step % len(batches)]
        input_ids = input_ids.to(device)
        attention_mask = None if attention_mask is None else attention_mask.to(device)
        loss = kl_to_standard(model, adapter, input_ids, attention_mask, layers=layers)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(dict(step=step + 1, kl=loss.item(), seconds=time.perf_counter() - started))
        bar.set_postfix(kl=f"{loss.item():.4f}")
    adapter.eval()
    adapter.fit_record = dict(adapter.fit_record, distillation=dict(
        steps=steps, lr=lr, first_kl=history[0]["kl"], last_kl=history[-1]["kl"],
        seconds=history[-1]["seconds"]))
    return history


# ---------------------------------------------------------------------------------------------------------
# Measuring it


def gap_recovered(ppl_kv: float, ppl_ka: float, ppl_adapter: float) -> float:
    """The fraction of the KA-vs-KV PPL gap an adapter recovers: (ka - adapter) / (ka - kv); nan when no gap."""
    gap = ppl_ka - ppl_kv
    return (ppl_ka - ppl_adapter) / gap if gap > 0 else math.nan


def compare_ppl(model, adapters: dict, blocks: torch.Tensor, batch_size: int = 8, progress: bool = False) -> dict:
    """PPL of `model` on full blocks [n, T] as kv (standard attention), ka (KACache) and ka+adapter for each
    {name: adapter}, on the same blocks in the same run, with the share of the KA-vs-KV gap each recovers."""
    from .training import perplexity

    results = {"kv": perplexity(model, blocks, batch_size, progress=progress),
               "ka": perplexity(model, blocks, batch_size, make_cache=KACache, progress=progress)}
    for name, adapter in adapters.items():
        ppl = perplexity(model, blocks, batch_size, make_cache=functools.partial(KACache, adapter=adapter),
                         progress=progress)
        results[name] = ppl
        results[f"{name} gap recovered"] = gap_recovered(results["kv"], results["ka"], ppl)
    return results
