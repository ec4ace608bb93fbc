"""The training recipes of docs/training.md ("Recipes: Trainer, PEFT LoRA, FSDP2, accelerate"), run as written.

Each `<!-- recipe: NAME -->` python block is written to NAME and run by the doc's own command for it (the bash
lines that name it), with the command's CHECKPOINT, TEXT_FILE and OUT replaced by a tiny random checkpoint
(float64, 2 layers, a BPE tokenizer trained here), a short text (20 blocks of 64 tokens: 4-5 steps) and a
scratch folder. `python` commands run in this process (runpy); `torchrun` / `accelerate launch` ones as real
gloo process groups (2 processes, and 1 for FSDP2's one-process command), all launched at once, each accelerate
one on a free port.

What is checked, per recipe: the losses and trained weights equal those of the token-by-token KA loop
(`kernel="loop"`: the same script with that one word changed, or a plain loop-KA training of the same steps),
generate's tokens are the argmax of the loop's logits, and the KA numbers differ from standard attention's.
"""

import os
import re
import runpy
import shlex
import socket
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import ka_hf
from ka_hf.study.data import default_corpus, train_tokenizer
from ka_hf.study.models import model_config

from conftest import REPO_ROOT

DOC = REPO_ROOT / "docs" / "training.md"
RECIPES = ("trainer_ka.py", "peft_lora_ka.py", "fsdp2_ka.py", "accelerate_ka.py")
ARCHS = {"llama-gqa": dict(arch="llama", num_kv_heads=2), "gpt-neox": dict(arch="gpt-neox", rotary_pct=0.25)}
LOSS_RTOL = 1e-6  # transformers computes the loss in float32, whatever the model's dtype
WEIGHT_ATOL = 1e-10  # float64 weights
LOGIT_ATOL = 1e-10
LAUNCH_TIMEOUT = 600


# ---------------------------------------------------------------------------------------------------------
# The doc's recipes and commands


def recipe_code(name: str) -> str:
    match = re.search(rf"<!-- recipe: {re.escape(name)} -->\n```python\n(.*?)```", DOC.read_text(), re.DOTALL)
    assert match, f"docs/training.md has no recipe {name}"
    return match.group(1)


def recipe_commands(name: str) -> list[list[str]]:
    """The bash lines of the doc that run `name`, as argv lists (comments dropped)."""
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.DOTALL)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    commands = [shlex.split(line) for line in lines if name in line.split()]
    assert commands, f"docs/training.md shows no command for {name}"
    return commands


def with_paths(command: list[str], script, checkpoint, text_file, out) -> tuple[dict, list[str]]:
    """(environment variables, argv) of a doc command, its script and its three arguments replaced."""
    env = {}
    while "=" in command[0]:
        key, value = command[0].split("=", 1)
        env[key], command = value, command[1:]
    index = command.index(script.name)
    assert len(command) == index + 4, f"{shlex.join(command)}: expected CHECKPOINT TEXT_FILE OUT"
    return env, [*command[:index], str(script), str(checkpoint), str(text_file), str(out)]


def variant(code: str, written: str, reference: str) -> str:
    """The recipe with its one `written` call replaced by the reference's."""
    assert code.count(written) == 1, f"{written!r} should appear once in the recipe"
    return code.replace(written, reference)


def test_every_recipe_in_the_doc_is_run_here():
    assert tuple(re.findall(r"<!-- recipe: (\S+) -->", DOC.read_text())) == RECIPES


