"""The layout: the library (ka_hf/) never imports the study (ka_hf/study/), and `import ka_hf` loads neither the
study nor the study's dependencies."""

import ast
import os
import subprocess
import sys

from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "ka_hf"
STUDY = PACKAGE / "study"
STUDY_ONLY = ("matplotlib", "datasets", "evaluate")  # never loaded by `import ka_hf`
# Loaded by `import ka_hf` only where torch or transformers load them themselves (torch.hub imports tqdm;
# transformers imports jinja2 and, for its modeling utilities, accelerate when installed).
STUDY_ONLY_UNLESS_UPSTREAM = ("accelerate", "jinja2", "tqdm")
# Optional extras: library modules that only their own import loads (`import ka_hf.lm_eval`), with their dependency.
EXTRAS = {PACKAGE / "lm_eval": "lm_eval"}

ACCEPTANCE_CHECK = (
    "import ka_hf, sys; print(sorted(m for m in sys.modules if m.startswith('ka_hf') or "
    "m.split('.')[0] in ('matplotlib','datasets','accelerate','jinja2','evaluate','tqdm','lm_eval')))"
)


def _python(code: str):
    """What `python -c code` prints last (a Python literal), run from the repository root."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True
    )
    return ast.literal_eval(result.stdout.strip().splitlines()[-1])


def _library_files():
    return sorted(path for path in PACKAGE.rglob("*.py") if STUDY not in path.parents)


def _module_name(path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(path, tree):
    """(module, node) for every import in the file's `tree`, relative imports resolved; `from X import y` gives X
    and X.y."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            yield base, node
            for alias in node.names:
                yield f"{base}.{alias.name}", node


def _third_party_imports(path):
    """The modules a library file imports at module level from outside ka_hf."""
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if not alias.name.startswith("ka_hf"))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and not node.module.startswith("ka_hf"):
            yield node.module


def _under_main_guard(tree, target) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test).replace("'", '"') == '__name__ == "__main__"':
            if any(child is target for child in ast.walk(node)):
                return True
    return False


def test_import_ka_hf_loads_neither_the_study_nor_its_dependencies():
    loaded = _python(ACCEPTANCE_CHECK)
    assert "ka_hf" in loaded and not [m for m in loaded if m == "ka_hf.study" or m.startswith("ka_hf.study.")]
    assert not [m for m in loaded if m.split(".")[0] in STUDY_ONLY]
    assert not [m for m in loaded if m.split(".")[0] in EXTRAS.values() or m.startswith("ka_hf.lm_eval")]

    # What the library's own module-level third-party imports (torch, transformers, ...) load without ka_hf.
    core = [path for path in _library_files() if not any(extra in path.parents for extra in EXTRAS)]
    upstream = sorted({module for path in core for module in _third_party_imports(path)})
    baseline = _python(
        "import sys; "
        + "; ".join(f"import {module}" for module in upstream)
        + "; print(sorted({m.split('.')[0] for m in sys.modules}))"
    )
    extra = {m.split(".")[0] for m in loaded if m.split(".")[0] in STUDY_ONLY_UNLESS_UPSTREAM} - set(baseline)
    assert not extra, f"import ka_hf loads {sorted(extra)}, which its torch/transformers imports do not"


def test_the_experiment_shim_imports_nothing():
    loaded = _python("import ka_hf.experiment, sys; print(sorted(m for m in sys.modules if m.startswith('ka_hf')))")
    assert not [m for m in loaded if m.startswith("ka_hf.study")]


def test_the_library_never_imports_the_study():
    offenders = []
    for path in _library_files():
        tree = ast.parse(path.read_text(), str(path))
        for module, node in _imported_modules(path, tree):
            if module == "ka_hf.study" or module.startswith("ka_hf.study."):
                # the one exception: `python -m ka_hf.experiment` runs the study's main, only as a script
                if path == PACKAGE / "experiment.py" and _under_main_guard(tree, node):
                    continue
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} imports {module}")
    assert not offenders


def test_the_console_script_and_the_module_entry_point_exist():
    assert 'ka-experiment = "ka_hf.study.experiment:main"' in (REPO_ROOT / "pyproject.toml").read_text()
    assert (REPO_ROOT / "ka_hf" / "study" / "metrics" / "ka_perplexity" / "ka_perplexity.py").is_file()
    help_text = subprocess.run(
        [sys.executable, "-m", "ka_hf.experiment", "--help"],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    ).stdout
    assert "--preset" in help_text
