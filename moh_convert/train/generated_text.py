"""Training text the teacher writes (`data: {generate: self | chat | default}`): no labelled or in-domain data
needed, and the text covers what the model is used for (its own chat template for 'chat'). The same generators as
calibration's 'self' and 'chat' sources (moh_convert.calibrate), written once per run to
output_dir/generated-text.jsonl, so that a resumed run (and every process of a distributed one) reads the same text."""
import itertools
import json
import os
import tempfile
from pathlib import Path

import torch

from .recipe import DataSource, TrainRecipe

GENERATED_TEXT = "generated-text.jsonl"


def generated_data_source(recipe: TrainRecipe, generator: str, tokenizer, output_dir: Path, is_main: bool,
                          wait_for_everyone, device: torch.device) -> list[DataSource]:
    """recipe.data, with each `generate:` source replaced by a DataSource over its generated text (written by the
    main process when the run does not have it yet; the others wait for it). `generator`: the model that writes (the
    teacher's source, else the trained model's folder)."""
    sources = []
    for index, source in enumerate(recipe.data):
        if source.generate is None:
            sources.append(source)
            continue
        # The first generated source keeps the single-source file name, so runs started before lists resume.
        path = output_dir / (GENERATED_TEXT if index == 0 else GENERATED_TEXT.replace(".jsonl", f"-{index}.jsonl"))
        if is_main and not path.is_file():
            # Another seed per source: two `generate: self` entries must not write the same text.
            documents = write_documents(source, generator, tokenizer, recipe.seq_len, recipe.seed + index,
                                        output_dir, device)
            with tempfile.NamedTemporaryFile("w", dir=output_dir, prefix=".generated-", suffix=".partial",
                                             delete=False, encoding="utf-8") as handle:
                for document in documents:
                    handle.write(json.dumps({"text": document}, ensure_ascii=False) + "\n")
            os.replace(handle.name, path)  # a killed run leaves no half-written file that a resume would trust
        sources.append(DataSource(path=str(path), column="text", weight=source.weight))
    wait_for_everyone()
    return sources


def write_documents(source: DataSource, generator: str, tokenizer, seq_len: int, seed: int, scratch: Path,
                    device: torch.device) -> list[str]:
    """The generated text as documents of about seq_len tokens (chat: its dialogues; self: its samples)."""
    from ..calibrate.chat_text import sample_chat_text
    from ..calibrate.data import sample_own_text
    from ..sources import resolve_source

    shares = {"self": {"self": 1.0}, "chat": {"chat": 1.0}, "default": {"chat": 0.5, "self": 0.5}}[source.generate]
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    streams = []
    with tempfile.TemporaryDirectory(prefix=".generator-", dir=scratch) as work_dir:
        folder = resolve_source(generator, Path(work_dir)).folder  # a .gguf teacher is dequantized first
        for kind, share in shares.items():
            tokens = max(seq_len, round(source.generate_tokens * share))
            if kind == "chat":
                streams.append(sample_chat_text(folder, tokenizer, tokens, 0, seq_len, seed, device=device,
                                                dtype=dtype).calibration)
            else:
                streams.append(sample_own_text(folder, tokenizer, tokens, seq_len, seed, device=device, dtype=dtype))
    per_kind = [[tokenizer.decode(stream[start:start + seq_len]) for start in range(0, stream.numel(), seq_len)]
                for stream in streams]
    # Interleaved (one of each kind in turn), so that any prefix of the run sees every kind.
    return [document for group in itertools.zip_longest(*per_kind) for document in group if document is not None]
