"""The Colab notebook, executed end to end by a real Jupyter kernel (nbclient), offline, on the tiny model.

Only the cell tagged `parameters` is swapped (T4 settings -> tiny model, local folders), so every other
cell is the code a Colab user runs. The run is first interrupted after its first checkpoint, as a
Colab disconnect would leave it on Drive, and the notebook must resume it.
"""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_style_images

pytestmark = pytest.mark.slow

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "style_dreambooth_colab.ipynb"


def _ci_parameters(tmp_path: Path, tiny_model: Path) -> dict:
    images = write_style_images(tmp_path / "my-images", n=4)
    (images / "img0.txt").write_text("a striped blob\n")
    (tmp_path / "subjects.txt").write_text("a house\n")
    return {
        "PACKAGE": "",  # CI runs from the checkout, already installed
        "IMAGES_FROM": "folder", "IMAGES_DIR": str(images),
        "RUN_DIR": str(tmp_path / "drive" / "style-dreambooth" / "runs" / "my-style"),
        "WORK_DIR": str(tmp_path / "content"),
        "BASE_MODEL": str(tiny_model),
        "INSTANCE_PROMPT": "yltcaxe artstyle", "CLASS_PROMPT": "artstyle",
        "VALIDATION_PROMPT": "a boy in yltcaxe artstyle",
        "METHOD": "full", "RESOLUTION": 64, "MAX_TRAIN_STEPS": 16, "LEARNING_RATE": 1e-3, "NUM_CLASS_IMAGES": 2,
        "CLASS_INFERENCE_STEPS": 2, "TRAIN_TEXT_ENCODER": True, "MIXED_PRECISION": "no", "USE_8BIT_ADAM": False,
        "GRADIENT_CHECKPOINTING": True, "CHECKPOINTING_STEPS": 4, "VALIDATION_STEPS": 8,
        "VALIDATION_INFERENCE_STEPS": 2,
        "PROMPT": "a lighthouse in yltcaxe artstyle", "NUM_IMAGES": 2, "SAMPLER_STEPS": 2, "EVAL_SEEDS": "0",
        "EVAL_PROMPTS": str(tmp_path / "subjects.txt"), "EVAL_CLIP": "none", "EVAL_DINO": "none",
    }


def _assigned_names(source: str) -> set[str]:
    return {t.id for node in ast.parse(source).body if isinstance(node, ast.Assign) for t in node.targets}


def _interrupt_after_first_checkpoint(config_file: Path, run: Path, env: dict) -> None:
    """Start the notebook's own training and Ctrl-C it once step 4's checkpoint is saved."""
    # Ctrl-C must reach it even when this test runs in the background, where the shell ignores SIGINT
    # and a child inherits that (Python then never raises KeyboardInterrupt).
    proc = subprocess.Popen([sys.executable, "-m", "style_dreambooth", "train", "--config", str(config_file)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 600
    while not (run / "checkpoints" / "step-000004" / "training_state.pt").is_file():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()[-2000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    assert not (run / "model").exists(), "the run finished before it could be interrupted"


def test_colab_notebook_runs_end_to_end_and_resumes(tmp_path, tiny_model, cache_env):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    [cell] = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    params = _ci_parameters(tmp_path, tiny_model)
    assert _assigned_names(cell.source) == set(params), "the CI parameters must set exactly the notebook's settings"
    cell.source = "\n".join(f"{k} = {v!r}" for k, v in params.items())

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    os.environ["HF_HUB_OFFLINE"] = "1"  # the kernel inherits this process's environment
    client = NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    run = Path(params["RUN_DIR"])
    train_cell = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code" and "--resume-from-checkpoint" in c.source)
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            if index == train_cell:  # a disconnect mid-training: the run folder keeps a checkpoint
                _interrupt_after_first_checkpoint(Path(params["WORK_DIR"]) / "train.yaml", run, env)
            client.execute_cell(cell, index)

    outputs = {i: "".join(o.get("text", "") for o in c.get("outputs", []) if o.output_type == "stream")
               for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    assert "resuming from step-000004" in outputs[train_cell]
    assert (run / "model" / "model_index.json").is_file()
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 17))  # resumed: no step lost or repeated
    assert "4 of 4 images usable" in "".join(outputs.values())
    assert "'yltcaxe' -> 4 BPE pieces" in "".join(outputs.values())
    generated = run.parent.parent / "generated"
    assert sorted(p.name for p in (generated / "my-style").glob("*.png")) == ["000000.png", "000001.png", "grid.png"]
    assert (generated / "my-style-best" / "grid.png").is_file()
    html = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "display_data" and "text/html" in o.data]
    assert html and "data:image/png;base64," in html[0].data["text/html"]  # the report, images inlined
    assert 'class="chosen' in html[0].data["text/html"]  # the checkpoint table marks the pick
    images = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "display_data" and "image/png" in o.data]
    assert len(images) >= 4  # loss plot, last validation grid, two generated grids
