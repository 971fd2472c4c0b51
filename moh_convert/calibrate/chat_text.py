"""The 'chat' calibration source: dialogues the dense source model writes itself, in its own chat template, in reply
to the varied prompts shipped in prompts.jsonl (everyday questions, code, math, prose). Such text looks like what
people run the model on (a chat model's turns, its special tokens, code and arithmetic) without needing any data.

Each dialogue (templated prompt + sampled reply + the end-of-turn token) is packed back to back with the next one
into a token stream; prompts are cycled until the stream holds the tokens asked for. The held-out stream is written
from prompts of its own, so the held-out perplexity measures text the calibration never saw."""
import itertools
import json
import math
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import MoHError
from ..modeling.configuration_moh import MoHConfig
from .settings import CHAT_MAX_NEW_TOKENS, CHAT_SAMPLING_TEMPERATURE, CHAT_SAMPLING_TOP_P

PROMPTS_FILE = "prompts.jsonl"  # package data of moh_convert.calibrate
PLAIN_PROMPT_END = "\n\n"  # without a chat template, a prompt is plain text followed by a blank line


def load_dense_model(model_folder: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """The dense source model of a MoH folder (its text_config with the source class: same weights, no routing), or
    the model of a dense folder, on `device` in `dtype` (generation runs on the calibration device when that is
    CUDA)."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if json.loads((Path(model_folder) / "config.json").read_text()).get("model_type") != MoHConfig.model_type:
        return AutoModelForCausalLM.from_pretrained(model_folder, dtype=dtype).to(device).eval()
    config = MoHConfig.from_pretrained(model_folder)
    source_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config.text_config)]
    return source_class.from_pretrained(model_folder, config=config.text_config, dtype=dtype).to(device).eval()


def load_prompts() -> list[dict]:
    """The shipped prompts: {"kind": "chat" | "code" | "math" | "prose", "prompt": ...} per line."""
    text = resources.files(__package__).joinpath(PROMPTS_FILE).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def split_prompts(prompts: list[str], seed: int, calibration_windows: int, heldout_windows: int) -> tuple[list[str], list[str]]:
    """(calibration prompts, held-out prompts): the prompts shuffled with `seed`, the held-out part in proportion
    to its windows (at least one prompt on each side that has windows)."""
    shuffled = list(prompts)
    random.Random(seed).shuffle(shuffled)
    if heldout_windows == 0:
        return shuffled, []
    num_heldout = round(len(shuffled) * heldout_windows / (calibration_windows + heldout_windows))
    num_heldout = max(1, min(num_heldout, len(shuffled) - (1 if calibration_windows else 0)))
    return shuffled[num_heldout:], shuffled[:num_heldout]


@dataclass
class ChatText:
    """Token streams (1-D LongTensors) of dialogues, and what was used to write them."""

    calibration: torch.Tensor
    heldout: torch.Tensor
    calibration_prompts: list[str] = field(default_factory=list)  # the prompts dialogues were written for, in order
    heldout_prompts: list[str] = field(default_factory=list)
    chat_template: bool = True

    def record(self, num_prompts: int) -> dict:
        """The report's record of how the text was written."""
        record = {
            "temperature": CHAT_SAMPLING_TEMPERATURE, "top_p": CHAT_SAMPLING_TOP_P, "max_new_tokens": CHAT_MAX_NEW_TOKENS,
            "prompts": num_prompts, "calibration_dialogues": len(self.calibration_prompts),
            "heldout_dialogues": len(self.heldout_prompts), "chat_template": self.chat_template,
        }
        if not self.chat_template:
            record["note"] = "the tokenizer has no chat template: prompts were given as plain text followed by a blank line"
        return record


@torch.no_grad()
def sample_chat_text(
    model_folder: Path, tokenizer, calibration_tokens: int, heldout_tokens: int, seq_len: int, seed: int,
    batch_size: int = 64, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
) -> ChatText:
    """Dialogues of the dense source model with at least `calibration_tokens` / `heldout_tokens` tokens, the
    held-out ones on prompts of their own. Sampling is seeded with `seed`; the model runs on `device` in `dtype`,
    the token streams come back on the CPU."""
    all_prompts = [item["prompt"] for item in load_prompts()]
    calibration_prompts, heldout_prompts = split_prompts(
        all_prompts, seed, math.ceil(calibration_tokens / seq_len), math.ceil(heldout_tokens / seq_len))
    model = load_dense_model(model_folder, device, dtype)
    writer = DialogueWriter(model, tokenizer, batch_size)
    torch.manual_seed(seed)
    with tqdm(total=calibration_tokens + heldout_tokens, desc="Writing chat calibration text", unit="tok") as progress:
        calibration, used_calibration = writer.write(calibration_prompts, calibration_tokens, progress)
        heldout, used_heldout = writer.write(heldout_prompts, heldout_tokens, progress)
    del model
    return ChatText(calibration, heldout, used_calibration, used_heldout, writer.chat_template)


class DialogueWriter:
    """Batched sampling of replies to prompts (left-padded), each dialogue's tokens kept without padding."""

    def __init__(self, model, tokenizer, batch_size: int):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.chat_template = bool(getattr(tokenizer, "chat_template", None))
        stop = model.generation_config.eos_token_id
        stop = [] if stop is None else [stop] if isinstance(stop, int) else list(stop)
        if tokenizer.eos_token_id is not None:
            stop.insert(0, tokenizer.eos_token_id)  # a chat tokenizer's EOS is its end-of-turn token
        if not stop:
            raise MoHError("'chat' calibration needs a tokenizer or generation config with an EOS token to end replies")
        self.stop_ids = list(dict.fromkeys(stop))
        self.end_of_turn = self.stop_ids[0]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.end_of_turn

    def prompt_text(self, prompt: str) -> str:
        if self.chat_template:
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
        return prompt + PLAIN_PROMPT_END

    def write(self, prompts: list[str], needed_tokens: int, progress) -> tuple[torch.Tensor, list[str]]:
        """A stream of whole dialogues with at least `needed_tokens` tokens, on `prompts` cycled in order."""
        if needed_tokens > 0 and not prompts:
            raise MoHError("no prompts to write chat calibration text from")
        pieces, used, have = [], [], 0
        cycle = itertools.cycle(prompts)
        while have < needed_tokens:
            # As many prompts as the remaining tokens need at the tokens per dialogue seen so far (+20%).
            per_dialogue = have / len(used) if used else CHAT_MAX_NEW_TOKENS / 2 + 64
            count = max(1, min(self.batch_size, math.ceil(1.2 * (needed_tokens - have) / per_dialogue)))
            batch = list(itertools.islice(cycle, count))
            before = have
            for dialogue in self.dialogues(batch):
                pieces.append(dialogue)
                have += dialogue.numel()
            used += batch
            progress.update(min(have, needed_tokens) - before)
        return (torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)), used

    def dialogues(self, prompts: list[str]) -> list[torch.Tensor]:
        """Token ids of each prompt's dialogue: templated prompt + sampled reply + end-of-turn token."""
        encoded = self.left_padded([self.prompt_text(prompt) for prompt in prompts])
        input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
        device = self.model.device
        output = self.model.generate(
            input_ids.to(device), attention_mask=attention_mask.to(device), do_sample=True,
            temperature=CHAT_SAMPLING_TEMPERATURE, top_p=CHAT_SAMPLING_TOP_P, max_new_tokens=CHAT_MAX_NEW_TOKENS,
            eos_token_id=self.stop_ids, pad_token_id=self.pad_id,
        ).cpu()
        replies = output[:, input_ids.shape[1]:]
        stops = torch.isin(replies, torch.tensor(self.stop_ids))
        dialogues = []
        for row in range(len(prompts)):
            prompt = input_ids[row][attention_mask[row].bool()]
            ends = stops[row].nonzero()
            if len(ends):
                reply = replies[row, : ends[0, 0] + 1]  # up to and with the end-of-turn token
            else:
                reply = torch.cat([replies[row], torch.tensor([self.end_of_turn])])
            dialogues.append(torch.cat([prompt, reply]))
        return dialogues

    def left_padded(self, texts: list[str]) -> dict:
        """Token ids and attention mask, padded on the left (generation continues every row at the right end); the
        pad token is the tokenizer's, or its end-of-turn token when it has none. A chat template writes its special
        tokens itself; plain prompts get those the tokenizer adds (e.g. BOS)."""
        rows = [self.tokenizer(text, add_special_tokens=not self.chat_template)["input_ids"] for text in texts]
        width = max(len(row) for row in rows)
        input_ids = torch.tensor([[self.pad_id] * (width - len(row)) + row for row in rows], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": mask}
