"""Calibration text as token windows: from a local .txt / .jsonl file or a Hub dataset (read through
`moh_convert.text_sources`, as `moh train` reads them), sampled from the model itself ('self'), dialogues the
model writes in its chat template ('chat', in chat_text.py), or real text that comes with the package ('prose',
'math', 'code': builtin_text.py); several sources mix with weights (SOURCE:WEIGHT)."""
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import MoHError
from ..text_sources import check_text_file, dataset_pieces, file_pieces, join_documents, open_dataset
from .builtin_text import read_builtin_text
from .chat_text import load_dense_model, load_prompts, sample_chat_text
from .device import generation_placement
from .settings import (
    BUILTIN_SOURCES, COLUMN_OPTION, GENERATED_SOURCES, NAMED_SOURCES, SELF_SAMPLING_TEMPERATURE, SELF_SAMPLING_TOP_P,
    CalibrationSettings, SourceEntry, parse_calibration_data,
)

SOURCE_NAMES = ", ".join(f"'{name}'" for name in NAMED_SOURCES)  # for messages
CHARS_PER_TOKEN = 8  # generous: text read per token needed, before tokenizing shows whether it was enough


@dataclass
class SourceWindows:
    """One source's share of the windows, and how its text was made (the 'chat' record; None otherwise) or where
    a built-in source's text came from (`origin`)."""

    entry: SourceEntry
    calibration: torch.Tensor  # [windows, seq_len]
    heldout: torch.Tensor
    sampling: dict | None = None
    origin: dict | None = None  # built-in sources: {"text": description, "files": [...]}


@dataclass
class CalibrationMix:
    """The windows of every source, interleaved so that each batch mixes the sources; `*_source` gives each
    window's index into `sources`."""

    calibration: torch.Tensor  # [windows, seq_len]
    heldout: torch.Tensor
    calibration_source: torch.Tensor  # [windows] LongTensor
    heldout_source: torch.Tensor
    sources: list[SourceWindows] = field(default_factory=list)


def load_calibration_windows(
    settings: CalibrationSettings, tokenizer, model_folder: Path
) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration windows, held-out windows), LongTensors [num_windows, seq_len] from the configured sources."""
    mix = load_calibration_mix(settings, tokenizer, model_folder)
    return mix.calibration, mix.heldout


def load_calibration_mix(settings: CalibrationSettings, tokenizer, model_folder: Path) -> CalibrationMix:
    """Every source's share of the calibration and held-out windows (`window_shares`), interleaved."""
    entries = parse_calibration_data(settings.calibration_data)
    seq_len = settings.calibration_seq_len
    num_calibration = math.ceil(settings.calibration_tokens / seq_len)
    num_heldout = math.ceil(settings.calibration_heldout_tokens / seq_len)
    weights = [entry.weight for entry in entries]
    sources = [
        load_source_windows(settings, entry, calibration, heldout, tokenizer, model_folder, single=len(entries) == 1)
        for entry, calibration, heldout in zip(entries, window_shares(num_calibration, weights),
                                               window_shares(num_heldout, weights))
    ]
    calibration, calibration_source = interleave([source.calibration for source in sources], seq_len)
    heldout, heldout_source = interleave([source.heldout for source in sources], seq_len)
    return CalibrationMix(calibration, heldout, calibration_source, heldout_source, sources)


def window_shares(total: int, weights: list[float]) -> list[int]:
    """`total` windows split in proportion to `weights` (largest remainders, so they add up to `total`); when there
    are at least as many windows as sources, every source gets one or more."""
    quotas = [total * weight / sum(weights) for weight in weights]
    shares = [math.floor(quota) for quota in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - shares[i]), i))
    for i in by_remainder[: total - sum(shares)]:
        shares[i] += 1
    if total >= len(weights):
        for i in range(len(shares)):
            if shares[i] == 0:
                shares[max(range(len(shares)), key=lambda j: (shares[j], -j))] -= 1
                shares[i] = 1
    return shares


