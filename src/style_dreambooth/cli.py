"""Command line: parse, call the library, report. User errors print one line and exit 2."""

from __future__ import annotations

import logging
import os
import sys
import typing
import warnings
from pathlib import Path
from typing import Any

import click

from .config import MAX_SEED, TrainConfig, build_config, field_aliases, read_yaml
from .errors import UserError


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    level = logging.DEBUG if verbose else logging.INFO
    handler = RichHandler(show_path=False, rich_tracebacks=False, markup=False)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s")
    logging.getLogger("style_dreambooth").setLevel(level)
    for noisy in ("diffusers", "transformers", "accelerate", "huggingface_hub", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def _quiet_libraries() -> None:
    """Our own rich bars report progress; silence the libraries' tqdm bars."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


def _is_bool(annotation: Any) -> bool:
    """A yes/no option: bool, or bool | None (unset: a default that depends on something else)."""
    return annotation is bool or set(typing.get_args(annotation)) == {bool, type(None)}


def _is_list(annotation: Any) -> bool:
    return typing.get_origin(annotation) is list


def _metavar(annotation: Any) -> str:
    """What a TrainConfig field takes, for --help (pydantic converts and checks the value itself)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return "[" + "|".join(str(a) for a in args) + "]"
    if args and typing.get_origin(annotation) is not list:  # X | None
        return _metavar(args[0])
    return {int: "INTEGER", float: "FLOAT", Path: "PATH"}.get(annotation, "TEXT")


def _config_options(func):
    """Add one option per TrainConfig field (dashed spelling, plus its aliases).

    Every option defaults to None so that only flags the user gave override the config file.
    """
    for name in reversed(list(TrainConfig.model_fields)):
        field = TrainConfig.model_fields[name]
        flags = [f"--{alias.replace('_', '-')}" for alias in field_aliases(name)]
        help_text = field.description or ""
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        if default not in (None, []):
            help_text += f" [default: {','.join(default) if isinstance(default, list) else default}]"
        if _is_bool(field.annotation):
            plain = flags[0][2:]
            off = "--no-" + plain.removeprefix("with-").removeprefix("use-")
            option = click.Option([f"{flags[0]}/{off}", *flags[1:], name], default=None, show_default=False, help=help_text)
        elif _is_list(field.annotation):
            option = click.Option([*flags, name], multiple=True, default=None, show_default=False, help=help_text,
                                  metavar="TEXT")
        else:
            option = click.Option([*flags, name], default=None, show_default=False, help=help_text,
                                  metavar=_metavar(field.annotation))
        func.__click_params__ = getattr(func, "__click_params__", [])
        func.__click_params__.append(option)
    return func



@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.version_option(package_name="style-dreambooth")
def app(verbose: bool) -> None:
    """Learn an artist's style with DreamBooth on Stable Diffusion, then paint new subjects in it."""
    _setup_logging(verbose)


@app.command()
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="YAML file of options; flags win.")
@_config_options
def train(config_file: Path | None, **flags: Any) -> None:
    """Fine-tune a model (SD 1.x, 2.x, SDXL, FLUX.1) on a folder of style images (DreamBooth)."""
    from .training.loop import train as run_training

    _quiet_libraries()
    given = {k: (list(v) if isinstance(v, tuple) else v) for k, v in flags.items() if v not in (None, ())}
    file_values = read_yaml(config_file) if config_file else {}
    out = given.get("output_dir", file_values.get("output_dir"))
    if given.get("resume_from_checkpoint") and out and (Path(out) / "config.yaml").is_file():
        # Resuming: the run's own resolved config is the base; the file and flags go on top. The family is
        # read again from the base model's files when they name it, so a resume on another family's model
        # is named as such.
        saved = read_yaml(Path(out) / "config.yaml")
        base_model = given.get("base_model", file_values.get("base_model", saved.get("base_model")))
        if base_model:
            from .models.backbones import detect_family

            if detect_family(str(base_model), saved.get("revision")) is not None:
                saved.pop("backbone", None)
        file_values = {**saved, **file_values}
    cfg = build_config(file_values, given)
    model_dir = run_training(cfg)
    click.echo(f"done: {model_dir}")


