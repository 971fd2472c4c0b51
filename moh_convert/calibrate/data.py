"""Calibration text as token windows: from a local .txt / .jsonl file or a Hub dataset (read through
`moh_convert.text_sources`, as `moh train` reads them), or sampled from the model itself ('self')."""
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import MoHError
from ..modeling.configuration_moh import MoHConfig
from ..text_sources import check_text_file, dataset_pieces, file_pieces, join_documents, open_dataset
from .settings import COLUMN_OPTION, SELF_SAMPLING_TEMPERATURE, SELF_SAMPLING_TOP_P, CalibrationSettings

CHARS_PER_TOKEN = 8  # generous: text read per token needed, before tokenizing shows whether it was enough


def load_calibration_windows(
    settings: CalibrationSettings, tokenizer, model_folder: Path
) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration windows, held-out windows), LongTensors [num_windows, seq_len] from the configured source."""
    seq_len = settings.calibration_seq_len
    num_calibration = math.ceil(settings.calibration_tokens / seq_len)
    num_heldout = math.ceil(settings.calibration_heldout_tokens / seq_len)
    if settings.calibration_data == "self":
        token_ids = sample_own_text(model_folder, tokenizer, (num_calibration + num_heldout) * seq_len, seq_len,
                                    settings.seed, batch_size=16 * settings.calibration_batch_size)
    else:
        needed_tokens = (num_calibration + num_heldout + 1) * seq_len  # one spare window: the cut may split a word
        token_ids = tokenize_enough(read_calibration_text(settings, needed_tokens * CHARS_PER_TOKEN), tokenizer,
                                    needed_tokens, needed_tokens * CHARS_PER_TOKEN)
    num_windows = token_ids.numel() // seq_len
    if num_windows < num_calibration + num_heldout:
        raise MoHError(
            f"calibration source {settings.calibration_data!r} has {token_ids.numel()} tokens; "
            f"{(num_calibration + num_heldout) * seq_len} are needed ({settings.calibration_tokens} for calibration "
            f"+ {settings.calibration_heldout_tokens} held out): give more text or lower --calibration-tokens"
        )
    windows = token_ids[: num_windows * seq_len].view(num_windows, seq_len)
    return windows[:num_calibration], windows[num_calibration : num_calibration + num_heldout]


def tokenize_enough(text: str, tokenizer, needed_tokens: int, prefix_chars: int) -> torch.Tensor:
    """Token ids of a prefix of `text` with at least `needed_tokens` tokens (or of all of it). Tokenizing a whole
    large file costs time and memory, so the prefix starts at `prefix_chars` and doubles until it is enough."""
    while True:
        token_ids = tokenizer(text[:prefix_chars], return_tensors="pt", add_special_tokens=False)["input_ids"][0]
        if token_ids.numel() >= needed_tokens or prefix_chars >= len(text):
            return token_ids
        prefix_chars *= 2


def check_calibration_source(source: str, column: str) -> None:
    """The cheap checks of a calibration source, run before any long work (converting, copying a model): a local
    file must exist, be UTF-8 text, hold some text and, for JSONL, have `column` on every line (the whole file is
    read: it is small next to a model). 'self' and Hub dataset ids pass (a dataset is only read when needed)."""
    if source == "self":
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
        raise MoHError(f"calibration data {source} is a folder; pass a .txt/.jsonl file, a Hub dataset id or 'self'")
    if not looks_like_dataset_id(source):
        raise MoHError(f"calibration file {source} not found; pass an existing .txt/.jsonl file, a Hub dataset id "
                       "(org/name) or 'self'")


def looks_like_dataset_id(source: str) -> bool:
    """`org/name` or `name`: no absolute or relative path, no .txt/.jsonl/.json file name."""
    parts = source.split("/")
    return (1 <= len(parts) <= 2 and all(parts) and not source.startswith((".", "~")) and "\\" not in source
            and Path(source).suffix not in (".txt", ".jsonl", ".json"))


def read_calibration_text(settings: CalibrationSettings, needed_chars: int) -> str:
    """A local file's whole text (JSONL records joined as documents), or a Hub dataset's first rows, enough for
    `needed_chars`."""
    source = settings.calibration_data
    path = Path(source).expanduser()
    if path.is_file():
        return join_documents(file_pieces(path, settings.calibration_column, COLUMN_OPTION))
    check_not_a_file(source, path)
    return read_hub_dataset_text(settings, needed_chars)


def read_hub_dataset_text(settings: CalibrationSettings, needed_chars: int) -> str:
    """Stream a Hugging Face dataset until enough text is read (through the local cache when offline)."""
    name = settings.calibration_data
    try:
        rows = open_dataset(name, settings.calibration_dataset_config, settings.calibration_split)
        return join_documents(dataset_pieces(rows, name, settings.calibration_column, COLUMN_OPTION), needed_chars)
    except MoHError:
        raise
    except Exception as error:  # datasets raises many types for missing / offline datasets
        reason = " ".join(str(error).split())  # one line: datasets' messages can span several
        raise MoHError(
            f"no file {name}, and the Hub dataset could not be read: {type(error).__name__}: {reason}; pass a local "
            ".txt/.jsonl file, a Hub dataset id (org/name) or 'self'"
        ) from None


@torch.no_grad()
def sample_own_text(
    model_folder: Path, tokenizer, num_tokens: int, seq_len: int, seed: int, batch_size: int = 64
) -> torch.Tensor:
    """Data-free calibration: sample windows of text from the dense source model (same weights, no routing).

    Decoding is one token per step for the whole batch, so the fewer, larger batches the faster: every window is
    sampled in one batch when it fits in `batch_size`."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = MoHConfig.from_pretrained(model_folder)
    source_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config.text_config)]
    model = source_class.from_pretrained(model_folder, config=config.text_config, dtype=torch.float32).eval()
    torch.manual_seed(seed)
    start_token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    num_sequences = math.ceil(num_tokens / seq_len)
    samples = []
    for start in tqdm(range(0, num_sequences, batch_size), desc="Sampling calibration text"):
        prompts = torch.full((min(batch_size, num_sequences - start), 1), start_token, dtype=torch.long)
        tokens = model.generate(
            prompts, attention_mask=torch.ones_like(prompts), do_sample=True, top_p=SELF_SAMPLING_TOP_P,
            temperature=SELF_SAMPLING_TEMPERATURE,
            max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1, pad_token_id=tokenizer.eos_token_id,
        )
        samples.append(tokens[:, :seq_len])
    del model
    return torch.cat(samples)[:num_sequences].reshape(-1)
