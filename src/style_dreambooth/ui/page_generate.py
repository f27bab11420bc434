"""Generate page: a run (or model) and checkpoint, stacked LoRAs, prompt and sampler settings -> images.

Generation runs `style-dreambooth generate` as a separate process, like training, so the UI never
holds the model; the images land in generated/<run>-<time>/ with their parameters in each PNG.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr
from PIL import Image

from ..config import MAX_SEED
from ..errors import UserError
from ..sampling.images import SCHEDULERS
from .commands import generate_argv, run_generate
from .context import UIContext, problem
from .runs import checkpoint_choices
from .workspace import MODELS, RUNS

LORA_ROWS = 3


def model_choices(ctx: UIContext) -> list[str]:
    """Runs and models in the workspace (a diffusers folder or a single .safetensors file)."""
    models = [ctx.ws.relative(p) for p in sorted((ctx.ws.root / MODELS).glob("*"))
              if (p / "model_index.json").is_file() or p.suffix == ".safetensors"]
    return ctx.ws.folders(RUNS) + models


def lora_choices(ctx: UIContext) -> list[str]:
    found = sorted((ctx.ws.root / RUNS).glob("*/model/lora.safetensors")) + sorted((ctx.ws.root / "loras").glob("*.safetensors"))
    return [ctx.ws.relative(p) for p in found]


def image_parameters(path: Path) -> str:
    """The A1111-style `parameters` text chunk `generate` writes into each PNG."""
    with Image.open(path) as img:
        return str(img.info.get("parameters", ""))


def build(ctx: UIContext) -> dict[str, gr.components.Component]:
    with gr.Row():
        model = gr.Dropdown(model_choices(ctx), label="Run or model", elem_id="gen-model", allow_custom_value=True)
        checkpoint = gr.Dropdown([], label="Checkpoint", info="final, latest, best (after Evaluate) or step-N",
                                 elem_id="gen-checkpoint", allow_custom_value=True)
    loras = []
    with gr.Accordion("LoRAs (stacked in order, each with its scale)", open=False):
        for i in range(LORA_ROWS):
            with gr.Row():
                loras.append(gr.Dropdown(lora_choices(ctx), value=None, label=f"LoRA {i + 1}", allow_custom_value=True,
                                         elem_id=f"gen-lora-{i}"))
                loras.append(gr.Slider(-2.0, 2.0, value=1.0, step=0.05, label="Scale", elem_id=f"gen-lora-scale-{i}"))
    prompt = gr.Textbox(label="Prompt", placeholder="a boy in yltcaxe artstyle", elem_id="gen-prompt")
    negative = gr.Textbox(label="Negative prompt", elem_id="gen-negative")
    with gr.Row():
        n = gr.Number(4, label="Images", precision=0, minimum=1, maximum=64, elem_id="gen-n")
        seed = gr.Number(0, label="Seed", precision=0, minimum=0, maximum=MAX_SEED, elem_id="gen-seed")
        steps = gr.Number(25, label="Steps", precision=0, minimum=1, maximum=1000, elem_id="gen-steps")
        guidance = gr.Number(None, label="Guidance (blank: the model's, 7.5; FLUX.1-dev 3.5)", minimum=0, maximum=100,
                             elem_id="gen-guidance")
        scheduler = gr.Dropdown(["auto", *SCHEDULERS], value="auto", label="Scheduler (auto: the model's)",
                                elem_id="gen-scheduler")
    go = gr.Button("Generate", variant="primary", elem_id="gen-start")
    status = gr.Markdown(elem_id="gen-status")
    gallery = gr.Gallery(label="Images (caption: parameters)", columns=4, elem_id="gen-gallery", height=360,
                         object_fit="contain")
    params = gr.Textbox(label="Parameters of each image", lines=4, elem_id="gen-params")

    def on_model(model_text):
        try:
            folder = ctx.ws.resolve(model_text or "", "model")
        except UserError:
            return gr.update(choices=[], value=None)
        choices = checkpoint_choices(folder) if (folder / "config.yaml").is_file() else []
        return gr.update(choices=choices, value=choices[0] if choices else None)

    def on_generate(model_text, checkpoint_name, prompt_text, negative_text, n_images, seed_value, n_steps, cfg,
                    scheduler_name, *lora_values, progress=gr.Progress()):
        try:
            stack = [(f, s) for f, s in zip(lora_values[::2], lora_values[1::2]) if f]
            argv, out = generate_argv(ctx, model_text, checkpoint_name, stack, prompt_text, negative_text, n_images,
                                      seed_value, n_steps, cfg, scheduler_name)
            progress(0.1, desc="generating (a separate process loads the model)")
            run_generate(argv)
        except UserError as exc:
            return problem(exc), gr.skip(), gr.skip()
        images = sorted(p for p in out.glob("*.png") if p.name != "grid.png")
        texts = [image_parameters(p) for p in images]
        return (f"wrote {len(images)} images to `{ctx.ws.relative(out)}`", [(str(p), t) for p, t in zip(images, texts)],
                "\n\n".join(f"{p.name}: {t}" for p, t in zip(images, texts)))

    def on_load():
        return gr.update(choices=model_choices(ctx)), *[gr.update(choices=lora_choices(ctx))] * LORA_ROWS

    model.change(on_model, model, checkpoint)
    go.click(on_generate, [model, checkpoint, prompt, negative, n, seed, steps, guidance, scheduler, *loras],
             [status, gallery, params])
    return {"model": model, "load": on_load, "lora_dropdowns": loras[::2], "prompt": prompt}
