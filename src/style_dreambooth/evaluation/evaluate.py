"""Score every checkpoint of a run on a fixed prompt set with fixed seeds.

For each model (the base at step 0, each checkpoint, the final model) it generates images for
three prompt kinds: subjects with the identifier ("token"), the same subjects without it
("plain"), and the class prompt ("class"). Images and scores are stored under
``RUN/eval/<name>/``; a model whose scores exist for the same settings is not generated again, so
an interrupted evaluation resumes. The summary, chosen checkpoint and overfitting alarm go to
``RUN/eval/metrics.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

from ..config import load_yaml
from ..data.images import list_images, load_image
from ..errors import UserError
from ..files import write_text_atomically
from ..models.loading import load_run_base, model_identity
from ..progress import progress_bar
from ..run_layout import EVAL_SUMMARY, list_checkpoints, read_summary
from ..sampling.generate import resolve_model, sample
from ..sampling.images import make_scheduler, save_png
from .agreement import JudgeAgreement, format_rho, judge_agreement
from .scorers import Scorer, scorer_name
from .selection import Alarm, Choice, Point, choose_checkpoint, overfitting_alarm

log = logging.getLogger(__name__)

DEFAULT_SUBJECTS = (
    "a portrait of an old man",
    "a cat sitting on a chair",
    "a lighthouse by the sea",
    "a bowl of fruit",
    "a city street at night",
)
KINDS = ("token", "plain", "class")

@dataclass
class PromptSet:
    token: list[str]
    plain: list[str]
    klass: list[str]

    def by_kind(self) -> dict[str, list[str]]:
        return {"token": self.token, "plain": self.plain, "class": self.klass}


def build_prompts(subjects: list[str], instance_prompt: str, class_prompt: str | None) -> PromptSet:
    return PromptSet(
        token=[f"{s}, {instance_prompt}" for s in subjects],
        plain=list(subjects),
        klass=[class_prompt] if class_prompt else [],
    )


def read_prompt_file(path: Path, instance_prompt: str, class_prompt: str | None) -> PromptSet:
    """A .txt file of subjects (one per line), or YAML with `subjects:` or explicit `token`/`plain`/`class` lists."""
    if path.suffix.lower() in (".yaml", ".yml"):
        data = load_yaml(path, "prompt file") or {}
        if not isinstance(data, dict):
            raise UserError(f"prompt file '{path}' must map 'subjects' (or 'token', 'plain', 'class') to lists")
        unknown = set(data) - {"subjects", "token", "plain", "class"}
        if unknown:
            raise UserError(f"prompt file '{path}' has unknown key '{sorted(unknown)[0]}'; use subjects, token, plain, class")

        def strings(key: str, default: list[str]) -> list[str]:
            value = data.get(key, default)
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
                raise UserError(f"prompt file '{path}': '{key}' must be a list of prompts")
            return [str(v) for v in value]

        klass = strings("class", [class_prompt] if class_prompt else [])
        if "subjects" in data:
            subjects = build_prompts(strings("subjects", []), instance_prompt, None)
            return PromptSet(subjects.token, subjects.plain, klass)
        return PromptSet(strings("token", []), strings("plain", []), klass)
    if not path.is_file():
        raise UserError(f"prompt file '{path}' not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"prompt file '{path}' is not UTF-8 text; save it as UTF-8") from None
    subjects = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not subjects:
        raise UserError(f"prompt file '{path}' has no subjects; write one per line")
    return build_prompts(subjects, instance_prompt, class_prompt)


@dataclass
class EvalSettings:
    prompts: PromptSet
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    steps: int = 25
    guidance: float = 7.5
    scheduler: str = "dpm++"
    resolution: int = 512

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class RunEvaluation:
    run: Path
    points: list[Point]
    choice: Choice | None
    alarm: Alarm | None
    skipped: dict[str, str]
    settings: EvalSettings
    agreement: JudgeAgreement | None = None  # weight-free style vs judges, where judges scored

    @classmethod
    def from_summary(cls, run: Path) -> "RunEvaluation":
        """Rebuild an evaluation from RUN/eval/metrics.json (e.g. to re-write a report)."""
        data = read_summary(run)
        s = dict(data["settings"])
        s["prompts"] = PromptSet(**s["prompts"])
        agreement = data.get("judge_agreement")
        return cls(
            run=run,
            points=[Point(**p) for p in data["points"]],
            choice=Choice(**data["choice"]) if data.get("choice") else None,
            alarm=Alarm(**data["alarm"]) if data.get("alarm") else None,
            skipped=dict(data.get("skipped") or {}),
            settings=EvalSettings(**s),
            agreement=JudgeAgreement.from_dict(agreement) if agreement else None,
        )

    def image_path(self, point_name: str, kind: str, prompt_index: int, seed: int) -> Path:
        return self.run / "eval" / point_name / f"{kind}-{prompt_index:02d}-{seed:04d}.png"


def _model_points(run: Path, max_steps: int) -> list[tuple[int, str, str | None]]:
    """(step, name, checkpoint spec) for the base, each checkpoint and the final model."""
    points: list[tuple[int, str, str | None]] = [(0, "base", "base")]
    for step, folder in list_checkpoints(run):
        points.append((step, folder.name, folder.name))
    model = run / "model"
    if ((model / "model_index.json").is_file() or (model / "lora.safetensors").is_file()) and max_steps not in {
        s for s, _, _ in points
    }:
        points.append((max_steps, "final", None))
    return points


def _pixel_distance(a: list[Image.Image], b: list[Image.Image]) -> float:
    diffs = [np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32)).mean() / 255.0 for x, y in zip(a, b)]
    return float(np.mean(diffs)) if diffs else float("nan")


class Scorers:
    """Weight-free metrics always; learned ones when their weights load; extra scorers as given."""

    def __init__(self, instances: list[Image.Image], learned: Any | None, extra: list[Scorer]) -> None:
        from .style_metrics import StyleReference

        self.instances = instances
        self.reference = StyleReference.from_images(instances)
        self.learned = learned
        self.extra = extra
        self.extra_names = [scorer_name(s) for s in extra]
        self.learned_id = learned.identity() if learned is not None and hasattr(learned, "identity") else None
        self.skipped: dict[str, str] = {}

    def score(self, images: dict[str, list[Image.Image]], prompts: dict[str, list[str]], n_seeds: int,
              base_class: list[Image.Image] | None) -> dict[str, Any]:
        from .diversity import diversity
        from .memorisation import is_copy, nearest_instance

        token, plain = images["token"], images["plain"]
        m: dict[str, Any] = {}
        style = self.reference.mean_distance(token)
        m["style_distance"] = style["style"]
        for part in ("palette", "texture", "edges"):
            m[part] = style[part]
        if plain:
            m["style_distance_no_token"] = self.reference.mean_distance(plain)["style"]
        groups = [token[i : i + n_seeds] for i in range(0, len(token), n_seeds)]
        m["diversity"] = float(np.mean([diversity(g) for g in groups]))
        nearest = nearest_instance(token, self.instances)
        m["max_instance_similarity"] = float(np.mean([s for _, s in nearest]))
        m["copy_rate"] = float(np.mean([is_copy(s) for _, s in nearest]))
        if base_class is not None and images["class"]:
            m["prior_drift"] = _pixel_distance(images["class"], base_class)
        if self.learned is not None:
            token_prompts = [p for p in prompts["token"] for _ in range(n_seeds)]
            for key, result in (
                ("clip_t", self.learned.clip_t(token, token_prompts)),
                ("clip_i", self.learned.clip_i(token, self.instances)),
                ("dino", self.learned.dino(token, self.instances)),
            ):
                m[key] = result.value
                if result.skipped:
                    self.skipped[key] = result.skipped
        m["prompt_fidelity"] = m.get("clip_t")
        for scorer in self.extra:
            for kind in KINDS:
                kind_prompts = [p for p in prompts[kind] for _ in range(n_seeds)]
                if images[kind]:
                    m.update(scorer(images[kind], kind_prompts, kind))
        if m.get("prompt_fidelity") is None and m.get("judge_prompt_fidelity") is not None:
            m["prompt_fidelity"] = m["judge_prompt_fidelity"]
        return m


def evaluate_run(
    run: Path,
    *,
    prompt_file: Path | None = None,
    seeds: list[int] | None = None,
    steps: int = 25,
    learned: Any | None = None,
    scorers: list[Scorer] | None = None,
    shared_base: Path | None = None,
) -> RunEvaluation:
    """Evaluate every model of `run` (resumable) and write RUN/eval/metrics.json.

    ``shared_base``: a folder where the base model's images and scores are kept for other runs
    with the same base, instance images and settings (a sweep's runs share one base evaluation).
    """
    config_path = run / "config.yaml"
    if not config_path.is_file():
        raise UserError(f"'{run}' is not a run folder (no config.yaml); pass the --output-dir of a training run")
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    instance_prompt, class_prompt = config["instance_prompt"], config.get("class_prompt")
    prompts = (
        read_prompt_file(prompt_file, instance_prompt, class_prompt)
        if prompt_file
        else build_prompts(list(DEFAULT_SUBJECTS), instance_prompt, class_prompt)
    )
    settings = EvalSettings(prompts, seeds or [0, 1, 2, 3], steps, resolution=int(config["resolution"]))
    instance_paths = list_images(Path(config["instance_dir"]), role="instance")
    instances = [load_image(p) for p in instance_paths]
    if len(instances) < 2:
        raise UserError(f"instance dir '{config['instance_dir']}' needs at least 2 images to measure style spread")
    scorer = Scorers(instances, learned, scorers or [])
    instances_hash = hashlib.sha256("".join(
        sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in instance_paths)).encode()).hexdigest()[:16]

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", None)
    eval_dir = run / "eval"
    eval_dir.mkdir(exist_ok=True)
    points: list[Point] = []
    base_class: list[Image.Image] | None = None
    models = _model_points(run, int(config["max_train_steps"]))
    n_images = sum(len(v) for v in prompts.by_kind().values()) * len(settings.seeds)
    with progress_bar("evaluating", len(models)) as bar:
        for step, name, spec in models:
            folder = eval_dir / name
            scores_file = folder / "scores.json"
            weights = config["base_model"] if spec == "base" else str(run / "model" if spec is None else run / "checkpoints" / spec)
            fingerprint: Any = model_identity(weights)
            if spec == "base":  # what load_run_base reads besides the weights
                fingerprint = {"weights": model_identity(weights, config.get("revision")),
                               "base_config": config.get("base_config")}
            identity = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()
            shared = None
            if spec == "base" and shared_base is not None:
                shared = shared_base / _base_key(identity, settings, instances_hash)
                if not scores_file.is_file() and (shared / "scores.json").is_file():
                    _adopt(shared, folder)
            cached = json.loads(scores_file.read_text()) if scores_file.is_file() else None
            metrics = None
            images = None
            if (
                cached
                and cached.get("settings") == settings.key()
                and cached.get("n_images") == n_images
                and cached.get("model") == identity
            ):
                images = _load_images(folder, prompts, settings.seeds)
                if images is None:
                    log.warning("stored images of %s are incomplete; generating them again", folder)
                elif (cached.get("scorers", []) == scorer.extra_names and cached.get("learned") == scorer.learned_id
                      and cached.get("instances") == instances_hash):
                    metrics = cached["metrics"]
                    scorer.skipped.update(cached.get("skipped") or {})  # why a metric is missing, as first scored
            if images is None:
                if spec == "base":
                    pipe = load_run_base(config, dtype)
                else:
                    pipe, _ = resolve_model(str(run), spec, dtype=dtype)
                pipe.scheduler = make_scheduler(settings.scheduler, pipe.scheduler.config)
                pipe = pipe.to(device)
                pipe.set_progress_bar_config(disable=True)
                folder.mkdir(parents=True, exist_ok=True)
                images = {}
                for kind, kind_prompts in prompts.by_kind().items():
                    images[kind] = []
                    for i, prompt in enumerate(kind_prompts):
                        outs = sample(pipe, prompt, settings.seeds, steps=settings.steps, guidance=settings.guidance,
                                      width=settings.resolution, height=settings.resolution)
                        for seed, image in zip(settings.seeds, outs):
                            save_png(image, folder / f"{kind}-{i:02d}-{seed:04d}.png")
                        images[kind] += outs
                del pipe
            if step == 0:
                base_class = images["class"]  # the reference for prior drift
            if metrics is None:  # new images, or stored images scored with other extra scorers or CLIP/DINO
                metrics = scorer.score(images, prompts.by_kind(), len(settings.seeds), base_class)
                record = {"settings": settings.key(), "model": identity, "n_images": n_images,
                          "scorers": scorer.extra_names, "learned": scorer.learned_id, "instances": instances_hash,
                          "metrics": metrics, "skipped": {k: v for k, v in scorer.skipped.items() if metrics.get(k) is None}}
                write_text_atomically(scores_file, json.dumps(record, indent=1))
            if shared is not None and not (shared / "scores.json").is_file():
                _publish(folder, shared)
            points.append(Point(step, name, metrics))
            if bar:
                bar.advance(0)
    choice = alarm = None
    if any(p.step > 0 for p in points):
        choice = choose_checkpoint(points)
        alarm = overfitting_alarm(points, choice)
        log.info("best checkpoint: %s (step %d): %s", choice.name, choice.step, choice.reason)
        if alarm.fired:
            log.warning("overfitting alarm at step %d: %s", alarm.step, "; ".join(alarm.reasons))
    agreement = judge_agreement(points, choice)
    if agreement is not None:
        log.info("judges vs weight-free style: Spearman %s over %d models; rule picked %s, judges' best %s",
                 format_rho(agreement.spearman), agreement.n, agreement.rule_pick, agreement.judges_best)
    for key, reason in scorer.skipped.items():
        log.info("metric %s skipped: %s", key, reason)
    result = RunEvaluation(run, points, choice, alarm, dict(scorer.skipped), settings, agreement)
    write_summary(result)
    return result


def _base_key(identity: str, settings: "EvalSettings", instances_hash: str) -> str:
    """Names a shared base evaluation: the same weights, settings and instance images give the same scores."""
    return hashlib.sha256(json.dumps([identity, settings.key(), instances_hash]).encode()).hexdigest()[:16]


def _publish(folder: Path, shared: Path) -> None:
    """Copy a finished base evaluation to the shared place in one step (a reader never sees half)."""
    tmp = shared.with_name(f".{shared.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(folder, tmp)
    try:
        os.replace(tmp, shared)
    except OSError:  # another sweep published it first
        shutil.rmtree(tmp, ignore_errors=True)


def _adopt(shared: Path, folder: Path) -> None:
    """Copy a shared base evaluation into a run, its scores last (they vouch for the images)."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in shared.iterdir():
        if f.name != "scores.json":
            shutil.copy2(f, folder / f.name)
    shutil.copy2(shared / "scores.json", folder / "scores.json")


def _load_images(folder: Path, prompts: PromptSet, seeds: list[int]) -> dict[str, list[Image.Image]] | None:
    """The stored images of one evaluated model, or None when any is missing or unreadable."""
    out: dict[str, list[Image.Image]] = {}
    try:
        for kind, kind_prompts in prompts.by_kind().items():
            out[kind] = [
                Image.open(folder / f"{kind}-{i:02d}-{s:04d}.png").convert("RGB")
                for i in range(len(kind_prompts)) for s in seeds
            ]
    except (OSError, ValueError):
        return None
    return out


def write_summary(result: RunEvaluation) -> Path:
    path = result.run / EVAL_SUMMARY
    data = {
        "settings": asdict(result.settings),
        "points": [asdict(p) for p in result.points],
        "choice": asdict(result.choice) if result.choice else None,
        "alarm": asdict(result.alarm) if result.alarm else None,
        "skipped": result.skipped,
        "judge_agreement": result.agreement.to_dict() if result.agreement else None,
    }
    write_text_atomically(path, json.dumps(data, indent=1))
    return path
