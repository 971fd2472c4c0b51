"""`moh push`: verify a MoH model folder, refresh its model card and upload it to the Hugging Face Hub in one commit.

Nothing is uploaded unless the folder is complete and loads, through the modeling code it ships, in a fresh Python
where moh_convert cannot be imported, which is how the people who download it will load it.
"""
import importlib
import json
import os
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from .errors import MoHError
from .model_card import CARD_NAME, load_evaluation, read_model_card, read_moh_config, render_updated_card
from .options import validate_options
from .safetensors_stream import read_safetensors_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_WEIGHTS_NAME = "model.safetensors"
REQUIRED_AUTO_MAP = ("AutoConfig", "AutoModelForCausalLM")
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
TOKENIZER_VOCAB_NAMES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
DEFAULT_COMMIT_MESSAGE = "Upload MoH model with moh_convert"
OFFLINE_MESSAGE = (
    "offline mode is on (HF_HUB_OFFLINE=1 or TRANSFORMERS_OFFLINE=1), so nothing can be pushed to the Hub: "
    "unset it, or add --dry-run to check the folder without uploading"
)
NOT_LOGGED_IN_MESSAGE = (
    "not logged in to the Hugging Face Hub: set HF_TOKEN to a write token or run `hf auth login` "
    "(--dry-run needs no token)"
)
MAX_NAMES_IN_MESSAGE = 5


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
    evaluation = load_evaluation(opts.eval_dir) if opts.eval_dir else None
    check_loads_in_fresh_process(folder)
    # Only a real push asks the Hub for the base model's license: a dry run stays offline.
    license = None if api is None else base_model_license(api, read_model_card(folder).data)
    card_text = render_updated_card(folder, read_moh_config(folder), repo_id, evaluation, license)
    files = files_to_upload(folder, card_text.encode("utf-8"))
    result = PushResult(repo_id, opts.revision, opts.create_pr, files, dry_run=opts.dry_run)
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


def is_uploaded(relative_path: Path) -> bool:
    """Hidden files and folders (.cache, .git) and Python bytecode are local leftovers, not part of the model."""
    parts = relative_path.parts
    return not any(part.startswith(".") or part == "__pycache__" for part in parts) and relative_path.suffix != ".pyc"


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
    if result.dry_run:
        lines.append("Dry run: the folder passed every check and loads without moh_convert; nothing was uploaded.")
    else:
        lines.append(f"Commit: {result.commit_url}")
        if result.pr_url:
            lines.append(f"Pull request: {result.pr_url}")
    return "\n".join(lines)


# ---------------------------------------------------------------- verifying the folder


def check_folder_files(folder: Path) -> None:
    """Every file a user needs is there and consistent; the first problem found is a MoHError naming it."""
    if not folder.is_dir():
        raise MoHError(f"model folder {folder} not found")
    auto_map = check_config(folder)
    check_modeling_code(folder, auto_map)
    check_weights(folder)
    check_tokenizer(folder)
    read_model_card(folder)


def check_config(folder: Path) -> dict:
    """config.json exists, is a MoH config and carries the auto_map that points transformers at the shipped code."""
    read_moh_config(folder)
    auto_map = json.loads((folder / "config.json").read_text()).get("auto_map")
    if not isinstance(auto_map, dict) or not auto_map:
        raise MoHError(
            f"{folder / 'config.json'} has no auto_map, so transformers cannot find the MoH modeling code "
            "(trust_remote_code); re-run `moh convert`"
        )
    missing = [key for key in REQUIRED_AUTO_MAP if key not in auto_map]
    if missing:
        raise MoHError(f"the auto_map in {folder / 'config.json'} lacks {', '.join(missing)}; re-run `moh convert`")
    return auto_map


def module_file_names(auto_map: dict) -> list[str]:
    """{'AutoConfig': 'configuration_moh.MoHConfig'} -> ['configuration_moh.py'] ('repo--module.Class' too)."""
    names = []
    for reference in auto_map.values():
        for item in reference if isinstance(reference, (list, tuple)) else [reference]:
            if isinstance(item, str):
                names.append(item.split("--")[-1].rsplit(".", 1)[0] + ".py")
    return sorted(set(names))


