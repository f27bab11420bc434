"""Two subjects in one picture, four ways, judged half by half.

1. ``prompt``: the prompt alone ("a yellow star and a purple heart, yltcaxe artstyle");
2. ``regions``: a layout whose left box asks for the first subject and right box for the second
   (regional prompts, ``sampling/regional_attention.py``);
3. ``controlnet``: the prompt, plus a sketch through the proof world's ControlNet: the layout's boxes
   filled with ink (``layout-sketch --style solid``), or a painted sketch of the two silhouettes, in ink
   or in the asked colours (``SKETCHES``);
4. ``both``: regions and the ControlNet together.

Success means both halves show the asked subject in the asked colour (the judges' verdict on
each half). With the token, the style hit of each half is the share of images whose half the
judges call yltcaxe. Pairs are of held-out subjects and colours (never in the instance images).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

from ..progress import progress_bar
from ..sampling.composition import Conditioning, Layout, Region, region_masks
from ..sampling.generate import sample
from ..sampling.sketch import draw_sketch
from .evaluate import GUIDANCE
from .judges import Judges, half_view
from .controlnet import painted_sketch
from .render import SIZE, Scene, random_subject
from .styles import ARTIST_STYLE

log = logging.getLogger(__name__)

WAYS: tuple[str, ...] = ("prompt", "regions", "controlnet", "both")
SKETCHES: tuple[str, ...] = ("boxes", "silhouettes", "colours")  # what the ControlNet's condition image shows
SILHOUETTE_SIZE = (12.0, 14.0)  # the sketch's subjects: as large as half the canvas holds
LEFT_HALF, RIGHT_HALF = (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)  # the regions: "left: A, right: B"
LEFT_BOX, RIGHT_BOX = (0.06, 0.28, 0.44, 0.72), (0.56, 0.28, 0.94, 0.72)  # the sketch: where each goes
BASE_WEIGHT = 0.3  # the pair prompt keeps a share inside each half (best of 0, 0.3, 0.5 measured)

Pair = tuple[tuple[str, str], tuple[str, str]]


def heldout_pairs(subjects: tuple[str, ...], colours: tuple[str, ...], n: int = 8) -> list[Pair]:
    """``n`` (left, right) pairs of two different subjects in two different colours, spread over all."""
    if len(subjects) < 2 or len(colours) < 2:
        raise ValueError(f"two-subject pairs need two subjects and two colours, not {subjects} and {colours}")
    kinds = list(itertools.permutations(subjects, 2))
    hues = list(itertools.permutations(colours, 2))
    picks = [(kinds[(5 * i) % len(kinds)], hues[i % len(hues)]) for i in range(n)]
    return [((k[0], c[0]), (k[1], c[1])) for k, c in picks]


def pair_layout(pair: Pair, suffix: str = "", boxes: tuple = (LEFT_HALF, RIGHT_HALF)) -> Layout:
    """The layout a user would write: the pair's prompt, and one region per subject with its own prompt."""
    (k1, c1), (k2, c2) = pair
    return Layout(
        prompt=f"a {c1} {k1} and a {c2} {k2}{suffix}", base_weight=BASE_WEIGHT, width=SIZE, height=SIZE,
        regions=[Region(prompt=f"a {c1} {k1}{suffix}", box=boxes[0]), Region(prompt=f"a {c2} {k2}{suffix}", box=boxes[1])],
    )


def sketch(layout: Layout) -> Image.Image:
    """The condition image the proof world's ControlNet reads: the subjects' boxes filled with ink
    (``layout-sketch --style solid`` of the same layout with the boxes where each subject goes)."""
    boxed = layout.model_copy(update={"regions": [r.model_copy(update={"box": b})
                                                  for r, b in zip(layout.regions, (LEFT_BOX, RIGHT_BOX))]})
    return draw_sketch(boxed, SIZE, SIZE, "solid")


def silhouette_sketch(pair: Pair, seed: int, coloured: bool = False) -> Image.Image:
    """A user's painted sketch of the pair: each subject's silhouette, as large as its half holds, filled
    with ink (or with its colour) at a place in that half, drawn by the renderer from ``seed``."""
    (k1, c1), (k2, c2) = pair
    rng = np.random.default_rng([seed, 4242])
    halves = ((0.0, SIZE / 2), (SIZE / 2, SIZE))
    subjects = tuple(random_subject(rng, k, c, region=half, size_range=SILHOUETTE_SIZE)
                     for (k, c), half in zip(pair, halves))
    return painted_sketch(Scene(subjects=subjects, background=(255, 255, 255), gradient=0.0), coloured)


