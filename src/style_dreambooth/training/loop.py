"""The one training loop: DreamBooth with prior preservation, read top to bottom.

`_train` runs six phases: setup (inputs, run folder, accelerator) -> data (instance and class
images) -> models (the family's modules, latents, what trains) -> optimiser (and a resumed state)
-> loop (steps: log, sample, checkpoint) -> save (the final model). Everything that differs between
model families is behind `models.backbones`; nothing here names a family. Only the main process
writes files.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

from ..config import TrainConfig
from ..data.dataset import (
    CaptionRules, Example, ImageBank, SampleOrder, instance_examples, make_batch, sample_numbers,
)
from ..data.images import list_images
from ..data.latent_cache import LatentEncoder
from ..errors import UserError
from ..files import disk_full_is_user_error, make_output_dir
from ..locks import hold_folder
from ..models.backbones import Backbone, PromptEncoder, get, prediction_type
from ..models.backbones.objectives import Objective
from ..models.loading import load_run_base, model_identity
from ..models.tokenizer import analyze_identifier, find_identifier, format_identifier_report
from ..progress import progress_bar
from ..sampling.generate import sample
from ..sampling.images import make_grid, make_scheduler, save_png
from .checkpoints import (
    check_checkpoint_method, checkpoint_name, load_training_state, resolve_checkpoint, save_checkpoint, state_bytes,
)
from .class_images import class_image_examples
from .ema import WeightAverage
from .inputs import (  # noqa: F401 - check_resume_config is part of this module's interface
    absolute_paths, check_prompt_lengths, check_resume_config, generated_class_prompts, resolve_class_prompt,
    resolve_family, resolve_mixed_precision,
)
from .noise import perturbed, training_noise
from .loss import dreambooth_loss
from .memory import check_fits_in_memory
from .optim import make_lr_scheduler, make_optimizer
from .run_folder import RunFolder
from .trainables import Trainables, lora_targets, make_trainables

log = logging.getLogger(__name__)


def _step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + micro * 104_729 + rank * 15_485_863) % (2**63)


def _is_main_process() -> bool:
    """Before accelerate starts: rank 0 of a launch (or a plain process) owns the run folder."""
    return os.environ.get("RANK", "0") == "0"


def train(cfg: TrainConfig) -> Path:
    """Run DreamBooth training as configured; return the final model folder.

    The run holds its folder's lock throughout. If the run fails or is stopped, the previous run
    it was replacing is put back whole; an output dir this call created and left empty is removed.
    """
    cfg = resolve_family(absolute_paths(cfg))
    check_fits_in_memory(cfg)
    run = RunFolder(cfg.output_dir)
    created = not run.root.exists()
    main = _is_main_process()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        if main:
            make_output_dir(run.root, "--output-dir")
        with hold_folder(run.root, "output dir") if main else contextlib.nullcontext():
            try:
                with disk_full_is_user_error(run.root, None, run.what_is_kept):
                    return _train(cfg)
            except BaseException:
                if main:
                    run.restore_previous()
                raise
    except BaseException:
        if main and created and run.root.is_dir():
            if not any(run.root.iterdir()):
                run.root.rmdir()
        raise
    finally:  # --allow-tf32 is this run's setting, not the process's
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


@dataclass
class Setup:
    """What the run settled before loading any model."""

    cfg: TrainConfig
    run: RunFolder
    accelerator: Accelerator
    weight_dtype: torch.dtype
    class_prompt: str | None
    instance_set: list[Example]
    class_prompts: tuple[str, ...]
    checkpoint: Path | None

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


@dataclass
class Base:
    backbone: type[Backbone]
    pipe: Any
    text_encoders: dict[str, torch.nn.Module]
    identifier: str | None
    objective: Objective


@dataclass
class Models:
    """The family's modules on the device, what trains, and the family's objective."""

    backbone: type[Backbone]
    base: Any  # the loaded pipeline; frozen parts are read from it
    text_encoders: dict[str, torch.nn.Module]
    trainables: Trainables
    encoder: LatentEncoder
    encode_prompts: PromptEncoder
    objective: Objective
    guidance: float | None  # a guidance-distilled denoiser's training guidance (FLUX.1-dev)
    trained: dict[str, torch.nn.Module] = field(default_factory=dict)  # after accelerator.prepare
    offloaded: bool = False  # the frozen text encoders wait on the CPU, their prompts encoded

    @property
    def denoiser(self) -> torch.nn.Module:
        """The prepared UNet or transformer."""
        return self.trained[self.backbone.denoiser_name]

    def current_text_encoders(self) -> dict[str, torch.nn.Module]:
        """Each text encoder as the step uses it: the prepared module if it trains, the frozen one if not."""
        return {name: self.trained.get(name, module) for name, module in self.text_encoders.items()}


@dataclass
class Optimisation:
    optimizer: Any
    lr_scheduler: Any
    params: list[torch.nn.Parameter]
    start_step: int
    ema: WeightAverage | None = None

    def averaged(self):
        """The weights the run shows and keeps (the moving average, with --ema-decay) in the modules."""
        return self.ema.applied() if self.ema else contextlib.nullcontext()


def _train(cfg: TrainConfig) -> Path:
    setup = set_up(cfg)
    base = load_base(setup)
    instances, classes = load_data(setup)
    models = load_models(setup, base, instances, classes)
    optimisation = make_optimisation(setup, models)
    run_steps(setup, models, optimisation, instances, classes)
    return save_model(setup, models, optimisation)


# --------------------------------------------------------------------------- setup


def set_up(cfg: TrainConfig) -> Setup:
    """Check the inputs (before anything heavy), prepare the run folder, start accelerate."""
    cfg = absolute_paths(cfg)
    run = RunFolder(cfg.output_dir)
    resuming = cfg.resume_from_checkpoint is not None
    cuda = torch.cuda.is_available()
    mixed_precision = resolve_mixed_precision(cfg.mixed_precision, cuda)
    class_prompt = resolve_class_prompt(cfg) if cfg.with_prior_preservation else cfg.class_prompt
    instance_set = instance_examples(list_images(cfg.instance_dir, role="instance", min_size=64), cfg.instance_prompt)
    class_prompts = generated_class_prompts(cfg, class_prompt, instance_set) if cfg.with_prior_preservation else ()
    run.prepare(overwrite=cfg.overwrite, resuming=resuming)
    checkpoint = resolve_checkpoint(cfg.output_dir, cfg.resume_from_checkpoint) if resuming else None
    if resuming:
        check_checkpoint_method(checkpoint, cfg.method)
        check_resume_config(run, cfg)

    # accelerate keeps one global state per process; a second run in the same process (a sweep,
    # the tests) may ask for another precision. The process group itself is kept.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(run.root), logging_dir=str(run.logs)),
        # Rank 0 may spend a long time generating class images while the others wait.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=3))],
    )
    if cuda and cfg.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)
    cfg = cfg.model_copy(update={"mixed_precision": mixed_precision, "class_prompt": class_prompt})
    if accelerator.is_main_process:
        log.info(
            "training %s (%s) on %d instance images -> %s (%s, %d process(es))",
            cfg.base_model, get(cfg.backbone).title, len(instance_set), run.root, mixed_precision,
            accelerator.num_processes,
        )
    return Setup(cfg, run, accelerator, weight_dtype, class_prompt, instance_set, class_prompts, checkpoint)


def load_base(setup: Setup) -> Base:
    """The base model, loaded once in fp32 (trained weights stay fp32; autocast does the rest), and
    the checks that need its modules or tokenizer, before the class images."""
    cfg = setup.cfg
    backbone = get(cfg.backbone)
    pipe = load_run_base(cfg.model_dump(), torch.float32)
    text_encoders = backbone.text_encoders(pipe)
    if cfg.method == "lora":
        lora_targets(cfg, backbone, backbone.denoiser(pipe), text_encoders)
    objective = backbone.objective(cfg, dict(pipe.scheduler.config), setup.accelerator.device)
    return Base(backbone, pipe, text_encoders, _checked_identifier(setup, pipe.tokenizer), objective)


# --------------------------------------------------------------------------- data


def load_data(setup: Setup) -> tuple[ImageBank, ImageBank | None]:
    """The instance images, and the class images (given, cached or generated by the base model)."""
    cfg = setup.cfg
    classes = None
    if cfg.with_prior_preservation:
        class_set = class_image_examples(cfg, setup.class_prompt, setup.class_prompts, setup.accelerator,
                                         setup.weight_dtype)
        classes = ImageBank(class_set, cfg.resolution, name="class")
    return ImageBank(setup.instance_set, cfg.resolution, name="instance"), classes


# --------------------------------------------------------------------------- models


def load_models(setup: Setup, loaded: Base, instances: ImageBank, classes: ImageBank | None) -> Models:
    """The latents of fixed crops encoded once, what trains chosen, frozen parts on the device."""
    cfg, accelerator, weight_dtype = setup.cfg, setup.accelerator, setup.weight_dtype
    device = accelerator.device
    backbone, base, text_encoders, identifier = loaded.backbone, loaded.pipe, loaded.text_encoders, loaded.identifier
    denoiser = backbone.denoiser(base)
    vae = base.vae
    vae.requires_grad_(False)
    # SDXL's VAE overflows in half precision; a fixed one (--vae) says so with force_upcast false.
    vae_dtype = torch.float32 if backbone.vae_needs_fp32 and vae.config.get("force_upcast", True) else weight_dtype
    vae.to(device, dtype=vae_dtype)
    encoder = LatentEncoder(vae, device, vae_dtype, cache=cfg.cache_latents)
    fixed = encoder.fixed_crops([instances] + ([classes] if classes is not None else []), cfg.center_crop)
    if fixed:
        with progress_bar("caching latents", len(fixed), enabled=setup.main) as bar:
            encoder.precompute(fixed, report=(lambda n: bar.update(0, completed=n)) if bar else None)

    torch.manual_seed(cfg.seed)  # LoRA's initial weights
    identifier_ids = base.tokenizer(identifier, add_special_tokens=False).input_ids if identifier else None
    trainables = make_trainables(cfg, backbone, denoiser, text_encoders, model_identity(cfg.base_model, cfg.revision),
                                 identifier_ids, prediction_type(base.scheduler))
    if setup.checkpoint is not None:
        trainables.load_weights(setup.checkpoint)
    trainables.cast_frozen(weight_dtype)
    for name, module in text_encoders.items():
        if name not in trainables.modules:
            module.to(device, dtype=weight_dtype)
    if cfg.channels_last:
        denoiser.to(memory_format=torch.channels_last)
    if cfg.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
        for name in trainables.modules:
            if name != backbone.denoiser_name:
                text_encoders[name].gradient_checkpointing_enable()
    frozen = not any(name in trainables.modules for name in text_encoders)
    models = Models(
        backbone, base, text_encoders, trainables, encoder,
        PromptEncoder(backbone, backbone.tokenizers(base), device, frozen=frozen),
        loaded.objective, backbone.train_guidance(denoiser, cfg),
    )
    if frozen and not (cfg.shuffle_caption or cfg.caption_tag_dropout_rate):
        _encode_every_prompt(setup, models, instances, classes)
    return models


def _encode_every_prompt(setup: Setup, models: Models, instances: ImageBank, classes: ImageBank | None) -> None:
    """Frozen text encoders with fixed captions: encode each of the run's prompts once, then move the
    encoders off the GPU (FLUX.1's T5-XXL alone is 9.5 GB in bf16); validation brings them back."""
    prompts = [e.prompt for bank in (instances, classes) if bank is not None for e in bank.examples]
    with setup.accelerator.autocast():
        models.encode_prompts.precompute(models.text_encoders, prompts)
    if setup.accelerator.device.type != "cpu":
        for module in models.text_encoders.values():
            module.to("cpu")
        models.offloaded = True
        torch.cuda.empty_cache()


def _checked_identifier(setup: Setup, tokenizer) -> str | None:
    """The identifier word of the instance prompt, with the prompt checks that need the tokenizer."""
    cfg = setup.cfg
    identifier = find_identifier(cfg.instance_prompt, setup.class_prompt)
    if cfg.text_encoder_scope == "identifier" and not identifier:
        raise UserError(
            f"--text-encoder-scope identifier: instance prompt '{cfg.instance_prompt}' has no identifier word "
            f"that the class prompt '{setup.class_prompt}' lacks"
        )
    check_prompt_lengths(tokenizer, cfg, setup.class_prompt, setup.class_prompts, setup.instance_set, identifier,
                         warn=setup.main)
    if identifier and setup.main:
        report = analyze_identifier(tokenizer, identifier)
        (log.info if report.is_good else log.warning)(format_identifier_report(report))
    return identifier


# --------------------------------------------------------------------------- optimiser


def make_optimisation(setup: Setup, models: Models) -> Optimisation:
    """The optimizer over the trained modules' parameter groups, prepared by accelerate; on a resume,
    its state, the schedule's and the fp16 scaler's from the checkpoint. Writes the run's config.yaml."""
    cfg, accelerator, run = setup.cfg, setup.accelerator, setup.run
    groups = models.trainables.param_groups()
    params = [p for g in groups for p in g["params"]]
    optimizer = make_optimizer(
        groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon, use_8bit=cfg.use_8bit_adam,
    )
    lr_scheduler = make_lr_scheduler(cfg.lr_scheduler, optimizer, cfg.lr_warmup_steps, cfg.max_train_steps)
    names = list(models.trainables.modules)
    prepared = accelerator.prepare(*models.trainables.modules.values(), optimizer)
    models.trained = dict(zip(names, prepared[:-1]))
    optimizer = prepared[-1]
    ema = WeightAverage.for_run(cfg, params)

    start_step = 0
    if setup.checkpoint is None and setup.main:
        run.set_aside_previous()  # put back if this run fails; dropped once its model is installed
    if setup.checkpoint is not None:
        start_step = _restore_state(setup, optimizer, lr_scheduler, ema)
    if setup.main:
        run.write_config(cfg.to_yaml_dict())
        accelerator.init_trackers("style-dreambooth")
    return Optimisation(optimizer, lr_scheduler, params, start_step, ema)


def _restore_state(setup: Setup, optimizer, lr_scheduler, ema: WeightAverage | None) -> int:
    """Load the optimizer, schedule, scaler and weight-average states of the checkpoint; return its step."""
    checkpoint, cfg, accelerator = setup.checkpoint, setup.cfg, setup.accelerator
    state = load_training_state(checkpoint)
    # Implementation flags (fused, foreach) belong to this run, not the saved one: a checkpoint from
    # before the fused optimizer would otherwise switch it off while the fp16 scaler still relies on it.
    flags = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    for group, kept in zip(optimizer.param_groups, flags):
        group.update(kept)
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if accelerator.scaler is not None and state.get("grad_scaler"):
        accelerator.scaler.load_state_dict(state["grad_scaler"])
    if ema is not None and state.get("ema"):
        ema.resume(state["ema"])
    elif ema is not None:
        log.info("checkpoint %s holds no weight average; the average starts from its weights", checkpoint)
    start_step = int(state["step"])
    if start_step >= cfg.max_train_steps:
        raise UserError(
            f"checkpoint '{checkpoint}' is at step {start_step}, not before --max-train-steps "
            f"{cfg.max_train_steps}; raise --max-train-steps to train further"
        )
    log.info("resumed from %s at step %d", checkpoint, start_step)
    if setup.main:
        setup.run.truncate_metrics(start_step)
    return start_step


# --------------------------------------------------------------------------- loop


class MetricsLog:
    """Each step's losses stay on the device until the next flush: reading them back every step would
    make the host wait for the GPU each time. One line per step is still written."""

    def __init__(self, setup: Setup, params: list[torch.nn.Parameter], with_prior: bool) -> None:
        self.setup = setup
        self.params = params
        self.with_prior = with_prior
        self.pending: list[tuple[int, float, torch.Tensor]] = []
        self.t_last = time.perf_counter()

    def add(self, step: int, lr: float, sums: torch.Tensor) -> None:
        self.pending.append((step, lr, sums))

    def flush(self, bar) -> None:
        if not self.pending:
            return
        accelerator, run = self.setup.accelerator, self.setup.run
        values = accelerator.reduce(torch.stack([s for _, _, s in self.pending]), reduction="mean").tolist()
        now = time.perf_counter()
        rate = len(self.pending) / max(now - self.t_last, 1e-9)
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        flushed = list(self.pending)
        for (step_no, lr, _), (loss, inst, prior_loss) in zip(flushed, values):
            self.pending.pop(0)  # taken before it is written: an interrupted flush never writes a step twice
            record = {
                "step": step_no, "loss": loss, "instance_loss": inst,
                "prior_loss": prior_loss if self.with_prior else None, "lr": lr, "it_per_s": rate,
            }
            if peak is not None:
                record["gpu_mem_peak_gib"] = peak
            if self.setup.main:
                run.append_metrics(record)
                accelerator.log({k: v for k, v in record.items() if v is not None and k != "step"}, step=step_no)
        if bar:
            bar.update(0, info=f"loss {values[-1][0]:.4f}")
        self.t_last = now
        bad = next(((s, v[0]) for (s, _, _), v in zip(flushed, values) if not math.isfinite(v[0])), None)
        # A non-finite loss alone can be a skipped fp16 step; non-finite weights cannot recover.
        if bad is not None and any(not bool(torch.isfinite(p).all()) for p in self.params):
            raise UserError(
                f"training diverged at step {bad[0]}: the loss is {bad[1]} and the weights are no longer finite; "
                f"start again with a lower --learning-rate (was {self.setup.cfg.learning_rate:g}); no model was saved"
            )


def validate(setup: Setup, models: Models, step: int) -> None:
    """Sample the validation prompts with the weights as they are and save a grid."""
    cfg, accelerator = setup.cfg, setup.accelerator
    unwrapped = {name: accelerator.unwrap_model(m) for name, m in models.current_text_encoders().items()}
    pipe = models.backbone.assemble(models.base, accelerator.unwrap_model(models.denoiser), unwrapped)
    pipe.scheduler = make_scheduler(models.backbone.samplers[0], models.base.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for m in models.trained.values():
        m.eval()
    images = []
    with torch.no_grad(), accelerator.autocast(), _decode_outside_autocast(pipe.vae), \
            _on_device(models.text_encoders.values() if models.offloaded else (), accelerator.device):
        for prompt in cfg.validation_prompt or [cfg.instance_prompt]:
            seeds = [cfg.seed + i for i in range(cfg.num_validation_images)]
            images += sample(pipe, prompt, seeds, steps=cfg.validation_inference_steps,
                             guidance=models.backbone.default_guidance, width=cfg.resolution, height=cfg.resolution)
    for m in models.trained.values():
        m.train()
    setup.run.samples.mkdir(exist_ok=True)
    save_png(make_grid(images, cols=cfg.num_validation_images), setup.run.samples / f"step-{step:06d}.png")


@contextlib.contextmanager
def _on_device(modules, device: torch.device):
    """Offloaded modules back on the device for the duration."""
    modules = list(modules)
    for module in modules:
        module.to(device)
    try:
        yield
    finally:
        for module in modules:
            module.to("cpu")


@contextlib.contextmanager
def _decode_outside_autocast(vae):
    """A VAE kept in fp32 (SDXL's) also decodes in fp32: under autocast its convolutions would run in
    half precision and overflow, the very thing keeping it fp32 avoids."""
    if vae.dtype != torch.float32:
        yield
        return
    decode = vae.decode

    def fp32_decode(latents, *args, **kwargs):
        with torch.autocast(latents.device.type, enabled=False):
            return decode(latents.float(), *args, **kwargs)

    vae.decode = fp32_decode
    try:
        yield
    finally:
        del vae.decode  # the instance attribute goes; the class's method shows through again


def save_step_checkpoint(setup: Setup, models: Models, optimisation: Optimisation, step: int) -> None:
    accelerator, run = setup.accelerator, setup.run
    if setup.main:
        unwrapped = {k: accelerator.unwrap_model(m) for k, m in models.trained.items()}
        state = {
            "optimizer": optimisation.optimizer.state_dict(),
            "lr_scheduler": optimisation.lr_scheduler.state_dict(),
            "grad_scaler": accelerator.scaler.state_dict() if accelerator.scaler else None,
            "ema": optimisation.ema.state() if optimisation.ema else None,
        }
        target = run.root / "checkpoints" / checkpoint_name(step)
        with disk_full_is_user_error(target, state_bytes([optimisation.params, state]), run.what_is_kept), \
                optimisation.averaged():
            save_checkpoint(
                run.root, step, lambda folder: models.trainables.save_weights(folder, unwrapped),
                state, setup.cfg.checkpoints_total_limit,
            )
    accelerator.wait_for_everyone()


def micro_step(setup: Setup, models: Models, optimisation: Optimisation, batch, step_seed: int, denoiser_step):
    """One forward and backward pass of the DreamBooth loss (and the optimizer step when it is due).

    The draws come from the step's generator in a fixed order: the latent sample, the noise, the
    noise levels, then the input perturbation."""
    cfg, accelerator = setup.cfg, setup.accelerator
    device = accelerator.device
    gen = torch.Generator(device=device).manual_seed(step_seed)
    torch.manual_seed(step_seed)  # dropout (e.g. --lora-dropout) draws from the global RNG
    backbone, objective = models.backbone, models.objective
    with accelerator.accumulate(*models.trained.values()):
        with torch.no_grad():
            dist = models.encoder.latent_dist(batch)
            latents = backbone.latents(dist.sample(generator=gen), models.base.vae.config).float()
        noise = training_noise(latents, gen, cfg.offset_noise, cfg.multires_noise_iterations,
                               cfg.multires_noise_discount)
        timesteps = objective.draw_timesteps(latents.shape[0], gen, latents.device, backbone.image_tokens(latents))
        noisy = objective.noisy(latents, perturbed(noise, gen, cfg.ip_noise_gamma), timesteps)
        with accelerator.autocast():
            embeds = models.encode_prompts(models.current_text_encoders(), batch.prompts)
            pred = backbone.denoise(denoiser_step, noisy, timesteps, embeds, batch.sizes(), models.guidance)
        parts = dreambooth_loss(
            pred, objective.target(latents, noise, timesteps), n_instance=batch.n_instance,
            prior_loss_weight=cfg.prior_loss_weight, weights=objective.weights(timesteps),
        )
        accelerator.backward(parts.total)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(optimisation.params, cfg.max_grad_norm)
        optimisation.optimizer.step()
        models.trainables.after_step()
        optimisation.optimizer.zero_grad(set_to_none=True)
    return parts


def run_steps(setup: Setup, models: Models, optimisation: Optimisation, instances: ImageBank,
              classes: ImageBank | None) -> None:
    """The optimizer steps from the start (or resumed) step to --max-train-steps."""
    cfg, accelerator = setup.cfg, setup.accelerator
    instance_order = SampleOrder(len(instances), cfg.seed, stream=0)
    class_order = SampleOrder(len(classes), cfg.seed, stream=1) if classes is not None else None
    accum, world, rank = cfg.gradient_accumulation_steps, accelerator.num_processes, accelerator.process_index
    # The compiled wrapper shares the denoiser's weights; saving and validation use the plain module.
    denoiser_step = torch.compile(models.denoiser) if cfg.compile else models.denoiser
    metrics = MetricsLog(setup, optimisation.params, with_prior=classes is not None)
    captions = CaptionRules(cfg.shuffle_caption, cfg.caption_tag_dropout_rate,
                            (cfg.instance_prompt, setup.class_prompt or ""))
    for m in models.trained.values():
        m.train()
    try:
        with progress_bar("training", cfg.max_train_steps, enabled=setup.main) as bar:
            if bar:
                bar.update(0, completed=optimisation.start_step)
            for step in range(optimisation.start_step, cfg.max_train_steps):
                sums = torch.zeros(3, device=accelerator.device)
                for micro in range(accum):
                    batch = make_batch(
                        sample_numbers(step, micro, accum, world, rank, cfg.train_batch_size),
                        instances, instance_order, classes, class_order, cfg.center_crop, captions,
                    )
                    parts = micro_step(setup, models, optimisation, batch, _step_seed(cfg.seed, step, micro, rank),
                                       denoiser_step)
                    prior = parts.prior.detach() if parts.prior is not None else torch.zeros((), device=sums.device)
                    sums += torch.stack([parts.total.detach(), parts.instance.detach(), prior]).float() / accum
                optimisation.lr_scheduler.step()
                if optimisation.ema:
                    optimisation.ema.step()
                global_step = step + 1
                metrics.add(global_step, optimisation.lr_scheduler.get_last_lr()[0], sums)

                last = global_step == cfg.max_train_steps
                checkpoint_due = cfg.checkpointing_steps and global_step % cfg.checkpointing_steps == 0 and not last
                if global_step % cfg.logging_steps == 0 or last or checkpoint_due:
                    metrics.flush(bar)
                if bar:
                    bar.update(0, completed=global_step)
                if cfg.validation_steps and (global_step % cfg.validation_steps == 0 or last) and setup.main:
                    with optimisation.averaged():
                        validate(setup, models, global_step)
                if checkpoint_due:
                    save_step_checkpoint(setup, models, optimisation, global_step)
    except BaseException:
        if accelerator.num_processes == 1:  # no collective needed: keep the losses up to the failure
            try:
                metrics.flush(None)
            except Exception:  # noqa: BLE001 - a broken device must not hide the original error
                log.warning("could not write the last %d steps' losses", len(metrics.pending))
        raise


# --------------------------------------------------------------------------- save


def save_model(setup: Setup, models: Models, optimisation: Optimisation) -> Path:
    """Write the final model (a diffusers folder or a LoRA file) next to the run and install it."""
    cfg, accelerator, run = setup.cfg, setup.accelerator, setup.run
    accelerator.wait_for_everyone()
    if setup.main:
        tmp = run.root / ".model.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        base = models.base
        if setup.weight_dtype != torch.float32 and cfg.method == "full":
            # Frozen parts were cast to half precision for training; save them from an fp32 load.
            base = load_run_base(cfg.model_dump(), torch.float32)
        final = {k: accelerator.unwrap_model(m) for k, m in models.trained.items()}
        saved = optimisation.params if cfg.method == "lora" else [
            base.vae, *{**models.backbone.text_encoders(base), **final}.values()]
        try:
            with disk_full_is_user_error(tmp, state_bytes(saved), run.what_is_kept), optimisation.averaged():
                models.trainables.save_final(tmp, base, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # frees the space a full disk needs back
            raise
        run.install_model(tmp)
        run.discard_previous()
        log.info("saved final model to %s", run.model)
    accelerator.end_training()
    return run.model