@app.command()
@click.option("--model", required=True, help="Run folder, diffusers folder, .safetensors file or hub id.")
@click.option("--prompt", default=None, help="What to paint (with --layout: the layout's global prompt by default).")
@click.option("--negative-prompt", default="", help="What to avoid.")
@click.option("-n", "--num-images", "n", default=4, show_default=True, type=click.IntRange(1, 1000))
@click.option("--steps", default=25, show_default=True, type=click.IntRange(1, 1000))
@click.option("--guidance", default=None, type=click.FloatRange(0, 100),
              help="Classifier-free guidance scale [default: 7.5]. FLUX.1-dev: the distilled guidance the transformer "
              "is conditioned on [default: 3.5]; FLUX.1-schnell takes none.")
@click.option(
    "--scheduler", default=None, type=click.Choice(["dpm++", "ddim", "euler-a", "pndm", "flow-euler"]),
    help="Sampler [default: dpm++; flow-euler for flow-matching families (FLUX.1), the only one they take].",
)
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, MAX_SEED))
@click.option("--width", type=click.IntRange(8, 4096), default=None, help="Default: the model's native size.")
@click.option("--height", type=click.IntRange(8, 4096), default=None, help="Default: the model's native size.")
@click.option("--checkpoint", default=None,
              help="With a run folder: 'best' (after evaluate), 'latest' or step-N instead of the final model.")
@click.option("--allow-pickle", is_flag=True, help="Allow loading pickle (.ckpt/.bin) models.")
@click.option("--base-config", default=None,
              help="With a single-file --model: a diffusers folder or hub id of the same architecture for its configs "
              "(FLUX.1's transformer-only file also takes its VAE, text encoders and scheduler from it).")
@click.option("--lora", multiple=True, help="LoRA file to apply, FILE[:SCALE]; repeat to stack several.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for the PNGs and grid.png.")
@click.option("--overwrite", is_flag=True, help="Replace PNGs of the same seeds from an earlier run in --out.")
@click.option("--layout", type=click.Path(path_type=Path), default=None,
              help="YAML/JSON layout: regions (box or mask) each with its own prompt, optional control images.")
@click.option("--control", multiple=True, type=click.Path(path_type=Path),
              help="Condition image (a sketch, a drawing) for the ControlNet of the same position; repeat to stack.")
@click.option("--controlnet", multiple=True,
              help="ControlNet for the --control of the same position: hub id, folder or .safetensors file.")
@click.option("--control-scale", multiple=True, type=click.FloatRange(0, 10),
              help="ControlNet conditioning scale: one for all, or one per --control [default: 1.0].")
def generate(**kw: Any) -> None:
    """Paint images with a trained model; each PNG carries its parameters (A1111 style)."""
    from .sampling.generate import GenerateRequest, generate as run_generate

    _quiet_libraries()
    paths = run_generate(GenerateRequest(**kw))
    click.echo(f"wrote {len(paths)} images and grid.png to {kw['out']}")


