"""The MoH model folder on disk, in one place: its weight shards and index, tensors read and rewritten one at a
time, the files that make it load (config with `auto_map`, the shipped modeling code, the source's tokenizer files)
and the staging folder every command assembles it in before renaming it into place.

`convert`, `calibrate` and `train` write folders only through this module; `hub` reads them through it.
"""
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from .errors import MoHError
from .safetensors_stream import read_safetensors_header, read_safetensors_tensor

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_WEIGHTS_NAME = "model.safetensors"
FIRST_SHARD_NAME = "model-00001-of-00001.safetensors"  # a single-file model's weights once a router shard joins them
ROUTER_SHARD = "model-moh-routers.safetensors"
ROUTER_TENSOR_MARKER = ".self_attn.moh."
MODELING_DIR = Path(__file__).parent / "modeling"
MODELING_FILES = ("configuration_moh.py", "modeling_moh.py")
AUTO_MAP = {"AutoConfig": "configuration_moh.MoHConfig", "AutoModelForCausalLM": "modeling_moh.MoHForCausalLM"}
# Everything else in a source folder that a converted model must carry along (tokenizer, chat template, ...).
SKIPPED_SOURCE_FILES = {"config.json", "README.md", INDEX_NAME, "pytorch_model.bin.index.json"}
SKIPPED_SOURCE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".py", ".msgpack", ".h5", ".ckpt")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# ---------------------------------------------------------------------------------------------- index and shards


def read_weight_index(path: Path, fix: str = "re-run `moh convert`") -> dict[str, str]:
    """The `weight_map` of a weights index (tensor name -> shard file); a damaged index is a MoHError ending in
    `fix` (a source checkpoint is re-downloaded, a MoH folder converted again)."""
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as error:
        raise MoHError(f"{path.name} is not a valid weights index ({error}); {fix}") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise MoHError(f"{path.name} has an empty weight_map; {fix}")
    return weight_map


def weight_files(folder: Path) -> list[str]:
    """The safetensors files that hold a folder's weights: the shards its index names, else model.safetensors."""
    index = folder / INDEX_NAME
    return sorted(set(read_weight_index(index).values())) if index.exists() else [SINGLE_WEIGHTS_NAME]


def safetensors_data_size(path: Path) -> int:
    """Bytes of tensor data in a safetensors file, read from its header (no tensor is loaded)."""
    _, header = read_safetensors_header(path)
    return sum(end - start for info in header.values() for start, end in [info["data_offsets"]])


def write_weight_index(folder: Path, weight_map: dict[str, str]) -> None:
    """Write the index for `weight_map` (sorted, with the total data size of the shards it names)."""
    total_size = sum(safetensors_data_size(folder / name) for name in set(weight_map.values()))
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def save_router_shard(folder: Path, router_tensors: dict[str, torch.Tensor]) -> None:
    """(Re)write the router shard and the index. A single-file model becomes shard 1 of an indexed checkpoint
    (transformers reads model.safetensors and ignores any index when that file exists). Files are unlinked before
    being rewritten: a staging copy may hard-link them to the original model, which must not change."""
    from safetensors.torch import save_file

    index_path = folder / INDEX_NAME
    if index_path.exists():
        weight_map = read_weight_index(index_path)
    else:
        _, header = read_safetensors_header(folder / SINGLE_WEIGHTS_NAME)
        weight_map = {name: FIRST_SHARD_NAME for name in header}
        (folder / SINGLE_WEIGHTS_NAME).rename(folder / FIRST_SHARD_NAME)
    weight_map = {name: file for name, file in weight_map.items() if ROUTER_TENSOR_MARKER not in name}
    for path in (folder / ROUTER_SHARD, index_path):
        path.unlink(missing_ok=True)
    save_file(router_tensors, folder / ROUTER_SHARD, metadata={"format": "pt"})
    weight_map.update({name: ROUTER_SHARD for name in router_tensors})
    write_weight_index(folder, weight_map)


