"""Load a base model of any known family from a diffusers folder, a single file or a Hub id.

The family (see models/backbones) is read from the files: model_index.json for a folder or a cached
Hub id, the tensor names for a single file; its module names the pipeline class to build.

Every problem the user can fix (missing path, wrong folder, pickle checkpoint, model not in the
local Hugging Face cache while offline) becomes a one-sentence :class:`UserError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Mapping

import huggingface_hub
import huggingface_hub.constants
import torch

from ..errors import UserError
from .hub import hub_offline
from .backbones import Backbone, agreeing_family, family_of_folder, family_of_unet, get, resolve_backbone, single_file_family

logger = logging.getLogger(__name__)

SAFETENSORS_EXTENSIONS = (".safetensors",)
PICKLE_EXTENSIONS = (".ckpt", ".bin", ".pt", ".pth")
WEIGHT_EXTENSIONS = SAFETENSORS_EXTENSIONS + PICKLE_EXTENSIONS
FINGERPRINT_CHUNK = 1 << 20  # bytes hashed at each end of a weight file

# A Hub repo id: "name" or "owner/name" (letters, digits, '-', '_', '.').
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


# --------------------------------------------------------------------------- offline handling


@contextlib.contextmanager
def _offline_guard(offline: bool) -> Iterator[None]:
    """While loading offline, make huggingface_hub refuse any HTTP request.

    Needed because the flag is read at import time, and because diffusers' ``from_single_file``
    retries a config download with ``local_files_only=False`` when the config is not cached.
    """
    if not offline or getattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False):
        yield
        return
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        huggingface_hub.constants.HF_HUB_OFFLINE = False


def _hub_access_error_types() -> tuple[type[BaseException], ...]:
    """Exception types meaning "could not reach the Hub" or "not in the Hub / local cache"."""
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    errors = getattr(huggingface_hub, "errors", None)
    for name in (
        "EntryNotFoundError",
        "LocalEntryNotFoundError",
        "RepositoryNotFoundError",
        "RevisionNotFoundError",
        "GatedRepoError",
        "HfHubHTTPError",
        "OfflineModeIsEnabled",
        "HFValidationError",
        "CachedRepoTreeNotFoundError",
    ):
        cls = getattr(errors, name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            types.append(cls)
    # HTTP client errors: httpx-style in huggingface_hub >= 1.0, requests before.
    http = getattr(getattr(huggingface_hub, "utils", None), "httpx", None)
    if http is not None and isinstance(getattr(http, "HTTPError", None), type):
        types.append(http.HTTPError)
    try:
        import requests

        types.append(requests.RequestException)
    except ImportError:  # pragma: no cover - requests is optional in newer stacks
        pass
    return tuple(types)


def _caused_by(exc: BaseException, types: tuple[type[BaseException], ...]) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, types):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _first_line(exc: BaseException) -> str:
    """The first sentence of an exception message, for embedding in a one-sentence UserError."""
    text = str(exc).strip()
    line = text.splitlines()[0].strip() if text else type(exc).__name__
    line = re.split(r"(?<=[.!?])\s+(?=[A-Z])", line, maxsplit=1)[0]
    return line.rstrip(".").rstrip(":") or type(exc).__name__


# --------------------------------------------------------------------------- classification


def _looks_like_path(base_model: str) -> bool:
    if base_model.startswith((".", "/", "~")) or "\\" in base_model:
        return True
    if base_model.lower().endswith(WEIGHT_EXTENSIONS):
        return True
    return base_model.count("/") > 1


def _is_diffusers_folder(path: Path) -> bool:
    return (path / "model_index.json").is_file()


def _common_kwargs(backbone: type[Backbone], torch_dtype: torch.dtype | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if "safety_checker" in backbone.pipeline_class()._optional_components:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    if torch_dtype is not None:
        # diffusers >= 0.36 renamed torch_dtype to dtype (torch_dtype warns as deprecated).
        kwargs["dtype"] = torch_dtype
    return kwargs


# --------------------------------------------------------------------------- loading


def load_pipeline(
    base_model: str,
    *,
    revision: str | None = None,
    torch_dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
    single_file_config: str | None = None,
    backbone: str = "auto",
):
    """Load a pipeline (safety checker off) from a folder, a single file or a Hub id.

    ``backbone`` (auto, sd1, sd2, sdxl) must agree with what the files say when they say it.

    * an existing folder must be a diffusers folder (with ``model_index.json``);
    * a ``.safetensors`` file is loaded with ``from_single_file``; its component configs come
      from ``single_file_config`` (a local diffusers folder or Hub id) or, by default, from the
      Hub repo diffusers infers from the checkpoint, which must be cached when offline;
    * ``.ckpt``/``.bin``/``.pt``/``.pth`` files are pickles and need ``allow_pickle``;
    * anything else is a Hub id, loaded from the local cache when ``HF_HUB_OFFLINE`` is set.
    """
    base_model = str(base_model).strip()
    if not base_model:
        raise UserError("the base model is empty; pass a Hub id, a diffusers folder or a .safetensors file")
    offline = hub_offline()
    path = Path(base_model).expanduser()

    if path.is_dir():
        return _load_folder(path, torch_dtype, backbone)
    if path.is_file():
        pipe = _load_single_file(path, torch_dtype, allow_pickle, single_file_config, revision, offline, backbone)
        return _agrees_with_its_unet(pipe, base_model)
    if path.exists():
        raise UserError(
            f"base model '{base_model}' is neither a folder nor a file; pass a diffusers folder or a .safetensors file"
        )
    if _looks_like_path(base_model):
        raise UserError(f"base model '{base_model}' not found; check the path or pass a Hub id")
    if not _HUB_ID.fullmatch(base_model):
        raise UserError(
            f"base model '{base_model}' is neither an existing path nor a valid Hugging Face Hub id; "
            "pass a Hub id such as 'owner/name', a diffusers folder or a .safetensors file"
        )
    return _agrees_with_its_unet(_load_hub(base_model, revision, torch_dtype, offline, backbone), base_model)


def _agrees_with_its_unet(pipe, base_model: str):
    """A pipeline class chosen before the files could be read (an uncached hub id, a pickle) must fit the
    UNet that loaded: diffusers builds what it is asked for and drops components it has no place for."""
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer")
    found = family_of_unet(denoiser.config)
    if not found.owns_pipeline_class(type(pipe).__name__, dict(denoiser.config)):
        raise UserError(
            f"base model '{base_model}' holds a {found.title} UNet but was read as {type(pipe).__name__}; "
            f"pass --backbone {found.family}"
        )
    return pipe


def _load_folder(path: Path, torch_dtype: torch.dtype | None, backbone: str = "auto"):
    if not _is_diffusers_folder(path):
        raise UserError(
            f"base model folder '{path}' is not a diffusers model folder (it has no model_index.json); "
            "pass a diffusers folder, a .safetensors file or a Hub id"
        )
    family = agreeing_family(backbone, family_of_folder(path), path)
    try:
        with _offline_guard(True):  # a local folder never needs the Hub
            return family.pipeline_class().from_pretrained(str(path), **_common_kwargs(family, torch_dtype))
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(
            f"base model folder '{path}' could not be loaded ({_first_line(exc)}); check that it is a complete "
            f"{family.title} diffusers folder"
        ) from exc


def _load_single_file(
    path: Path,
    torch_dtype: torch.dtype | None,
    allow_pickle: bool,
    single_file_config: str | None,
    revision: str | None,
    offline: bool,
    backbone: str = "auto",
):
    suffix = path.suffix.lower()
    if suffix in PICKLE_EXTENSIONS:
        if not allow_pickle:
            raise UserError(
                f"base model '{path}' is a pickle checkpoint, which can run arbitrary code; "
                "convert it to .safetensors or pass --allow-pickle"
            )
        logger.warning("loading pickle checkpoint %s because pickles were explicitly allowed", path)
    elif suffix not in SAFETENSORS_EXTENSIONS:
        raise UserError(
            f"base model file '{path}' is not a .safetensors checkpoint; "
            "pass a .safetensors file, a diffusers folder or a Hub id"
        )

    family = agreeing_family(backbone, single_file_family(path), path) if suffix in SAFETENSORS_EXTENSIONS else get(
        "sd1" if backbone == "auto" else backbone)
    kwargs = _common_kwargs(family, torch_dtype)
    config = single_file_config
    if config is not None:
        config_path = Path(config).expanduser()
        if config_path.is_dir():
            if not _is_diffusers_folder(config_path):
                raise UserError(
                    f"base config folder '{config}' is not a diffusers model folder (it has no model_index.json); "
                    "pass a diffusers folder or Hub id of the same architecture as the checkpoint"
                )
            config = str(config_path)
        elif _looks_like_path(config):
            raise UserError(f"base config '{config}' not found; pass a local diffusers folder or a Hub id")
        else:
            kwargs["revision"] = revision
        kwargs["config"] = config
    elif family.single_file_denoiser_only:
        raise UserError(
            f"base model file '{path}' holds the {family.title} {family.denoiser_name} alone (the original "
            f"release's layout), with no VAE or text encoders; pass --base-config with a {family.title} diffusers "
            "folder or Hub id for the other parts"
        )
    if offline:
        kwargs["local_files_only"] = True

    try:
        with _offline_guard(offline):
            return family.load_single_file(path, kwargs)
    except UserError:
        raise
    except Exception as exc:
        if _caused_by(exc, _hub_access_error_types()):
            logger.debug("single-file config lookup failed: %s", exc)
            where = f"'{config}'" if config is not None else "the Hub"
            raise UserError(
                f"the component configs for '{path}' could not be fetched from {where} (offline, unreachable or "
                "not in the local Hugging Face cache); pass --base-config with a local diffusers folder (or Hub id) "
                "of the same architecture"
            ) from exc
        if isinstance(exc, (ValueError, KeyError, RuntimeError, OSError)) or type(exc).__name__ in (
            "SafetensorError",
            "SingleFileComponentError",
        ):
            raise UserError(
                f"base model file '{path}' could not be loaded ({_first_line(exc)}); check that it is a "
                f"{family.title} checkpoint and that --base-config matches its architecture"
            ) from exc
        raise


def _load_hub(hub_id: str, revision: str | None, torch_dtype: torch.dtype | None, offline: bool, backbone: str = "auto"):
    family = resolve_backbone(backbone, hub_id, revision)
    kwargs = _common_kwargs(family, torch_dtype)
    if revision is not None:
        kwargs["revision"] = revision
    if offline:
        kwargs["local_files_only"] = True
    try:
        with _offline_guard(offline):
            return family.pipeline_class().from_pretrained(hub_id, **kwargs)
    except Exception as exc:
        if not _caused_by(exc, (OSError, *_hub_access_error_types())):
            raise
        at = f" at revision '{revision}'" if revision else ""
        raise UserError(
            f"base model '{hub_id}'{at} could not be loaded: it is not in the local Hugging Face cache and the "
            "Hub is unreachable or has no such repo; download it first or pass a local diffusers folder or "
            ".safetensors file"
        ) from exc


# --------------------------------------------------------------------------- identity


def _file_fingerprint(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        digest.update(fh.read(FINGERPRINT_CHUNK))
        if size > FINGERPRINT_CHUNK:
            fh.seek(max(FINGERPRINT_CHUNK, size - FINGERPRINT_CHUNK))
            digest.update(fh.read(FINGERPRINT_CHUNK))
    return {"size": size, "sha256_ends": digest.hexdigest()}


def _folder_fingerprint(folder: Path) -> dict[str, Any]:
    weights = []
    configs = []
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = file.relative_to(folder).as_posix()
        if any(part.startswith(".") for part in file.relative_to(folder).parts):
            continue  # hidden files and folders (.cache, .git, editor droppings)
        if file.suffix.lower() in WEIGHT_EXTENSIONS:
            weights.append({"name": rel, **_file_fingerprint(file)})
        elif file.suffix.lower() == ".json" and file.stat().st_size <= FINGERPRINT_CHUNK:
            # Component configs (scheduler, model_index, ...) change what the weights mean.
            configs.append({"name": rel, "sha256": hashlib.sha256(file.read_bytes()).hexdigest()})
    return {"weights": weights, "configs": configs}


def _cached_commit(hub_id: str, revision: str | None) -> str | None:
    """The commit a Hub id/revision resolves to in the local cache, without any network access."""
    try:
        found = huggingface_hub.try_to_load_from_cache(hub_id, "model_index.json", revision=revision)
    except Exception:  # invalid id, unreadable cache, API differences: no commit known
        return None
    if isinstance(found, str):
        parts = Path(found).parts
        if "snapshots" in parts:
            index = parts.index("snapshots")
            if index + 1 < len(parts):
                return parts[index + 1]
    return None


def model_identity(base_model: str, revision: str | None = None) -> dict[str, Any]:
    """A JSON-able fingerprint of a base model, for cache keys.

    For a local folder or file: its absolute path and, for every weight file, its relative name,
    size and a sha256 of its first and last MiB (plus a hash of each small JSON config in a
    folder). For a Hub id: the id, the requested revision and, when the repo is in the local
    cache, the commit it resolves to. Never touches the network.
    """
    base_model = str(base_model).strip()
    path = Path(base_model).expanduser()
    if path.exists():
        resolved = path.resolve()
        if resolved.is_dir():
            return {"path": str(resolved), **_folder_fingerprint(resolved)}
        return {"path": str(resolved), "weights": [{"name": resolved.name, **_file_fingerprint(resolved)}]}
    identity: dict[str, Any] = {"hub_id": base_model, "revision": revision}
    commit = _cached_commit(base_model, revision)
    if commit is not None:
        identity["commit"] = commit
    return identity


def load_run_base(config: Mapping[str, Any], torch_dtype: torch.dtype | None = None):
    """The base model a run was trained from, given its config (a TrainConfig dump or config.yaml),
    with the run's --vae in place of the model's own."""
    pipe = load_pipeline(
        config["base_model"],
        revision=config.get("revision"),
        torch_dtype=torch_dtype,
        allow_pickle=bool(config.get("allow_pickle")),
        single_file_config=config.get("base_config"),
        backbone=config.get("backbone") or "auto",
    )
    if config.get("vae"):
        pipe.vae = load_vae(str(config["vae"]), torch_dtype)
    return pipe


def load_vae(vae: str, torch_dtype: torch.dtype | None = None):
    """A replacement VAE (e.g. SDXL's fp16-fixed one) from a diffusers folder or a cached Hub id."""
    from diffusers import AutoencoderKL

    path = Path(vae).expanduser()
    where = str(path) if path.exists() else vae
    kwargs: dict[str, Any] = {} if torch_dtype is None else {"dtype": torch_dtype}
    if path.is_dir() and (path / "vae" / "config.json").is_file():
        kwargs["subfolder"] = "vae"
    if hub_offline():
        kwargs["local_files_only"] = True
    try:
        with _offline_guard(hub_offline() or path.exists()):
            return AutoencoderKL.from_pretrained(where, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure here is a bad --vae
        raise UserError(
            f"--vae '{vae}' could not be loaded as a VAE ({_first_line(exc)}); pass a diffusers VAE folder "
            "(with config.json) or a cached Hub id"
        ) from exc
