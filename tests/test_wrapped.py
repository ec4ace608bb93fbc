"""KA on wrapped models: DDP, FSDP2 (`fully_shard`), PEFT, torch.compile and accelerate's `prepare`.

`exact_ka`, `enable_ka`, `disable_ka` and `without_ka` take the wrapper (ka_hf.wrapped.unwrap_model finds the
transformers model inside). For each wrapper, on tiny GPT-NeoX (partial rotary) and Llama-GQA models in float64,
with left padding in a batch of 3: the loss and every gradient of a forward through the wrapper under
`exact_ka(wrapper)` equal those of the token-by-token KA loop on the bare model (the same weights), and differ
from standard attention's. DDP and FSDP2 run in a one-process gloo group; the two-process runs are
test_recipes'. Anything ka_hf cannot see into gets one KAError that names what to pass.
"""

import contextlib

import pytest
import torch
import torch.distributed as dist

import ka_hf
from ka_hf.wrapped import unwrap_model

from conftest import VOCAB, tiny_model

ARCHS = ["gpt-neox", "llama-gqa"]


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    """A one-process gloo group (what DDP and FSDP2 need), torn down after this module's tests."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    store = tmp_path_factory.mktemp("gloo") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def ddp(model):
    return torch.nn.parallel.DistributedDataParallel(model)


def fsdp2(model):
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():  # one shard group per decoder layer, then the rest
        if type(module).__name__ in model._no_split_modules:
            fully_shard(module)
    return fully_shard(model)


def compiled(model):
    torch._dynamo.reset()  # fresh graphs: earlier tests' compiled code must not count
    return torch.compile(model, backend="aot_eager")  # Dynamo + AOTAutograd: the backward is traced too


def accelerate_prepared(model):
    from accelerate import Accelerator

    return Accelerator(cpu=True).prepare(model)  # one process: the model itself (test_recipes: DDP on 2)


def lora(model):
    from peft import LoraConfig, get_peft_model

    # Random A and B (not B = 0): the adapters change the outputs, so their gradients are tested through KA.
    return get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))


WRAPPERS = {"ddp": ddp, "fsdp2": fsdp2, "peft": lora, "compile": compiled, "accelerate": accelerate_prepared}
NEEDS_GROUP = {"ddp", "fsdp2"}
# Compiling costs seconds per graph (and today Dynamo recompiles at every attention call): one model, one test;
# the unwrapping of a compiled model is test_wrappers_around_wrappers'.
CASES = [(wrapper, arch) for wrapper in WRAPPERS for arch in ARCHS if wrapper != "compile" or arch == "llama-gqa"]


def batch():
    ids = torch.randint(1, VOCAB, (3, 14), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :4] = 0  # left padding in one row
    labels = ids.masked_fill(attention_mask == 0, -100)
    return dict(input_ids=ids, attention_mask=attention_mask, labels=labels, use_cache=False)


def full(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor  # FSDP2 gradients are DTensors


def loss_and_grads(forward_model, bare, within=contextlib.nullcontext):
    """Loss of one forward of `forward_model` inside `within()`, backward after the block (the README's pattern),
    and the gradients by the bare transformers model's parameter names."""
    bare.zero_grad()
    with within():
        loss = forward_model(**batch()).loss
    loss.backward()
    grads = {name: full(p.grad).clone() for name, p in bare.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def wrapped_pair(wrapper, arch):
    """(wrapped model, the transformers model inside), from the same seed every call: the same weights."""
    model = tiny_model(arch, num_layers=2).train()
    if wrapper == "peft":
        torch.manual_seed(3)  # the same LoRA initialization every call
    wrapped = WRAPPERS[wrapper](model)
    return wrapped, (wrapped.get_base_model() if wrapper == "peft" else model)


@pytest.fixture
def wrapper(request):
    if request.param in NEEDS_GROUP:
        request.getfixturevalue("process_group")
    if request.param == "accelerate":
        from accelerate.state import AcceleratorState

        yield request.param
        AcceleratorState._reset_state(reset_partial_state=True)  # leave no accelerate state to later tests
        return
    yield request.param


@pytest.mark.parametrize("wrapper,arch", CASES, indirect=["wrapper"])
def test_exact_ka_on_a_wrapper_equals_the_token_loop(wrapper, arch):
    reference_model, reference_bare = wrapped_pair(wrapper, arch)
    loop_loss, loop_grads = loss_and_grads(
        reference_bare, reference_bare, lambda: ka_hf.exact_ka(reference_bare, kernel="loop")
    )
    standard_loss, _ = loss_and_grads(reference_bare, reference_bare)
    assert abs(standard_loss - loop_loss) > 1e-4  # KA changes these models' loss: the test can tell them apart

    model, bare = wrapped_pair(wrapper, arch)
    if wrapper == "compile":  # a graph compiled for standard attention must not be reused inside exact_ka
        torch.testing.assert_close(loss_and_grads(model, bare)[0], standard_loss, rtol=1e-10, atol=0)
    loss, grads = loss_and_grads(model, bare, lambda: ka_hf.exact_ka(model))
    torch.testing.assert_close(loss, loop_loss, rtol=1e-10, atol=0)
    assert grads.keys() == loop_grads.keys() and grads
    for name, grad in loop_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-8, atol=1e-12, msg=name)
    assert getattr(bare.config, "ka", None) is None  # the block leaves no setting behind
    torch.testing.assert_close(loss_and_grads(model, bare)[0], standard_loss, rtol=1e-10, atol=0)


@pytest.mark.parametrize("wrapper", [name for name in WRAPPERS if name != "compile"], indirect=True)
def test_enable_disable_and_without_ka_on_a_wrapper(wrapper):
    model, bare = wrapped_pair(wrapper, "llama-gqa")
    with torch.no_grad():
        with ka_hf.exact_ka(bare, kernel="loop"):
            ka_loss = bare(**batch()).loss
        standard_loss = bare(**batch()).loss
        assert abs(ka_loss - standard_loss) > 1e-4
        assert ka_hf.enable_ka(model) is model  # the wrapper comes back: it is what syncs gradients / runs compiled
        assert ka_hf.ka_spec(bare.config) is not None
        torch.testing.assert_close(model(**batch()).loss, ka_loss, rtol=1e-10, atol=0)
        with ka_hf.without_ka(model):
            torch.testing.assert_close(model(**batch()).loss, standard_loss, rtol=1e-10, atol=0)
        torch.testing.assert_close(model(**batch()).loss, ka_loss, rtol=1e-10, atol=0)
        assert ka_hf.disable_ka(model) is model
        torch.testing.assert_close(model(**batch()).loss, standard_loss, rtol=1e-10, atol=0)


def test_wrappers_around_wrappers(process_group):
    """accelerate may compile a DDP model; DataParallel is DDP's single-process cousin."""
    model = tiny_model("gpt2", num_layers=1)
    assert unwrap_model(torch.compile(ddp(model))) is model
    assert unwrap_model(torch.nn.DataParallel(model)) is model
    assert unwrap_model(model) is model


class Holder(torch.nn.Module):
    """A user's own module around a transformers model (a reward head, a teacher-student pair, ...)."""

    def __init__(self, *models):
        super().__init__()
        for index, model in enumerate(models):
            setattr(self, "lm" if index == 0 else f"lm{index}", model)


@pytest.mark.parametrize(
    "given,expected",
    [
        (lambda: Holder(tiny_model("gpt2", num_layers=1)), r"got Holder, which holds one as \.lm: pass that"),
        (lambda: ddp(Holder(tiny_model("gpt2", num_layers=1))), r"got Holder inside DistributedDataParallel"),
        (lambda: Holder(tiny_model("gpt2", num_layers=1), tiny_model("gpt2", num_layers=1)), "cannot see into"),
        (lambda: torch.nn.Linear(2, 2), "got Linear, which ka_hf cannot see into"),
        (lambda: "gpt2", "got str. Pass the model from_pretrained returned"),
    ],
    ids=["holder", "ddp-holder", "two-models", "not-a-transformers-model", "a-name"],
)
def test_what_cannot_be_unwrapped_gets_a_clear_error(given, expected, process_group):
    thing = given()
    for call in (ka_hf.enable_ka, ka_hf.disable_ka):
        with pytest.raises(ka_hf.KAError, match=expected):
            call(thing)
    for block in (ka_hf.exact_ka, ka_hf.without_ka):
        with pytest.raises(ka_hf.KAError, match=expected), block(thing):
            pass
