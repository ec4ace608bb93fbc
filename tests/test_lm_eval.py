"""lm-evaluation-harness integration (`ka_hf.lm_eval`, the optional extra `ka_hf[lm-eval]`): local-file tasks run
offline with real lm-eval, tiny real models and a tokenizer trained here on WikiText-2 lines.

- kv equals lm-eval's own `hf` model; ka differs; a model saved with config.ka reads as standard under kv and as
  KA under lm-eval's `hf` (its own attention) = ka_hf ka on the plain copy.
- Every mode's scores equal a token-by-token reference through the mode's cache (float64, batches with right
  padding and left truncation, GPT-2 / GPT-NeoX / Llama-GQA).
- A generate_until task decodes through a KACache (seen by the model's forward) and returns what direct KA
  generation returns.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

import ka_hf
from ka_hf.adapters import KAAdapter, save_adapter
from ka_hf.errors import KAError
from ka_hf.modes import parse_mode
from ka_hf.study.data import train_tokenizer
from ka_hf.study.models import model_config

lm_eval = pytest.importorskip(
    "lm_eval", reason='lm-evaluation-harness is the optional extra: pip install -e ".[lm-eval]"'
)

from ka_hf.lm_eval import KALM  # noqa: E402 (needs lm_eval)

from conftest import REPO_ROOT, SHARED_DATA  # noqa: E402

WIKITEXT = SHARED_DATA / "wikitext-2-raw" / "test.txt"
MAX_LENGTH = 32
ROLLING_TASK, GENERATE_TASK = "ka_local_wikitext", "ka_local_continue"
LAYERS = {"gpt2": dict(arch="gpt2"), "gpt-neox": dict(arch="gpt-neox"), "llama-gqa": dict(arch="llama", num_kv_heads=2)}


def wikitext_lines(count: int) -> list[str]:
    if not WIKITEXT.is_file():
        pytest.skip(f"WikiText-2 raw not found at {WIKITEXT} (shared test data, not part of the repo)")
    lines = (line.strip() for line in WIKITEXT.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if 120 <= len(line) <= 240 and not line.startswith("=")][:count]


def tiny_lm(tokenizer, arch: str = "gpt-neox", seed: int = 0):
    torch.manual_seed(seed)
    config = model_config(vocab_size=len(tokenizer), num_layers=3, hidden_size=32, num_heads=4, **LAYERS[arch])
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(torch.float64).eval()


def write_tasks(folder, texts: list[str]) -> None:
    """A loglikelihood_rolling task (WikiText's metrics) and a generate_until task, both `dataset_path: json`."""
    folder.mkdir()
    (folder / "wiki.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in texts[:3]))
    prompts = [{"prompt": text[:40], "target": text[40:60]} for text in texts[3:6]]
    (folder / "continue.jsonl").write_text("".join(json.dumps(row) + "\n" for row in prompts))
    common = "dataset_path: json\ntest_split: test\n"
    (folder / "wiki.yaml").write_text(
        f"task: {ROLLING_TASK}\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'wiki.jsonl'}\n"
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n'
        + "".join(
            f"  - metric: {name}\n    aggregation: {agg}\n    higher_is_better: false\n"
            for name, agg in [("word_perplexity", "weighted_perplexity"), ("bits_per_byte", "bits_per_byte")]
        )
    )
    (folder / "continue.yaml").write_text(
        f"task: {GENERATE_TASK}\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'continue.jsonl'}\n"
        'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{target}}"\n'
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The tokenizer, a saved tiny GPT-NeoX (plain) and the same weights saved with config.ka, and the tasks."""
    root = tmp_path_factory.mktemp("lm_eval")
    texts = wikitext_lines(6)
    tokenizer = train_tokenizer(texts, vocab_size=300, min_frequency=1)
    model = tiny_lm(tokenizer)
    for name, save in [("plain", model), ("ka-config", ka_hf.enable_ka(tiny_lm(tokenizer)))]:
        save.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    write_tasks(root / "tasks", texts)
    return dict(root=root, tokenizer=tokenizer, model=model, texts=texts)


def evaluate(workspace, model, task: str = ROLLING_TASK, **model_args):
    """lm-eval's simple_evaluate on one local task: its results and its samples."""
    from lm_eval.tasks import TaskManager

    if isinstance(model, str):
        model_args = ",".join(f"{key}={value}" for key, value in model_args.items())
        model_args += f",device=cpu,max_length={MAX_LENGTH}"
    manager = TaskManager(include_path=str(workspace["root"] / "tasks"), include_defaults=False)
    output = lm_eval.simple_evaluate(
        model=model, model_args=model_args or None, tasks=[task], task_manager=manager, batch_size=2, log_samples=True
    )
    return output["results"][task], output["samples"][task]


def bits_per_byte(workspace, model: str, folder: str = "plain", **model_args) -> float:
    results, _ = evaluate(workspace, model, pretrained=workspace["root"] / folder, **model_args)
    return results["bits_per_byte,none"]


def test_kv_equals_lm_evals_hf_model_and_ka_differs(workspace):
    hf = bits_per_byte(workspace, "hf")
    kv = bits_per_byte(workspace, "ka_hf", ka_mode="kv")
    ka = bits_per_byte(workspace, "ka_hf", ka_mode="ka")
    assert kv == pytest.approx(hf, rel=1e-12, abs=0)
    assert abs(ka - kv) > 1e-4, "KA scored like standard attention"

    # The same weights saved with config.ka: kv reads them with standard attention; lm-eval's hf runs its KA.
    assert bits_per_byte(workspace, "ka_hf", "ka-config", ka_mode="kv") == pytest.approx(hf, rel=1e-12, abs=0)
    assert bits_per_byte(workspace, "hf", "ka-config") == pytest.approx(ka, rel=1e-9, abs=0)


# -- every mode against a token-by-token reference ------------------------------------------------------------


@torch.no_grad()
def reference_loglikelihood(model, mode_name: str, context, continuation, adapter=None):
    """(sum of log p(continuation), greedy?) fed one token at a time through a fresh cache of the mode, after
    ka-hybrid's prompt (the kept context) or the first token; the input is cut as HFLM cuts it."""
    kept = (context + continuation)[-(MAX_LENGTH + 1) :]
    inputs = torch.tensor([kept[:-1]])
    prompt = len(kept) - len(continuation) if mode_name == "ka-hybrid" else 1
    cache = parse_mode(mode_name).new_cache(adapter)
    logits = [model(inputs[:, :prompt], cache=cache, use_cache=True).logits]
    for t in range(prompt, inputs.shape[1]):
        logits.append(model(inputs[:, t : t + 1], cache=cache, use_cache=True).logits)
    scored = torch.cat(logits, dim=1)[0, -len(continuation) :].log_softmax(-1)
    target = torch.tensor(continuation)
    return float(scored.gather(1, target[:, None]).sum()), bool((scored.argmax(-1) == target).all())


@pytest.fixture(scope="module")
def adapter_dir(workspace, tmp_path_factory):
    """A plan-1 adapter that is not the identity (so ka+adapter must differ from ka)."""
    adapters = {}
    for arch in LAYERS:
        adapter = KAAdapter.for_model(tiny_lm(workspace["tokenizer"], arch)).double()
        with torch.no_grad():
            adapter.weight.add_(0.3 * torch.randn_like(adapter.weight))
            adapter.bias.add_(0.3 * torch.randn_like(adapter.bias))
        adapters[arch] = save_adapter(adapter, tmp_path_factory.mktemp("adapter") / arch)
    return adapters


@pytest.mark.parametrize("arch", list(LAYERS))
def test_every_mode_scores_like_the_token_by_token_reference(workspace, adapter_dir, arch):
    from ka_hf.adapters import load_adapter

    tokenizer = workspace["tokenizer"]
    model = tiny_lm(tokenizer, arch)
    ids = tokenizer(" ".join(workspace["texts"])).input_ids
    # context lengths 1..40 and continuations 1..9: a batch of 3 mixes lengths (right padding); 40 + 9 tokens
    # exceed max_length + 1 (HFLM cuts the context from the left).
    requests = [((None, None), ids[s : s + c], ids[s + c : s + c + n]) for s, c, n in [(0, 5, 3), (7, 1, 9), (3, 12, 1), (20, 40, 9), (9, 6, 6)]]  # fmt: skip
    results = {}
    for mode_name in ["ka", "ka@0-1", "ka-hybrid", "ka+adapter"]:
        adapter = adapter_dir[arch] if mode_name == "ka+adapter" else None
        lm = KALM(pretrained=model, tokenizer=tokenizer, ka_mode=mode_name, adapter=adapter, max_length=MAX_LENGTH, batch_size=3)  # fmt: skip
        got = lm._loglikelihood_tokens(requests, disable_tqdm=True)
        loaded = load_adapter(adapter, dtype=torch.float64) if adapter else None
        for (_, context, continuation), (logprob, greedy) in zip(requests, got):
            expected, expected_greedy = reference_loglikelihood(model, mode_name, context, continuation, loaded)
            assert logprob == pytest.approx(expected, rel=1e-10, abs=1e-10), (mode_name, len(context))
            assert greedy == expected_greedy
        results[mode_name] = [logprob for logprob, _ in got]
    kv = KALM(pretrained=model, tokenizer=tokenizer, ka_mode="kv", max_length=MAX_LENGTH)
    results["kv"] = [logprob for logprob, _ in kv._loglikelihood_tokens(requests, disable_tqdm=True)]
    for name in ["ka", "ka@0-1", "ka-hybrid", "ka+adapter"]:  # each mode is its own computation
        assert all(results[name] != results[other] for other in results if other != name), name


# -- generation -----------------------------------------------------------------------------------------------


def cache_types_seen(model):
    """Record the type of every cache the model's forward receives (a real forward pre-hook, nothing replaced)."""
    seen = []

    def hook(module, args, kwargs):
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        if cache is not None:
            seen.append(cache)

    return seen, model.register_forward_pre_hook(hook, with_kwargs=True)


def direct_generation(model, tokenizer, prompt: str, cache, max_new_tokens: int = 6) -> str:
    """Greedy decoding of `prompt` alone (no padding) through `cache`, its context cut as HFLM cuts it (to leave
    room for the new tokens), the text cut at the task's stop sequence."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids[:, -(MAX_LENGTH - max_new_tokens) :]
    out = model.generate(
        ids, cache=cache, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).split("\n")[0]


# KA modes on the plain model (which alone would generate with a DynamicCache); kv on the config.ka copy (which
# alone would generate with a KACache).
@pytest.mark.parametrize("mode_name, folder", [("ka", "plain"), ("ka-hybrid", "plain"), ("kv", "ka-config")])
def test_a_generate_until_task_decodes_with_the_modes_cache(workspace, mode_name, folder):
    model = AutoModelForCausalLM.from_pretrained(workspace["root"] / folder, dtype=torch.float64).eval()
    tokenizer = workspace["tokenizer"]
    lm = KALM(pretrained=model, tokenizer=tokenizer, ka_mode=mode_name, max_length=MAX_LENGTH, batch_size=2)
    seen, handle = cache_types_seen(model)
    try:
        _, samples = evaluate(workspace, lm, GENERATE_TASK)
    finally:
        handle.remove()
    expected_type = DynamicCache if mode_name == "kv" else ka_hf.KACache
    assert seen and all(type(cache) is expected_type for cache in seen), {type(cache) for cache in seen}
    if mode_name == "ka-hybrid":
        assert all(cache.prefill == "standard" for cache in seen)
    with ka_hf.without_ka(model) if mode_name == "kv" else torch.no_grad():
        for sample in samples:  # a batch of 2 prompts is left-padded; each must decode as it does alone
            cache = DynamicCache() if mode_name == "kv" else parse_mode(mode_name).new_cache()
            expected = direct_generation(model, tokenizer, sample["doc"]["prompt"], cache)
            assert sample["resps"][0][0] == expected


# -- bad input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model_args, message",
    [
        (dict(ka_mode="kq"), "unknown mode"),
        (dict(ka_mode="ka-window@8"), "window modes"),
        (dict(ka_mode="ka+adapter"), "needs adapter=DIR"),
        (dict(ka_mode="ka", adapter="somewhere"), "only by ka_mode=ka\\+adapter"),
        (dict(ka_mode="ka@0-5"), "names layer 5"),
    ],
)
def test_bad_modes_are_clear_errors(workspace, model_args, message):
    with pytest.raises(KAError, match=message):
        KALM(pretrained=str(workspace["root"] / "plain"), device="cpu", **model_args)


@pytest.mark.slow  # lm-eval's command line indexes its thousands of built-in task files at every start
def test_the_command_line_is_lm_evals_with_the_ka_hf_model(workspace, tmp_path):
    """`python -m ka_hf.lm_eval` runs lm-eval's CLI with `--model ka_hf`; its ka figure is the Python API's."""
    expected = bits_per_byte(workspace, "ka_hf", ka_mode="ka-hybrid")
    model_args = f"pretrained={workspace['root'] / 'plain'},ka_mode=ka-hybrid,max_length={MAX_LENGTH}"
    command = [sys.executable, "-m", "ka_hf.lm_eval", "--model", "ka_hf", "--model_args", model_args]
    command += ["--tasks", ROLLING_TASK, "--include_path", str(workspace["root"] / "tasks"), "--device", "cpu"]
    command += ["--batch_size", "2", "--output_path", str(tmp_path / "out")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    [results_file] = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"][ROLLING_TASK]
    assert results["bits_per_byte,none"] == pytest.approx(expected, rel=1e-9)
