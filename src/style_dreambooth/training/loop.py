"""The one training loop: DreamBooth with prior preservation, read top to bottom.

Order of work: check inputs (before anything heavy) -> class images -> models -> optimizer ->
steps (log, sample, checkpoint) -> final model. Only the main process writes files.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
from datetime import timedelta
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

from ..config import TrainConfig
from ..data.class_cache import ClassImageSpec, default_cache_root, ensure_class_images
from ..data.dataset import (
    CaptionRules, Example, ImageBank, SampleOrder, class_examples, class_prompts_for, instance_examples, make_batch, sample_numbers,
)
from ..data.images import IMAGE_EXTENSIONS, list_images
from ..data.latent_cache import LatentEncoder
from ..errors import UserError
from ..files import disk_full_is_user_error, make_output_dir
from ..locks import hold_folder
from ..models.backbone import PromptEncoder, assemble_pipeline, prediction_type
from ..models.loading import load_run_base, model_identity
from ..models.tokenizer import (
    analyze_identifier, check_instance_prompt_fits, find_identifier, format_identifier_report, warn_if_truncated,
)
from ..progress import progress_bar
from ..sampling.generate import sample
from ..sampling.images import make_grid, make_scheduler, save_png
from .checkpoints import (
    check_checkpoint_method, checkpoint_name, load_training_state, resolve_checkpoint, save_checkpoint, state_bytes,
)
from .memory import check_fits_in_memory
from .loss import diffusion_target, dreambooth_loss
from .optim import make_lr_scheduler, make_optimizer
from .trainables import lora_targets, make_trainables
from .run_folder import RunFolder

log = logging.getLogger(__name__)


def resolve_mixed_precision(requested: str | None, cuda: bool) -> str:
    if requested is None:
        return "fp16" if cuda else "no"
    if requested == "fp16" and not cuda:
        raise UserError("--mixed-precision fp16 needs a CUDA GPU; use bf16 or no on this machine")
    if requested == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise UserError("--mixed-precision bf16 is not supported by this GPU (e.g. a T4 or V100); use fp16")
    return requested


# Keys that must not change when a run is resumed: they shape the weights, optimizer or data order.
RESUME_FIXED_KEYS = (
    "base_model", "method", "rank", "lora_alpha", "lora_targets", "train_text_encoder", "use_8bit_adam",
    "seed", "train_batch_size", "gradient_accumulation_steps", "resolution", "center_crop",
    "with_prior_preservation", "instance_prompt",
    # the optimizer and schedule state come from the checkpoint, so a new value would be ignored
    "learning_rate", "text_encoder_lr", "lr_scheduler", "lr_warmup_steps",
)


def check_resume_config(run: RunFolder, cfg: TrainConfig) -> None:
    """Refuse a resume whose settings contradict the run's config.yaml."""
    if not run.config.is_file():
        return
    saved = yaml.safe_load(run.config.read_text(encoding="utf-8")) or {}
    now = cfg.to_yaml_dict()
    for key in RESUME_FIXED_KEYS:
        if key in saved and saved[key] != now.get(key):
            raise UserError(
                f"cannot resume '{run.root}': {key} is {saved[key]!r} in its config.yaml but {now.get(key)!r} now; "
                "resume with the same value or start a new run"
            )


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Local paths made absolute, so the run's config.yaml works from any directory."""
    update: dict = {}
    for key in ("instance_dir", "class_dir", "output_dir"):
        value = getattr(cfg, key)
        if value is not None:
            update[key] = Path(value).expanduser().absolute()
    for key in ("base_model", "base_config"):
        value = getattr(cfg, key)
        if value and Path(value).expanduser().exists():
            update[key] = str(Path(value).expanduser().absolute())
    return cfg.model_copy(update=update)


def resolve_class_prompt(cfg: TrainConfig) -> str:
    """The class prompt, or the instance prompt without its leading identifier word."""
    if cfg.class_prompt:
        return cfg.class_prompt
    words = cfg.instance_prompt.split()
    if len(words) < 2:
        raise UserError(
            f"cannot derive a class prompt from instance prompt '{cfg.instance_prompt}'; pass --class-prompt "
            "(e.g. 'artstyle') or --no-prior-preservation"
        )
    derived = " ".join(words[1:])
    log.info("class prompt not given; using '%s' (the instance prompt without '%s')", derived, words[0])
    return derived


