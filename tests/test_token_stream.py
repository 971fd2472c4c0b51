"""The training token stream: packing, resuming from its saved position, and errors that name the recipe key."""
import json

import pytest
import torch

from moh_convert import text_sources
from moh_convert import train as moh_train
from moh_convert.errors import MoHError
from moh_convert.train.token_stream import heldout_windows

from .conftest import synthetic_text, tiny_tokenizer


class CountingTokenizer:
    """Records every text it is asked to tokenize."""

    def __init__(self, tokenizer):
        self.tokenizer, self.texts, self.eos_token_id = tokenizer, [], tokenizer.eos_token_id

    def __call__(self, text, **kwargs):
        self.texts.append(text)
        return self.tokenizer(text, **kwargs)


@pytest.mark.parametrize("kind", ["txt", "jsonl", "hub-streaming"])
def test_data_stream_resumes_from_its_state_without_rereading(kind, tmp_path, monkeypatch):
    """The stream's saved position (epoch, pieces read, leftover tokens, a streamed dataset's own state) gives the
    same sequences as reading on, across piece and epoch boundaries; tokenization never re-runs on skipped text."""
    monkeypatch.setattr(text_sources, "TEXT_CHUNK_CHARS", 300)  # several pieces per file
    documents = [synthetic_text(40 + 13 * i, seed=i) for i in range(12)]
    if kind == "txt":
        (tmp_path / "a.txt").write_text("\n".join(documents[:6]) + "\n")
        (tmp_path / "b.txt").write_text("\n".join(documents[6:]) + "\n")
        source = moh_train.DataSource(path=[str(tmp_path / "a.txt"), str(tmp_path / "b.txt")])
    else:
        folder = tmp_path / "dataset"
        folder.mkdir()
        (folder / "train.jsonl").write_text("".join(json.dumps({"body": text}) + "\n" for text in documents))
        source = (moh_train.DataSource(path=str(folder / "train.jsonl"), column="body") if kind == "jsonl" else
                  moh_train.DataSource(dataset=str(folder), column="body", streaming=True))
    tokenizer = tiny_tokenizer()
    total_tokens = sum(len(text) + 1 for text in documents)
    reference = moh_train.PackedTokenStream(source, tokenizer, 64)
    expected = moh_train.take(reference, 2 * total_tokens // 64 + 3)  # more than one epoch
    first_piece = documents[0] if kind != "txt" else next(text_sources.file_pieces(source.paths()[0], "text", "-"))[0]
    for split in (1, 7, total_tokens // 64 + 1):
        stream = moh_train.PackedTokenStream(source, tokenizer, 64)
        head = moh_train.take(stream, split)
        state = json.loads(json.dumps(stream.state_dict()))  # it goes through trainer_state.json
        counting = CountingTokenizer(tokenizer)
        resumed = moh_train.PackedTokenStream(source, counting, 64)
        resumed.load_state_dict(state)
        tail = moh_train.take(resumed, len(expected) - split)
        assert torch.equal(torch.cat([head, tail]), expected), split
        # it carries on where it stopped: the first text it tokenizes is not the start of the data
        assert counting.texts[0] != first_piece, split


def test_mixed_sources_follow_their_weights_and_resume(tmp_path):
    """Two sources at weights 3:1 give 3 of every 4 sequences from the first, spread evenly (never more than one
    sequence off its share at any point), each source in its own order and epochs; the saved position of the mix
    continues it exactly."""
    (tmp_path / "a.txt").write_text("\n".join(synthetic_text(60, seed=i) for i in range(4)) + "\n")
    (tmp_path / "b.txt").write_text("\n".join(synthetic_text(60, seed=10 + i) for i in range(2)) + "\n")
    sources = [moh_train.DataSource(path=str(tmp_path / "a.txt"), weight=3),
               moh_train.DataSource(path=str(tmp_path / "b.txt"), weight=1)]
    tokenizer = tiny_tokenizer()
    only_a = moh_train.take(moh_train.PackedTokenStream(sources[0], tokenizer, 16), 30)
    only_b = moh_train.take(moh_train.PackedTokenStream(sources[1], tokenizer, 16), 10)
    mixed = moh_train.take(moh_train.training_stream(sources, tokenizer, 16, ["data.0", "data.1"]), 40)
    from_a = [any(torch.equal(row, other) for other in only_a) for row in mixed]
    assert sum(from_a) == 30
    for end in range(1, 41):  # every prefix holds each source within one sequence of its share
        assert abs(sum(from_a[:end]) - 0.75 * end) <= 1.0
    assert torch.equal(mixed[torch.tensor(from_a)], only_a) and torch.equal(mixed[~torch.tensor(from_a)], only_b)

    stream = moh_train.training_stream(sources, tokenizer, 16, ["data.0", "data.1"])
    head = moh_train.take(stream, 13)
    resumed = moh_train.training_stream(sources, tokenizer, 16, ["data.0", "data.1"])
    resumed.load_state_dict(json.loads(json.dumps(stream.state_dict())))
    assert torch.equal(torch.cat([head, moh_train.take(resumed, 27)]), mixed)
    with pytest.raises(MoHError, match="resume with the recipe it started with"):
        moh_train.training_stream(sources + sources[:1], tokenizer, 16, ["a", "b", "c"]).load_state_dict(
            stream.state_dict())


def test_missing_column_names_the_recipe_key(tmp_path):
    (tmp_path / "train.txt").write_text(synthetic_text(400))
    (tmp_path / "eval.jsonl").write_text(json.dumps({"body": "some text"}) + "\n")
    recipe = moh_train.TrainRecipe(model="m", output_dir="o", data={"path": str(tmp_path / "train.txt")},
                                   eval_data={"path": str(tmp_path / "eval.jsonl")}, max_steps=1, seq_len=8)
    stream = moh_train.PackedTokenStream(recipe.data[0], tiny_tokenizer(), recipe.seq_len)
    with pytest.raises(MoHError, match=r"eval\.jsonl:1 is not a JSON object with a 'text' field \(set recipe key "
                                       r"'eval_data\.column'\)"):
        heldout_windows(recipe, tiny_tokenizer(), stream)
    # without eval_data the held-out windows are the first sequences of the training stream
    windows = heldout_windows(recipe.model_copy(update={"eval_data": None}), tiny_tokenizer(), stream)
    assert windows.shape == (recipe.eval_windows, 8)
    assert torch.equal(windows[0], torch.tensor(next(moh_train.PackedTokenStream(recipe.data[0], tiny_tokenizer(), 8))))
