"""The benchmark plumbing still runs: the step clock around Accelerator.backward, and the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_train_clock_and_report_on_tiny_model(tmp_path, tiny_model):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STYLE_DREAMBOOTH_CACHE": str(tmp_path / "cache")}
    subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_train.py"), "--out", str(tmp_path), "--model", str(tiny_model),
         "--shape", "tiny", "--resolution", "64", "--precision", "no", "--steps", "2,5",
         "--configs", "full-fp16,lora-fp16"],
        check=True, env=env, capture_output=True, text=True,
    )
    data = json.loads((tmp_path / "train_bench.json").read_text())
    assert [r["config"] for r in data["rows"]] == ["full-fp16", "lora-fp16"]
    for row in data["rows"]:
        assert row["ours_it_s"] > 0 and row["ours_load_s"] > 0, row
        assert "ours_error" not in row
    # The clock stopped the run at step 5: no final model was saved.
    assert not (tmp_path / "runs" / "full-fp16-ours" / "model").exists()
    clock = json.loads((tmp_path / "full-fp16-ours.json").read_text())
    assert clock["done"] and sorted(int(k) for k in clock["marks"]) == [1, 2, 5]
    table = subprocess.run([sys.executable, str(ROOT / "bench" / "report.py"), str(tmp_path / "train_bench.json")],
                           check=True, capture_output=True, text=True).stdout
    assert "| full-fp16 | " in table and "| lora-fp16 | " in table


def test_clock_reports_a_failed_run(tmp_path):
    """A script that dies before the window still leaves a result saying so, with what was measured."""
    script = tmp_path / "boom.py"
    script.write_text("raise SystemExit(3)\n")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "_peak.py"), str(tmp_path / "r.json"), str(script)])
    assert proc.returncode == 3
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["done"] is False and "it_s" not in result