def trained_timesteps(cfg: TrainConfig, total: int) -> tuple[int, int]:
    """[low, high) of the timesteps drawn for training."""
    high = total if cfg.max_timestep is None else cfg.max_timestep
    if high > total:
        raise UserError(f"--max-timestep {high} is beyond the base model's {total} noise timesteps")
    return cfg.min_timestep, high


def _step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + micro * 104_729 + rank * 15_485_863) % (2**63)


def _has_top_level_images(folder: Path) -> bool:
    return folder.is_dir() and any(
        p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() for p in folder.iterdir()
    )


def generated_class_prompts(cfg: TrainConfig, class_prompt: str, instances: list[Example]) -> tuple[str, ...]:
    """With --class-prompts-from-captions, one class prompt per instance caption; else none (the class prompt)."""
    if not cfg.class_prompts_from_captions:
        return tuple(dict.fromkeys(cfg.class_prompts))
    prompts = class_prompts_for(instances, cfg.instance_prompt, class_prompt)
    if prompts == (class_prompt,):
        raise UserError(
            f"--class-prompts-from-captions needs .txt captions next to the instance images; none in '{cfg.instance_dir}'"
        )
    return tuple(dict.fromkeys(prompts + tuple(cfg.class_prompts)))


def class_image_examples(
    cfg: TrainConfig, class_prompt: str, prompts: tuple[str, ...], accelerator: Accelerator, weight_dtype
) -> list[Example]:
    """Real class images given by the user, or cached images generated by the base model, with their prompts."""
    if cfg.class_dir is not None and _has_top_level_images(cfg.class_dir):
        paths = list_images(cfg.class_dir, role="class", min_size=64)
        log.info("class images: using the %d images in %s as given", len(paths), cfg.class_dir)
        if prompts:
            log.warning("--class-prompts-from-captions does not apply: the given class images keep their own captions")
        return class_examples(paths, class_prompt)
    root = cfg.class_dir if cfg.class_dir is not None else default_cache_root()
    spec = ClassImageSpec(
        model=model_identity(cfg.base_model, cfg.revision),
        prompt=class_prompt,
        resolution=cfg.resolution,
        inference_steps=cfg.class_inference_steps,
        guidance_scale=cfg.class_guidance_scale,
        sampler="dpm++",
        seed=cfg.seed,
        prompts=prompts,
        batch_size=cfg.sample_batch_size,
    )

    def make_generator():
        pipe = load_run_base(cfg.model_dump(), weight_dtype)
        pipe.scheduler = make_scheduler("dpm++", pipe.scheduler.config)
        pipe = pipe.to(accelerator.device)
        pipe.set_progress_bar_config(disable=True)

        def generate(prompt: str, seeds: list[int]):
            return sample(
                pipe, prompt, seeds, steps=cfg.class_inference_steps, guidance=cfg.class_guidance_scale,
                width=cfg.resolution, height=cfg.resolution, batch_size=cfg.sample_batch_size,
            )

        return generate

    if accelerator.is_main_process:
        with progress_bar("class images", cfg.num_class_images) as bar:
            def report(done: int, total: int) -> None:
                if bar:
                    bar.update(0, completed=done)

            ensure_class_images(spec, cfg.num_class_images, root, make_generator, cfg.sample_batch_size, report)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    accelerator.wait_for_everyone()
    paths = ensure_class_images(spec, cfg.num_class_images, root, make_generator, cfg.sample_batch_size)
    return [Example(path, spec.prompt_for(i)) for i, path in enumerate(paths)]


def check_prompt_lengths(
    tokenizer, cfg: TrainConfig, class_prompt: str | None, class_prompts: tuple[str, ...],
    instances: list[Example], identifier: str | None, warn: bool,
) -> None:
    """Refuse an instance prompt cut before its identifier; warn of every other prompt the text encoder cuts."""
    labelled = {"the instance prompt": cfg.instance_prompt}
    labelled.update({f"the prompt of '{e.path.name}' (with its caption)": e.prompt for e in instances})
    for label, prompt in labelled.items():
        check_instance_prompt_fits(tokenizer, label, prompt, class_prompt, identifier)
    if not warn:
        return
    if class_prompt:
        labelled["the class prompt"] = class_prompt
    labelled.update({f"class prompt {i + 1}": p for i, p in enumerate(class_prompts)})
    labelled.update({f"validation prompt {i + 1}": p for i, p in enumerate(cfg.validation_prompt)})
    warn_if_truncated(tokenizer, labelled)


