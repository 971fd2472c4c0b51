"""Finding a source checkpoint: a local folder, a Hub id (through the local cache) or a GGUF file."""
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MoHError
from .model_folder import INDEX_NAME, read_json_object, read_weight_index

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
INDEX_NAMES = (INDEX_NAME, "pytorch_model.bin.index.json")


@dataclass
class SourceCheckpoint:
    """A source model as files on disk: config.json, weight shards, tokenizer files."""

    folder: Path
    name: str  # what the user passed, for the model card (Hub id, folder or GGUF file name)
    weight_format: str  # "safetensors" or "bin"
    weight_map: dict[str, str] = field(default_factory=dict)  # tensor name -> file name inside folder

    @property
    def weight_files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))


def resolve_source(source: str | os.PathLike, work_dir: Path) -> SourceCheckpoint:
    """Return the source as a folder of files. GGUF sources are dequantized into `work_dir` first."""
    path = Path(source).expanduser()
    if str(source).endswith(".gguf"):
        if not path.is_file():
            raise MoHError(f"GGUF file not found: {path}")
        folder = dequantize_gguf(path, work_dir / "dequantized-source")
        return inspect_folder(folder, name=path.name)
    if path.is_dir():
        return inspect_folder(path, name=str(source))
    if path.exists():
        raise MoHError(f"source {path} is a file but not a .gguf; pass a checkpoint folder, a Hub id or a .gguf file")
    if _looks_like_hub_id(str(source)):
        return inspect_folder(download_from_hub(str(source)), name=str(source))
    raise MoHError(f"source {source!r} not found: pass an existing checkpoint folder, a .gguf file or a Hub id (org/name)")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tiktoken.model")


def check_source(source: str | os.PathLike, role: str) -> None:
    """What `resolve_source` would refuse, found without loading or converting anything, so a command can check
    every model it needs before its long work starts: a missing file, a folder without a readable config.json or
    without tokenizer files. Hub ids are only checked when they are resolved."""
    path = Path(source).expanduser()
    if str(source).endswith(".gguf"):
        if not path.is_file():
            raise MoHError(f"{role}: GGUF file {path} not found")
        return
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MoHError(f"{role}: {path} has no config.json; it is not a Hugging Face checkpoint folder")
        read_json_object(path / "config.json", "re-download or re-convert the model")
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise MoHError(f"{role}: {path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); copy "
                           "the tokenizer of the model it came from into it")
        return
    if path.exists():
        raise MoHError(f"{role}: {path} is a file but not a .gguf; pass a checkpoint folder, a Hub id or a .gguf file")
    if not _looks_like_hub_id(str(source)):
        raise MoHError(f"{role}: {source!r} not found: pass an existing checkpoint folder, a .gguf file or a Hub id "
                       "(org/name)")


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not source.startswith((".", "~"))


def download_from_hub(repo_id: str) -> Path:
    """Resolve a Hub id through the Hugging Face cache; honours HF_HUB_OFFLINE (cache only)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except RepositoryNotFoundError:
        raise MoHError(f"Hub model {repo_id!r} does not exist or is private (log in with `hf auth login`)") from None
    except LocalEntryNotFoundError:
        raise MoHError(
            f"Hub model {repo_id!r} is not in the local Hugging Face cache and the Hub cannot be reached "
            "(offline); download it on a connected machine (`hf download ID`) or pass a local folder"
        ) from None
    except (HfHubHTTPError, OSError) as error:
        raise MoHError(f"could not fetch {repo_id!r} from the Hub: {error}") from None


def dequantize_gguf(gguf_file: Path, folder: Path) -> Path:
    """Load a GGUF file through transformers (which dequantizes it) and save it as a safetensors checkpoint."""
    if importlib.util.find_spec("gguf") is None:
        raise MoHError("reading GGUF files needs the gguf package: pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    except Exception as error:  # gguf raises plain ValueError/KeyError/struct errors on damaged files
        raise MoHError(f"could not read GGUF file {gguf_file}: {type(error).__name__}: {error}") from None
    # The weights are plain float tensors now; drop the quantizer so they save as an ordinary checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = gguf_file.name
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def inspect_folder(folder: Path, name: str) -> SourceCheckpoint:
    """Check a checkpoint folder is complete and list which file holds each tensor."""
    if not (folder / "config.json").is_file():
        raise MoHError(f"{folder} has no config.json; it is not a Hugging Face checkpoint folder")
    for index_name, weight_format in zip(INDEX_NAMES, ("safetensors", "bin")):
        index_path = folder / index_name
        if index_path.is_file():
            weight_map = read_weight_index(index_path, fix="re-download the checkpoint")
            missing = sorted({shard for shard in weight_map.values() if not (folder / shard).is_file()})
            if missing:
                raise MoHError(f"{index_path.name} names missing shard(s) {', '.join(missing)}; re-download the checkpoint")
            if weight_format == "safetensors":
                for shard in sorted(set(weight_map.values())):  # all of them before any output is written
                    check_safetensors_shard(folder / shard)
            return SourceCheckpoint(folder, name, weight_format, weight_map)
    for file_name, weight_format in (("model.safetensors", "safetensors"), ("pytorch_model.bin", "bin")):
        if (folder / file_name).is_file():
            return SourceCheckpoint(folder, name, weight_format, _single_file_map(folder / file_name, weight_format))
    raise MoHError(f"{folder} has no weights (model.safetensors, an index of shards, or pytorch_model.bin)")


def _single_file_map(path: Path, weight_format: str) -> dict[str, str]:
    if weight_format == "safetensors":
        return {tensor_name: path.name for tensor_name in check_safetensors_shard(path)}
    import torch

    try:
        state_dict = torch.load(path, map_location="meta", weights_only=True, mmap=True)
    except Exception as error:
        raise MoHError(f"could not read {path}: {error}; re-download the checkpoint") from None
    return {tensor_name: path.name for tensor_name in state_dict}


def check_safetensors_shard(path: Path) -> list[str]:
    """A source shard whose header is damaged, or that is empty or shorter than its header says, is a MoHError now,
    before it is copied or rewritten (only the header is read). Returns its tensor names."""
    from .safetensors_stream import read_safetensors_header

    try:
        read_safetensors_header(path, fix="re-download the checkpoint")
    except (AttributeError, KeyError, TypeError, IndexError, ValueError):  # JSON, but not a safetensors header
        raise MoHError(f"weights file {path.name} has a damaged header; re-download the checkpoint") from None
    except OSError as error:
        raise MoHError(f"cannot read {path}: {error.strerror or error}") from None
    return read_safetensors_names(path)  # safetensors' own checks (dtypes, offsets), still from the header only


def read_safetensors_names(path: Path) -> list[str]:
    """Tensor names in a safetensors file, read from its header only; corrupt files raise MoHError."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            return list(handle.keys())
    except Exception as error:
        raise MoHError(f"{path} is not a readable safetensors file ({error}); re-download the checkpoint") from None