def interleave(window_groups: list[torch.Tensor], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The groups' windows in one deterministic order that spreads each group evenly (window j of a group of n
    sits at (j + 1/2) / n of the way), and each window's group index. One group keeps its order."""
    order = sorted(
        ((index + 0.5) / len(group), group_index, index)
        for group_index, group in enumerate(window_groups) for index in range(len(group))
    )
    if not order:
        return torch.zeros(0, seq_len, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    windows = torch.stack([window_groups[group_index][index] for _, group_index, index in order])
    return windows, torch.tensor([group_index for _, group_index, _ in order], dtype=torch.long)


def load_source_windows(
    settings: CalibrationSettings, entry: SourceEntry, num_calibration: int, num_heldout: int, tokenizer,
    model_folder: Path, single: bool,
) -> SourceWindows:
    """`num_calibration` windows of one source, then `num_heldout` windows of text that follows them (self: other
    samples; chat: dialogues on other prompts)."""
    seq_len, source = settings.calibration_seq_len, entry.source
    empty = torch.zeros(0, seq_len, dtype=torch.long)
    if num_calibration + num_heldout == 0:
        return SourceWindows(entry, empty, empty)
    batch_size = 16 * settings.calibration_batch_size
    if source in GENERATED_SOURCES:
        device, dtype = generation_placement(settings.calibration_device, settings.calibration_dtype)
    if source == "chat":
        chat = sample_chat_text(model_folder, tokenizer, num_calibration * seq_len, num_heldout * seq_len, seq_len,
                                settings.seed, batch_size=batch_size, device=device, dtype=dtype)
        calibration = chat.calibration[: num_calibration * seq_len].view(num_calibration, seq_len)
        heldout = chat.heldout[: num_heldout * seq_len].view(num_heldout, seq_len)
        return SourceWindows(entry, calibration, heldout, chat.record(len(load_prompts())))
    if source == "self":
        token_ids = sample_own_text(model_folder, tokenizer, (num_calibration + num_heldout) * seq_len, seq_len,
                                    settings.seed, batch_size=batch_size, device=device, dtype=dtype)
    elif source in BUILTIN_SOURCES:
        builtin = read_builtin_text(source, (num_calibration + num_heldout + 1) * seq_len * CHARS_PER_TOKEN)
        origin = {"text": builtin.origin, "files": builtin.files}
        token_ids = tokenizer(builtin.text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    else:
        needed_tokens = (num_calibration + num_heldout + 1) * seq_len  # one spare window: the cut may split a word
        token_ids = tokenize_enough(read_calibration_text(settings, needed_tokens * CHARS_PER_TOKEN, source), tokenizer,
                                    needed_tokens, needed_tokens * CHARS_PER_TOKEN)
    num_windows = token_ids.numel() // seq_len
    if num_windows < num_calibration + num_heldout:
        calibration_tokens, heldout_tokens = (settings.calibration_tokens, settings.calibration_heldout_tokens) if single \
            else (num_calibration * seq_len, num_heldout * seq_len)
        share = "" if single else f", its {entry.weight:.0%} share"
        remedy = "lower --calibration-tokens or this source's weight, or add a file of such text" \
            if source in BUILTIN_SOURCES else "give more text or lower --calibration-tokens"
        raise MoHError(
            f"calibration source {source!r} has {token_ids.numel()} tokens; "
            f"{(num_calibration + num_heldout) * seq_len} are needed ({calibration_tokens} for calibration "
            f"+ {heldout_tokens} held out{share}): {remedy}"
        )
    windows = token_ids[: num_windows * seq_len].view(num_windows, seq_len)
    if source in BUILTIN_SOURCES:
        calibration, heldout = spread_windows(windows, num_calibration, num_heldout)
        return SourceWindows(entry, calibration, heldout, origin=origin)
    return SourceWindows(entry, windows[:num_calibration], windows[num_calibration : num_calibration + num_heldout])


def spread_windows(windows: torch.Tensor, num_calibration: int, num_heldout: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration, held-out) windows picked evenly over all of `windows`, the held-out ones spread among them.
    A built-in text is small and ordered (articles, problems, modules one after another): its first windows would
    be a few documents, windows from all over it are many, which is what calibration should generalise from."""
    wanted = num_calibration + num_heldout
    picked = [int((index + 0.5) * len(windows) / wanted) for index in range(wanted)]
    heldout_slots = {int((index + 0.5) * wanted / num_heldout) for index in range(num_heldout)}
    calibration = [picked[slot] for slot in range(wanted) if slot not in heldout_slots]
    heldout = [picked[slot] for slot in sorted(heldout_slots)]
    return windows[calibration], windows[heldout]


def tokenize_enough(text: str, tokenizer, needed_tokens: int, prefix_chars: int) -> torch.Tensor:
    """Token ids of a prefix of `text` with at least `needed_tokens` tokens (or of all of it). Tokenizing a whole
    large file costs time and memory, so the prefix starts at `prefix_chars` and doubles until it is enough."""
    while True:
        token_ids = tokenizer(text[:prefix_chars], return_tensors="pt", add_special_tokens=False)["input_ids"][0]
        if token_ids.numel() >= needed_tokens or prefix_chars >= len(text):
            return token_ids
        prefix_chars *= 2


def check_calibration_source(calibration_data: str | list[str], column: str) -> None:
    """The cheap checks of every calibration source, run before any long work (converting, copying a model): each
    entry's weight must be a positive number; a local file must exist, be UTF-8 text, hold some text and, for
    JSONL, have `column` on every line (the whole file is read: it is small next to a model). The named sources
    ('self', 'chat', 'prose', 'math', 'code', 'default') and Hub dataset ids pass (a dataset is only read when
    needed)."""
    for entry in parse_calibration_data(calibration_data):
        check_one_source(entry.source, column)


def check_one_source(source: str, column: str) -> None:
    if source in NAMED_SOURCES:
        return
    path = Path(source).expanduser()
    if path.is_file():
        if not check_text_file(path, column, COLUMN_OPTION):
            raise MoHError(f"calibration file {source} holds no text; give a .txt/.jsonl file with text")
        return
    check_not_a_file(source, path)


def check_not_a_file(source: str, path: Path) -> None:
    """When `source` is no file: a MoHError unless it can be a Hub dataset id (`org/name` or `name`)."""
    if path.is_dir():
        raise MoHError(f"calibration data {source} is a folder; pass a .txt/.jsonl file, a Hub dataset id or a "
                       f"named source ({SOURCE_NAMES})")
    if not looks_like_dataset_id(source):
        raise MoHError(f"calibration file {source} not found; pass an existing .txt/.jsonl file, a Hub dataset id "
                       f"(org/name) or a named source ({SOURCE_NAMES})")


def looks_like_dataset_id(source: str) -> bool:
    """`org/name` or `name`: no absolute or relative path, no .txt/.jsonl/.json file name."""
    parts = source.split("/")
    return (1 <= len(parts) <= 2 and all(parts) and not source.startswith((".", "~")) and "\\" not in source
            and Path(source).suffix not in (".txt", ".jsonl", ".json"))


def read_calibration_text(settings: CalibrationSettings, needed_chars: int, source: str | None = None) -> str:
    """A local file's whole text (JSONL records joined as documents), or a Hub dataset's first rows, enough for
    `needed_chars`; `source` is one of the settings' sources (default: the settings' single source)."""
    source = settings.calibration_data if source is None else source
    path = Path(source).expanduser()
    if path.is_file():
        return join_documents(file_pieces(path, settings.calibration_column, COLUMN_OPTION))
    check_not_a_file(source, path)
    return read_hub_dataset_text(settings, needed_chars, source)


def read_hub_dataset_text(settings: CalibrationSettings, needed_chars: int, name: str) -> str:
    """Stream a Hugging Face dataset until enough text is read (through the local cache when offline)."""
    try:
        rows = open_dataset(name, settings.calibration_dataset_config, settings.calibration_split)
        return join_documents(dataset_pieces(rows, name, settings.calibration_column, COLUMN_OPTION), needed_chars)
    except MoHError:
        raise
    except Exception as error:  # datasets raises many types for missing / offline datasets
        reason = " ".join(str(error).split())  # one line: datasets' messages can span several
        raise MoHError(
            f"no file {name}, and the Hub dataset could not be read: {type(error).__name__}: {reason}; pass a local "
            f".txt/.jsonl file, a Hub dataset id (org/name) or a named source ({SOURCE_NAMES})"
        ) from None


@torch.no_grad()
def sample_own_text(
    model_folder: Path, tokenizer, num_tokens: int, seq_len: int, seed: int, batch_size: int = 64,
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Data-free calibration: sample windows of text from the dense source model (same weights, no routing), run
    on `device` in `dtype`; the tokens come back on the CPU.

    Decoding is one token per step for the whole batch, so the fewer, larger batches the faster: every window is
    sampled in one batch when it fits in `batch_size`."""
    model = load_dense_model(model_folder, device, dtype)
    torch.manual_seed(seed)
    start_token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    num_sequences = math.ceil(num_tokens / seq_len)
    samples = []
    for start in tqdm(range(0, num_sequences, batch_size), desc="Sampling calibration text"):
        prompts = torch.full((min(batch_size, num_sequences - start), 1), start_token, dtype=torch.long, device=model.device)
        tokens = model.generate(
            prompts, attention_mask=torch.ones_like(prompts), do_sample=True, top_p=SELF_SAMPLING_TOP_P,
            temperature=SELF_SAMPLING_TEMPERATURE,
            max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1, pad_token_id=tokenizer.eos_token_id,
        )
        samples.append(tokens[:, :seq_len].cpu())
    del model
    return torch.cat(samples)[:num_sequences].reshape(-1)
