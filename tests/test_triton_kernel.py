"""The Triton kernel of the sparse path (routed heads at prefill on CUDA), run here on CPU tensors by Triton's
interpreter (TRITON_INTERPRET=1): its output against plain causal attention of every head, gated (GQA groups,
several routed counts, rows at the start and end of the kernel's 16-row / 16-key tiles on CPU, float32 and bfloat16);
its packed layout; whole models on it against the masked path; and which kernel the sparse path picks for CUDA
tensors (no GPU needed: dispatch reads the device type)."""
from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F
from transformers import AutoModelForCausalLM

import moh_convert
from moh_convert.modeling import modeling_moh

from .conftest import TINY_FAMILIES

pytest.importorskip("triton")


def test_interpreter_is_on():
    # tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported; without it CPU tensors cannot run the kernel.
    import os

    assert os.environ.get("TRITON_INTERPRET") == "1"


class HeadLayout:
    """The parts of MoHHeadRouting the kernel reads: which heads are shared and which routed."""

    def __init__(self, num_heads, shared_heads):
        self.num_heads = num_heads
        self.shared_heads = list(shared_heads)
        self.routed_heads = [head for head in range(num_heads) if head not in shared_heads]
        self._index_cache = {}

    heads_by_key_value_head = modeling_moh.MoHHeadRouting.heads_by_key_value_head
    routed_slots = modeling_moh.MoHHeadRouting.routed_slots


def random_case(batch, num_heads, num_kv_heads, seq, head_dim, shared_heads, top_k, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    layout = HeadLayout(num_heads, shared_heads)
    # Queries as the attention block hands them over: a transposed view of [b, seq, heads, d].
    query = torch.randn(batch, seq, num_heads, head_dim, generator=generator).transpose(1, 2).to(dtype)
    key = torch.randn(batch, num_kv_heads, seq, head_dim, generator=generator).to(dtype)
    value = torch.randn(batch, num_kv_heads, seq, head_dim, generator=generator).to(dtype)
    scores = torch.randn(batch, seq, len(layout.routed_heads), generator=generator)
    routed_mask = torch.zeros_like(scores).scatter_(-1, scores.topk(top_k, dim=-1).indices, 1.0)
    return layout, query, key, value, routed_mask


def gated_reference(layout, query, key, value, routed_mask):
    """Every head by plain causal attention in float32, unselected routed (token, head) pairs zeroed."""
    group = query.shape[1] // key.shape[1]
    dense = F.scaled_dot_product_attention(
        query.float(), key.float().repeat_interleave(group, 1), value.float().repeat_interleave(group, 1),
        is_causal=True, scale=query.shape[-1] ** -0.5,
    ).transpose(1, 2)
    gates = torch.zeros(dense.shape[:3])
    gates[:, :, layout.shared_heads] = 1.0
    gates[:, :, layout.routed_heads] = routed_mask
    return dense * gates.unsqueeze(-1)


TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "batch, num_heads, num_kv_heads, seq, head_dim, shared_heads, top_k",
    [
        (2, 8, 2, 37, 16, [0, 5], 3),  # GQA groups of 4, uneven routed heads per key/value head, two batch rows
        (1, 6, 3, 50, 32, [1], 1),  # one routed head of five per token
        (1, 6, 3, 50, 32, [1], 4),  # all routed heads but one
        (1, 4, 1, 33, 24, [0], 2),  # one key/value head (MQA); head_dim 24 is padded to the kernel's 32
        (1, 4, 4, 16, 16, [], 2),  # no shared heads, MHA, exactly one 16-token tile
        (1, 4, 4, 17, 16, [2], 3),  # all routed heads selected: one row past a tile's end
        (1, 8, 2, 29, 16, [0, 1, 2, 3], 2),  # the shared heads are a whole GQA group (no per-head key copies)
    ],
)
def test_kernel_matches_gated_causal_attention(batch, num_heads, num_kv_heads, seq, head_dim, shared_heads, top_k, dtype):
    layout, query, key, value, routed_mask = random_case(
        batch, num_heads, num_kv_heads, seq, head_dim, shared_heads, top_k, dtype
    )
    output = modeling_moh.head_sparse_attention(
        layout, query, key, value, None, head_dim**-0.5, None, routed_mask, kernel="triton"
    )
    assert output.dtype == dtype and output.shape == (batch, seq, num_heads, head_dim)
    torch.testing.assert_close(output.float(), gated_reference(layout, query, key, value, routed_mask), **TOLERANCE[dtype])


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_cpu_rows_path_with_whole_shared_groups(softcap):
    """The CPU path shares the shared-head layout: whole GQA groups use the kernel's broadcast (and the soft-capping
    branch repeats key/value heads itself)."""
    layout, query, key, value, routed_mask = random_case(1, 8, 2, 23, 16, [4, 5, 6, 7], 2, torch.float32, seed=3)
    output = modeling_moh.head_sparse_attention(layout, query, key, value, None, 0.25, softcap, routed_mask, "rows")
    if softcap is None:
        expected = gated_reference(layout, query, key, value, routed_mask)
    else:
        scores = torch.matmul(query, key.repeat_interleave(4, 1).transpose(2, 3)) * 0.25
        scores = (torch.tanh(scores / softcap) * softcap).masked_fill(torch.ones(23, 23, dtype=torch.bool).triu(1), -torch.inf)
        dense = torch.matmul(scores.softmax(-1), value.repeat_interleave(4, 1)).transpose(1, 2)
        gates = torch.zeros(dense.shape[:3])
        gates[:, :, layout.shared_heads] = 1.0
        gates[:, :, layout.routed_heads] = routed_mask
        expected = dense * gates.unsqueeze(-1)
    torch.testing.assert_close(output, expected, atol=2e-5, rtol=1e-5)


