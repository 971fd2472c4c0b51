#!/usr/bin/env python
"""Head-sparse attention on one GPU: the Triton kernel against the dense kernel, a whole model's prefill and decode,
and calibration on the GPU, in one run (fits in about 8 minutes on one H100):

    python benchmarks/gpu_sparse_attention.py            # on a machine with a CUDA GPU: writes BENCHMARKS.md
    python benchmarks/gpu_sparse_attention.py --dry-run  # anywhere: tiny shapes on CPU (Triton's interpreter)

1. Kernel: one LLaMA-3-8B attention layer (32 query heads, 8 key/value heads, head_dim 128, bfloat16, batch 1) at
   4K, 16K and 32K tokens with 75% of heads active (the paper's split: the first 16 heads shared + top-8 of 16) and
   50% (first 8 shared + top-8 of 24), random routing. MoH time = the whole sparse path (packed layout, shared heads
   by SDPA, routed heads by the Triton kernel, output assembly) against the fastest dense kernel available (SDPA
   with GQA, SDPA on expanded keys, flash-attn when installed). Error: max |MoH - dense gated| in bfloat16.
2. End to end: a random LLaMA-architecture model shaped like LLaMA-3.2-1B (16 layers, hidden 2048, 32/8 heads,
   head_dim 64; vocabulary 32,000: about 1.1B parameters) in bfloat16, and the same weights as MoH at 24/32 heads
   (16 shared + top-8 of 16, learned router with random weights): prefill at 4K and 16K tokens (logits of the last
   token), greedy decoding after a 512-token prompt; dense and MoH interleaved, medians of ratios.
3. Calibration of that model on the GPU (`moh convert --active-heads 24 --calibration-device cuda
   --calibration-dtype bfloat16`, 16,384 tokens of Python source text, character-level tokenizer).
"""
import argparse
import json
import os
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

if "--dry-run" in sys.argv:
    # CPU tensors reach the Triton kernel only through its interpreter, chosen before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import moh_convert  # noqa: E402
from benchmarks import common  # noqa: E402
from moh_convert import MoHConfig  # noqa: E402
from moh_convert.modeling import modeling_moh  # noqa: E402

MARKERS = ("<!-- gpu_sparse_attention:start -->", "<!-- gpu_sparse_attention:end -->")
LAYER_8B = dict(num_heads=32, num_kv_heads=8, head_dim=128)
# (label, shared heads, routed top-k) for 32 heads
SPLITS = [("75%", 16, 8), ("50%", 8, 8)]
MODEL_1B = dict(
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
    vocab_size=32000, max_position_embeddings=32768, rope_theta=500000.0,
)
TINY = dict(  # --dry-run
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
    vocab_size=320, max_position_embeddings=512,
)


def time_call(fn, device, repeats: int, warmups: int = 2) -> float:
    """Median seconds of fn() (CUDA events around each call after warm-ups; perf_counter on CPU)."""
    for _ in range(warmups):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            began = time.perf_counter()
            fn()
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def routing_for(num_heads, num_kv_heads, head_dim, shared, top_k):
    from transformers import LlamaConfig

    text_config = LlamaConfig(hidden_size=num_heads * head_dim, num_attention_heads=num_heads,
                              num_key_value_heads=num_kv_heads, num_hidden_layers=1, head_dim=head_dim)
    config = MoHConfig(text_config=text_config.to_dict(), shared_heads=[list(range(shared))], routed_top_k=top_k)
    return modeling_moh.MoHHeadRouting(config, 0, text_config.hidden_size, head_dim)


def dense_kernels(query, key, value):
    """name -> fn() of the dense attention kernels available here, every head, causal."""
    group = query.shape[1] // key.shape[1]
    expanded_key, expanded_value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    kernels = {
        "sdpa (gqa)": lambda: F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True),
        "sdpa (expanded kv)": lambda: F.scaled_dot_product_attention(query, expanded_key, expanded_value, is_causal=True),
    }
    try:
        from flash_attn import flash_attn_func

        q, k, v = (t.transpose(1, 2).contiguous() for t in (query, key, value))
        kernels["flash-attn"] = lambda: flash_attn_func(q, k, v, causal=True)
    except ImportError:
        pass
    return kernels


# (BLOCK_M, BLOCK_N, warps, stages) tried for the routed kernel at head_dim 128; the first is the shipped default.
TILE_CONFIGS = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3), (128, 64, 8, 4)]


