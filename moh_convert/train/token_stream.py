"""The training token stream: documents of local files or a Hugging Face dataset (read through
`moh_convert.text_sources`, as calibration reads them), tokenized, EOS after each, packed into seq_len sequences;
several sources are interleaved by weight. Every process builds the same stream and takes its own slice of each
global batch."""
import copy
import itertools
from typing import Iterator

import torch

from ..errors import MoHError
from ..text_sources import dataset_pieces, file_pieces, open_dataset
from .recipe import DataSource, TrainRecipe


class PackedTokenStream:
    """Tokens of every document, EOS after each, concatenated and cut into seq_len sequences; the data repeats
    (epochs) in the same order when it runs out. Every process builds the same stream.

    Its position (`state_dict`) is small: the epoch, how many text pieces of it were read, the tokens left over from
    the last piece, and for streamed Hub datasets the dataset's own state. Resuming therefore neither re-tokenizes
    nor (for Hub datasets) re-downloads what was already trained on. `key` is the recipe section the source comes
    from (data or eval_data), for error messages."""

    def __init__(self, source: DataSource, tokenizer, seq_len: int, key: str = "data"):
        self.source, self.tokenizer, self.seq_len = source, tokenizer, seq_len
        self.column_option = f"recipe key '{key}.column'"
        self.epoch, self.pieces_read, self.buffer = 0, 0, []
        self.produced_any = False
        self._dataset = None  # the Hub dataset being iterated
        self._dataset_state = None  # a saved position to restore when it is next opened
        self._pieces = None

    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "pieces_read": self.pieces_read, "buffer": list(self.buffer)}
        if self._dataset is not None and hasattr(self._dataset, "state_dict"):
            state["dataset_state"] = copy.deepcopy(self._dataset.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pieces_read, self.buffer = state["epoch"], state["pieces_read"], list(state["buffer"])
        self._dataset_state = state.get("dataset_state")
        self._pieces, self.produced_any = None, True

    def _open(self) -> Iterator[tuple[str, bool]]:
        source, skip = self.source, self.pieces_read
        if source.dataset is None:
            pieces = itertools.chain.from_iterable(
                file_pieces(path, source.column, self.column_option) for path in source.paths())
        else:
            self._dataset = open_dataset(source.dataset, source.dataset_config, source.split, source.streaming)
            if self._dataset_state is not None and hasattr(self._dataset, "load_state_dict"):
                self._dataset.load_state_dict(self._dataset_state)
                skip = 0
            pieces = dataset_pieces(self._dataset, source.dataset, source.column, self.column_option)
        self._dataset_state = None
        return itertools.islice(pieces, skip, None)  # skipping reads text but tokenizes nothing

    def __iter__(self):
        return self

    def __next__(self) -> list[int]:
        while len(self.buffer) < self.seq_len:
            if self._pieces is None:
                self._pieces = self._open()
            piece = next(self._pieces, None)
            if piece is None:  # end of the data: next epoch, same order
                if not self.produced_any:
                    raise MoHError(f"the data has fewer than seq_len={self.seq_len} tokens; give more text or "
                                   "lower seq_len")
                self.epoch, self.pieces_read, self._pieces = self.epoch + 1, 0, None
                continue
            text, ends_document = piece
            self.pieces_read += 1
            self.buffer.extend(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            if ends_document and self.tokenizer.eos_token_id is not None:
                self.buffer.append(self.tokenizer.eos_token_id)
        self.produced_any = True
        sequence = self.buffer[: self.seq_len]
        del self.buffer[: self.seq_len]
        return sequence


class MixedTokenStream:
    """Sequences of several sources (each a PackedTokenStream with its own epochs), interleaved by weight: each
    sequence comes from the source furthest behind its share (smooth weighted round-robin), so any stretch of the
    run holds every source in proportion, the order is deterministic, and the position is a few numbers per source."""

    def __init__(self, streams: list[PackedTokenStream], weights: list[float]):
        total = sum(weights)
        self.streams, self.weights = streams, [weight / total for weight in weights]
        self.credits = [0.0] * len(streams)

    def state_dict(self) -> dict:
        return {"credits": list(self.credits), "sources": [stream.state_dict() for stream in self.streams]}

    def load_state_dict(self, state: dict) -> None:
        if len(state.get("sources", ())) != len(self.streams):
            raise MoHError(f"the checkpoint was written with {len(state.get('sources', ()) or [1])} training "
                           f"source(s) and the recipe now has {len(self.streams)}: resume with the recipe it started with")
        self.credits = list(state["credits"])
        for stream, stream_state in zip(self.streams, state["sources"]):
            stream.load_state_dict(stream_state)

    def __iter__(self):
        return self

    def __next__(self) -> list[int]:
        self.credits = [credit + weight for credit, weight in zip(self.credits, self.weights)]
        index = max(range(len(self.streams)), key=lambda i: (self.credits[i], -i))
        self.credits[index] -= 1.0
        return next(self.streams[index])


def training_stream(sources: list[DataSource], tokenizer, seq_len: int, keys: list[str]):
    """The training sequences of `sources` (recipe keys `keys`, for messages): one source's packed stream, or several
    mixed by their weights."""
    streams = [PackedTokenStream(source, tokenizer, seq_len, key) for source, key in zip(sources, keys)]
    return streams[0] if len(streams) == 1 else MixedTokenStream(streams, [source.weight for source in sources])


def take(stream: Iterator[list[int]], count: int) -> torch.Tensor:
    """The next `count` sequences of `stream` as a LongTensor [count, seq_len]."""
    rows = [next(stream) for _ in range(count)]
    return torch.tensor(rows, dtype=torch.long)


def heldout_windows(recipe: TrainRecipe, tokenizer, stream: PackedTokenStream | MixedTokenStream) -> torch.Tensor | None:
    """The held-out sequences: the first `eval_windows` of `eval_data`, else of the training stream (which then
    starts training after them); None when `eval_windows` is 0."""
    if not recipe.eval_windows:
        return None
    if recipe.eval_data is not None:
        return take(PackedTokenStream(recipe.eval_data, tokenizer, recipe.seq_len, "eval_data"), recipe.eval_windows)
    return take(stream, recipe.eval_windows)
