"""`--head-allocation per-layer`: active heads spread over layers by the oracle loss curves, the total kept."""
import itertools
import json

import torch
from transformers import AutoModelForCausalLM

import moh_convert
from moh_convert.calibrate import calibrate
from moh_convert.calibrate.allocation import allocate_active_heads, minimum_active_heads

from .conftest import synthetic_text
from .test_calibrate import SETTINGS


def convex_curves(num_layers, num_heads, seed):
    """Random decreasing convex curves [layers, heads + 1] ending at 0 (what oracle_loss_curves returns)."""
    generator = torch.Generator().manual_seed(seed)
    gains = torch.rand(num_layers, num_heads, generator=generator, dtype=torch.float64).sort(dim=1, descending=True).values
    return torch.cat([gains.flip(1).cumsum(1).flip(1), torch.zeros(num_layers, 1, dtype=torch.float64)], dim=1)


def test_allocation_is_optimal_and_keeps_the_total():
    for seed in range(5):
        curves = convex_curves(4, 5, seed)
        best = min(
            (combo for combo in itertools.product(range(2, 6), repeat=4) if sum(combo) == 13),
            key=lambda combo: sum(curves[l, k].item() for l, k in enumerate(combo)),
        )
        active = allocate_active_heads(curves, budget=13, minimum=2, maximum=5)
        assert sum(active) == 13 and all(2 <= k <= 5 for k in active)
        assert sum(curves[l, k] for l, k in enumerate(active)) <= sum(curves[l, k] for l, k in enumerate(best)) + 1e-12


def test_allocation_follows_sensitivity():
    # Layer 0 loses ten times more per dropped head than layer 1: it keeps all its heads, layer 1 gives them up.
    curves = torch.tensor([[40.0, 30.0, 20.0, 10.0, 0.0], [4.0, 3.0, 2.0, 1.0, 0.0]], dtype=torch.float64)
    assert allocate_active_heads(curves, budget=6, minimum=2, maximum=4) == [4, 2]
    assert minimum_active_heads(6.0) == 3 and minimum_active_heads(1.0) == 1


def test_per_layer_allocation_calibrates_a_model(tiny_checkpoints, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(synthetic_text(2000))
    out = moh_convert.convert(tiny_checkpoints["llama"], tmp_path / "moh", active_heads=2, no_calibration=True)
    calibrate(out, calibration_data=str(text), head_allocation="per-layer", **SETTINGS)
    config = json.loads((out / "config.json").read_text())
    active = [len(shared) + top_k for shared, top_k in zip(config["shared_heads"], config["routed_top_k"])]
    assert sum(active) == 2 * len(active) and all(1 <= k <= 4 for k in active)
    report = json.loads((out / "calibration_report.json").read_text())
    assert report["head_allocation"] == "per-layer" and report["active_heads"] == active
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sparse = model(ids).logits
        masked = model.set_attention_path("masked")(ids).logits
    torch.testing.assert_close(sparse, masked, atol=1e-4, rtol=0)