def tile_sweep(length, layer, device, dtype, repeats):
    """Routed-part time of each tile configuration at one length (75% split); returns rows, best first."""
    generator = torch.Generator(device=device).manual_seed(0)
    num_heads, num_kv_heads, head_dim = layer["num_heads"], layer["num_kv_heads"], layer["head_dim"]
    query = torch.randn(1, length, num_heads, head_dim, device=device, dtype=dtype, generator=generator).transpose(1, 2)
    key = torch.randn(1, num_kv_heads, length, head_dim, device=device, dtype=dtype, generator=generator)
    value = torch.randn_like(key)
    _, shared, top_k = SPLITS[0]
    routing = routing_for(num_heads, num_kv_heads, head_dim, shared, top_k)
    scores = torch.rand(1, length, num_heads - shared, device=device, generator=generator)
    routed_mask = torch.zeros_like(scores).scatter_(-1, scores.topk(top_k, dim=-1).indices, 1.0)
    output = query.new_zeros(1, length, num_heads, head_dim)
    original = modeling_moh.triton_block_sizes
    rows = []
    try:
        for config in TILE_CONFIGS:
            modeling_moh.triton_block_sizes = lambda query, config=config: config
            try:
                seconds = time_call(lambda: modeling_moh.triton_routed_attention(
                    routing, query, key, value, output, routed_mask, head_dim**-0.5), device, repeats)
            except Exception as error:  # e.g. out of shared memory for this tile shape
                print(f"tile config {config}: failed ({type(error).__name__}: {str(error)[:120]})")
                continue
            rows.append(dict(config=config, routed_ms=seconds * 1e3))
            print(f"tile config {config}: routed part {seconds * 1e3:.3f} ms at {length} tokens", flush=True)
    finally:
        modeling_moh.triton_block_sizes = original
    return sorted(rows, key=lambda row: row["routed_ms"])


def kernel_rows(lengths, layer, device, dtype, repeats):
    rows = []
    generator = torch.Generator(device=device).manual_seed(0)
    num_heads, num_kv_heads, head_dim = layer["num_heads"], layer["num_kv_heads"], layer["head_dim"]
    for length in lengths:
        query = torch.randn(1, length, num_heads, head_dim, device=device, dtype=dtype, generator=generator).transpose(1, 2)
        key = torch.randn(1, num_kv_heads, length, head_dim, device=device, dtype=dtype, generator=generator)
        value = torch.randn(1, num_kv_heads, length, head_dim, device=device, dtype=dtype, generator=generator)
        dense_times = {name: time_call(fn, device, repeats) for name, fn in dense_kernels(query, key, value).items()}
        dense_name = min(dense_times, key=dense_times.get)
        dense_output = F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True).transpose(1, 2)
        for label, shared, top_k in SPLITS:
            shared, top_k = shared * num_heads // 32, top_k * num_heads // 32
            routing = routing_for(num_heads, num_kv_heads, head_dim, shared, top_k)
            scores = torch.rand(1, length, num_heads - shared, device=device, generator=generator)
            routed_mask = torch.zeros_like(scores).scatter_(-1, scores.topk(top_k, dim=-1).indices, 1.0)
            scale = head_dim**-0.5

            def moh():
                return modeling_moh.head_sparse_attention(routing, query, key, value, None, scale, None, routed_mask, "triton")

            output = query.new_zeros(1, length, num_heads, head_dim)

            def routed_only():
                modeling_moh.triton_routed_attention(routing, query, key, value, output, routed_mask, scale)

            moh_time, routed_time = time_call(moh, device, repeats), time_call(routed_only, device, repeats)
            gates = torch.zeros(1, length, num_heads, 1, device=device, dtype=dtype)
            gates[:, :, :shared] = 1
            gates[:, :, shared:, 0] = routed_mask.to(dtype)
            error = (moh().float() - (dense_output * gates).float()).abs().max().item()
            rows.append(dict(length=length, active=label, dense_kernel=dense_name, dense_ms=dense_times[dense_name] * 1e3,
                             moh_ms=moh_time * 1e3, routed_ms=routed_time * 1e3, ratio=moh_time / dense_times[dense_name],
                             max_abs_error=error, dense_all={k: v * 1e3 for k, v in dense_times.items()}))
            print(f"kernel {length:>6} tokens {label}: dense {dense_name} {rows[-1]['dense_ms']:.3f} ms, MoH "
                  f"{rows[-1]['moh_ms']:.3f} ms (routed part {rows[-1]['routed_ms']:.3f}) -> {rows[-1]['ratio']:.3f}x, "
                  f"max err {error:.2e}", flush=True)
    return rows