def condition_image(layout: Layout, pair: Pair, kind: str, seed: int) -> Image.Image:
    """The ControlNet's condition image: the layout's box sketch, or a silhouette sketch of the pair."""
    if kind not in SKETCHES:
        raise ValueError(f"sketch kind {kind!r} is not one of {', '.join(SKETCHES)}")
    return sketch(layout) if kind == "boxes" else silhouette_sketch(pair, seed, coloured=kind == "colours")


def conditioning(way: str, layout: Layout, control_image: Image.Image) -> Conditioning:
    cond = Conditioning()
    if way in ("regions", "both"):
        cond = Conditioning([r.prompt for r in layout.regions], region_masks(layout, SIZE, SIZE), layout.base_weight)
    if way in ("controlnet", "both"):
        cond.control_images = [control_image]
        cond.control_scales = [1.0]
    return cond


@dataclass
class TwoSubjectScores:
    n: int
    success: float  # both halves right: subject and colour
    subjects: float  # both halves show the asked subject, whatever its colour
    left: float  # the left half right (subject and colour)
    right: float
    style_left: float  # the left half judged yltcaxe
    style_right: float

    def as_dict(self) -> dict:
        return asdict(self)


def score(judges: Judges, pairs: list[Pair], images: list[list[Image.Image]]) -> TwoSubjectScores:
    n = ok = kinds = lok = rok = sl = sr = 0
    for ((k1, c1), (k2, c2)), ims in zip(pairs, images):
        left = judges.judge([half_view(im, "left") for im in ims])
        right = judges.judge([half_view(im, "right") for im in ims])
        for lv, rv in zip(left, right):
            a, b = (lv.subject, lv.colour) == (k1, c1), (rv.subject, rv.colour) == (k2, c2)
            n, ok, lok, rok = n + 1, ok + (a and b), lok + a, rok + b
            kinds += lv.subject == k1 and rv.subject == k2
            sl, sr = sl + (lv.style == ARTIST_STYLE), sr + (rv.style == ARTIST_STYLE)
    d = max(1, n)
    return TwoSubjectScores(n, ok / d, kinds / d, lok / d, rok / d, sl / d, sr / d)


def measure(pipe, control_pipe, judges: Judges, pairs: list[Pair], seeds: list[int], suffix: str = "",
            ways: tuple[str, ...] = WAYS, steps: int = 20, label: str = "two subjects", sketch_kind: str = "boxes"
            ) -> tuple[dict[str, TwoSubjectScores], dict[str, list[list[Image.Image]]]]:
    """Scores and images per way; ``control_pipe`` is ``pipe``'s ControlNet pipeline (None: skip those ways).
    ``sketch_kind``: the ControlNet reads the layout's boxes, or a silhouette sketch of each pair."""
    scores, images = {}, {}
    ways = tuple(w for w in ways if control_pipe is not None or w not in ("controlnet", "both"))
    layouts = [pair_layout(pair, suffix) for pair in pairs]
    controls = [condition_image(layout, pair, sketch_kind, 90_000 + i) if control_pipe is not None else None
                for i, (layout, pair) in enumerate(zip(layouts, pairs))]
    with progress_bar(label, len(ways) * len(pairs) * len(seeds)) as bar, torch.no_grad():
        for way in ways:
            runner = control_pipe if way in ("controlnet", "both") else pipe
            images[way] = []
            for layout, control in zip(layouts, controls):
                images[way].append(sample(runner, layout.prompt, seeds, steps=steps, guidance=GUIDANCE, width=SIZE,
                                          height=SIZE, batch_size=16, conditioning=conditioning(way, layout, control)))
                if bar:
                    bar.advance(0, len(seeds))
            scores[way] = score(judges, pairs, images[way])
            log.info("%s, %s: %s", label, way, scores[way])
    return scores, images


def toy_controlnet_pipeline(pipe, folder=None):
    """``pipe`` with the shipped tiny ControlNet, or the one in ``folder`` (diffusers' ControlNet
    pipeline over the same parts)."""
    from ..sampling.control import controlnet_pipeline, load_controlnet
    from .controlnet import controlnet_dir

    net = load_controlnet(str(folder or controlnet_dir()), pipe.unet, "proof-world model", pipe.unet.dtype)
    control = controlnet_pipeline(pipe, [net])
    control.set_progress_bar_config(disable=True)
    return control
