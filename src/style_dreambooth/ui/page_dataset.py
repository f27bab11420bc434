"""Dataset page: pick or upload images, see each one's problems, edit captions, check the identifier."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from ..errors import UserError
from ..models.tokenizer import analyze_identifier, find_identifier, format_identifier_report
from .context import UIContext, problem
from .dataset import inspect_folder, save_uploads, write_caption
from .workspace import DATASETS

CAPTION_HEADERS = ["image", "size", "problems", "caption"]


def identifier_check(ctx: UIContext, instance_prompt: str, class_prompt: str) -> str:
    """The `token` command's report for the prompt's identifier, as the user types."""
    if not instance_prompt.strip():
        return "Type the instance prompt, e.g. `yltcaxe artstyle`: its rare identifier is checked here."
    word = find_identifier(instance_prompt, class_prompt or None)
    if word is None:
        return "⚠️ every word of the instance prompt is in the class prompt; add a rare identifier"
    return format_identifier_report(analyze_identifier(ctx.tokenizer(), word)).replace("\n", "  \n")


def _show_folder(ctx: UIContext, folder_text: str):
    folder = ctx.ws.resolve(folder_text, "dataset folder")
    infos = inspect_folder(folder)
    gallery = []
    for info in infos:
        label = info.path.name + (f" · {info.size[0]}×{info.size[1]}" if info.size else "")
        if info.problems:
            label += " · ⚠️ " + "; ".join(info.problems)
        gallery.append((str(info.path) if info.usable else _placeholder(), label))
    rows = [[i.path.name, f"{i.size[0]}×{i.size[1]}" if i.size else "-", "; ".join(i.problems) or "ok", i.caption]
            for i in infos]
    bad = sum(1 for i in infos if i.problems)
    summary = f"{len(infos)} images in `{ctx.ws.relative(folder)}`" + (f", **{bad} with problems**" if bad else ", all usable")
    return gallery, rows, summary


def _placeholder():
    import numpy as np

    img = np.full((64, 64, 3), 200, np.uint8)
    idx = np.arange(64)
    img[idx, idx] = img[idx, 63 - idx] = (200, 0, 0)
    return img


def build(ctx: UIContext) -> dict[str, gr.components.Component]:
    existing = ctx.ws.folders(DATASETS)
    with gr.Row():
        pick = gr.Dropdown(existing, value=None, label="Existing dataset", elem_id="ds-pick", scale=1)
        folder = gr.Textbox(existing[0] if existing else f"{DATASETS}/my-style", label="Dataset folder",
                            info="Inside the workspace; uploads go here.", elem_id="ds-folder", scale=2)
        show = gr.Button("Show", elem_id="ds-show", scale=0)
    upload = gr.File(file_count="multiple", file_types=["image"], label=f"Upload images (at most {ctx.max_upload_mb:g} MB each)",
                     elem_id="ds-upload")
    status = gr.Markdown(elem_id="ds-status")
    gallery = gr.Gallery(label="Images (problems are named under each thumbnail)", columns=6, height="auto",
                         elem_id="ds-gallery", allow_preview=True)
    table = gr.Dataframe(headers=CAPTION_HEADERS, datatype="str", interactive=True, static_columns=[0, 1, 2],
                         label="Captions (the .txt file beside each image; edit, then save)", elem_id="ds-captions",
                         wrap=True)
    save = gr.Button("Save captions", elem_id="ds-save")
    with gr.Row():
        prompt = gr.Textbox(label="Instance prompt", placeholder="yltcaxe artstyle", elem_id="ds-instance-prompt")
        class_prompt = gr.Textbox(label="Class prompt (optional)", placeholder="artstyle", elem_id="ds-class-prompt")
    check = gr.Markdown(identifier_check(ctx, "", ""), elem_id="ds-identifier")
    use = gr.Button("Use this dataset and prompt for training", variant="primary", elem_id="ds-use")

    def on_show(folder_text):
        try:
            return (*_show_folder(ctx, folder_text),)
        except UserError as exc:
            return [], [], problem(exc)

    def on_upload(files, folder_text):
        try:
            target = ctx.ws.resolve(folder_text, "dataset folder")
            pairs = [(Path(f), Path(f).name) for f in (files or [])]
            saved, refused = save_uploads(pairs, target, ctx.max_upload_mb)
            gallery_items, rows, summary = _show_folder(ctx, folder_text)
            note = f"uploaded {len(saved)} images. " + " ".join(problem(r) for r in refused)
            return gallery_items, rows, note + "  \n" + summary, None
        except UserError as exc:
            return gr.skip(), gr.skip(), problem(exc), None

    def on_save(folder_text, rows):
        try:
            folder = ctx.ws.resolve(folder_text, "dataset folder")
            values = rows.values.tolist() if hasattr(rows, "values") else rows
            for name, _size, _problems, caption in values:
                image = ctx.ws.resolve(folder / Path(str(name)).name, "image")
                write_caption(image, str(caption or ""))
            return f"saved {len(values)} captions in `{ctx.ws.relative(folder)}`"
        except UserError as exc:
            return problem(exc)

    pick.change(lambda v: v or gr.skip(), pick, folder).then(on_show, folder, [gallery, table, status])
    show.click(on_show, folder, [gallery, table, status])
    folder.submit(on_show, folder, [gallery, table, status])
    upload.upload(on_upload, [upload, folder], [gallery, table, status, upload])
    save.click(on_save, [folder, table], status)
    for box in (prompt, class_prompt):
        box.input(lambda p, c: identifier_check(ctx, p, c), [prompt, class_prompt], check, show_progress="hidden",
                  trigger_mode="always_last")  # the check of the last keystroke always runs
    return {"folder": folder, "prompt": prompt, "class_prompt": class_prompt, "use": use, "pick": pick}