def _is_main_process() -> bool:
    """Before accelerate starts: rank 0 of a launch (or a plain process) owns the run folder."""
    return os.environ.get("RANK", "0") == "0"


def train(cfg: TrainConfig) -> Path:
    """Run DreamBooth training as configured; return the final model folder.

    The run holds its folder's lock throughout. If the run fails or is stopped, the previous run
    it was replacing is put back whole; an output dir this call created and left empty is removed.
    """
    cfg = absolute_paths(cfg)
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


def _train(cfg: TrainConfig) -> Path:
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
    main = accelerator.is_main_process
    if cuda and cfg.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)
    resolved = cfg.model_copy(update={"mixed_precision": mixed_precision, "class_prompt": class_prompt})
    if main:
        log.info(
            "training %s on %d instance images -> %s (%s, %d process(es))",
            cfg.base_model, len(instance_set), run.root, mixed_precision, accelerator.num_processes,
        )

    # Models. The base is loaded once in fp32; trained weights stay fp32 (autocast does the rest).
    base = load_run_base(cfg.model_dump(), torch.float32)
    tokenizer, vae, noise_config = base.tokenizer, base.vae, base.scheduler.config
    timestep_range = trained_timesteps(cfg, noise_config["num_train_timesteps"])
    if cfg.method == "lora":
        lora_targets(cfg, base.unet, base.text_encoder)
    identifier = find_identifier(cfg.instance_prompt, class_prompt)
    if cfg.text_encoder_scope == "identifier" and not identifier:
        raise UserError(
            f"--text-encoder-scope identifier: instance prompt '{cfg.instance_prompt}' has no identifier word "
            f"that the class prompt '{class_prompt}' lacks"
        )
    check_prompt_lengths(tokenizer, cfg, class_prompt, class_prompts, instance_set, identifier, warn=main)
    if identifier and main:
        report = analyze_identifier(tokenizer, identifier)
        (log.info if report.is_good else log.warning)(format_identifier_report(report))

    classes = None
    if cfg.with_prior_preservation:
        class_set = class_image_examples(cfg, class_prompt, class_prompts, accelerator, weight_dtype)
        classes = ImageBank(class_set, cfg.resolution, name="class")
    instances = ImageBank(instance_set, cfg.resolution, name="instance")

    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(noise_config)
    pred_type = prediction_type(noise_scheduler)
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(accelerator.device)

    unet, text_encoder = base.unet, base.text_encoder
    vae.requires_grad_(False)
    vae.to(accelerator.device, dtype=weight_dtype)
    encoder = LatentEncoder(vae, accelerator.device, weight_dtype, cache=cfg.cache_latents)
    fixed = encoder.fixed_crops([instances] + ([classes] if classes is not None else []), cfg.center_crop)
    if fixed:
        with progress_bar("caching latents", len(fixed), enabled=main) as bar:
            encoder.precompute(fixed, report=(lambda n: bar.update(0, completed=n)) if bar else None)
    torch.manual_seed(cfg.seed)  # LoRA's initial weights
    identifier_ids = tokenizer(identifier, add_special_tokens=False).input_ids if identifier else None
    trainables = make_trainables(cfg, unet, text_encoder, model_identity(cfg.base_model, cfg.revision), identifier_ids)
    if checkpoint is not None:
        trainables.load_weights(checkpoint)
    trainables.cast_frozen(weight_dtype)
    if not cfg.train_text_encoder:
        text_encoder.to(accelerator.device, dtype=weight_dtype)
    if cfg.channels_last:
        unet.to(memory_format=torch.channels_last)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()

    trained = dict(trainables.modules)
    groups = trainables.param_groups()
    params = [p for g in groups for p in g["params"]]
    optimizer = make_optimizer(
        groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon, use_8bit=cfg.use_8bit_adam,
    )
    lr_scheduler = make_lr_scheduler(cfg.lr_scheduler, optimizer, cfg.lr_warmup_steps, cfg.max_train_steps)
    prepared = accelerator.prepare(*trained.values(), optimizer)
    trained = dict(zip(trained, prepared[:-1]))
    optimizer = prepared[-1]
    unet = trained["unet"]
    text_encoder = trained.get("text_encoder", text_encoder)
    # The compiled wrapper shares the UNet's weights; saving and validation use the plain module.
    unet_step = torch.compile(unet) if cfg.compile else unet

    start_step = 0
    if not resuming and main:
        run.set_aside_previous()  # put back if this run fails; dropped once its model is installed
    if checkpoint is not None:
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
        start_step = int(state["step"])
        if start_step >= cfg.max_train_steps:
            raise UserError(
                f"checkpoint '{checkpoint}' is at step {start_step}, not before --max-train-steps "
                f"{cfg.max_train_steps}; raise --max-train-steps to train further"
            )
        log.info("resumed from %s at step %d", checkpoint, start_step)
        if main:
            run.truncate_metrics(start_step)
    if main:
        run.write_config(resolved.to_yaml_dict())
        accelerator.init_trackers("style-dreambooth")

    instance_order = SampleOrder(len(instances), cfg.seed, stream=0)
    class_order = SampleOrder(len(classes), cfg.seed, stream=1) if classes is not None else None
    accum, world, rank = cfg.gradient_accumulation_steps, accelerator.num_processes, accelerator.process_index
    validation_prompts = cfg.validation_prompt or [cfg.instance_prompt]
    encode_prompts = PromptEncoder(tokenizer, accelerator.device)

    def validate(step: int) -> None:
        pipe = assemble_pipeline(base, accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder))
        pipe.vae, pipe.scheduler = vae, make_scheduler("dpm++", noise_config)
        pipe.set_progress_bar_config(disable=True)
        for m in trained.values():
            m.eval()
        images = []
        with torch.no_grad(), accelerator.autocast():
            for prompt in validation_prompts:
                seeds = [cfg.seed + i for i in range(cfg.num_validation_images)]
                images += sample(
                    pipe, prompt, seeds, steps=cfg.validation_inference_steps,
                    width=cfg.resolution, height=cfg.resolution,
                )
        for m in trained.values():
            m.train()
        run.samples.mkdir(exist_ok=True)
        save_png(make_grid(images, cols=cfg.num_validation_images), run.samples / f"step-{step:06d}.png")

    # Each step's losses stay on the device until the next flush: reading them back every step would
    # make the host wait for the GPU each time. One line per step is still written.
    pending: list[tuple[int, float, torch.Tensor]] = []
    t_last = time.perf_counter()

    def flush_metrics(bar) -> None:
        nonlocal t_last
        if not pending:
            return
        values = accelerator.reduce(torch.stack([s for _, _, s in pending]), reduction="mean").tolist()
        now = time.perf_counter()
        rate = len(pending) / max(now - t_last, 1e-9)
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        flushed = list(pending)
        for (step_no, lr, _), (loss, inst, prior_loss) in zip(flushed, values):
            pending.pop(0)  # taken before it is written: an interrupted flush never writes a step twice
            record = {
                "step": step_no, "loss": loss, "instance_loss": inst,
                "prior_loss": prior_loss if classes is not None else None, "lr": lr, "it_per_s": rate,
            }
            if peak is not None:
                record["gpu_mem_peak_gib"] = peak
            if main:
                run.append_metrics(record)
                accelerator.log({k: v for k, v in record.items() if v is not None and k != "step"}, step=step_no)
        if bar:
            bar.update(0, info=f"loss {values[-1][0]:.4f}")
        t_last = now
        bad = next(((s, v[0]) for (s, _, _), v in zip(flushed, values) if not math.isfinite(v[0])), None)
        # A non-finite loss alone can be a skipped fp16 step; non-finite weights cannot recover.
        if bad is not None and any(not bool(torch.isfinite(p).all()) for p in params):
            raise UserError(
                f"training diverged at step {bad[0]}: the loss is {bad[1]} and the weights are no longer finite; "
                f"start again with a lower --learning-rate (was {cfg.learning_rate:g}); no model was saved"
            )

    for m in trained.values():
        m.train()
    try:
        with progress_bar("training", cfg.max_train_steps, enabled=main) as bar:
            if bar:
                bar.update(0, completed=start_step)
            for step in range(start_step, cfg.max_train_steps):
                sums = torch.zeros(3, device=accelerator.device)
                for micro in range(accum):
                    batch = make_batch(
                        sample_numbers(step, micro, accum, world, rank, cfg.train_batch_size),
                        instances, instance_order, classes, class_order, cfg.center_crop,
                        CaptionRules(cfg.shuffle_caption, cfg.caption_tag_dropout_rate,
                                     (cfg.instance_prompt, class_prompt or "")),
                    )
                    step_seed = _step_seed(cfg.seed, step, micro, rank)
                    gen = torch.Generator(device=accelerator.device).manual_seed(step_seed)
                    torch.manual_seed(step_seed)  # dropout (e.g. --lora-dropout) draws from the global RNG
                    with accelerator.accumulate(*trained.values()):
                        with torch.no_grad():
                            dist = encoder.latent_dist(batch)
                            latents = (dist.sample(generator=gen) * vae.config.scaling_factor).float()
                        noise = torch.randn(latents.shape, generator=gen, device=latents.device)
                        if cfg.offset_noise:
                            noise = noise + cfg.offset_noise * torch.randn(
                                (*latents.shape[:2], 1, 1), generator=gen, device=latents.device
                            )
                        timesteps = torch.randint(
                            *timestep_range, (latents.shape[0],), generator=gen, device=latents.device
                        )
                        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                        with accelerator.autocast():
                            hidden = encode_prompts(text_encoder, batch.prompts)
                            pred = unet_step(noisy, timesteps, hidden).sample
                        target = diffusion_target(pred_type, latents, noise, timesteps, alphas_cumprod)
                        parts = dreambooth_loss(
                            pred, target, timesteps, alphas_cumprod, n_instance=batch.n_instance,
                            prior_loss_weight=cfg.prior_loss_weight, snr_gamma=cfg.snr_gamma,
                            prediction_type=pred_type,
                        )
                        accelerator.backward(parts.total)
                        if accelerator.sync_gradients:
                            accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                        optimizer.step()
                        trainables.after_step()
                        optimizer.zero_grad(set_to_none=True)
                    prior = parts.prior.detach() if parts.prior is not None else torch.zeros((), device=sums.device)
                    sums += torch.stack([parts.total.detach(), parts.instance.detach(), prior]).float() / accum
                lr_scheduler.step()
                global_step = step + 1
                pending.append((global_step, lr_scheduler.get_last_lr()[0], sums))

                last = global_step == cfg.max_train_steps
                checkpoint_due = cfg.checkpointing_steps and global_step % cfg.checkpointing_steps == 0 and not last
                if global_step % cfg.logging_steps == 0 or last or checkpoint_due:
                    flush_metrics(bar)
                if bar:
                    bar.update(0, completed=global_step)

                if cfg.validation_steps and (global_step % cfg.validation_steps == 0 or last) and main:
                    validate(global_step)
                if checkpoint_due:
                    if main:
                        unwrapped = {k: accelerator.unwrap_model(m) for k, m in trained.items()}
                        state = {
                            "optimizer": optimizer.state_dict(),
                            "lr_scheduler": lr_scheduler.state_dict(),
                            "grad_scaler": accelerator.scaler.state_dict() if accelerator.scaler else None,
                        }
                        target = run.root / "checkpoints" / checkpoint_name(global_step)
                        with disk_full_is_user_error(target, state_bytes([params, state]), run.what_is_kept):
                            save_checkpoint(
                                run.root, global_step, lambda folder: trainables.save_weights(folder, unwrapped),
                                state, cfg.checkpoints_total_limit,
                            )
                    accelerator.wait_for_everyone()

    except BaseException:
        if accelerator.num_processes == 1:  # no collective needed: keep the losses up to the failure
            try:
                flush_metrics(None)
            except Exception:  # noqa: BLE001 - a broken device must not hide the original error
                log.warning("could not write the last %d steps' losses", len(pending))
        raise

    accelerator.wait_for_everyone()
    if main:
        tmp = run.root / ".model.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        if weight_dtype != torch.float32 and cfg.method == "full":
            # Frozen parts were cast to half precision for training; save them from an fp32 load.
            base = load_run_base(cfg.model_dump(), torch.float32)
        final = {k: accelerator.unwrap_model(m) for k, m in trained.items()}
        saved = params if cfg.method == "lora" else [base.vae, final["unet"], final.get("text_encoder", base.text_encoder)]
        try:
            with disk_full_is_user_error(tmp, state_bytes(saved), run.what_is_kept):
                trainables.save_final(tmp, base, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # frees the space a full disk needs back
            raise
        run.install_model(tmp)
        run.discard_previous()
        log.info("saved final model to %s", run.model)
    accelerator.end_training()
    return run.model
