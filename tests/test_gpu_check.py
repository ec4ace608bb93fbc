"""benchmarks/gpu_check.py --device cpu --tiny: every section runs and every exactness entry passes (on a GPU the
same script runs at full size; docs/benchmarks.md, "GPU check")."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT


@pytest.mark.slow
def test_the_gpu_check_runs_every_section_at_tiny_shapes(tmp_path):
    out = tmp_path / "check"
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--tiny"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command + ["--out", str(out)], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads((out / "gpu_check.json").read_text())
    sections = record["sections"]
    assert list(sections) == ["versions", "exactness", "long", "offloading", "static", "seed"]
    assert all(section["status"] == "ok" for section in sections.values())
    entries = sections["exactness"]["entries"]
    assert len(entries) >= 20 and all(entry["passed"] for entry in entries)
    assert {"cpu-flash", "tiles"} <= {entry["name"].split()[1] for entry in entries if entry["name"].startswith("op ")}
    assert sections["versions"]["info"]["torch"] and (out / "gpu_check.md").read_text().startswith("# ka_hf GPU check")
    assert {row["kind"] for row in sections["long"]["rows"]} == {"prefill", "train", "decode-gqa"}


def test_a_failing_section_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    """A section that raises leaves its error in the JSON; the next section runs and the exit status is 1."""
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    import gpu_check

    def broken(device):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(gpu_check, "versions", broken)
    status = gpu_check.main(
        ["--device", "cpu", "--tiny", "--sections", "versions,static", "--out", str(tmp_path / "o")]
    )
    record = json.loads((tmp_path / "o" / "gpu_check.json").read_text())
    assert status == 1
    assert record["sections"]["versions"]["status"] == "error"
    assert "planted failure" in record["sections"]["versions"]["error"]
    assert record["sections"]["static"]["status"] == "ok"