def build_models(shape, device, dtype, shared, top_k):
    """The dense random model and the same weights as MoH (learned router with random weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    text_config = LlamaConfig(**shape)
    text_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        dense = LlamaForCausalLM(text_config).to(dtype).eval()
        config = MoHConfig(text_config=text_config.to_dict(), router="learned", routed_top_k=top_k,
                           shared_heads=[list(range(shared))] * shape["num_hidden_layers"])
        config.text_config._attn_implementation = "sdpa"
        moh = modeling_moh.MoHForCausalLM(config).to(dtype).eval()
    moh.load_state_dict(dense.state_dict(), strict=False)
    with torch.no_grad():
        for name, parameter in moh.named_parameters():
            if ".moh." in name:
                parameter.normal_(0.0, 0.02)
    moh.set_attention_path("sparse")
    if device.type != "cuda":
        moh.set_sparse_kernel("triton")  # the interpreter (dry run); on CUDA "auto" picks Triton
    return dense, moh


def end_to_end_rows(shape, lengths, decode_prompt, decode_tokens, device, dtype, rounds):
    shared, top_k = shape["num_attention_heads"] // 2, shape["num_attention_heads"] // 4
    dense, moh = build_models(shape, device, dtype, shared, top_k)
    parameters = sum(p.numel() for p in dense.parameters())
    generator = torch.Generator().manual_seed(1)
    rows = []

    def prefill(model, ids):
        return lambda: model(input_ids=ids, logits_to_keep=1)

    with torch.no_grad():
        for length in lengths:
            ids = torch.randint(3, shape["vocab_size"], (1, length), generator=generator).to(device)
            ratios, dense_times, moh_times = [], [], []
            prefill(dense, ids)(), prefill(moh, ids)()  # warm-up (kernel compilation, allocator)
            for _ in range(rounds):
                dense_time = time_call(prefill(dense, ids), device, 1, warmups=0)
                moh_time = time_call(prefill(moh, ids), device, 1, warmups=0)
                dense_times.append(dense_time), moh_times.append(moh_time), ratios.append(moh_time / dense_time)
            sparse_logits = moh(input_ids=ids, logits_to_keep=64).logits.float()
            moh.set_attention_path("masked")
            masked_time = time_call(prefill(moh, ids), device, 1)
            masked_logits = moh(input_ids=ids, logits_to_keep=64).logits.float()
            moh.set_attention_path("sparse")
            difference = ((sparse_logits - masked_logits).abs().max() / masked_logits.std()).item()
            rows.append(dict(what=f"prefill {length} tokens", dense_ms=statistics.median(dense_times) * 1e3,
                             moh_ms=statistics.median(moh_times) * 1e3, ratio=statistics.median(ratios),
                             masked_ms=masked_time * 1e3, logits_difference=difference))
            print(f"prefill {length}: dense {rows[-1]['dense_ms']:.1f} ms, MoH {rows[-1]['moh_ms']:.1f} ms "
                  f"({rows[-1]['ratio']:.3f}x), masked path {masked_time * 1e3:.1f} ms, max |sparse - masked| logits "
                  f"{difference:.3f} std", flush=True)

        prompt = torch.randint(3, shape["vocab_size"], (1, decode_prompt), generator=generator).to(device)

        def decode(model):
            return lambda: model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                          max_new_tokens=decode_tokens, min_new_tokens=decode_tokens, pad_token_id=0)

        ratios, dense_times, moh_times = [], [], []
        decode(dense)(), decode(moh)()  # warm-up
        for _ in range(rounds):
            dense_time = time_call(decode(dense), device, 1, warmups=0)
            moh_time = time_call(decode(moh), device, 1, warmups=0)
            dense_times.append(dense_time), moh_times.append(moh_time), ratios.append(moh_time / dense_time)
        rows.append(dict(what=f"decode {decode_tokens} tokens after {decode_prompt}",
                         dense_ms=statistics.median(dense_times) * 1e3 / decode_tokens,
                         moh_ms=statistics.median(moh_times) * 1e3 / decode_tokens, ratio=statistics.median(ratios)))
        print(f"decode: dense {rows[-1]['dense_ms']:.2f} ms/token, MoH {rows[-1]['moh_ms']:.2f} ms/token "
              f"({rows[-1]['ratio']:.3f}x)", flush=True)
    del dense, moh
    return parameters, rows


def character_tokenizer(vocab_size: int):
    """A character-level tokenizer (no Hub): printable ASCII and newline, ids below vocab_size."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    characters = ["\n"] + [chr(code) for code in range(32, 127)]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(characters)}}
    assert len(vocab) <= vocab_size
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def python_source_text(characters: int) -> str:
    """Python source of the installed torch package: text that exists on every machine that runs this."""
    pieces, total = [], 0
    for path in sorted(Path(torch.__file__).parent.rglob("*.py")):
        text = path.read_text(errors="ignore")
        pieces.append(text)
        total += len(text)
        if total >= characters:
            break
    return "\n".join(pieces)


