"""Run the CLI in-process and capture its exit code and output."""

from __future__ import annotations

from style_dreambooth.cli import main


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def train_args(model, instance_dir, out, *extra) -> list[str]:
    """A fast tiny-model training command (64 px, few steps, few class images)."""
    return [
        "train", "--base-model", model, "--instance-dir", instance_dir, "--instance-prompt", "yltcaxe artstyle",
        "--class-prompt", "artstyle", "--output-dir", out, "--resolution", "64", "--num-class-images", "4",
        "--class-inference-steps", "2", "--validation-inference-steps", "2", "--max-train-steps", "4",
        "--validation-steps", "0", "--checkpointing-steps", "0", "--learning-rate", "1e-3", *extra,
    ]
