"""`generate()` on a model whose config asks for KA: a `KACache` (or a `StaticKACache`) by default.

transformers builds a `DynamicCache` when the caller passes none; a KA model needs a cache of attention outputs,
so `prepare_cache_with_ka_default` (installed around `GenerationMixin._prepare_cache_for_generation` by
`ka_hf.install`) builds the KA cache that matches the request instead: `cache_implementation` None/"dynamic" ->
`KACache`, "offloaded" -> an offloading `KACache`, "static" -> `StaticKACache`; any other is refused.
"""

import functools

from .cache import KACache
from .config import ka_spec
from .errors import KAError
from .static_cache import StaticKACache

# generate(cache_implementation=...) values a KA model can honour with a KACache (None: the default, dynamic).
KA_CACHE_IMPLEMENTATIONS = (None, "dynamic", "offloaded")


def prepare_cache_with_ka_default(original):
    """generate() on a model whose config asks for KA gets a KA cache when the caller gave no cache, built from the
    model's config as generate() builds its own cache."""

    @functools.wraps(original)
    def prepare(self, generation_config, model_kwargs, *args, **kwargs):
        spec = ka_spec(self.config)
        if spec is not None and model_kwargs.get("cache") is None and generation_config.use_cache is not False:
            model_kwargs["cache"] = _ka_default_cache(self.config, spec, generation_config, *args, **kwargs)
            generation_config.cache_implementation = None  # generate's own copy: it refuses a cache and a name
        return original(self, generation_config, model_kwargs, *args, **kwargs)

    return prepare


def _ka_default_cache(config, spec, generation_config, generation_mode=None, batch_size=None, max_cache_length=None):
    implementation = generation_config.cache_implementation
    if implementation == "static":
        # The length transformers would give its StaticCache: this call's prompt + new tokens, or max_cache_len.
        if spec.variant != "ka":
            raise KAError(
                f"cache_implementation='static' runs exact KA, but this model's config asks for variant "
                f"{spec.variant!r}: generate without cache_implementation (a KACache)"
            )
        length = max(max_cache_length or 0, generation_config.max_cache_len or 0)
        return StaticKACache(
            config=config,
            max_cache_len=length,
            ka_layers=spec.ka_layers,
            kernel=spec.kernel,
            block_size=spec.block_size,
        )
    if implementation not in KA_CACHE_IMPLEMENTATIONS:
        raise KAError(
            f"generate(cache_implementation={implementation!r}): this model runs KA, which caches attention "
            "outputs in a KACache; use 'dynamic', 'offloaded' or 'static', or pass cache=ka_hf.KACache(...)"
        )
    return KACache(
        config.get_text_config(decoder=True),
        ka_layers=spec.ka_layers,
        variant=spec.variant,
        block_size=spec.block_size,
        kernel=spec.kernel,
        offloading=implementation == "offloaded",
    )