def heading_anchor(heading: str) -> str:
    """GitHub's anchor for a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_to_the_recipes_reach_their_sections():
    anchors = {heading_anchor(h) for h in re.findall(r"^#+ (.+)$", DOC.read_text(), re.MULTILINE)}
    readme_links = re.findall(r"docs/training\.md#([\w-]+)", (REPO_ROOT / "README.md").read_text())
    doc_links = re.findall(r"\]\(#([\w-]+)\)", DOC.read_text())
    assert "recipes-trainer-peft-lora-fsdp2-accelerate" in readme_links
    assert "accelerate-on-several-cpu-processes" in doc_links
    assert set(readme_links + doc_links) <= anchors


# ---------------------------------------------------------------------------------------------------------
# Tiny checkpoints, text and references


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text("\n".join(text.replace("\n", " ") for text in default_corpus("test")[:6]) + "\n")
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, text_file):
    """{arch: folder} of tiny random float64 models with a BPE tokenizer trained here."""
    tokenizer = train_tokenizer(default_corpus("train")[:200], vocab_size=400)
    folders = {}
    for name, spec in ARCHS.items():
        torch.manual_seed(0)
        config = model_config(vocab_size=len(tokenizer), num_layers=2, hidden_size=32, num_heads=4, **spec)
        folders[name] = tmp_path_factory.mktemp(name)
        AutoModelForCausalLM.from_config(config).to(torch.float64).save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    ids = tokenizer(text_file.read_text(), return_tensors="pt").input_ids[0]
    assert len(ids) // 256 == 5, "the text should make 5 batches of 4 blocks of 64 tokens"
    return folders


def batches_of(checkpoint, text_file):
    """The recipes' batches: 4 blocks of 64 tokens, as each recipe cuts its text."""
    ids = AutoTokenizer.from_pretrained(checkpoint)(text_file.read_text(), return_tensors="pt").input_ids[0]
    return ids[: len(ids) // 256 * 256].view(-1, 4, 64)


def loss_of(model, batch, kernel=None):
    """The loss of `batch` under loop KA (kernel="loop") or standard attention (kernel None)."""
    with torch.no_grad(), ka_hf.exact_ka(model, kernel="loop") if kernel else ka_hf.without_ka(model):
        return model(input_ids=batch, labels=batch).loss.item()


def loop_ka_training(checkpoint, text_file):
    """The multi-process recipes' training in one process, KA by the token loop: (losses, trained weights)."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    standard_first_loss = loss_of(model, batches_of(checkpoint, text_file)[0])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for batch in batches_of(checkpoint, text_file):
        with ka_hf.exact_ka(model, kernel="loop"):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert abs(losses[0] - standard_first_loss) > 1e-4  # KA is another number: a run that lost it cannot match
    return losses, model.state_dict()


def assert_weights_equal(weights, reference):
    assert weights and set(weights) == set(reference)
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=WEIGHT_ATOL, msg=name)


def assert_generated_by_loop_ka(model, generated, prompt_length, reference=None):
    """`model`'s own logits over `generated` equal the loop-KA logits of `reference` (default: `model`), whose
    argmax is each generated token; and standard attention's differ."""
    reference = reference if reference is not None else model
    assert generated.shape[1] > prompt_length
    with torch.no_grad():
        logits = model(generated).logits
        with ka_hf.exact_ka(reference, kernel="loop"):
            loop_logits = reference(generated).logits
        with ka_hf.without_ka(model):
            standard_logits = model(generated).logits
    torch.testing.assert_close(logits, loop_logits, rtol=0, atol=LOGIT_ATOL)
    assert (standard_logits - loop_logits).abs().max() > 1e-6
    assert torch.equal(loop_logits[0, prompt_length - 1 : -1].argmax(-1), generated[0, prompt_length:])


# ---------------------------------------------------------------------------------------------------------
# The in-process recipes: Trainer, PEFT


def run_in_process(code, name, checkpoint, text_file, out, monkeypatch):
    """Run `code` as the doc's `python NAME ...` command would: its module namespace afterwards."""
    (command,) = recipe_commands(name)
    script = out.parent / f"{out.name}-script" / name  # under its own name: the command names it
    script.parent.mkdir()
    script.write_text(code)
    env, argv = with_paths(command, script, checkpoint, text_file, out)
    assert argv[0] == "python" and not env
    monkeypatch.setattr(sys, "argv", argv[1:])
    try:
        return runpy.run_path(str(script), run_name="__main__")
    finally:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)  # the Trainer's accelerator: none left behind


