"""Perplexity on plain text: exp(mean token loss) over non-overlapping fixed-length windows."""
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm


def text_windows(tokenizer, text: str, window: int, max_windows: int | None = None) -> torch.Tensor:
    """Tokenize `text` once and cut it into non-overlapping windows: LongTensor [num_windows, window]."""
    token_ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    num_windows = token_ids.numel() // window
    if max_windows is not None:
        num_windows = min(num_windows, max_windows)
    if num_windows == 0:
        raise ValueError(f"text has {token_ids.numel()} tokens, fewer than one {window}-token window")
    return token_ids[: num_windows * window].view(num_windows, window)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = True, accelerator=None) -> float:
    """exp of the mean next-token loss over every predicted token of every window.

    With an accelerate `accelerator` (training), each process runs `windows[rank::world]` and the sums are reduced
    over processes, so every process returns the same value. Token losses are summed in float64 either way. The
    model runs in eval mode and gets its previous training mode back afterwards."""
    was_training = model.training
    model.eval()
    if accelerator is None:
        device = next(model.parameters()).device
    else:
        device = accelerator.device
        windows = windows[accelerator.process_index::accelerator.num_processes]
        progress = progress and accelerator.is_local_main_process
    total_loss, total_tokens = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc="Perplexity", disable=not progress, leave=False):
        batch = batch.to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_loss += loss.item()
        total_tokens += batch[:, 1:].numel()
    if accelerator is not None:
        totals = torch.tensor([total_loss, total_tokens], dtype=torch.float64, device=device)
        total_loss, total_tokens = accelerator.reduce(totals, reduction="sum").tolist()
    model.train(was_training)
    return math.exp(total_loss / total_tokens)


def wikitext_windows(tokenizer, data_dir: str | Path, split: str = "test", window: int = 512, max_windows: int = 48):
    """Windows of WikiText-2 `split` from a data folder laid out like ../shared/data (wikitext-2/{split}.txt)."""
    path = Path(data_dir) / "wikitext-2" / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass the data folder that holds wikitext-2/{split}.txt")
    return text_windows(tokenizer, path.read_text(), window, max_windows)
