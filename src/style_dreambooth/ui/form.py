"""The train form, generated from TrainConfig: same fields, defaults, help text and validation as the CLI.

No Gradio here: `form_fields` describes each input, `config_from_form` turns what the user typed
into a validated TrainConfig through `build_config`, the function behind `train`'s flags and YAML.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import TrainConfig, build_config
from ..errors import UserError
from .workspace import RUNS, Workspace

# Shown first; every other field is under "All options". output_dir comes from the run name and
# resume_from_checkpoint from the Resume button, so neither is a form field.
BASIC_FIELDS = (
    "base_model", "backbone", "instance_dir", "instance_prompt", "class_prompt", "method", "max_train_steps",
    "learning_rate", "resolution", "train_batch_size", "with_prior_preservation", "num_class_images",
    "train_text_encoder", "use_8bit_adam", "mixed_precision", "gradient_checkpointing",
    "validation_prompt", "validation_steps", "checkpointing_steps", "seed",
)
HIDDEN_FIELDS = ("output_dir", "resume_from_checkpoint")
PATH_FIELDS = ("instance_dir", "class_dir")
MODEL_FIELDS = ("base_model", "base_config", "vae")
REQUEST_FILE = "ui-train-request.yaml"


@dataclass(frozen=True)
class FormField:
    name: str
    kind: str  # "bool", "choice", "list" or "text"
    default: Any  # as the input shows it: bool, str, or a choice
    help: str
    choices: tuple[str, ...] = ()
    required: bool = False


def _choices(annotation: Any) -> tuple[str, ...]:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return tuple(str(a) for a in args)
    for arg in args:  # Literal[...] | None
        if typing.get_origin(arg) is typing.Literal:
            return ("",) + tuple(str(a) for a in typing.get_args(arg))
    return ()


def _families() -> tuple[str, ...]:
    from ..models.backbones import CHOICES

    return CHOICES


def form_fields() -> list[FormField]:
    """One input per TrainConfig field, basic ones first."""
    names = [n for n in BASIC_FIELDS] + [n for n in TrainConfig.model_fields if n not in BASIC_FIELDS]
    fields = []
    for name in names:
        if name in HIDDEN_FIELDS:
            continue
        info = TrainConfig.model_fields[name]
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        choices = _choices(info.annotation) if name != "backbone" else _families()
        if info.annotation is bool:
            kind, shown = "bool", bool(default)
        elif choices:
            kind, shown = "choice", "" if default is None else str(default)
        elif typing.get_origin(info.annotation) is list:
            kind, shown = "list", "\n".join(default or [])
        else:
            kind, shown = "text", "" if default is None else str(default)
        fields.append(FormField(name, kind, shown, info.description or "", choices, info.is_required()))
    return fields


def _value(field: FormField, raw: Any) -> Any:
    """What the input holds -> a config value; None for a blank (the field's default applies)."""
    if field.kind == "bool":
        return bool(raw)
    if field.kind == "list":
        items = [line.strip() for line in str(raw or "").splitlines() if line.strip()]
        return items or None
    text = str(raw if raw is not None else "").strip()
    return text or None


def config_from_form(ws: Workspace, run_name: str, values: dict[str, Any]) -> TrainConfig:
    """Validate the form: paths inside the workspace, then TrainConfig's own checks (one-line UserErrors)."""
    output_dir = ws.new_folder(RUNS, run_name, "run")
    given: dict[str, Any] = {"output_dir": output_dir}
    by_name = {f.name: f for f in form_fields()}
    for name, raw in values.items():
        value = _value(by_name[name], raw)
        if value is None:
            continue
        if name in PATH_FIELDS:
            value = ws.resolve(value, name)
        elif name in MODEL_FIELDS:
            value = ws.model_or_hub_id(value, name)
        given[name] = value
    return build_config({}, given)


def write_request(cfg: TrainConfig) -> Path:
    """The form's config as a YAML file in the run folder; `train --config` runs it."""
    import yaml

    path = Path(cfg.output_dir) / REQUEST_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    data = cfg.to_yaml_dict()
    if cfg.overwrite:
        data["overwrite"] = True
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def form_values_from_run(run: Path) -> dict[str, Any]:
    """A run's request (or config.yaml) as form values, so a past run can be re-run or tweaked."""
    from ..config import read_yaml

    for name in (REQUEST_FILE, "config.yaml"):
        if (run / name).is_file():
            data = read_yaml(run / name)
            break
    else:
        raise UserError(f"run '{run.name}' has no config to load")
    out: dict[str, Any] = {}
    for field in form_fields():
        if field.name not in data:
            continue
        value = data[field.name]
        if field.kind == "list":
            value = "\n".join(value or [])
        elif field.kind != "bool":
            value = "" if value is None else str(value)
        out[field.name] = value
    return out
