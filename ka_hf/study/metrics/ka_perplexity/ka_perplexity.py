"""KA perplexity as an `evaluate` module: the same numbers as examples/eval_ppl.py, for people who reach for
`evaluate` first. Works offline (it is a local file; nothing is downloaded):

    import evaluate
    from ka_hf.study.evaluation import KA_PERPLEXITY_METRIC
    ka_ppl = evaluate.load(KA_PERPLEXITY_METRIC)
    ka_ppl.compute(predictions=texts, model_id="runs/standard/best", modes="kv,ka")
"""

import datasets
import evaluate

_DESCRIPTION = """\
Perplexity of a causal LM under KV caching and KA caching (keys and attention outputs, attend over past outputs;
see ka_hf's docs/evaluation.md) on the same token windows. The texts are tokenized and joined (eos between them),
cut into windows of `max_length` tokens every `stride` tokens as in the Hugging Face guide "Perplexity of
fixed-length models" (context tokens not scored), and every mode scores exactly the same windows.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): the texts to score.
    model_id (str or PreTrainedModel): a local model directory, a Hub id, or a loaded model.
    tokenizer (str or tokenizer, optional): default: the model directory's tokenizer.
    modes (str or list of str): comma-separated modes (or a list of them): kv, ka, ka-hybrid, ka@LAYERS (e.g. ka@0-2), ka+adapter. Default "kv,ka".
    max_length (int): tokens per window. Default 128.
    stride (int): a window starts every `stride` tokens. Default 128.
    method (str): "parallel" (one forward per window) or "token" (token by token through the cache).
    batch_size (int): windows per forward. Default 1.
    adapter (object, optional): a plan-1 adapter, for ka+adapter.
    device (str, optional): default: CUDA when available, else CPU.
Returns:
    perplexities (dict): mode -> PPL = exp(mean token NLL over the scored tokens).
    mean_nll (dict): mode -> mean NLL (nats).
    degradation_pct (dict): mode -> (PPL / PPL_kv - 1) * 100 (None without kv).
    scored_tokens (int): tokens scored by every mode.
    windows (int), method (str).
Examples:
    >>> ka_ppl = evaluate.load(KA_PERPLEXITY_METRIC)  # doctest: +SKIP
    >>> texts = ["A first text.", "A second one."]
    >>> ka_ppl.compute(predictions=texts, model_id="tiny-model", modes="kv,ka")  # doctest: +SKIP
    {'perplexities': {'kv': 210.3, 'ka': 212.9}, ...}
"""

_CITATION = ""


class KaPerplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(
        self,
        predictions,
        model_id,
        tokenizer=None,
        modes="kv,ka",
        max_length=128,
        stride=128,
        method="parallel",
        batch_size=1,
        adapter=None,
        device=None,
    ):
        import torch

        from ka_hf.errors import KAError
        from ka_hf.study.data import ppl_windows, tokenize_texts
        from ka_hf.study.evaluation import parse_modes, score_modes
        from ka_hf.study.models import load_model, load_tokenizer

        parse_modes(modes)  # a bad mode list is refused before any model is loaded
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if isinstance(model_id, str):
            model = load_model(model_id, device=device)
        else:
            model = model_id.to(device).eval()
        if tokenizer is None or isinstance(tokenizer, str):
            if tokenizer is None and not isinstance(model_id, str):
                raise KAError("pass tokenizer= when model_id is a loaded model")
            tokenizer = load_tokenizer(tokenizer or model_id)
        texts = [text for text in predictions if text and text.strip()]
        if not texts:
            raise KAError("no text to score: predictions holds no non-empty text")
        windows = ppl_windows(tokenize_texts(texts, tokenizer), max_length, stride)
        records = score_modes(
            model,
            windows,
            parse_modes(modes, model.config.num_hidden_layers),
            method,
            batch_size,
            adapter=adapter,
            pad_id=tokenizer.pad_token_id or 0,
            progress=False,
        )
        return {
            "perplexities": {record["mode"]: record["ppl"] for record in records},
            "mean_nll": {record["mode"]: record["mean_nll"] for record in records},
            "degradation_pct": {record["mode"]: record["degradation_pct"] for record in records},
            "scored_tokens": records[0]["scored_tokens"],
            "windows": records[0]["windows"],
            "method": method,
        }
