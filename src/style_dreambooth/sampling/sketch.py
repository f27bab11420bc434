"""`layout-sketch`: a condition image drawn from a layout, so "left: a girl, right: a boy" becomes a
ControlNet input without a drawing program: outlines (black on white, like a pen drawing; or white
on black, as scribble, lineart and canny ControlNets expect), solid regions (filled with ink, as
the proof world's ControlNet reads a layout), segments (a flat colour each, as segmentation
ControlNets expect) or colours (each region filled with its own ``colour``, as a colour drawing)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageColor, ImageDraw, ImageFilter

from .composition import Layout, box_pixels, region_masks

FILL_COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
                (240, 50, 230), (210, 245, 60))


def line_width(width: int, height: int) -> int:
    """2 px on the proof world's 64 px canvas, 8 px at 512."""
    return max(2, round(min(width, height) / 64))


STYLES = ("outline", "solid", "segments", "colours")


def fill(region, index: int, style: str, ink: tuple[int, int, int]) -> tuple[int, int, int]:
    """A region's colour in the sketch: its segment colour, its own ``colour`` (ink where it has none), or ink."""
    if style == "segments":
        return FILL_COLOURS[index % len(FILL_COLOURS)]
    if style == "colours" and region.colour is not None:
        return ImageColor.getrgb(region.colour)[:3]
    return ink


def draw_sketch(layout: Layout, width: int, height: int, style: str = "outline", white_on_black: bool = False
                ) -> Image.Image:
    """The layout's regions as an RGB image of ``width`` x ``height``."""
    if style not in STYLES:
        raise ValueError(f"unknown sketch style {style!r}")
    ink, paper = ((255, 255, 255), (0, 0, 0)) if white_on_black else ((0, 0, 0), (255, 255, 255))
    canvas = Image.new("RGB", (width, height), paper)
    draw = ImageDraw.Draw(canvas)
    masks = region_masks(layout, width, height)
    lw = line_width(width, height)
    for i, region in enumerate(layout.regions):
        colour = fill(region, i, style, ink)
        if region.box is not None:
            box = box_pixels(region.box, width, height, f"region {i}")
            x0, y0, x1, y1 = box[0], box[1], box[2] - 1, box[3] - 1
            if style != "outline":
                draw.rectangle((x0, y0, x1, y1), fill=colour)
            else:
                draw.rectangle((x0, y0, x1, y1), outline=colour, width=lw)
            continue
        solid = masks[i].numpy() > 0.5
        if style == "outline":
            inner = Image.fromarray(solid.astype(np.uint8) * 255).filter(ImageFilter.MinFilter(2 * lw - 1))
            solid = solid & ~(np.asarray(inner) > 0)
        arr = np.asarray(canvas).copy()
        arr[solid] = colour
        canvas = Image.fromarray(arr)
        draw = ImageDraw.Draw(canvas)
    return canvas