@app.command("layout-sketch")
@click.argument("layout", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The PNG to write.")
@click.option("--width", type=click.IntRange(8, 4096), default=None, help="Default: the layout's, else 512.")
@click.option("--height", type=click.IntRange(8, 4096), default=None, help="Default: the layout's, else 512.")
@click.option("--style", type=click.Choice(["outline", "solid", "segments", "colours"]), default="outline",
              show_default=True, help="Outlines (scribble, lineart), ink-filled regions (the proof world's ControlNet), "
              "one flat colour per region (seg), or each region in its own `colour` (a colour drawing).")
@click.option("--white-on-black", is_flag=True, help="White lines on black, as scribble/lineart/canny ControlNets expect.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
def layout_sketch(layout: Path, out: Path, width: int | None, height: int | None, style: str, white_on_black: bool,
                  overwrite: bool) -> None:
    """Draw a condition image for --control from a layout file's regions."""
    from .sampling.composition import load_layout
    from .sampling.images import save_png
    from .sampling.sketch import draw_sketch

    spec = load_layout(layout)
    if not spec.regions:
        raise UserError(f"layout file '{layout}' has no regions to draw")
    if out.exists() and (out.is_dir() or not overwrite):
        raise UserError(f"--out '{out}' already exists; pass --overwrite or another path" if not out.is_dir()
                        else f"--out '{out}' is a folder; pass a .png file path")
    if out.suffix.lower() != ".png":
        raise UserError(f"--out '{out}' must end in .png")
    w, h = width or spec.width or 512, height or spec.height or 512
    image = draw_sketch(spec, w, h, style, white_on_black)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_png(image, out)
    click.echo(f"wrote {w}x{h} {style} sketch of {len(spec.regions)} regions to {out}")


@app.command("random-model")
@click.option("--shape", default="tiny", show_default=True,
              help="A shape a family declares, e.g. tiny, sd15 (sd1); sdxl-tiny, sdxl; flux-tiny, flux-dev (full "
              "shapes: the published parameter counts); an unknown one lists them all.")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True)
@click.option("--prediction-type", type=click.Choice(["epsilon", "v_prediction"]), default="epsilon", show_default=True)
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
              help="The weights' precision (flux-dev: bf16, 34 GB on disk).")
@click.option("--device", default="cpu", show_default=True, help="Where the weights are drawn (cuda: seconds for flux-dev).")
@click.option("--overwrite", is_flag=True, help="Replace an existing folder.")
@click.argument("out", type=click.Path(path_type=Path))
def random_model(shape: str, seed: int, prediction_type: str, dtype: str, device: str, overwrite: bool,
                 out: Path) -> None:
    """Build a random-weight pipeline of any family (real CLIP tokenizer) for offline smoke tests."""
    from .models.random_model import save_random_model

    _quiet_libraries()
    path = save_random_model(shape, out, seed=seed, prediction_type=prediction_type, overwrite=overwrite,
                             dtype=dtype, device=device)
    click.echo(f"wrote random {shape} model to {path}")


def _eval_options(func):
    func = click.option("--prompts", "prompt_file", type=click.Path(path_type=Path), default=None,
                        help="Subjects (.txt, one per line) or YAML with token/plain/class prompt lists.")(func)
    func = click.option("--seeds", default="0,1,2,3", show_default=True, help="Comma-separated seeds per prompt.")(func)
    func = click.option("--steps", default=25, show_default=True, type=click.IntRange(1, 1000))(func)
    func = click.option("--clip", default="openai/clip-vit-base-patch32", show_default=True,
                        help="CLIP weights for CLIP-T/CLIP-I (hub id or folder); 'none' to skip.")(func)
    func = click.option("--dino", default="facebook/dinov2-small", show_default=True,
                        help="DINO weights (hub id or folder); 'none' to skip.")(func)
    func = click.option("--judges", default="none", show_default=True,
                        help="Extra scorers to add: 'toyworld' (the proof world's ground-truth judges), "
                             "a module:callable that returns a scorer, or 'none'.")(func)
    return func


def _eval_kwargs(prompt_file, seeds: str, steps: int, clip: str, dino: str, judges: str) -> dict[str, Any]:
    from . import toyworld  # noqa: F401 - registers the proof world's judges as --judges toyworld
    from .evaluation.learned import LearnedMetrics
    from .evaluation.scorers import judge_scorers

    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds '{seeds}' must be comma-separated integers") from None
    if not seed_list:
        raise UserError("--seeds needs at least one seed")
    if not all(0 <= s <= MAX_SEED for s in seed_list):
        raise UserError(f"--seeds '{seeds}': each seed must be between 0 and {MAX_SEED}")
    scorers = judge_scorers(judges)
    learned = LearnedMetrics.load(clip=None if clip == "none" else clip, dino=None if dino == "none" else dino)
    return {"prompt_file": prompt_file, "seeds": seed_list, "steps": steps, "learned": learned, "scorers": scorers}


