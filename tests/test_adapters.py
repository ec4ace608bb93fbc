"""Tests for ka_hf.adapters, ka_hf.study.fit_adapters (plan 1) and examples/fit_adapter.py: tiny random-init
models, real HF parts."""

import importlib.util

import pytest
import torch

import ka_hf
from ka_hf.adapters import KAAdapter, load_adapter, save_adapter
from ka_hf.errors import KAError
from ka_hf.study.capture import capture_attention
from ka_hf.study.fit_adapters import compare_ppl, distill_adapter, fit_adapter_least_squares, kl_to_standard

from conftest import REPO_ROOT, VOCAB
from conftest import tiny_model as conftest_tiny_model

NAMES = {"gpt-neox": "gpt-neox", "llama": "llama-gqa", "gpt2": "gpt2"}  # conftest's tiny configs


def tiny_model(arch="gpt-neox", dtype=torch.float64):
    """conftest's tiny model (2 layers, 4 heads of 8; llama: 2 kv heads) with sharper attention: random init
    attends almost uniformly, which makes KA and standard attention nearly agree."""
    model = conftest_tiny_model(NAMES[arch], dtype=dtype, num_layers=2)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if any(part in name for part in ("query_key_value", "q_proj", "k_proj", "c_attn")):
                parameter.mul_(6.0)
    return model


def token_batches(n=3, batch=2, length=16, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, length), generator=generator) for _ in range(n)]


def logits(model, ids, cache=None):
    with torch.no_grad():
        return model(ids, use_cache=False).logits if cache is None else model(ids, cache=cache).logits


# ---------------------------------------------------------------------------------------------------------
# The identity adapter is plain KA


@pytest.mark.parametrize("arch", ["gpt-neox", "llama", "gpt2"])
def test_identity_adapter_reproduces_plain_ka(arch):
    model = tiny_model(arch)
    adapter = KAAdapter.for_model(model).double()
    ids = token_batches(1, length=12)[0]
    plain = logits(model, ids, ka_hf.KACache())  # parallel solve
    with_adapter = logits(model, ids, ka_hf.KACache(adapter=adapter))  # token recursion with f = identity
    torch.testing.assert_close(with_adapter, plain, rtol=0, atol=1e-10)
    assert (plain - logits(model, ids)).abs().max() > 1e-3  # and KA is not standard attention here

    # decoding one token at a time: the adapter's f(a) = a @ I + 0 is exact, so the logits are identical
    def decode(cache):
        return torch.cat([model(ids[:, i : i + 1], cache=cache).logits for i in range(ids.shape[1])], dim=1)

    with torch.no_grad():
        assert torch.equal(decode(ka_hf.KACache(adapter=adapter)), decode(ka_hf.KACache()))


def test_adapter_prefill_equals_decode_and_serves_generate():
    model = tiny_model("llama")
    adapter = fit_adapter_least_squares(model, token_batches())
    adapter.bias.data.add_(0.1)  # any f: chunked prefill and token-by-token decode must agree
    ids = token_batches(1, length=10)[0]
    full = logits(model, ids, ka_hf.KACache(adapter=adapter))
    cache = ka_hf.KACache(adapter=adapter)
    with torch.no_grad():
        first = model(ids[:, :4], cache=cache).logits
        rest = [model(ids[:, i : i + 1], cache=cache).logits for i in range(4, 10)]
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), full, rtol=0, atol=1e-10)

    generated = model.generate(ids[:, :5], max_new_tokens=4, do_sample=False, cache=ka_hf.KACache(adapter=adapter))
    assert generated.shape == (2, 9)


# ---------------------------------------------------------------------------------------------------------
# Capturing and the closed-form fit


def test_capture_records_the_standard_attention():
    model = tiny_model("llama")
    ids = token_batches(1)[0]
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # a left-padded row
    captured = capture_attention(model, ids, mask)
    assert sorted(captured) == [0, 1]
    layer = captured[0]
    assert layer.outputs.shape == (2, 4, 16, 8) and layer.values.shape == (2, 2, 16, 8)
    torch.testing.assert_close(layer.outputs, layer.weights @ layer.values.repeat_interleave(2, dim=1))
    assert layer.weights[0, :, 5:, :5].abs().max() == 0  # padded keys get no weight
    assert model.config._attn_implementation == "sdpa"  # restored


@pytest.mark.parametrize("arch", ["gpt-neox", "llama"])
def test_least_squares_is_optimal_for_its_target(arch):
    """The fit minimizes its objective: better than the identity and than a nudged fit, on its data."""
    model = tiny_model(arch)
    batches = token_batches()
    group = 2 if arch == "llama" else 1  # query heads per kv head

    @torch.no_grad()
    def value_error(adapter):
        total = 0.0
        for ids in batches:
            for layer, c in capture_attention(model, ids).items():
                mapped = adapter.map_outputs(layer, c.outputs.double())
                total += float(((mapped - c.values.double().repeat_interleave(group, dim=1)) ** 2).sum())
        return total

    identity = KAAdapter.for_model(model).double()
    fitted = fit_adapter_least_squares(model, batches, target="values", ridge=0.0).double()
    assert value_error(fitted) < value_error(identity)
    nudged = KAAdapter.for_model(model).double()
    nudged.load_state_dict(fitted.state_dict())
    nudged.weight.data.add_(1e-3 * torch.randn_like(nudged.weight))
    assert value_error(fitted) < value_error(nudged)


