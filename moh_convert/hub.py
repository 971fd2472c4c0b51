"""`moh push`: verify a MoH model folder, refresh its model card and upload it to the Hugging Face Hub in one commit.

Nothing is uploaded unless the folder is complete, its Python code is the code moh_convert ships (checked before
anything from the folder runs), and it loads, through that code, in a fresh Python with a minimal environment where
moh_convert cannot be imported, which is how the people who download it will load it. With --allow-custom-code the
code is not compared, and then not run here either.
"""
import importlib
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from .errors import MoHError
from .folder_checks import check_code_is_shipped, check_folder_files, check_loads_in_fresh_process, is_uploaded
from .card_evaluation import load_evaluation
from .model_card import CARD_NAME, read_model_card, read_moh_config, render_updated_card
from .options import validate_options

DEFAULT_COMMIT_MESSAGE = "Upload MoH model with moh_convert"
OFFLINE_MESSAGE = (
    "offline mode is on (HF_HUB_OFFLINE=1 or TRANSFORMERS_OFFLINE=1), so nothing can be pushed to the Hub: "
    "unset it, or add --dry-run to check the folder without uploading"
)
LOAD_CHECK_SKIPPED_MESSAGE = (
    "Load check skipped: with --allow-custom-code the folder's Python code is not moh_convert's, so it was not run "
    "here (it would run with your environment and token); load the model yourself before sharing it."
)
NOT_LOGGED_IN_MESSAGE = (
    "not logged in to the Hugging Face Hub: set HF_TOKEN to a write token or run `hf auth login` "
    "(--dry-run needs no token)"
)


class PushOptions(BaseModel):
    """Options of `moh push` / `moh_convert.hub.push()`."""

    model_config = ConfigDict(extra="forbid")

    private: bool = Field(False, description="Create the repository as private (ignored if it already exists).")
    revision: str | None = Field(None, description="Branch to push to, created if missing (default: main).")
    create_pr: bool = Field(False, description="Open a pull request with the upload instead of committing directly.")
    commit_message: str | None = Field(None, description=f"Commit message (default: '{DEFAULT_COMMIT_MESSAGE}').")
    dry_run: bool = Field(
        False, description="Verify the folder and list the files that would be uploaded with their sizes; "
        "needs no token or network.",
    )
    eval_dir: Path | None = Field(
        None, description="Output folder of `moh eval` (results_table.md, comparison.json): adds the results "
        "to the model card and its model-index metadata.",
    )
    allow_custom_code: bool = Field(
        False, description="Upload Python code that is not moh_convert's own: skip the check that config.json's "
        "auto_map, configuration_moh.py and modeling_moh.py are what moh_convert writes, with no other .py file and "
        "no tokenizer auto_map. That code is then never run by moh push (the fresh-Python load check is skipped), but "
        "everyone who loads the model with trust_remote_code runs it: only for code you wrote and reviewed.",
    )


@dataclass
class UploadFile:
    """One file of the commit. The model card is uploaded as rendered (`content`), everything else from disk."""

    path_in_repo: str
    size: int
    local_path: Path | None = None
    content: bytes | None = None


@dataclass
class PushResult:
    """What `push()` uploaded, or with dry_run would upload; commit_url/pr_url are set after a real push."""

    repo_id: str
    revision: str | None
    create_pr: bool
    files: list[UploadFile]
    dry_run: bool
    load_check_skipped: bool = False  # --allow-custom-code: the folder's own code was not run
    commit_url: str | None = None
    pr_url: str | None = None

    @property
    def total_size(self) -> int:
        return sum(upload.size for upload in self.files)


def push(folder: str | os.PathLike, repo_id: str, **options) -> PushResult:
    """Verify FOLDER, refresh its model card and upload it to the Hub repository REPO_ID in one commit.

    Keyword options are those of `PushOptions` (the same as the `moh push` flags). With dry_run=True the folder is
    verified and the files are listed, but no token or network is needed and nothing is uploaded.
    """
    opts = validate_options(PushOptions, options)
    folder = Path(folder).expanduser().resolve()
    check_repo_id(repo_id)
    # Offline mode or a missing token fails at once, before the slow load check; a dry run needs neither.
    api = None if opts.dry_run else hub_api(hub_token())
    check_folder_files(folder)
    # Nothing from the folder runs unless its code is ours; custom code is never run here at all.
    if not opts.allow_custom_code:
        check_code_is_shipped(folder)
    evaluation = load_evaluation(opts.eval_dir) if opts.eval_dir else None
    if not opts.allow_custom_code:
        check_loads_in_fresh_process(folder)
    # Only a real push asks the Hub for the base model's license: a dry run stays offline.
    license = None if api is None else base_model_license(api, read_model_card(folder).data)
    card_text = render_updated_card(folder, read_moh_config(folder), repo_id, evaluation, license)
    files = files_to_upload(folder, card_text.encode("utf-8"))
    result = PushResult(
        repo_id, opts.revision, opts.create_pr, files, dry_run=opts.dry_run, load_check_skipped=opts.allow_custom_code
    )
    if api is None:
        return result
    commit = upload(api, repo_id, files, opts)
    result.commit_url, result.pr_url = commit.commit_url, commit.pr_url
    return result


def check_push_ready(repo_id: str) -> None:
    """Fail now, not after a long conversion or training run, if REPO_ID cannot be pushed to: a bad id, offline
    mode or no token. `moh convert/train --push-to-hub` call this first and `push()` when the folder is written."""
    check_repo_id(repo_id)
    hub_token()