class ShardedWeights:
    """Reads named tensors from a model folder's safetensors files, one tensor at a time, without memory maps (a
    mapped shard's pages would count as the process's memory until the end)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.weight_map, self.headers = {}, {}
        for file in weight_files(folder):
            data_start, header = read_safetensors_header(folder / file)
            self.headers[file] = (data_start, header)
            self.weight_map.update({name: file for name in header})

    def get(self, name: str) -> torch.Tensor:
        file = self.weight_map[name]
        data_start, header = self.headers[file]
        return read_safetensors_tensor(self.folder / file, data_start, header[name])

    def load_into(self, module: torch.nn.Module, prefix: str, init_fn) -> None:
        """Materialise a meta-device module on the CPU, in float32, with its checkpoint tensors (`prefix.<name>`).

        Each tensor is read and cast on its own, so the transient memory is one tensor, not a second copy of the
        module. Only a module with buffers (rotary frequencies, embedding scales, computed by `init_fn`) or with
        tensors missing from the checkpoint is allocated empty first."""
        names = list(module.state_dict())
        state = {name: self.get(f"{prefix}.{name}").float() for name in names if f"{prefix}.{name}" in self.weight_map}
        if len(state) < len(names) or any(True for _ in module.buffers()):
            module.to_empty(device="cpu")
            for submodule in module.modules():
                init_fn(submodule)
        module.load_state_dict(state, strict=False, assign=True)
        module.float()


def replace_tensors_in_shards(folder: Path, tensors: dict[str, Path]) -> None:
    """Overwrite the values of existing tensors in their safetensors shards, keeping names, dtypes and shapes (so
    headers, offsets and the index stay valid). Each touched shard is rewritten as a new file: a staging copy may
    hard-link it to the original model, which must not change. `tensors` maps each name to a safetensors file
    holding its new value, already in the stored dtype."""
    from safetensors import safe_open

    weight_map = ShardedWeights(folder).weight_map
    by_shard: dict[str, list[str]] = {}
    for name in tensors:
        by_shard.setdefault(weight_map[name], []).append(name)
    for shard, names in by_shard.items():
        path = folder / shard
        data_start, header = read_safetensors_header(path)
        replacement = path.with_name(path.name + ".new")
        shutil.copyfile(path, replacement)
        with open(replacement, "r+b") as handle:
            for name in names:
                begin, end = header[name]["data_offsets"]
                with safe_open(tensors[name], framework="pt") as stored:
                    data = stored.get_tensor(name).contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                if len(data) != end - begin:
                    raise ValueError(f"{name}: {len(data)} bytes do not fit the {end - begin} stored in {shard}")
                handle.seek(data_start + begin)
                handle.write(data)
        path.unlink()
        replacement.rename(path)


# ---------------------------------------------------------------------------------------------- the other files


def copy_support_files(source_folder: Path, folder: Path) -> None:
    """Tokenizer files, chat template, generation config: everything that is not weights, config or code."""
    for path in source_folder.iterdir():
        if (
            path.is_file()
            and not path.name.startswith(".")
            and path.name not in SKIPPED_SOURCE_FILES
            and not path.name.endswith(SKIPPED_SOURCE_SUFFIXES)
        ):
            shutil.copy2(path, folder / path.name)


def write_moh_config(folder: Path, config) -> None:
    """Save a MoHConfig as FOLDER/config.json, pointing `auto_map` at the shipped modeling code, and copy that code."""
    config.auto_map = dict(AUTO_MAP)
    (folder / CONFIG_NAME).unlink(missing_ok=True)  # may be hard-linked to the folder being calibrated
    config.save_pretrained(folder)
    write_modeling_code(folder)


def finish_saved_moh_folder(folder: Path, dtype: str) -> None:
    """Make a folder that `save_pretrained` wrote for a MoH model load anywhere: `auto_map` and `dtype` in its
    config.json, the shipped modeling code next to it."""
    config = json.loads((folder / CONFIG_NAME).read_text())
    config["auto_map"] = dict(AUTO_MAP)
    config["dtype"] = dtype
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    write_modeling_code(folder)


def write_modeling_code(folder: Path) -> None:
    for file_name in MODELING_FILES:
        # Unlinked first: copyfile writes through a hard link, into the model a staging copy was linked from.
        (folder / file_name).unlink(missing_ok=True)
        shutil.copyfile(MODELING_DIR / file_name, folder / file_name)


def read_json_object(path: Path, fix: str) -> dict:
    """A JSON file that must hold an object (config.json, a report); anything else is a MoHError ending in `fix`."""
    try:
        data = json.loads(path.read_text())
    except ValueError as error:
        raise MoHError(f"{path} is not valid JSON ({error}); {fix}") from None
    if not isinstance(data, dict):
        raise MoHError(f"{path} must hold a JSON object (key: value pairs), not {type(data).__name__}; {fix}")
    return data


# ---------------------------------------------------------------------------------------------- staging


def is_moh_model_folder(path: Path) -> bool:
    """A folder `moh convert` / `moh calibrate` / `moh train` wrote: config.json with model_type "moh"."""
    try:
        return json.loads((path / CONFIG_NAME).read_text()).get("model_type") == "moh"
    except (OSError, ValueError, AttributeError):
        return False


def is_empty_folder(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def check_output_location(output: Path, sources: list[Path]) -> None:
    """OUTPUT must not be, contain or lie inside a folder (or file) the command reads: replacing OUTPUT would
    delete it. Paths are compared resolved (symbolic links followed)."""
    for source in sources:
        source = Path(source).expanduser().resolve()
        if output == source:
            raise MoHError(f"output {output} is the source itself; choose another output folder")
        if output in source.parents:
            raise MoHError(f"output {output} contains the source {source}; choose an output folder outside it")
        if source in output.parents:
            raise MoHError(f"output {output} lies inside the source {source}; choose an output folder outside it")


def prepare_output_parent(output: Path) -> None:
    """Create OUTPUT's parent folders, or say in one line why they cannot be (a file in the way, no permission)."""
    existing = output.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise MoHError(f"cannot create {output}: {existing} is a file, not a folder; choose another output path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise MoHError(f"cannot write to {existing} (permission denied); choose an output folder you can write to")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise MoHError(f"cannot create {output.parent}: {error.strerror or error}; choose another output folder") from None


class OutputLock:
    """An exclusive lock on OUTPUT for a whole run (`.OUTPUT.lock` next to it, flock'ed), so a second command
    writing the same folder stops at once with one line instead of racing the first. The lock file is removed when
    the run ends; a killed run's lock file is released by the OS and taken over by the next run."""

    def __init__(self, output: Path):
        self.output = output
        self.path = output.parent / f".{output.name}.lock"
        self.handle = None

    def __enter__(self) -> "OutputLock":
        try:
            import fcntl
        except ImportError:  # not POSIX (Windows): no lock, as before
            return self
        self.handle = open(self.path, "a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.handle.close()
            self.handle = None
            raise MoHError(
                f"another moh command is writing {self.output} right now ({self.path.name} is locked); wait for it "
                "to finish or choose another output folder"
            ) from None
        return self

    def __exit__(self, *exc_info) -> None:
        if self.handle is not None:
            self.path.unlink(missing_ok=True)  # while still held: a waiting run then takes a fresh file
            self.handle.close()
            self.handle = None


def remove_stale_partial_folders(output: Path) -> list[Path]:
    """Hidden `.OUTPUT.partial-*` folders of runs that were killed. Only called with OUTPUT's lock held, so no live
    run owns any of them. Returns what was removed (the caller says so)."""
    stale = sorted(path for path in output.parent.glob(f".{output.name}.partial-*") if path.is_dir())
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


class StagedFolder:
    """Assemble a folder out of sight and rename it into place when complete, safely.

    `with StagedFolder(output, sources=[...], overwrite=...) as staged:` checks OUTPUT before any work (not the
    source, not inside or around it, parent writable; an existing OUTPUT only with `overwrite` and only if it is a
    folder `replaceable` accepts or an empty one), locks OUTPUT for the run, removes hidden `.OUTPUT.partial-*`
    folders of killed runs (and says so), and makes this run's own work folder next to OUTPUT. Write the new
    folder at `staged.path` (not created: a copy or `save_pretrained` may create it), scratch files under
    `staged.work_dir`, then call `staged.move_into_place()`. The work folder is removed on every way out, so an
    interrupted run leaves no OUTPUT and an existing OUTPUT is kept until the new one is complete."""

    def __init__(self, output: Path, sources: list[Path] = (), overwrite: bool = False,
                 replaceable=is_moh_model_folder, what: str = "a MoH model folder"):
        self.output = Path(output).expanduser().resolve()
        self.sources, self.overwrite, self.replaceable, self.what = list(sources), overwrite, replaceable, what
        self.work_dir: Path | None = None
        self.lock = OutputLock(self.output)
        self.existing: tuple[int, int] | None = None  # (device, inode) of the OUTPUT found at the start

    @property
    def path(self) -> Path:
        return self.work_dir / self.output.name

    def check_existing_output(self) -> None:
        output = self.output
        if not output.exists():
            return
        if not output.is_dir():
            raise MoHError(f"output {output} is a file; choose a folder path")
        if not self.overwrite:
            raise MoHError(f"output {output} already exists; pass --overwrite to replace it or choose another folder")
        if not (is_empty_folder(output) or self.replaceable(output)):
            raise MoHError(
                f"output {output} exists and is not {self.what}; --overwrite only replaces a folder moh_convert "
                "wrote (or an empty one): choose another folder, or remove it yourself"
            )
        stat = output.stat()
        self.existing = (stat.st_dev, stat.st_ino)

    def __enter__(self) -> "StagedFolder":
        check_output_location(self.output, self.sources)
        prepare_output_parent(self.output)
        self.lock.__enter__()
        try:
            self.check_existing_output()
            stale = remove_stale_partial_folders(self.output)
            if stale:
                print(f"moh: removed {len(stale)} unfinished folder(s) of an interrupted earlier run: "
                      + ", ".join(path.name for path in stale), file=sys.stderr)
            self.work_dir = Path(tempfile.mkdtemp(prefix=f".{self.output.name}.partial-", dir=self.output.parent))
        except BaseException:
            self.lock.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            if self.work_dir is not None:
                shutil.rmtree(self.work_dir, ignore_errors=True)
        finally:
            self.lock.__exit__(*exc_info)

    def move_into_place(self) -> Path:
        """Rename the finished folder to OUTPUT, after checking that OUTPUT is still what it was at the start (no
        folder appeared, the one being replaced was not swapped for another). An existing OUTPUT is first moved
        into the work folder (and deleted with it), so at no moment is there neither."""
        output = self.output
        if output.exists() or output.is_symlink():
            stat = output.lstat()
            if self.existing is None:
                raise MoHError(f"{output} appeared while this run was working; it was left as it is and nothing was "
                               "written: remove it or choose another output folder, then run again")
            if (stat.st_dev, stat.st_ino) != self.existing:
                raise MoHError(f"{output} was replaced while this run was working; it was left as it is and nothing "
                               "was written: run again")
            output.rename(self.work_dir / f"{output.name}.previous")
        self.path.rename(output)
        return output


def link_or_copy(source, destination) -> None:
    """copytree's copy function for staging copies: hard links cost no disk space or time (files that will change
    are unlinked before being rewritten)."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)