@app.command()
@click.argument("run", type=click.Path(path_type=Path))
@_eval_options
def evaluate(run: Path, prompt_file, seeds: str, steps: int, clip: str, dino: str, judges: str) -> None:
    """Score every checkpoint of RUN, pick the best, warn of overfitting; writes RUN/report.html."""
    from .evaluation.agreement import format_rho
    from .evaluation.evaluate import evaluate_run
    from .reports.html import write_report

    _quiet_libraries()
    result = evaluate_run(run, **_eval_kwargs(prompt_file, seeds, steps, clip, dino, judges))
    report = write_report([result], run, f"Evaluation: {run.name}")
    if result.choice:
        click.echo(f"best checkpoint: {result.choice.name} (step {result.choice.step}): {result.choice.reason}")
    if result.alarm and result.alarm.fired:
        click.echo(f"overfitting alarm at step {result.alarm.step}: {'; '.join(result.alarm.reasons)}")
    if result.agreement:
        a = result.agreement
        click.echo(f"judges: rank correlation {format_rho(a.spearman)} over {a.n} models; "
                   f"rule picked {a.rule_pick}, judges rank {a.judges_best} best")
    click.echo(f"report: {report}")


@app.command()
@click.option("--config", "config_file", required=True, type=click.Path(path_type=Path), help="Base YAML config.")
@click.option("--grid", multiple=True, help="key=v1,v2 (repeatable): the values to sweep.")
@click.option("--runs", "runs_file", type=click.Path(path_type=Path), default=None,
              help="YAML file of named variants (name: {key: value, ...}), e.g. an ablation; combines with --grid.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Sweep folder (runs/ and report.html).")
@_eval_options
def sweep(config_file: Path, grid: tuple[str, ...], runs_file: Path | None, out: Path, prompt_file, seeds: str,
          steps: int, clip: str, dino: str, judges: str) -> None:
    """Train and evaluate a grid or a list of runs (resumable) into one report.html."""
    from .sweep import parse_grid, read_runs_file, run_sweep

    _quiet_libraries()
    runs = read_runs_file(runs_file) if runs_file else None
    report = run_sweep(config_file, parse_grid(list(grid)), out, runs=runs,
                       eval_kwargs=_eval_kwargs(prompt_file, seeds, steps, clip, dino, judges))
    click.echo(f"report: {report}")


@app.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--to", "fmt", type=click.Choice(["single-file"]), default="single-file", show_default=True)
@click.option("--checkpoint", default=None, help="Export a checkpoint (latest or step-N) instead of the final model.")
@click.option("--half", is_flag=True, help="Store half-precision weights (half the size): fp16 for SD 1.x, 2.x and "
              "SDXL; bf16 for FLUX.1, as BFL ships flux1-dev.safetensors.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.argument("out", type=click.Path(path_type=Path))
def export(run: Path, fmt: str, checkpoint: str | None, half: bool, overwrite: bool, out: Path) -> None:
    """Write a full fine-tuned model as one .safetensors in its original layout (A1111, ComfyUI).

    SD 1.x, 2.x and SDXL: the whole checkpoint (UNet, VAE, text encoders). FLUX.1: the transformer only, in
    Black Forest Labs' layout, as BFL ships flux1-dev.safetensors (ComfyUI: models/diffusion_models); train
    --base-model FILE or generate --model FILE read it with --base-config <FLUX.1 diffusers folder or hub id>
    for the other parts."""
    from .models.single_file import export_single_file
    from .sampling.generate import resolve_model

    _quiet_libraries()
    from .models.backbones import backbone_of

    pipe, label = resolve_model(str(run), checkpoint)
    if getattr(backbone_of(pipe).denoiser(pipe), "peft_config", None):
        raise UserError(f"'{run}' is a LoRA run; its model/lora.safetensors already loads in A1111 and ComfyUI")
    path = export_single_file(pipe, out, half=half, overwrite=overwrite)
    click.echo(f"wrote {label} as {path}")


@app.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("demo-out"), show_default=True)
@click.option("--steps", type=click.IntRange(1, 100000), default=None, help="Training steps (default: the demo's).")
def demo(out: Path, steps: int | None) -> None:
    """Offline proof-world demo: fine-tune the bundled tiny base on a toy artist style, judge, write HTML."""
    from .toyworld.demo import run_demo

    _quiet_libraries()
    click.echo(f"demo page: {run_demo(out, steps=steps)}")