def check_modeling_code(folder: Path, auto_map: dict) -> None:
    """The files auto_map names, and the files they import relatively, are in the folder."""
    from transformers.dynamic_module_utils import get_relative_imports

    pending = module_file_names(auto_map)
    seen: set[str] = set()
    while pending:
        file_name = pending.pop()
        if file_name in seen:
            continue
        seen.add(file_name)
        if not (folder / file_name).is_file():
            raise MoHError(
                f"modeling file {file_name} is missing from {folder} (config.json's auto_map needs it); "
                "re-run `moh convert` or copy it from moh_convert/modeling/"
            )
        pending.extend(f"{module}.py" for module in get_relative_imports(str(folder / file_name)))


def read_weight_index(path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as error:
        raise MoHError(f"{path.name} is not a valid weights index ({error}); re-run `moh convert`") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise MoHError(f"{path.name} has an empty weight_map; re-run `moh convert`")
    return weight_map


def some_names(names) -> str:
    names = sorted(names)
    shown = ", ".join(names[:MAX_NAMES_IN_MESSAGE])
    return shown + (f" and {len(names) - MAX_NAMES_IN_MESSAGE} more" if len(names) > MAX_NAMES_IN_MESSAGE else "")


def check_weights(folder: Path) -> None:
    """The index names only existing shards, lists every shard, and each shard holds exactly the tensors the index
    puts in it. Without an index, model.safetensors is the only weights file."""
    shard_names = {path.name for path in folder.glob("*.safetensors")}
    index_path = folder / INDEX_NAME
    if not index_path.is_file():
        if not shard_names:
            raise MoHError(f"{folder} has no weights: neither {SINGLE_WEIGHTS_NAME} nor {INDEX_NAME}; re-run `moh convert`")
        unused = shard_names - {SINGLE_WEIGHTS_NAME}
        if unused:
            raise MoHError(
                f"{INDEX_NAME} is missing, so weights file(s) {some_names(unused)} would not be loaded; re-run `moh convert`"
            )
        read_safetensors_header(folder / SINGLE_WEIGHTS_NAME)  # raises on a damaged file
        return
    weight_map = read_weight_index(index_path)
    listed_shards = set(weight_map.values())
    missing_shards = listed_shards - shard_names
    if missing_shards:
        raise MoHError(f"{INDEX_NAME} names shard(s) {some_names(missing_shards)} that are missing from {folder}")
    # transformers prefers model.safetensors over an index when both exist, so a stray one would be loaded alone.
    unlisted_shards = shard_names - listed_shards
    if unlisted_shards:
        raise MoHError(f"weights file(s) {some_names(unlisted_shards)} are not listed in {INDEX_NAME}")
    tensors_in_shard = {shard: set(read_safetensors_header(folder / shard)[1]) for shard in sorted(listed_shards)}
    for shard, in_header in tensors_in_shard.items():
        in_index = {name for name, file_name in weight_map.items() if file_name == shard}
        if in_index - in_header:
            raise MoHError(
                f"{INDEX_NAME} puts tensor(s) {some_names(in_index - in_header)} in {shard}, but {shard} does not hold them"
            )
    for shard, in_header in tensors_in_shard.items():
        unlisted_tensors = {name for name in in_header if weight_map.get(name) != shard}
        if unlisted_tensors:
            raise MoHError(f"{shard} holds tensor(s) {some_names(unlisted_tensors)} that {INDEX_NAME} does not list there")


def check_tokenizer(folder: Path) -> None:
    if not (folder / TOKENIZER_CONFIG_NAME).is_file():
        raise MoHError(f"{folder} has no tokenizer ({TOKENIZER_CONFIG_NAME} is missing); copy the source's tokenizer files")
    if not any((folder / name).is_file() for name in TOKENIZER_VOCAB_NAMES):
        raise MoHError(
            f"{folder} has no tokenizer vocabulary (none of {', '.join(TOKENIZER_VOCAB_NAMES)}); "
            "copy the source's tokenizer files"
        )


# Run in a fresh interpreter where `import moh_convert` fails, like the machine of someone who downloads the model.
LOAD_CHECK_SCRIPT = r"""
import json, sys
sys.modules["moh_convert"] = None
folder, report_path = sys.argv[1], sys.argv[2]

def report(result):
    with open(report_path, "w") as handle:
        json.dump(result, handle)

def fail(stage, error):
    lines = str(error).strip().splitlines()
    report({"failed": stage, "error": f"{type(error).__name__}: {lines[0] if lines else ''}"})
    sys.exit(1)

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
try:
    model, info = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
except Exception as error:
    fail("model", error)
try:
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    input_ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    assert input_ids.shape[1] > 0, "the tokenizer returned no tokens"
except Exception as error:
    fail("tokenizer", error)
try:
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
except Exception as error:
    fail("forward", error)
report({
    "module": type(model).__module__,
    "missing": sorted(info["missing_keys"]),
    "unexpected": sorted(info["unexpected_keys"]),
    "mismatched": sorted(str(item[0]) if isinstance(item, tuple) else str(item) for item in info["mismatched_keys"]),
    "finite": bool(torch.isfinite(logits).all()),
})
"""
LOAD_STAGES = {"model": "the model", "tokenizer": "the tokenizer", "forward": "a forward pass of the model"}


def check_loads_in_fresh_process(folder: Path) -> None:
    """Load the model with trust_remote_code and the tokenizer in a subprocess without moh_convert (offline, with
    an empty module cache so no earlier copy of the code stands in), run one forward pass, and check that every
    weight was used and every parameter was loaded."""
    with tempfile.TemporaryDirectory(prefix="moh-load-check-") as work_dir:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(Path(work_dir) / "modules")}
        report_path = Path(work_dir) / "report.json"
        completed = subprocess.run(
            [sys.executable, "-c", LOAD_CHECK_SCRIPT, str(folder), str(report_path)],
            capture_output=True, text=True, env=env, cwd=work_dir, stdin=subprocess.DEVNULL,
        )
        report = json.loads(report_path.read_text()) if report_path.is_file() else None
    prefix = f"{folder} does not load in a fresh Python without moh_convert (trust_remote_code)"
    if report is None:
        stderr_lines = completed.stderr.strip().splitlines()
        raise MoHError(f"{prefix}: {stderr_lines[-1] if stderr_lines else f'exit code {completed.returncode}'}")
    if "failed" in report:
        raise MoHError(f"{prefix}: loading {LOAD_STAGES[report['failed']]} failed: {report['error']}")
    if not report["module"].startswith("transformers_modules"):
        raise MoHError(f"{prefix}: transformers used {report['module']}, not the modeling code shipped in the folder")
    for key, meaning in (
        ("missing", "parameters missing from the weights"),
        ("unexpected", "weights the model does not use"),
        ("mismatched", "weights whose shape does not match the config"),
    ):
        if report[key]:
            raise MoHError(f"{prefix}: {meaning}: {some_names(report[key])}")
    if not report["finite"]:
        raise MoHError(f"{prefix}: the model's logits contain NaN or inf; the weights are damaged")