@pytest.mark.parametrize("arch", list(ARCHS))
def test_trainer_recipe(arch, checkpoints, text_file, tmp_path, monkeypatch):
    code = recipe_code("trainer_ka.py")
    written = run_in_process(code, "trainer_ka.py", checkpoints[arch], text_file, tmp_path / "ka", monkeypatch)
    loop_code = variant(code, "ka_hf.enable_ka(model)", 'ka_hf.enable_ka(model, kernel="loop")')
    loop = run_in_process(loop_code, "trainer_ka.py", checkpoints[arch], text_file, tmp_path / "loop", monkeypatch)

    history = written["trainer"].state.log_history
    losses, loop_losses = (
        [h["loss"] for h in run["trainer"].state.log_history if "loss" in h] for run in (written, loop)
    )
    assert len(losses) == 4
    torch.testing.assert_close(losses, loop_losses, rtol=LOSS_RTOL, atol=0)
    trained = written["trainer"].model
    assert_weights_equal(trained.state_dict(), loop["trainer"].model.state_dict())

    held_out = torch.stack([block["input_ids"] for block in written["held_out"]])
    (eval_loss,) = [h["eval_loss"] for h in history if "eval_loss" in h]
    assert eval_loss == pytest.approx(loss_of(trained, held_out, kernel="loop"), rel=LOSS_RTOL)
    assert abs(eval_loss - loss_of(trained, held_out)) > 1e-4  # standard attention's loss is another number

    reloaded = written["model"]  # from_pretrained(OUT): KA from config.json
    assert ka_hf.ka_spec(reloaded.config) is not None
    assert_weights_equal(reloaded.state_dict(), trained.state_dict())
    assert_generated_by_loop_ka(reloaded, written["generated"], written["prompt"]["input_ids"].shape[1])


@pytest.mark.parametrize("arch", list(ARCHS))
def test_peft_lora_recipe(arch, checkpoints, text_file, tmp_path, monkeypatch, capsys):
    from peft import PeftModel

    code = recipe_code("peft_lora_ka.py")
    written = run_in_process(code, "peft_lora_ka.py", checkpoints[arch], text_file, tmp_path / "ka", monkeypatch)
    printed = [float(x) for x in re.findall(r"step \d+, loss (\S+)", capsys.readouterr().out)]
    loop_code = variant(code, "ka_hf.exact_ka(model)", 'ka_hf.exact_ka(model, kernel="loop")')
    loop = run_in_process(loop_code, "peft_lora_ka.py", checkpoints[arch], text_file, tmp_path / "loop", monkeypatch)

    # LoRA starts as the identity (B = 0): the first step's loss is the checkpoint's own loop-KA loss.
    first = batches_of(checkpoints[arch], text_file)[0]
    base = AutoModelForCausalLM.from_pretrained(checkpoints[arch])
    assert len(printed) == 5 and printed[0] == pytest.approx(loss_of(base, first, kernel="loop"), rel=LOSS_RTOL)
    assert abs(printed[0] - loss_of(base, first)) > 1e-4
    assert written["loss"].item() == pytest.approx(loop["loss"].item(), rel=LOSS_RTOL)
    merged = written["merged"]
    assert_weights_equal(merged.state_dict(), loop["merged"].state_dict())

    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(checkpoints[arch]), tmp_path / "ka")
    assert_generated_by_loop_ka(merged, written["generated"], written["prompt"]["input_ids"].shape[1], adapter)


# ---------------------------------------------------------------------------------------------------------
# The multi-process recipes: FSDP2 (torchrun), accelerate launch

