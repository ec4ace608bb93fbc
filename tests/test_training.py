"""Tests for ka_hf.study.training and examples/train.py: tiny models, a few steps, real HF parts."""

import importlib.util
import math

import pytest
import torch
from transformers import PreTrainedTokenizerFast

import ka_hf
import ka_hf.integration
from ka_hf.errors import KAError
from ka_hf.study.data import default_corpus
from ka_hf.study.evaluation.ppl import perplexity
from ka_hf.study.models import load_model, load_tokenizer
from ka_hf.study.training import TrainConfig, load_data_texts, load_train_config, make_blocks, train

from conftest import REPO_ROOT, TINY_TRAIN, TINY_TRAIN_FLAGS, VOCAB, tiny_model

TINY = TINY_TRAIN


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """~10k characters of the offline corpus, one text per line."""
    path = tmp_path_factory.mktemp("data") / "train.txt"
    texts = [text.replace("\n", " ") for text in default_corpus("train")[:30]]
    path.write_text("\n".join(texts))
    return path


def tiny_config(out, text_file, **changes) -> TrainConfig:
    return TrainConfig(out=str(out), text_file=str(text_file), **(TINY | changes))


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ka_run(tmp_path_factory, text_file):
    return train(tiny_config(tmp_path_factory.mktemp("ka"), text_file, attention="ka"))


# ---------------------------------------------------------------------------------------------------------
# Runs


@pytest.mark.parametrize("attention", ["standard", "ka"])
def test_short_run_lowers_the_loss(tmp_path, text_file, ka_run, attention):
    result = ka_run if attention == "ka" else train(tiny_config(tmp_path, text_file))
    first, last = result.records[0], result.records[-1]
    assert last["train_ppl"] < first["train_ppl"] and last["val_ppl"] < first["val_ppl"]
    assert result.best_epoch == last["epoch"]
    for name in ("epochs.md", "results.json", "curves.png", "best/model.safetensors", "best/tokenizer.json"):
        assert (result.out_dir / name).is_file(), name
    assert "| Epoch | Train PPL | Val PPL | Epoch s | Note |" in (result.out_dir / "epochs.md").read_text()
    config = load_model(str(result.best_dir)).config
    assert config.ka["attention"] == attention and config.ka_provenance["training"]["best_epoch"] == result.best_epoch


def test_checkpoint_round_trip_gives_identical_logits(tmp_path, ka_run):
    model = load_model(str(ka_run.best_dir))
    assert ka_hf.ka_spec(model.config) is not None  # a KA-trained model loads back running KA
    ids = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
        model.save_pretrained(tmp_path / "again")
        again = load_model(str(tmp_path / "again"))(ids, use_cache=False).logits
    assert torch.equal(logits, again)
    # the saved best model reproduces the val PPL the run recorded for it (KA attention, same blocks)
    config = load_train_config(ka_run.out_dir)
    _, val_blocks = make_blocks(config, load_tokenizer(str(ka_run.best_dir)), *load_data_texts(config)[:2])
    assert perplexity(model, val_blocks) == pytest.approx(ka_run.best_val_ppl, rel=1e-5)


class Interrupted(Exception):
    pass


def test_resume_ends_like_an_uninterrupted_run(tmp_path, text_file):
    full = train(tiny_config(tmp_path / "full", text_file, epochs=3, patience=3))

    def stop_after_first_epoch(record):
        raise Interrupted

    with pytest.raises(Interrupted):
        train(tiny_config(tmp_path / "cut", text_file, epochs=3, patience=3), on_epoch_end=stop_after_first_epoch)
    resumed = train(load_train_config(tmp_path / "cut"), resume=True)

    assert [r["val_ppl"] for r in resumed.records] == [r["val_ppl"] for r in full.records]
    assert [r["train_ppl"] for r in resumed.records] == [r["train_ppl"] for r in full.records]
    weights = [load_model(str(run.best_dir)).state_dict() for run in (full, resumed)]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def test_tokenizer_trained_from_scratch_or_given(tmp_path, text_file, ka_run):
    trained = load_tokenizer(str(ka_run.best_dir))
    assert isinstance(trained, PreTrainedTokenizerFast) and len(trained) <= TINY["vocab_size"]
    given = train(tiny_config(tmp_path, text_file, epochs=1, vocab_size=300, tokenizer=str(ka_run.best_dir)))
    reused = load_tokenizer(str(given.best_dir))
    assert reused.get_vocab() == trained.get_vocab()  # --vocab-size ignored: the given tokenizer is used