# ---------------------------------------------------------------- Hub access


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise MoHError(f"invalid Hub repository id {repo_id!r}: {first_line(error)}") from None


def hub_token() -> str:
    """The token from HF_TOKEN or a saved `hf auth login`; offline mode and no login are one-line errors."""
    from huggingface_hub import constants, get_token

    if constants.is_offline_mode():
        raise MoHError(OFFLINE_MESSAGE)
    token = get_token()
    if not token:
        raise MoHError(NOT_LOGGED_IN_MESSAGE)
    return token


def hub_api(token: str):
    from huggingface_hub import HfApi

    return HfApi(token=token)


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def transport_errors() -> tuple[type[BaseException], ...]:
    """Connection errors of huggingface_hub's HTTP client (httpx2 in huggingface_hub 2.x, httpx in 1.x)."""
    errors = []
    for module_name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(module_name).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


@contextmanager
def hub_errors_as_moh_errors(repo_id: str):
    """Turn what the Hub or the network raise into one line that says what to do."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError

    try:
        yield
    except OfflineModeIsEnabled:
        raise MoHError(OFFLINE_MESSAGE) from None
    except RepositoryNotFoundError:
        raise MoHError(f"repository {repo_id} was not found or your token cannot access it") from None
    except HfHubHTTPError as error:
        status = getattr(error.response, "status_code", None)
        if status == 401:
            raise MoHError(f"the Hub rejected the token (HTTP 401); {NOT_LOGGED_IN_MESSAGE}") from None
        if status == 403:
            raise MoHError(
                f"your token may not write to {repo_id} (HTTP 403): use a token with write access, "
                "or --create-pr to propose the upload as a pull request"
            ) from None
        raise MoHError(f"the Hub refused the push to {repo_id}: {first_line(error)}") from None
    except transport_errors() as error:
        raise MoHError(
            f"cannot reach the Hugging Face Hub ({type(error).__name__}: {first_line(error)}); "
            "check the network connection, or use --dry-run"
        ) from None


def base_model_license(api, card_data) -> str | None:
    """When the card names a base model but no license, the license the base model's Hub card declares."""
    from huggingface_hub.errors import HfHubHTTPError

    base_model = card_data.base_model
    if card_data.license or not isinstance(base_model, str):
        return None
    try:
        info = api.model_info(base_model)
    except (HfHubHTTPError, *transport_errors()):
        return None  # unknown: the card simply has no license line, the push goes on
    license = info.card_data.get("license") if info.card_data is not None else None
    return license if isinstance(license, str) else None


def upload(api, repo_id: str, files: list[UploadFile], opts: PushOptions):
    """Create the repository (and branch) if needed, then upload every file in one commit. huggingface_hub
    uploads large files through LFS/Xet by itself."""
    from huggingface_hub import CommitOperationAdd

    operations = [
        CommitOperationAdd(
            path_in_repo=upload_file.path_in_repo,
            path_or_fileobj=upload_file.content if upload_file.content is not None else upload_file.local_path,
        )
        for upload_file in files
    ]
    with hub_errors_as_moh_errors(repo_id):
        # private=None lets an organisation's default visibility apply when --private is not given.
        api.create_repo(repo_id, repo_type="model", private=True if opts.private else None, exist_ok=True)
        if opts.revision and opts.revision != "main":
            api.create_branch(repo_id, repo_type="model", branch=opts.revision, exist_ok=True)
        return api.create_commit(
            repo_id,
            operations,
            repo_type="model",
            commit_message=opts.commit_message or DEFAULT_COMMIT_MESSAGE,
            revision=opts.revision,
            create_pr=opts.create_pr,
        )


# ---------------------------------------------------------------- what gets uploaded


def files_to_upload(folder: Path, card_bytes: bytes) -> list[UploadFile]:
    files = []
    for path in sorted(folder.rglob("*")):
        relative_path = path.relative_to(folder)
        if not path.is_file() or not is_uploaded(relative_path):
            continue
        path_in_repo = relative_path.as_posix()
        if path_in_repo == CARD_NAME:
            files.append(UploadFile(path_in_repo, len(card_bytes), content=card_bytes))
        else:
            files.append(UploadFile(path_in_repo, path.stat().st_size, local_path=path))
    return files


def human_size(size: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def describe_push(result: PushResult) -> str:
    """What the CLI prints: every file with its size in bytes, the total, and where it went (or would go)."""
    branch = result.revision or "main"
    target = f"a pull request on {result.repo_id} ({branch})" if result.create_pr else f"{result.repo_id} ({branch})"
    verb = "Would upload" if result.dry_run else "Uploaded"
    lines = [f"{verb} {len(result.files)} files to {target}:"]
    width = max(len(f"{upload_file.size:,}") for upload_file in result.files)
    for upload_file in result.files:
        note = "  (model card, as rendered for the Hub)" if upload_file.content is not None else ""
        lines.append(f"  {upload_file.size:>{width},} bytes  {upload_file.path_in_repo}{note}")
    lines.append(f"Total: {result.total_size:,} bytes ({human_size(result.total_size)})")
    if result.load_check_skipped:
        lines.append(LOAD_CHECK_SKIPPED_MESSAGE)
    if result.dry_run and result.load_check_skipped:
        lines.append("Dry run: the folder's files passed the checks (its code was neither compared nor run); "
                     "nothing was uploaded.")
    elif result.dry_run:
        lines.append("Dry run: the folder passed every check and loads without moh_convert; nothing was uploaded.")
    else:
        lines.append(f"Commit: {result.commit_url}")
        if result.pr_url:
            lines.append(f"Pull request: {result.pr_url}")
    return "\n".join(lines)