def test_rows_at_tile_edges():
    """One key/value head whose routed rows fill tiles exactly and spill one row over: tokens 0 and 15 (first and
    last of a 16-key tile), 16 (first of the next), the last token; a token selecting both routed heads."""
    layout, query, key, value, _ = random_case(1, 4, 1, 40, 16, [0], 1, torch.float32, seed=2)
    routed_mask = torch.zeros(1, 40, 3)
    for token, column in [(0, 0), (15, 1), (15, 2), (16, 0), (31, 2), (32, 1), (39, 0), (39, 1)]:
        routed_mask[0, token, column] = 1.0
    routed_mask[0, 1:15, 2] = 1.0  # rows 1..14: with the above, the first tile holds tokens 0..15 exactly
    output = modeling_moh.head_sparse_attention(layout, query, key, value, None, 0.25, None, routed_mask, "triton")
    torch.testing.assert_close(output, gated_reference(layout, query, key, value, routed_mask), atol=2e-5, rtol=1e-5)


def test_packed_layout_tiles_cover_each_group_without_crossing():
    layout, *_, routed_mask = random_case(3, 8, 2, 45, 16, [0, 5], 3, torch.float32, seed=1)
    row_token, row_head, tile_group, tile_start, tile_end = modeling_moh.routed_rows_layout(layout, routed_mask, 2, 16)
    # Sized for every routed pair selected (no device sync): the selected rows first, then padding.
    total = int(routed_mask.sum())
    assert row_token.numel() == routed_mask.numel() > total
    row_token, row_head = row_token[:total], row_head[:total]
    group_of_row = torch.empty(total, dtype=torch.long)
    covered = torch.zeros(total, dtype=torch.long)
    last_tokens = []
    for group, start, end in zip(tile_group.tolist(), tile_start.tolist(), tile_end.tolist()):
        if start == end:  # empty tiles of the static launch size
            continue
        assert 0 < end - start <= 16
        last_tokens.append(row_token[end - 1].item())
        group_of_row[start:end] = group
        covered[start:end] += 1
    assert torch.equal(covered, torch.ones_like(covered))  # every row in exactly one tile
    assert last_tokens == sorted(last_tokens, reverse=True)  # longest tiles launch first
    assert (tile_start == tile_end).sum() == tile_group.numel() - len(last_tokens)
    assert torch.all((tile_start == tile_end)[len(last_tokens):])  # empty tiles at the end
    for group in range(6):
        rows = (group_of_row == group).nonzero().flatten()
        batch_row, kv_head = divmod(group, 2)
        tokens, heads = row_token[rows].long(), row_head[rows].long()
        assert torch.all(tokens[1:] >= tokens[:-1])  # sorted by token within a group
        assert torch.all(heads // 4 == kv_head)  # rows read their own key/value head
        columns = torch.tensor([layout.routed_heads.index(head) for head in heads.tolist()], dtype=torch.long)
        assert torch.all(routed_mask[batch_row, tokens, columns] == 1)
        assert rows.numel() == int(routed_mask[batch_row][:, [j for j, h in enumerate(layout.routed_heads) if h // 4 == kv_head]].sum())


# Families whose prefill without padding reaches the kernel with no mask tensor (gemma2/gemma3 have sliding
# windows: their mask goes to the CPU rows path, see test_dispatch).
CAUSAL_FAMILIES = [family for family, extra in TINY_FAMILIES.items() if "sliding_window" not in extra]


@pytest.fixture(scope="module")
def converted_half_heads(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("triton-half-heads")
    return {
        model_type: moh_convert.convert(folder, root / model_type, active_heads=2, shared_heads=1, no_calibration=True)
        for model_type, folder in tiny_checkpoints.items() if model_type in CAUSAL_FAMILIES
    }


@pytest.mark.parametrize("model_type", CAUSAL_FAMILIES)
def test_models_on_the_kernel_match_the_masked_path(model_type, converted_half_heads, monkeypatch):
    calls = []
    original = modeling_moh.triton_routed_attention
    monkeypatch.setattr(
        modeling_moh, "triton_routed_attention", lambda *args: calls.append(1) or original(*args)
    )
    model = AutoModelForCausalLM.from_pretrained(converted_half_heads[model_type]).eval()
    input_ids = torch.randint(3, 128, (2, 21), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        masked = model.set_attention_path("masked")(input_ids=input_ids).logits
        sparse = model.set_attention_path("sparse").set_sparse_kernel("triton")(input_ids=input_ids).logits
        assert len(calls) == model.config.num_layers
        torch.testing.assert_close(sparse, masked, atol=1e-4, rtol=0)
        # generate() with the KV cache: the prompt through the kernel, then decoding (the source kernel, gated).
        generated = model.generate(input_ids=input_ids[:, :12], max_new_tokens=4, do_sample=False, pad_token_id=0)
        model.set_attention_path("masked")
        assert torch.equal(generated, model.generate(input_ids=input_ids[:, :12], max_new_tokens=4, do_sample=False, pad_token_id=0))


def cuda_query(head_dim=64):
    """Stands in for a CUDA query tensor: dispatch reads only its device and shape."""
    return SimpleNamespace(device=torch.device("cuda"), shape=(1, 8, 128, head_dim))


def test_dispatch(monkeypatch):
    pick = modeling_moh.sparse_kernel_for
    cpu_query = torch.zeros(1, 8, 128, 64)
    # CUDA: the Triton kernel for plain causal prefill; the dense kernel then gates where the kernel does not apply.
    assert pick(cuda_query(), None, None) == "triton"
    assert pick(cuda_query(), torch.ones(1, 1, 128, 128, dtype=torch.bool), None) == "dense"  # padding / windows
    assert pick(cuda_query(), None, 50.0) == "dense"  # soft-capping (gemma2)
    assert pick(cuda_query(head_dim=512), None, None) == "dense"
    assert pick(cuda_query(), None, None, requested="rows") == "rows"
    # CPU keeps the rows path, with every mask; "triton" on CPU (the interpreter) only where the kernel applies.
    assert pick(cpu_query, None, None) == "rows"
    assert pick(cpu_query, None, None, requested="triton") == "triton"
    assert pick(cpu_query, torch.ones(1, 1, 128, 128, dtype=torch.bool), None, requested="triton") == "rows"
    monkeypatch.setattr(modeling_moh, "triton_is_available", lambda: False)
    assert pick(cuda_query(), None, None) == "dense"


def test_attention_on_cuda_tensors_selects_the_kernel(converted_half_heads, monkeypatch):
    """A model whose tensors report CUDA (faked at the one place the sparse path reads the device: dispatch) runs
    its routed heads through the Triton kernel without padding, and with padding through the source kernel with
    gates (the CPU rows path never runs on CUDA); logits equal the masked path's either way."""
    original_pick = modeling_moh.sparse_kernel_for
    picked, launched = [], []

    def pick_as_if_on_cuda(query, attention_mask, softcap, requested="auto"):
        picked.append(original_pick(cuda_query(query.shape[-1]), attention_mask, softcap, requested))
        return picked[-1]

    original_launch = modeling_moh.triton_routed_attention
    monkeypatch.setattr(modeling_moh, "sparse_kernel_for", pick_as_if_on_cuda)
    monkeypatch.setattr(modeling_moh, "triton_routed_attention", lambda *args: launched.append(1) or original_launch(*args))
    monkeypatch.setattr(modeling_moh, "attend_causal_rows", lambda *args: pytest.fail("CPU rows path used"))
    monkeypatch.setattr(modeling_moh, "masked_block_rows", lambda *args: pytest.fail("CPU rows path used"))
    model = AutoModelForCausalLM.from_pretrained(converted_half_heads["llama"]).eval()
    num_layers = model.config.num_layers
    input_ids = torch.randint(3, 128, (2, 19), generator=torch.Generator().manual_seed(4))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0
    with torch.no_grad():
        for mask, kernel in ((None, "triton"), (attention_mask, "dense")):
            picked.clear(), launched.clear()
            masked = model.set_attention_path("masked")(input_ids=input_ids, attention_mask=mask).logits
            sparse = model.set_attention_path("sparse")(input_ids=input_ids, attention_mask=mask).logits
            assert picked == [kernel] * num_layers
            assert len(launched) == (num_layers if kernel == "triton" else 0)
            real = slice(None) if mask is None else mask.bool()
            torch.testing.assert_close(sparse[real], masked[real], atol=1e-4, rtol=0)


def test_set_sparse_kernel_rejects_unknown_names(converted_half_heads):
    model = AutoModelForCausalLM.from_pretrained(converted_half_heads["llama"])
    with pytest.raises(ValueError, match="auto, triton, rows"):
        model.set_sparse_kernel("flash")


def test_gpu_benchmark_dry_run(tmp_path):
    """benchmarks/gpu_sparse_attention.py --dry-run: every part wired (kernel, whole model, calibration) on tiny
    shapes through the interpreter, says that no GPU was used, and writes nothing to BENCHMARKS.md."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    benchmarks_md = (repo / "BENCHMARKS.md").read_text()
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu_sparse_attention.py", "--dry-run", "--json", str(tmp_path / "results.json"),
         "--work", str(tmp_path / "work")],
        cwd=repo, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Dry run: no GPU used" in result.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert [row["active"] for row in results["kernel"]] == ["75%", "50%"]
    assert all(row["max_abs_error"] < 1e-4 for row in results["kernel"])
    assert [row["what"].split()[0] for row in results["end_to_end"]] == ["prefill", "decode"]
    assert results["end_to_end"][0]["logits_difference"] < 1e-3
    assert results["calibration"]["report_device"] == "cpu"
    assert (repo / "BENCHMARKS.md").read_text() == benchmarks_md