def calibration_row(shape, work: Path, device, dtype_name: str, tokens: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    source = work / "source"
    torch.manual_seed(0)
    with torch.device("cpu"):
        LlamaForCausalLM(LlamaConfig(**shape)).to(torch.bfloat16).save_pretrained(source)
    character_tokenizer(shape["vocab_size"]).save_pretrained(source)
    text_file = work / "python-source.txt"
    text_file.write_text(python_source_text(4 * tokens))
    active = 3 * shape["num_attention_heads"] // 4
    began = time.perf_counter()
    moh_convert.convert(source, work / "calibrated", active_heads=active, calibration_data=str(text_file),
                        calibration_tokens=tokens, calibration_heldout_tokens=2048,
                        calibration_device=str(device), calibration_dtype=dtype_name)
    seconds = time.perf_counter() - began
    report = json.loads((work / "calibrated" / "calibration_report.json").read_text())
    print(f"calibration on {device} ({dtype_name}): {seconds:.1f} s", flush=True)
    return dict(seconds=seconds, tokens=tokens, active=active, heads=shape["num_attention_heads"], device=str(device),
                dtype=dtype_name,
                report_device=report.get("device"), report_dtype=report.get("dtype"))


def machine(device) -> str:
    import platform

    parts = [f"Python {platform.python_version()}", f"torch {torch.__version__}"]
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except ImportError:
        parts.append("no triton")
    import transformers

    parts.append(f"transformers {transformers.__version__}")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs); " + ", ".join(parts)
    return "no GPU (dry run on CPU, Triton interpreter); " + ", ".join(parts)


def markdown(command, machine_text, started, kernel, parameters, e2e, calibration, sweep) -> str:
    lines = [
        "## Head-sparse attention on a GPU (Triton kernel)", "",
        f"Command: `{command}` ({started}). Machine: {machine_text}.", "",
        "### Kernel: one LLaMA-3-8B attention layer (32 heads, 8 key/value heads, head_dim 128, bfloat16, batch 1)", "",
        "MoH = the whole sparse path (packed layout, shared heads by SDPA, routed heads by the Triton kernel, output "
        "assembly); dense = the fastest dense causal kernel measured (all timed: "
        + ", ".join(sorted(kernel[0]["dense_all"]) if kernel else []) + "). Error: max |MoH - dense output gated| (bfloat16).", "",
        "| tokens | active heads | dense kernel | dense ms | MoH ms | routed part ms | MoH / dense | max abs error |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in kernel:
        lines.append(f"| {row['length']} | {row['active']} | {row['dense_kernel']} | {row['dense_ms']:.3f} | "
                     f"{row['moh_ms']:.3f} | {row['routed_ms']:.3f} | {row['ratio']:.3f} | {row['max_abs_error']:.1e} |")
    if sweep:
        lines += ["", f"Tile shapes of the routed kernel (BLOCK_M, BLOCK_N, warps, stages), routed part at "
                  f"{max(row['length'] for row in kernel) if kernel else '-'} tokens, 75%: "
                  + ", ".join(f"{row['config']} {row['routed_ms']:.3f} ms" for row in sweep)
                  + f". The table above uses {sweep[0]['config']}."]
    lines += [
        "", f"### End to end: random LLaMA-3.2-1B-shaped model ({parameters / 1e9:.2f}B parameters, bfloat16), MoH at "
        "24/32 heads (16 shared + top-8 of 16, learned router)", "",
        "Dense and MoH interleaved, median of the per-round ratios; the masked path (every head, then gates) for "
        "reference; logits difference = max |sparse - masked| over the last 64 positions, in units of the logits' "
        "standard deviation.", "",
        "| run | dense ms | MoH (sparse) ms | MoH / dense | masked path ms | logits difference |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in e2e:
        masked = f"{row['masked_ms']:.1f}" if "masked_ms" in row else "-"
        difference = f"{row['logits_difference']:.3f}" if "logits_difference" in row else "-"
        unit = " (per token)" if row["what"].startswith("decode") else ""
        lines.append(f"| {row['what']}{unit} | {row['dense_ms']:.2f} | {row['moh_ms']:.2f} | {row['ratio']:.3f} | "
                     f"{masked} | {difference} |")
    lines += ["", "### Calibration on the GPU", ""]
    if calibration is None:
        return "\n".join(lines + ["Not run (`--skip-calibration`)."])
    lines += [f"`moh convert` of that model at {calibration['active']}/{calibration['heads']} heads with {calibration['tokens']:,} "
              f"calibration tokens (Python source text, character-level tokenizer) on {calibration['device']} in "
              f"{calibration['dtype']}: **{calibration['seconds']:.0f} s** in all (folder copy, calibration, held-out "
              f"perplexity, save); the report records device {calibration['report_device']!r}, dtype "
              f"{calibration['report_dtype']!r}."]
    return "\n".join(lines)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="Tiny shapes on CPU through Triton's interpreter: "
                        "checks the wiring anywhere; writes nothing.")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768], help="Kernel sequence lengths.")
    parser.add_argument("--e2e-lengths", type=int, nargs="+", default=[4096, 16384], help="End-to-end prefill lengths.")
    parser.add_argument("--rounds", type=int, default=5, help="Interleaved rounds of the end-to-end timings.")
    parser.add_argument("--repeats", type=int, default=10, help="Timed calls per kernel measurement.")
    parser.add_argument("--skip-calibration", action="store_true")
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    parser.add_argument("--work", type=Path, default=Path("/tmp/moh-gpu-benchmark"), help="Scratch folder.")
    return parser.parse_args()


