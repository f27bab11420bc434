"""The web app: four pages over one workspace, served on 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import logging
import mimetypes
import os
from pathlib import Path

from ..errors import UserError
from .context import UIContext
from .workspace import Workspace

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
# What the workspace-file route serves: reports and the images they show, nothing a user uploaded as HTML.
_SERVED_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".svg", ".css"})
_SERVED_PAGES = frozenset({"report.html"})


def build_app(ctx: UIContext):
    import gradio as gr

    from . import page_dataset, page_evaluate, page_generate, page_train

    with gr.Blocks(title="Style-DreamBooth", analytics_enabled=False) as demo:
        gr.Markdown(f"# Style-DreamBooth\nWorkspace: `{ctx.ws.root}`: every file the app reads or writes is in it.")
        with gr.Tabs(elem_id="pages") as tabs:
            with gr.Tab("Dataset", id="dataset", elem_id="tab-dataset"):
                dataset = page_dataset.build(ctx)
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                train = page_train.build(ctx)
            with gr.Tab("Evaluate", id="evaluate", elem_id="tab-evaluate"):
                evaluate = page_evaluate.build(ctx)
            with gr.Tab("Generate", id="generate", elem_id="tab-generate"):
                generate = page_generate.build(ctx)

        form = train["inputs"]
        dataset["use"].click(
            lambda folder, prompt, klass: (folder, prompt, klass, gr.Tabs(selected="train")),
            [dataset["folder"], dataset["prompt"], dataset["class_prompt"]],
            [form["instance_dir"], form["instance_prompt"], form["class_prompt"], tabs],
        )
        # A reload or a restart re-attaches: what to show is read again from the workspace, and a
        # training in progress brings its page to the front.
        demo.load(lambda: gr.Tabs(selected="train") if page_train.training_now(ctx) else gr.skip(), None, tabs)
        demo.load(train["load"], None, train["watch"])
        demo.load(evaluate["load"], None, [evaluate["run"], evaluate["base_run"]])
        demo.load(generate["load"], None, [generate["model"], *generate["lora_dropdowns"]])
    return demo


def serve_workspace_file(ws: Workspace, rel: str) -> tuple[Path, str]:
    """The file and media type for a report or image under the workspace; UserError for anything else."""
    path = ws.resolve(rel, "file")
    if not path.is_file() or not (path.suffix.lower() in _SERVED_SUFFIXES or path.name in _SERVED_PAGES):
        raise UserError(f"'{rel}' is not a report or image in the workspace")
    return path, mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def _add_file_route(app, ws: Workspace) -> None:
    from fastapi.responses import FileResponse, PlainTextResponse

    from .page_evaluate import FILE_ROUTE

    def workspace_file(path: str):
        try:
            found, media = serve_workspace_file(ws, path)
        except UserError as exc:
            return PlainTextResponse(str(exc), status_code=404)
        return FileResponse(found, media_type=media)

    app.add_api_route(FILE_ROUTE + "/{path:path}", workspace_file, methods=["GET"])
    # Gradio's own routes come first in the list; ours must match before any catch-all.
    app.router.routes.insert(0, app.router.routes.pop())


def launch(workspace: Path, host: str = DEFAULT_HOST, port: int | None = None, share: bool = False,
           max_upload_mb: float = 20.0, block: bool = True):
    """Serve the app. Returns (app, local_url) when `block` is False (tests); else serves until Ctrl-C."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    ws = Workspace.create(workspace)
    # Training and evaluation processes keep their class-image and evaluation caches in the workspace too.
    os.environ["STYLE_DREAMBOOTH_CACHE"] = str(ws.root / ".cache")
    # Gradio's copies of uploads and served images too (read when gradio is first imported, just below).
    os.environ["GRADIO_TEMP_DIR"] = str(ws.root / ".gradio")
    ctx = UIContext(ws, max_upload_mb)
    demo = build_app(ctx)
    if host != DEFAULT_HOST:
        log.warning("serving on %s: anyone who can reach this address can train and read the workspace", host)
    app, local_url, share_url = demo.launch(
        server_name=host, server_port=port, share=share, allowed_paths=[str(ws.root)],
        max_file_size=f"{max_upload_mb:g}mb", prevent_thread_lock=True, quiet=True, footer_links=[],
    )
    _add_file_route(app, ws)
    log.info("Style-DreamBooth UI on %s (workspace %s)", local_url, ws.root)
    if share_url:
        log.warning("public share link: %s", share_url)
    if not block:
        return demo, local_url
    try:
        demo.block_thread()
    finally:
        demo.close()
    return demo, local_url
