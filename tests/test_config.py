"""ka_hf.config: the typed KA runtime settings in model.config.ka (KAConfig) and the provenance kept apart."""

import json

import pytest
import torch

import ka_hf
from ka_hf.architectures import num_kv_heads
from ka_hf.config import KAConfig, provenance, record_provenance

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


def test_a_ka_section_with_other_keys_is_refused(tmp_path):
    """config.ka holds the runtime setting only: a config.json whose section carries anything else (a typo, a
    training record) fails to load with a KAError that names the keys, never a silently ignored setting."""
    model = tiny_model("gpt-neox", dtype=torch.float32)
    model.save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    config["ka"] = {"attention": "ka", "kernal": "loop", "training": {"lr": 0.001}}
    config_path.write_text(json.dumps(config))

    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
    with pytest.raises(ka_hf.KAError, match=r"unknown keys \['kernal', 'training'\]"):
        ka_hf.ka_spec(loaded.config)
    with pytest.raises(ka_hf.KAError, match="unknown keys"):
        loaded(torch.ones(1, 3, dtype=torch.long))


def test_enable_ka_keeps_runtime_and_provenance_apart():
    model = tiny_model("llama-gqa", dtype=torch.float32)
    ka_hf.enable_ka(model, ka_layers=[1], kernel="parallel", block_size=16)
    record_provenance(model.config, training={"lr": 0.1})
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
