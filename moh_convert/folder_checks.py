"""Is a MoH model folder complete, running only our code, and loadable? The checks `moh push` runs before anything is
uploaded: config with `auto_map`, the modeling files it names, weights matching their index, tokenizer, model card;
then that the folder's Python code is the code moh_convert ships (nothing from the folder runs before that), and a
load plus a forward pass in a fresh Python, with a minimal environment, where moh_convert cannot be imported (how the
people who download it load it)."""
import hashlib
import json
import os
import site
import subprocess
import sys
import tempfile
from pathlib import Path

from .errors import MoHError
from .model_card import read_model_card, read_moh_config
from .model_folder import (
    AUTO_MAP, CONFIG_NAME, INDEX_NAME, MODELING_DIR, MODELING_FILES, SINGLE_WEIGHTS_NAME, read_json_object,
    read_weight_index,
)
from .safetensors_stream import read_safetensors_header

REQUIRED_AUTO_MAP = ("AutoConfig", "AutoModelForCausalLM")
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
TOKENIZER_VOCAB_NAMES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
MAX_NAMES_IN_MESSAGE = 5
# sha256 of the modeling files earlier moh_convert versions shipped; the current files count without being listed.
KNOWN_MODELING_FILES = MODELING_DIR / "known_modeling_files.json"
CUSTOM_CODE_FIX = "re-run `moh convert`, or pass --allow-custom-code if you wrote it yourself"


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


# ---------------------------------------------------------------- the folder's code is ours


def is_uploaded(relative_path: Path) -> bool:
    """Hidden files and folders (.cache, .git) and Python bytecode are local leftovers, not part of the model."""
    parts = relative_path.parts
    return not any(part.startswith(".") or part == "__pycache__" for part in parts) and relative_path.suffix != ".pyc"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def known_modeling_hashes() -> dict[str, set[str]]:
    """File name -> sha256 of every version of it moh_convert has shipped: the installed file plus earlier ones."""
    earlier = json.loads(KNOWN_MODELING_FILES.read_text())["sha256"]
    return {name: {file_sha256(MODELING_DIR / name), *earlier.get(name, [])} for name in MODELING_FILES}


def check_code_is_shipped(folder: Path) -> None:
    """Everything in FOLDER that transformers would run with trust_remote_code is moh_convert's own code: config.json's
    auto_map is exactly the one moh_convert writes, the files it names are byte for byte a shipped version, there is
    no other .py file and tokenizer_config.json has no auto_map (a custom tokenizer class). Reads files, runs none."""
    auto_map = read_json_object(folder / CONFIG_NAME, CUSTOM_CODE_FIX).get("auto_map")
    if auto_map != AUTO_MAP:
        auto_map = auto_map if isinstance(auto_map, dict) else {}
        differences = [
            f"{key}: {auto_map.get(key)!r} instead of {AUTO_MAP.get(key)!r}"
            for key in sorted(set(auto_map) | set(AUTO_MAP), key=str) if auto_map.get(key) != AUTO_MAP.get(key)
        ]
        raise MoHError(
            f"config.json's auto_map differs from the one moh_convert writes ({'; '.join(differences)}), so loading "
            f"the folder would run code moh_convert does not ship; {CUSTOM_CODE_FIX}"
        )
    known = known_modeling_hashes()
    for name in MODELING_FILES:
        if not (folder / name).is_file():
            raise MoHError(f"modeling file {name} is missing from {folder}; {CUSTOM_CODE_FIX}")
        digest = file_sha256(folder / name)
        if digest not in known[name]:
            raise MoHError(f"{name} differs from the modeling code moh_convert ships (sha256 {digest}); {CUSTOM_CODE_FIX}")
    others = sorted(
        relative.as_posix() for relative in (path.relative_to(folder) for path in folder.rglob("*.py"))
        if is_uploaded(relative) and relative.as_posix() not in MODELING_FILES
    )
    if others:
        raise MoHError(
            f"{others[0]} is Python code moh_convert does not ship (a MoH folder holds only {' and '.join(MODELING_FILES)});"
            f" remove it, or pass --allow-custom-code if you wrote it yourself"
        )
    tokenizer_auto_map = read_json_object(folder / TOKENIZER_CONFIG_NAME, "copy the source's tokenizer files").get("auto_map")
    if tokenizer_auto_map is not None:
        raise MoHError(
            f"{TOKENIZER_CONFIG_NAME} has an auto_map ({json.dumps(tokenizer_auto_map)}): a custom tokenizer class would "
            "run code from the folder; remove it, or pass --allow-custom-code if you wrote it yourself"
        )


# ---------------------------------------------------------------- the folder loads without moh_convert

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


# Passed on when set: what Python needs to start and find its packages. Nothing else (no HF_TOKEN, no other secret).
STARTUP_ENV = ("PATH", "LANG", "LC_ALL", "PYTHONPATH", "PYTHONHOME", "LD_LIBRARY_PATH") + (
    ("SYSTEMROOT",) if os.name == "nt" else ()
)


def load_check_environment(work_dir: Path) -> dict[str, str]:
    """The whole environment of the load check: the STARTUP_ENV variables that are set, and HOME, TMPDIR and every
    Hugging Face cache inside WORK_DIR, offline, so nothing from the user's home or HF cache is read or written."""
    env = {name: os.environ[name] for name in STARTUP_ENV if name in os.environ}
    env.setdefault("PATH", os.defpath)
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        env["PYTHONUSERBASE"] = site.getuserbase()  # packages installed with `pip install --user` (HOME moves)
    env.update(
        HOME=str(work_dir), TMPDIR=str(work_dir), HF_HOME=str(work_dir / "hf-home"),
        HF_MODULES_CACHE=str(work_dir / "modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
    )
    if os.name == "nt":
        env.update(USERPROFILE=str(work_dir), TEMP=str(work_dir), TMP=str(work_dir))
    return env


def check_loads_in_fresh_process(folder: Path) -> None:
    """Load the model with trust_remote_code and the tokenizer in a subprocess without moh_convert (offline, in the
    minimal environment of `load_check_environment`, with an empty module cache so no earlier copy of the code stands
    in), run one forward pass, and check that every weight was used and every parameter was loaded. Run it only on a
    folder that passed `check_code_is_shipped`: it executes the folder's code."""
    with tempfile.TemporaryDirectory(prefix="moh-load-check-") as work_dir:
        env = load_check_environment(Path(work_dir))
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