def register_cli(commands) -> None:
    """`moh push OUTPUT REPO_ID [options]`: flags generated from PushOptions."""
    import argparse

    from .options import add_options_to_parser, options_from_args

    parser = commands.add_parser(
        "push",
        help="verify a MoH model folder and upload it to the Hugging Face Hub",
        description="Check that OUTPUT is a complete MoH model folder (config with auto_map, modeling code, "
        "weights matching their index, tokenizer, model card) that loads with trust_remote_code in a fresh Python "
        "without moh_convert; refresh its model card (conversion settings, calibration and training reports, "
        "evaluation results); then upload it to REPO_ID in one commit. Uses HF_TOKEN or a saved `hf auth login`.",
        epilog="examples:\n  moh push smollm2-moh me/SmolLM2-135M-MoH --dry-run\n"
        "  moh push smollm2-moh me/SmolLM2-135M-MoH --private --eval-dir eval-out\n"
        "  moh push smollm2-moh org/SmolLM2-135M-MoH --revision calibrated --create-pr",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("output", metavar="OUTPUT", help="MoH model folder (written by moh convert)")
    parser.add_argument("repo_id", metavar="REPO_ID", help="Hub repository, e.g. your-name/model-name")
    add_options_to_parser(parser, PushOptions)

    def run(args):
        result = push(args.output, args.repo_id, **options_from_args(args, PushOptions))
        print(describe_push(result))

    parser.set_defaults(handler=run)