# recipe -> the model its doc commands train (both families covered); `launched` runs all of them at once
LAUNCHES = {"fsdp2_ka.py": "llama-gqa", "accelerate_ka.py": "gpt-neox"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launcher(argv: list[str]) -> list[str]:
    """The doc's launcher through this interpreter; accelerate on a free port (parallel runs must not collide;
    torchrun --standalone picks its own)."""
    if argv[0] == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    assert argv[:2] == ["accelerate", "launch"], shlex.join(argv)
    return [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port()), *argv[2:]]


@pytest.fixture(scope="module")
def launched(checkpoints, text_file, tmp_path_factory):
    """{(recipe, index of its doc command): (doc command, returncode, stdout, stderr, OUT)}, all run at once."""
    scratch = tmp_path_factory.mktemp("launched")
    base_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(scratch / "hf-home"),  # no accelerate config of this machine's user
        "OMP_NUM_THREADS": "1",
    }
    processes = {}
    for name, arch in LAUNCHES.items():
        script = scratch / name
        script.write_text(recipe_code(name))
        for index, command in enumerate(recipe_commands(name)):
            out = scratch / f"{name}-{index}"
            env, argv = with_paths(command, script, checkpoints[arch], text_file, out)
            processes[name, index] = (
                (shlex.join(command), out),
                subprocess.Popen(
                    launcher(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**base_env, **env}
                ),
            )
    results = {}
    for key, ((command, out), process) in processes.items():
        stdout, stderr = process.communicate(timeout=LAUNCH_TIMEOUT)
        results[key] = (command, process.returncode, stdout, stderr, out)
    return results


def saved_weights(folder):
    """The weights a recipe saved, by the model's own parameter names (a file may name them otherwise: GPT-NeoX's
    output layer is `embed_out` in model.safetensors)."""
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def printed_losses(stdout: str) -> list[float]:
    return [float(x) for x in re.findall(r"step \d+, loss (\S+)", stdout)]


def runs_of(launched, name):
    runs = [run for (recipe, _), run in sorted(launched.items()) if recipe == name]
    for command, returncode, _, stderr, _ in runs:
        assert returncode == 0, f"{command}\n{stderr[-3000:]}"
    return runs


@pytest.fixture(scope="module")
def loop_references(checkpoints, text_file):
    return {arch: loop_ka_training(checkpoints[arch], text_file) for arch in set(LAUNCHES.values())}


def test_fsdp2_two_processes_train_as_one(launched, loop_references):
    (two, one) = runs_of(launched, "fsdp2_ka.py")
    assert "--nproc_per_node 2" in two[0] and "--nproc_per_node 1" in one[0]
    for (_, _, stdout, _, _), processes in ((two, 2), (one, 1)):
        assert re.findall(r"(\d+) processes, step", stdout) == [str(processes)] * 5
    two_losses, one_losses = printed_losses(two[2]), printed_losses(one[2])
    torch.testing.assert_close(two_losses, one_losses, rtol=LOSS_RTOL, atol=0)
    assert_weights_equal(saved_weights(two[4]), saved_weights(one[4]))

    losses, weights = loop_references[LAUNCHES["fsdp2_ka.py"]]
    torch.testing.assert_close(one_losses, losses, rtol=LOSS_RTOL, atol=0)
    assert_weights_equal(saved_weights(one[4]), weights)


def test_accelerate_launch_starts_two_cpu_processes(launched, loop_references):
    runs = runs_of(launched, "accelerate_ka.py")
    assert [("--multi_gpu" in command, "--use_fsdp" in command) for command, *_ in runs] == [
        (True, False),
        (False, True),
    ]
    losses, weights = loop_references[LAUNCHES["accelerate_ka.py"]]
    for command, _, stdout, _, out in runs:
        # accelerate's FSDP plugin on CPU prepares DDP (docs/training.md says so): this line is what tells.
        assert stdout.splitlines()[0] == "2 processes, DistributedType.MULTI_CPU, DistributedDataParallel", command
        torch.testing.assert_close(printed_losses(stdout), losses, rtol=LOSS_RTOL, atol=0)
        assert_weights_equal(saved_weights(out), weights)