def test_least_squares_adapter_lowers_the_kl():
    model = tiny_model("gpt-neox")
    batches = token_batches()
    adapter = fit_adapter_least_squares(model, batches)
    assert adapter.fit_record["least_squares"]["target"] == "attention"
    for ids in batches:
        with torch.no_grad():
            assert kl_to_standard(model, adapter, ids) < kl_to_standard(model, None, ids)


def test_distillation_lowers_the_kl():
    model = tiny_model("gpt2", dtype=torch.float32)
    batches = token_batches()
    adapter = KAAdapter.for_model(model, mlp_hidden=8)
    with torch.no_grad():
        before = sum(float(kl_to_standard(model, adapter, ids)) for ids in batches)
    history = distill_adapter(model, adapter, batches, steps=12, lr=3e-3, progress=False)
    with torch.no_grad():
        after = sum(float(kl_to_standard(model, adapter, ids)) for ids in batches)
    assert after < 0.9 * before
    assert len(history) == 12 and adapter.fit_record["distillation"]["steps"] == 12
    assert not any(p.requires_grad for p in model.parameters())  # the base stayed frozen


# ---------------------------------------------------------------------------------------------------------
# Files and errors


def test_save_load_round_trip(tmp_path):
    model = tiny_model("gpt-neox", dtype=torch.float32)
    adapter = fit_adapter_least_squares(model, token_batches(), KAAdapter.for_model(model, mlp_hidden=4))
    save_adapter(adapter, tmp_path / "adapter")
    loaded = load_adapter(tmp_path / "adapter")
    assert loaded.kind == "affine+mlp" and loaded.base["model_type"] == "gpt_neox"
    assert loaded.fit_record["least_squares"]["tokens"] == 3 * 2 * 16
    outputs = torch.randn(2, 4, 5, 8)
    assert torch.equal(loaded.map_outputs(1, outputs), adapter.map_outputs(1, outputs))
    size = sum(f.stat().st_size for f in (tmp_path / "adapter").iterdir())
    assert size < 50_000  # small: 2 layers x 4 heads x (8 x 8 + 8) + the MLP


def test_bad_adapter_input_gets_a_clear_error(tmp_path):
    model = tiny_model("gpt-neox")
    with pytest.raises(KAError, match="holds no ka_hf adapter"):
        load_adapter(tmp_path)
    other = KAAdapter(num_layers=3, num_heads=4, head_dim=8)
    with pytest.raises(KAError, match="made for a model"):
        fit_adapter_least_squares(model, token_batches(), other)
    with pytest.raises(KAError, match="wrong model for this adapter"):
        logits(model, token_batches(1)[0], ka_hf.KACache(adapter=KAAdapter(2, 2, 16).double()))
    ka_hf.enable_ka(model)
    with pytest.raises(KAError, match="standard-trained model"):
        fit_adapter_least_squares(model, token_batches())


def test_fit_adapter_script(tmp_path, capsys):
    model = tiny_model("gpt-neox", dtype=torch.float32)
    from ka_hf.study.data import default_corpus, train_tokenizer

    texts = [text.replace("\n", " ") for text in default_corpus("train")[:40]]
    tokenizer = train_tokenizer(texts, vocab_size=VOCAB + 20)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "train.txt").write_text("\n".join(texts))

    spec = importlib.util.spec_from_file_location("fit_adapter", REPO_ROOT / "examples" / "fit_adapter.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(
        [
            "--model",
            str(tmp_path / "model"),
            "--out",
            str(tmp_path / "adapter"),
            "--text-file",
            str(tmp_path / "train.txt"),
            "--samples",
            "4",
            "--val-samples",
            "2",
            "--seq-len",
            "16",
            "--distill-steps",
            "2",
            "--batch-size",
            "2",
        ]
    )
    assert "ka+adapter (distilled)" in capsys.readouterr().out
    assert load_adapter(tmp_path / "adapter").fit_record["distillation"]["steps"] == 2
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2 and "does not exist" in capsys.readouterr().err


def test_compare_ppl_reports_the_gap():
    model = tiny_model("gpt-neox", dtype=torch.float32)
    blocks = torch.cat(token_batches(2))
    results = compare_ppl(model, {"identity": KAAdapter.for_model(model)}, blocks, batch_size=2)
    assert results["identity"] == pytest.approx(results["ka"], rel=1e-5)
    assert results["identity gap recovered"] == pytest.approx(0.0, abs=1e-3)
