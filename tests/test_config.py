"""ka_hf.config: the typed KA runtime settings in model.config.ka (KAConfig) and the provenance kept apart."""

import json

import pytest
import torch

import ka_hf
from ka_hf.config import KAConfig, num_kv_heads, provenance, record_provenance

from conftest import tiny_model


def test_kaconfig_validates_and_round_trips():
    setting = KAConfig(ka_layers=[2, 0, 2], kernel="blocked", block_size=64)
    assert setting.ka_layers == (0, 2) and setting.covers(2) and not setting.covers(1)
    assert setting.to_dict() == {
        "attention": "ka",
        "ka_layers": [0, 2],
        "variant": "ka",
        "kernel": "blocked",
        "block_size": 64,
    }
    assert KAConfig.from_dict(setting.to_dict()) == setting
    assert json.loads(json.dumps(setting.to_dict())) == setting.to_dict()
    for bad, message in [
        (dict(attention="sideways"), "attention"),
        (dict(ka_layers=[-1]), "layer indices"),
        (dict(ka_layers="01"), "layer indices"),
        (dict(kernel="fast"), "unknown KA kernel"),
        (dict(variant="plan9"), "unknown KA variant"),
        (dict(block_size=0), "block_size"),
        (dict(variant="plan2", kernel="blocked"), "exact KA only"),
    ]:
        with pytest.raises(ka_hf.KAError, match=message):
            KAConfig(**bad)


def test_an_old_flat_ka_section_still_loads(tmp_path):
    """A config.json written before KAConfig: one flat `ka` dict with runtime keys and the training record."""
    model = tiny_model("gpt-neox", dtype=torch.float32)
    model.save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    config["ka"] = {
        "attention": "ka",
        "layers": [0, 2],  # the selection's former name
        "variant": "ka",
        "block_size": 128,
        "training": {"facts": {"n": 3, "seed": 1}, "lr": 0.001},
    }
    config_path.write_text(json.dumps(config))

    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
    assert ka_hf.ka_spec(loaded.config) == KAConfig(ka_layers=[0, 2], block_size=128)
    assert provenance(loaded.config) == {"training": {"facts": {"n": 3, "seed": 1}, "lr": 0.001}}
    ids = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = ka_hf.KACache(ka_layers=[0, 2], block_size=128)
        assert torch.allclose(loaded(ids).logits, loaded(ids, cache=cache).logits, atol=1e-5)
    ka_hf.disable_ka(loaded)  # rewriting the section moves the record to its own key
    assert loaded.config.ka == KAConfig(attention="standard", ka_layers=[0, 2], block_size=128).to_dict()
    assert loaded.config.ka_provenance["training"]["lr"] == 0.001


def test_enable_ka_keeps_runtime_and_provenance_apart():
    model = tiny_model("llama-gqa", dtype=torch.float32)
    ka_hf.enable_ka(model, ka_layers=[1], kernel="parallel", block_size=16, training={"lr": 0.1})
    assert model.config.ka == {
        "attention": "ka",
        "ka_layers": [1],
        "variant": "ka",
        "kernel": "parallel",
        "block_size": 16,
    }
    assert model.config.ka_provenance == {"training": {"lr": 0.1}}
    record_provenance(model.config, facts={"n": 2})
    assert provenance(model.config) == {"training": {"lr": 0.1}, "facts": {"n": 2}}
    with ka_hf.without_ka(model):
        assert ka_hf.ka_spec(model.config) is None
    assert ka_hf.ka_spec(model.config) == KAConfig(ka_layers=[1], kernel="parallel", block_size=16)

    plain = tiny_model("gpt2", dtype=torch.float32)
    with ka_hf.exact_ka(plain, kernel="loop"):
        assert ka_hf.ka_spec(plain.config).kernel == "loop"
    assert not hasattr(plain.config, "ka") and not hasattr(plain.config, "ka_provenance")
    assert num_kv_heads(model.config) == 2 and num_kv_heads(plain.config) == 4


def test_the_former_layers_argument_of_enable_ka_is_refused():
    """enable_ka records extra keyword arguments as provenance: `layers=` must not land there silently."""
    model = tiny_model("gpt2", dtype=torch.float32)
    with pytest.raises(ka_hf.KAError, match=r"ka_layers=\[1\]"):
        ka_hf.enable_ka(model, layers=[1])
    assert not hasattr(model.config, "ka")
