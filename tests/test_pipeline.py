"""pipeline("text-generation") and TextStreamer on a KA-configured model: they decode through a KACache."""

import pytest
import torch
from transformers import AutoModelForCausalLM, TextStreamer, pipeline

import ka_hf
from ka_hf import KACache

TEXTS = ["The capital of France is Paris."] * 20 + ["KA caches keys and attention outputs."] * 20
SETTINGS = dict(max_new_tokens=12, do_sample=False)


@pytest.fixture(scope="module")
def ka_model_dir(tmp_path_factory):
    """A tiny GPT-2 made KA with enable_ka and saved (config.ka), with a locally trained tokenizer."""
    from ka_hf.study.data import train_tokenizer
    from ka_hf.study.models import model_config

    folder = tmp_path_factory.mktemp("ka-model")
    tokenizer = train_tokenizer(TEXTS, vocab_size=300)
    config = model_config("gpt2", vocab_size=len(tokenizer), num_layers=3)
    config.initializer_range = 0.2  # weights large enough that KA and standard attention pick other tokens
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    ka_hf.enable_ka(model).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, tokenizer


def explicit_ka_text(model, tokenizer, prompt):
    """What generate() decodes with a KACache passed explicitly, and with standard attention."""
    inputs = tokenizer([prompt], return_tensors="pt")
    settings = dict(SETTINGS, pad_token_id=tokenizer.eos_token_id)
    ka = model.generate(**inputs, cache=KACache(config=model.config), **settings)
    with ka_hf.without_ka(model):
        standard = model.generate(**inputs, **settings)
    n_prompt = inputs["input_ids"].shape[1]
    return tuple(tokenizer.decode(ids[0, n_prompt:], skip_special_tokens=True) for ids in (ka, standard))


def test_text_generation_pipeline_decodes_with_a_ka_cache(ka_model_dir):
    folder, tokenizer = ka_model_dir
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    expected, standard = explicit_ka_text(model, tokenizer, "The capital of")
    assert expected != standard  # KA decodes other tokens here: the comparison below can tell them apart
    for generator in (
        pipeline("text-generation", model=model, tokenizer=tokenizer),
        pipeline("text-generation", model=str(folder)),  # loaded from the folder: config.ka makes it KA
    ):
        out = generator("The capital of", return_full_text=False, **SETTINGS)
        assert out[0]["generated_text"] == expected


def test_text_streamer_prints_the_ka_generation(ka_model_dir, capsys):
    folder, tokenizer = ka_model_dir
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    expected, _ = explicit_ka_text(model, tokenizer, "KA caches")
    inputs = tokenizer(["KA caches"], return_tensors="pt")
    capsys.readouterr()
    model.generate(
        **inputs,
        streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
        pad_token_id=tokenizer.eos_token_id,
        **SETTINGS,
    )
    assert capsys.readouterr().out == expected + "\n"
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    generator("KA caches", streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True), **SETTINGS)
    assert capsys.readouterr().out == expected + "\n"
