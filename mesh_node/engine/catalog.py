"""Which model to serve: resolving `--model`, and listing the models available locally.

`resolve_model(spec)`:
- None or "builtin": the tiny MoE model shipped inside the package (no download);
- a path to a folder: that folder (it must hold config.json and safetensors weights);
- a Hugging Face repo id ("owner/name"): the copy in the local Hugging Face cache if complete,
  else fetched with huggingface_hub into the cache. Offline (no network, or HF_HUB_OFFLINE=1),
  the error says so and how to point at a local folder instead.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mesh_node.engine.checkpoint import Checkpoint
from mesh_node.engine.errors import EngineError, ModelNotFoundError

BUILTIN_NAME = "builtin"
BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
# what a checkpoint folder needs from a repo: config, weights, tokenizer, chat template
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
# Mistral's repos carry their own format's copy of the weights beside the Hugging Face shards
IGNORE_PATTERNS = ["consolidated*.safetensors"]


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    path: Path
    source: str  # "builtin" | "local" | "hf-cache" | "downloaded"


def resolve_model(
    spec: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    allow_download: bool = True,
) -> ResolvedModel:
    """Turns a `--model` value into a local checkpoint folder (see the module docstring)."""
    if spec is None or str(spec) == BUILTIN_NAME:
        return ResolvedModel(BUILTIN_NAME, BUILTIN_DIR, "builtin")
    text = str(spec)
    path = Path(text).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{path} has no config.json; point --model at a Hugging Face model folder "
                f"(config.json, *.safetensors, tokenizer files)"
            )
        return ResolvedModel(folder_name(path), path.resolve(), "local")
    if not REPO_ID.match(text) or text.startswith((".", "/", "~")):
        raise ModelNotFoundError(
            f"{text!r} is neither an existing folder nor a Hugging Face repo id (owner/name)"
        )
    return _from_hub(text, cache_dir, allow_download)


def folder_name(path: Path) -> str:
    """The name of the model in folder `path`: the folder's as given, `.` and `..` taken away
    (`--model .` in a model's folder would name it "", which no request can ask for); a link's
    own name, not its target's."""
    return Path(os.path.abspath(path)).name


def hf_cache_folder(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The Hugging Face hub cache: `cache_dir`, else the default one (HF_HUB_CACHE, else
    $HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def check_cache_folder(cache_dir: str | os.PathLike[str]) -> Path:
    """`cache_dir`, a Hugging Face cache someone named; ModelNotFoundError unless it is a folder
    (a typo would otherwise list nothing, or download whole models into a new folder). A
    Hugging Face home (HF_HOME, e.g. ~/.cache/huggingface: no models of its own, and a `hub`
    folder that has some) stands for its hub cache, that `hub` folder."""
    path = hf_cache_folder(cache_dir)
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise ModelNotFoundError(f"the Hugging Face cache {path} {what}")
    if not _holds_models(path) and _holds_models(path / "hub"):
        return path / "hub"
    return path


def _holds_models(folder: Path) -> bool:
    """Whether `folder` holds a model as a Hugging Face hub cache lays it out (models--*)."""
    return folder.is_dir() and any(folder.glob("models--*"))


def _from_hub(repo_id: str, cache_dir, allow_download: bool) -> ResolvedModel:
    from huggingface_hub import snapshot_download

    download = functools.partial(
        snapshot_download,
        repo_id,
        cache_dir=cache_dir,
        allow_patterns=DOWNLOAD_PATTERNS,
        ignore_patterns=IGNORE_PATTERNS,
    )
    try:
        folder = download(local_files_only=True)
        if (Path(folder) / "config.json").is_file():
            return ResolvedModel(repo_id, Path(folder), "hf-cache")
    except Exception:  # not cached (or incomplete): fetch below
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    cache = (
        f"the local Hugging Face cache at {hf_cache_folder(cache_dir)} (HF_HUB_CACHE, or "
        f"--cache-dir, names another)"
    )
    how = (
        f"To use a copy you already have, pass its folder: --model /path/to/folder "
        f"(with config.json, *.safetensors and tokenizer files), or download it on a machine "
        f"with network access (`hf download {repo_id}`) and copy the folder over."
    )
    if offline or not allow_download:
        why = "HF_HUB_OFFLINE is set" if offline else "this command only reads the cache"
        raise ModelNotFoundError(
            f"model {repo_id!r} is not in {cache}, and it is not downloaded ({why}). {how}"
        )
    try:
        folder = download()
    except Exception as exc:
        kind = type(exc).__name__
        if "RepositoryNotFound" in kind or "GatedRepo" in kind:
            raise ModelNotFoundError(
                f"Hugging Face repo {repo_id!r} was not found or needs access rights ({kind})"
            ) from exc
        raise ModelNotFoundError(
            f"cannot fetch {repo_id!r} from the Hugging Face hub, and it is not in {cache}: "
            f"{kind}: {exc}. If this machine is offline: {how}"
        ) from exc
    return ResolvedModel(repo_id, Path(folder), "downloaded")


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: Path
    source: str
    architecture: str
    size_bytes: int
    parameters: int
    active_parameters: int
    experts: int  # routed experts per MoE layer (0 for dense models)
    experts_per_token: int
    layers: int
    error: str | None = None  # set when the folder is there but unusable


def describe_model(name: str, path: Path, source: str) -> ModelInfo:
    try:
        checkpoint = Checkpoint.open(path)
    except EngineError as exc:
        return ModelInfo(name, path, source, "?", 0, 0, 0, 0, 0, 0, error=str(exc))
    except Exception as exc:  # a folder no check foresaw: listed as unusable, never a crash
        error = f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})"
        return ModelInfo(name, path, source, "?", 0, 0, 0, 0, 0, 0, error=error)
    args = checkpoint.args
    counts = args.parameter_count()
    return ModelInfo(
        name=name,
        path=path,
        source=source,
        architecture=args.architecture,
        size_bytes=checkpoint.nbytes,
        parameters=counts["total"],
        active_parameters=counts["active"],
        experts=args.moe.num_experts if args.moe else 0,
        experts_per_token=args.moe.top_k if args.moe else 0,
        layers=args.num_layers,
    )


def list_local_models(
    folders: Iterable[str | os.PathLike[str]] = (),
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    include_hf_cache: bool = True,
) -> list[ModelInfo]:
    """The built-in model, models in the Hugging Face cache (`cache_dir`, which must exist, else
    the default one if there is one), and the given folders (each either a model folder or a
    folder of model folders)."""
    if include_hf_cache and cache_dir is not None:
        cache_dir = check_cache_folder(cache_dir)
    models = [describe_model(BUILTIN_NAME, BUILTIN_DIR, "builtin")]
    for folder in folders:
        path = Path(folder).expanduser()
        if (path / "config.json").is_file():
            models.append(describe_model(folder_name(path), path, "local"))
        elif path.is_dir():
            for child in sorted(p for p in path.iterdir() if (p / "config.json").is_file()):
                models.append(describe_model(child.name, child, "local"))
        else:
            raise ModelNotFoundError(f"{path} is not a folder")
    if include_hf_cache:
        models.extend(_hf_cache_models(cache_dir))
    return models


def _hf_cache_models(cache_dir) -> list[ModelInfo]:
    from huggingface_hub import scan_cache_dir

    try:
        info = scan_cache_dir(cache_dir)
    except Exception:  # no cache yet (CacheNotFound) or unreadable: nothing to list
        return []
    found = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        revisions = sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True)
        for revision in revisions:
            if (revision.snapshot_path / "config.json").is_file():
                found.append(describe_model(repo.repo_id, revision.snapshot_path, "hf-cache"))
                break
    return found
