"""Push a run to the Hugging Face Hub: `hf-fedkseed push`, and the Trainer's push with the FedKSeed model card."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

__all__ = [
    "DELTA_FILES",
    "FAILURE",
    "IGNORE_PATTERNS",
    "KSEED_CONFIG_NAME",
    "KSEED_DELTA_NAME",
    "USAGE_ERROR",
    "add_push_arguments",
    "files_to_upload",
    "push_output_dir",
    "push_trainer_to_hub",
    "run_push",
]

# The KSeed delta and the card (`delta.KSEED_CONFIG_NAME`, `delta.KSEED_DELTA_NAME`, `model_card.MODEL_CARD_NAME`),
# spelled out so that building the CLI parser imports no torch.
KSEED_CONFIG_NAME = "kseed_config.json"
KSEED_DELTA_NAME = "kseed_delta.safetensors"
DELTA_FILES = (KSEED_CONFIG_NAME, KSEED_DELTA_NAME, "README.md")
# What the Trainer leaves out of its pushes (`_*`, checkpoints), plus hidden and temporary files.
IGNORE_PATTERNS = ["_*", "checkpoint-*", ".*", "*/.*"]
USAGE_ERROR = 2
FAILURE = 1


def files_to_upload(folder: str | os.PathLike, *, delta_only: bool = False) -> list[tuple[str, int]]:
    """The `(path in repo, size in bytes)` of every file a push of `folder` uploads, as `upload_folder` selects them.

    Args:
        folder: a run's output directory (or a checkpoint).
        delta_only: only the KSeed delta and the model card (a few kilobytes), not the merged model.

    Raises:
        ValueError: if `folder` is not a directory, `delta_only` and it holds no KSeed delta, or a file to upload is
            a symbolic link (itself or through a linked folder) to a path outside `folder`.

    Example:
        >>> files_to_upload("outputs/quickstart", delta_only=True)
        [('README.md', 4120), ('kseed_config.json', 2210), ('kseed_delta.safetensors', 8280)]
    """
    from huggingface_hub.utils import filter_repo_objects
    from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{str(folder)!r} is not a directory; pass the output directory of `hf-fedkseed train`.")
    if delta_only and not all((folder / name).is_file() for name in (KSEED_CONFIG_NAME, KSEED_DELTA_NAME)):
        raise ValueError(
            f"{str(folder)!r} holds no KSeed delta ({KSEED_CONFIG_NAME} + {KSEED_DELTA_NAME}); only FedKSeed runs "
            "write one. Push without `--delta_only` to upload the merged model."
        )
    files = {path.relative_to(folder).as_posix(): path for path in sorted(folder.glob("**/*")) if path.is_file()}
    allow = list(DELTA_FILES) if delta_only else None
    selected = list(
        filter_repo_objects(files, allow_patterns=allow, ignore_patterns=IGNORE_PATTERNS + DEFAULT_IGNORE_PATTERNS)
    )
    root = folder.resolve()
    linked_folders = {}  # the upload walks into a linked folder; glob does not, so check the links themselves
    if not delta_only:
        links = {path.relative_to(folder).as_posix(): path for path in folder.glob("**/*") if path.is_symlink()}
        kept = filter_repo_objects(links, ignore_patterns=IGNORE_PATTERNS + DEFAULT_IGNORE_PATTERNS)
        linked_folders = {name: links[name] for name in kept if links[name].is_dir()}
    for name, path in [*((name, files[name]) for name in selected), *linked_folders.items()]:
        # upload_folder follows links: a link out of the folder would upload a foreign file
        target = path.resolve()
        if not target.is_relative_to(root):
            raise ValueError(
                f"{name!r} in {str(folder)!r} is a symbolic link to {str(target)!r}, outside the folder; a push "
                "uploads only the run's own files. Replace the link with a copy of the file, or remove it."
            )
    return [(name, files[name].stat().st_size) for name in selected]


def _require_token(token: str | None) -> str:
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise RuntimeError(
            "No Hugging Face token found: run `hf auth login` or set the `HF_TOKEN` environment variable to a token "
            "with write access, then push again."
        )
    return token


def push_output_dir(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    delta_only: bool = False,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
):
    """Create `repo_id` on the Hub if needed and upload a run's output directory to it in one commit.

    Uploads the merged model, tokenizer, KSeed delta, model card and run records (not checkpoints), or with
    `delta_only` just the delta and the card. Local files are only read.

    Args:
        folder: the output directory of a run.
        repo_id: `user/name` or `org/name`.
        delta_only: upload only `kseed_config.json`, `kseed_delta.safetensors` and `README.md`.
        private: create the repo private (ignored if it exists; None: the account's default).
        token: a token with write access (default: `HF_TOKEN` or the saved `hf auth login`).
        revision: the branch to commit to (default: main).
        commit_message: the commit's summary.
        endpoint: the Hub's URL (default: `HF_ENDPOINT` or https://huggingface.co).

    Returns:
        The `huggingface_hub.CommitInfo` of the upload.

    Raises:
        ValueError: for a folder that is not a run's output (see `files_to_upload`).
        RuntimeError: without a token, or when the Hub refuses or the upload fails; nothing local changes.

    Example:
        >>> push_output_dir("outputs/quickstart", "me/tiny-llama-fedkseed", delta_only=True)
    """
    from huggingface_hub import HfApi

    files = files_to_upload(folder, delta_only=delta_only)
    if not files:
        raise ValueError(f"{str(folder)!r} holds no file to upload.")
    token = _require_token(token)
    api = HfApi(endpoint=endpoint, token=token)
    what = "KSeed delta" if delta_only else "model"
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(
            repo_id=url.repo_id,
            folder_path=str(folder),
            allow_patterns=list(DELTA_FILES) if delta_only else None,
            ignore_patterns=list(IGNORE_PATTERNS),
            commit_message=commit_message or f"Upload {what} with hf_fedkseed",
            revision=revision,
        )
    except Exception as error:  # network, authentication or Hub errors: one clear message, local files untouched
        raise RuntimeError(
            f"Pushing {str(folder)!r} to {repo_id!r} failed ({type(error).__name__}: {error}). Nothing local was "
            "changed; fix the cause (token rights, repo id, network) and run the push again."
        ) from error


def push_trainer_to_hub(trainer, *, commit_message: str = "End of training", blocking: bool = True):
    """`trainer.push_to_hub()` that keeps the FedKSeed card instead of writing the Trainer's generic one.

    `Trainer.push_to_hub` calls `create_model_card`, which would replace `README.md` with a card that names the
    Trainer's default optimizer (AdamW); for this one call it is a no-op, so the card `KSeedArtifactsCallback`
    writes (on `on_push_begin`) is the one uploaded.

    Raises:
        RuntimeError: if the push fails; the output directory is already complete on disk.

    Example:
        >>> push_trainer_to_hub(trainer)
    """
    trainer.create_model_card = lambda *args, **kwargs: None
    try:
        return trainer.push_to_hub(commit_message=commit_message, blocking=blocking)
    except Exception as error:
        output_dir = trainer.args.output_dir
        raise RuntimeError(
            f"Pushing {output_dir!r} to the Hub failed ({type(error).__name__}: {error}). The outputs are saved in "
            f"{output_dir!r}; push them later with `hf-fedkseed push {output_dir} --repo_id USER/NAME`."
        ) from error
    finally:
        del trainer.create_model_card  # back to the Trainer's method


def add_push_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the arguments of `hf-fedkseed push` to `parser`."""
    parser.add_argument("output_dir", help="directory written by `hf-fedkseed train` (or one of its checkpoints)")
    parser.add_argument("--repo_id", required=True, help="Hub repository to create or update, as USER/NAME")
    parser.add_argument(
        "--delta_only",
        action="store_true",
        help=f"upload only the KSeed delta ({KSEED_CONFIG_NAME}, {KSEED_DELTA_NAME}) and the model card",
    )
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--dry_run", action="store_true", help="list the files and sizes to upload; upload nothing")
    parser.add_argument("--revision", default=None, help="branch to commit to (default: main)")
    parser.add_argument("--commit_message", default=None, help="summary of the commit")
    return parser


def run_push(args: argparse.Namespace) -> int:
    """`hf-fedkseed push`: 0 on success, 2 for a wrong command line or folder, 1 if the push fails."""
    try:
        files = files_to_upload(args.output_dir, delta_only=args.delta_only)
    except ValueError as error:
        print(f"hf-fedkseed push: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    if args.dry_run:
        width = max((len(name) for name, _ in files), default=0)
        print(f"Would upload {len(files)} files to {args.repo_id}{' (private)' if args.private else ''}:")
        for name, size in files:
            print(f"  {name:<{width}}  {size:>14,} bytes")
        print(f"  {'total':<{width}}  {sum(size for _, size in files):>14,} bytes")
        return 0
    try:
        info = push_output_dir(
            args.output_dir,
            args.repo_id,
            delta_only=args.delta_only,
            private=True if args.private else None,
            revision=args.revision,
            commit_message=args.commit_message,
        )
    except (ValueError, RuntimeError) as error:
        print(f"hf-fedkseed push: error: {error}", file=sys.stderr)
        return FAILURE
    print(f"Uploaded {len(files)} files ({sum(size for _, size in files):,} bytes) to {info.commit_url}")
    return 0
