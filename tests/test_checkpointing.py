"""Gradient checkpointing recomputes each layer during backward(), after an `exact_ka` block has ended: the
recomputed attention must be the KA the forward ran, so the gradients equal the un-checkpointed KA gradients
(float64, 1e-6 relative), with both `use_reentrant` settings, for the loss computed inside `exact_ka` and for a
model made KA with `enable_ka` — and a model outside KA keeps its standard gradients."""

import pytest
import torch

import ka_hf

from conftest import VOCAB, tiny_model

ARCHS = ["gpt2", "gpt-neox", "llama-gqa"]


def gradients(model, ids, mask, within=None, checkpoint=None):
    """{name: grad} of the LM loss; the loss computed inside `within(model)` (a context), backward() after it."""
    model.train()
    model.zero_grad(set_to_none=True)
    if checkpoint is None:
        model.gradient_checkpointing_disable()
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpoint})
    labels = ids.masked_fill(mask == 0, -100)
    if within is None:
        loss = model(ids, attention_mask=mask, labels=labels).loss
    else:
        with within(model):
            loss = model(ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def relative_difference(first, second) -> float:
    assert first.keys() == second.keys()
    return max(((first[n] - second[n]).norm() / second[n].norm().clamp_min(1e-30)).item() for n in first)


def batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (2, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    return ids, mask


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("arch_name", ARCHS)
def test_checkpointed_gradients_inside_exact_ka_equal_the_ka_gradients(arch_name, use_reentrant):
    model = tiny_model(arch_name)
    model.config.attn_pdrop = model.config.resid_pdrop = model.config.embd_pdrop = 0.0  # no dropout noise (gpt2)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    ids, mask = batch()
    ka = gradients(model, ids, mask, within=ka_hf.exact_ka)
    standard = gradients(model, ids, mask)
    assert relative_difference(ka, standard) > 1e-3  # the test can tell KA from standard gradients
    checkpointed = gradients(model, ids, mask, within=ka_hf.exact_ka, checkpoint=use_reentrant)
    assert relative_difference(checkpointed, ka) < 1e-6
    loop = gradients(model, ids, mask, within=lambda m: ka_hf.exact_ka(m, kernel="loop"), checkpoint=use_reentrant)
    assert relative_difference(loop, ka) < 1e-6  # and the reference loop agrees
    # Outside KA the checkpointed model still gives standard gradients (nothing pinned leaks into later calls).
    assert relative_difference(gradients(model, ids, mask, checkpoint=use_reentrant), standard) < 1e-6


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("arch_name", ARCHS)
def test_checkpointed_gradients_of_an_enable_ka_model_equal_the_ka_gradients(arch_name, use_reentrant):
    model = tiny_model(arch_name)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    ids, mask = batch(1)
    ka = gradients(model, ids, mask, within=ka_hf.exact_ka)
    ka_hf.enable_ka(model)
    checkpointed = gradients(model, ids, mask, checkpoint=use_reentrant)
    assert relative_difference(checkpointed, ka) < 1e-6
    # backward() after switching the model back to standard attention still recomputes what the forward ran.
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    ka_hf.disable_ka(model)
    loss.backward()
    late = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert relative_difference(late, ka) < 1e-6