@app.command()
@click.argument("word")
@click.option("--base-model", default=None, help="Use this model's tokenizer (default: the SD 1.x CLIP tokenizer).")
def token(word: str, base_model: str | None) -> None:
    """Show how WORD tokenizes and suggest single-token rare identifiers."""
    from .models.tokenizer import analyze_identifier, build_clip_tokenizer, format_identifier_report

    if not word.strip():
        raise UserError("WORD is empty; pass the identifier to check, e.g. 'style-dreambooth token yltcaxe'")

    if base_model:
        from .models.loading import load_pipeline

        tokenizer = load_pipeline(base_model).tokenizer
    else:
        tokenizer = build_clip_tokenizer()
    click.echo(format_identifier_report(analyze_identifier(tokenizer, word)))


@app.command()
@click.option("--workspace", type=click.Path(path_type=Path), default=Path("style-dreambooth-workspace"),
              show_default=True, help="Folder that holds every file the UI reads or writes.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to serve on; anything but 127.0.0.1 lets other machines in.")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="Port (default: 7860 or the next free one).")
@click.option("--share", is_flag=True, help="Also open a public Gradio share link (anyone with it can use the app).")
@click.option("--max-upload-mb", type=click.FloatRange(0.1, 1024), default=20.0, show_default=True,
              help="Largest image file accepted by upload.")
def ui(workspace: Path, host: str, port: int | None, share: bool, max_upload_mb: float) -> None:
    """Web app (Gradio): dataset, training, evaluation, sweeps and generation. Needs pip install -e ".[ui]"."""
    try:
        from .ui.app import launch
    except ModuleNotFoundError as exc:
        if exc.name not in ("gradio", "pandas", "fastapi"):
            raise
        raise UserError(f"the UI needs the 'ui' extra ({exc.name} is missing); run: pip install -e \".[ui]\"") from None
    launch(workspace, host=host, port=port, share=share, max_upload_mb=max_upload_mb)


def dash_option_names(argv: list[str]) -> list[str]:
    """Accept diffusers-style `--snake_case` flags by rewriting the flag name (never its value)."""
    out = []
    for arg in argv:
        if arg.startswith("--") and "_" in arg.split("=", 1)[0]:
            name, sep, value = arg.partition("=")
            arg = name.replace("_", "-") + sep + value
        out.append(arg)
    return out


def refuse_undecodable(argv: list[str]) -> None:
    """Bytes that are not UTF-8 reach Python as lone surrogates, which no tokenizer or file format takes:
    refuse such an argument (a prompt, say) unless it names an existing file."""
    for arg in argv:
        value = arg.partition("=")[2] if arg.startswith("--") and "=" in arg else arg
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            if not os.path.lexists(value):
                shown = value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                raise UserError(f"argument '{shown}' holds bytes that are not UTF-8 text; write it in UTF-8") from None


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors with exit code 2 for user errors."""
    argv = dash_option_names(sys.argv[1:] if argv is None else argv)
    # diffusers passes huggingface_hub an argument it deprecated; the warning is no news to a user.
    warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*", category=UserWarning)
    try:
        refuse_undecodable(argv)
        app.main(args=argv, prog_name="style-dreambooth", standalone_mode=False)
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(UserError.exit_code)
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort):
        click.echo("interrupted; finished class images and checkpoints are kept: run the same command again "
                   "(a run with checkpoints then says how to resume it)", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