# ---------------------------------------------------------------------------------------------------------
# KA training is the exact KA recursion


@pytest.mark.parametrize("kernel", ["blocked", "parallel"])
def test_ka_loss_and_gradients_equal_the_token_loop(kernel):
    model = tiny_model("llama-gqa", num_layers=2).train()  # float64, GQA + RoPE
    ids = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(0))
    # Left padding in one row: padded queries and keys must get exactly zero weight (and zero gradient).
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :5] = 0

    def loss_and_grads(kernel):
        model.zero_grad()
        with ka_hf.exact_ka(model, kernel=kernel, block_size=6):  # several blocks of 20 tokens
            loss = model(input_ids=ids, attention_mask=attention_mask, labels=ids, use_cache=False).loss
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    fast_loss, fast_grads = loss_and_grads(kernel)
    loop_loss, loop_grads = loss_and_grads("loop")
    torch.testing.assert_close(fast_loss, loop_loss, rtol=1e-8, atol=0)
    for name, grad in loop_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-8, atol=1e-12, msg=name)


def test_plan2_outputs_equal_the_first_value(tmp_path, text_file):
    result = train(tiny_config(tmp_path, text_file, attention="ka", variant="plan2", epochs=1))
    model = load_model(str(result.best_dir))
    assert model.config.ka["variant"] == "plan2"
    assert math.isfinite(result.best_val_ppl)

    ids = torch.randint(0, 400, (2, 24))
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=1, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
        uncached = model(ids, use_cache=False).logits
        cached = model(ids, cache=ka_hf.KACache(variant="plan2"), use_cache=True).logits
    cache = generated.past_key_values  # the KACache generate() made from config.ka
    assert isinstance(cache, ka_hf.KACache) and cache.variant == "plan2"
    assert len(cache.layers) == model.config.num_hidden_layers
    for layer in cache.layers:
        outputs = layer.values  # every token's cached output A: plan 2 makes each the first token's value
        torch.testing.assert_close(outputs, outputs[..., :1, :].expand_as(outputs), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(uncached, cached)  # the cache-less forward runs plan 2 as the config says


# ---------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_gets_a_clear_error(tmp_path, text_file, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(KAError, match="no text"):
        train(tiny_config(tmp_path / "a", empty))
    with pytest.raises(KAError, match="attention='sideways' is not known"):
        train(tiny_config(tmp_path / "b", text_file, attention="sideways"))
    with pytest.raises(KAError, match="no checkpoint to resume from"):
        train(tiny_config(tmp_path / "c", text_file), resume=True)

    script = load_script("train")
    for argv, message in [
        (["--text-file", str(empty), "--out", str(tmp_path / "d")], "no text"),
        (["--resume", str(tmp_path / "nothing-here")], "holds no training run"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            script.main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--attention", "sideways", "--out", str(tmp_path / "e")])
    assert exit_info.value.code == 2 and "error: --attention 'sideways': use standard, ka" in capsys.readouterr().err


def test_train_script_end_to_end(tmp_path, text_file, capsys):
    script = load_script("train")
    args = [
        "--text-file",
        str(text_file),
        "--out",
        str(tmp_path / "run"),
        "--samples",
        "16",
        "--attention",
        "ka",
        *TINY_TRAIN_FLAGS,
    ]
    script.main(args)
    out = capsys.readouterr().out
    assert "| 1 |" in out and "* best" in out
    with pytest.raises(SystemExit):  # the run exists: refuse to overwrite it silently
        script.main(args)
    assert "--resume" in capsys.readouterr().err
