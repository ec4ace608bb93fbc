"""Shapes that cannot give KA are refused when the cache is built or bound, or KA is enabled, naming the numbers:
query heads that do not split over the key/value heads, and more sink tokens than window positions."""

import pytest
import torch

import ka_hf
from ka_hf import KACache, KAError, KVWindowCache, StaticKACache

from conftest import VOCAB


@pytest.mark.parametrize("heads, kv_heads", [(4, 3), (6, 4)])
def test_query_heads_that_do_not_split_over_kv_heads(heads, kv_heads):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=heads * 8,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
    )
    model = LlamaForCausalLM(config).eval()
    message = f"{heads} query heads do not split evenly over {kv_heads} key/value heads"
    for build in (
        lambda: KACache(config=model.config),
        lambda: StaticKACache(config=model.config, max_cache_len=8),
        lambda: KVWindowCache(4, config=model.config),
        lambda: ka_hf.enable_ka(model),
    ):
        with pytest.raises(KAError, match=message):
            build()
    with pytest.raises(KAError, match=message), torch.no_grad():  # bound at the first forward
        model(torch.randint(1, VOCAB, (1, 5)), cache=KACache(), use_cache=True)
    assert not hasattr(model.config, "ka")


def test_more_sinks_than_window_positions_is_refused():
    for make in (lambda: KACache(window=2, sink=8), lambda: KVWindowCache(window=2, sink=8)):
        with pytest.raises(KAError, match=r"window=2, sink=8\): 8 sink tokens but a window of only 2"):
            make()
    assert KACache(window=4, sink=4).sink == 4  # as many sinks as window positions is a valid choice
    for bad in (dict(window=0), dict(window=True), dict(window=4, sink=-1), dict(sink=2)):
        with pytest.raises(KAError):
            KACache(**bad)