def main():
    args = parse_args()
    command = "python benchmarks/gpu_sparse_attention.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if args.dry_run or not torch.cuda.is_available():
        if not args.dry_run:
            sys.exit("No CUDA GPU found: this benchmark needs one. Run with --dry-run to check the wiring on CPU.")
        print("Dry run: no GPU used (found: " + ("a CUDA GPU" if torch.cuda.is_available() else "no GPU")
              + "); tiny shapes on CPU through Triton's interpreter; BENCHMARKS.md is not written.")
        device, dtype = torch.device("cpu"), torch.float32
        layer, shape, lengths, e2e_lengths = dict(num_heads=8, num_kv_heads=2, head_dim=16), TINY, [64], [48]
        decode_prompt, decode_tokens, rounds, repeats, calibration_dtype = 16, 4, 1, 1, "float32"
        calibration_shape, calibration_tokens = TINY, 512
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
        layer, shape, lengths, e2e_lengths = LAYER_8B, MODEL_1B, args.lengths, args.e2e_lengths
        decode_prompt, decode_tokens, rounds, repeats, calibration_dtype = 512, 128, args.rounds, args.repeats, "bfloat16"
        calibration_shape, calibration_tokens = MODEL_1B, 16384
    machine_text = machine(device)
    print(machine_text, flush=True)
    # Each part runs even when an earlier one failed (one GPU session is short): the failure is printed and the
    # run exits non-zero at the end.
    failures = []

    def attempt(part, fn, default):
        try:
            return fn()
        except Exception:
            import traceback

            traceback.print_exc()
            failures.append(part)
            return default
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()

    sweep = []
    if device.type == "cuda":
        sweep = attempt("tile sweep", lambda: tile_sweep(max(lengths), layer, device, dtype, repeats), [])
        if sweep and sweep[0]["config"] != TILE_CONFIGS[0]:
            # The rest of the run uses the fastest tile shape for head_dim 128 (reported below).
            default_sizes = modeling_moh.triton_block_sizes
            best = sweep[0]["config"]
            modeling_moh.triton_block_sizes = lambda query: best if query.shape[-1] == 128 else default_sizes(query)
    kernel = attempt("kernel", lambda: kernel_rows(lengths, layer, device, dtype, repeats), [])
    parameters, e2e = attempt("end to end", lambda: end_to_end_rows(
        shape, e2e_lengths, decode_prompt, decode_tokens, device, dtype, rounds), (0, []))
    calibration = None
    if not args.skip_calibration:
        import tempfile

        args.work.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=args.work) as work:
            calibration = attempt("calibration", lambda: calibration_row(
                calibration_shape, Path(work), device, calibration_dtype, calibration_tokens), None)
    results = dict(machine=machine_text, command=command, started=started, tile_sweep=sweep, kernel=kernel,
                   parameters=parameters,
                   end_to_end=e2e, calibration=calibration)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if failures:
        print(f"\nFailed: {', '.join(failures)} (tracebacks above); BENCHMARKS.md not written.")
        sys.exit(1)
    body = markdown(command, machine_text, started, kernel, parameters, e2e, calibration, sweep)
    print("\n" + body)
    if not args.dry_run:
        common.write_markdown_section(REPO_ROOT / "BENCHMARKS.md", MARKERS, body)
        print(f"\nWrote the gpu_sparse_attention section of {REPO_ROOT / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
