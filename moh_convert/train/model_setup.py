"""The model for training: loaded in float32, what the optimizer updates (all | attention | routers | LoRA), AdamW and the
learning-rate schedule."""
import math

import torch

from ..errors import MoHError
from ..modeling.modeling_moh import routing_modules
from .plan import TrainingPlan
from .recipe import TrainRecipe


def load_model(recipe: TrainRecipe, plan: TrainingPlan):
    from transformers import AutoModelForCausalLM

    # MoH folders load natively, without remote code: importing the moh_convert package (which this module is part
    # of) registered the MoH classes with the Auto classes.
    kwargs = {"dtype": torch.float32}  # float32 master weights; mixed precision is accelerate's autocast
    if recipe.attn_implementation:
        kwargs["attn_implementation"] = recipe.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(plan.model_folder, **kwargs)
    model.config.use_cache = False
    return model


def enable_gradient_checkpointing(model) -> None:
    # Non-reentrant checkpointing keeps the graph from the router probabilities (recorded inside the
    # checkpointed layers) to the routing losses computed outside them.
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.25 (the old name warns)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def is_router_parameter(name: str) -> bool:
    return ".moh." in name or name.startswith("moh.")


def make_trainable(model, recipe: TrainRecipe, plan: TrainingPlan):
    """Freeze what the recipe does not train; wrap with peft LoRA for `trainable: lora`."""
    if recipe.trainable == "all":
        model.requires_grad_(True)
        return model
    if recipe.trainable == "routers":
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(is_router_parameter(name))
        return model
    if recipe.trainable == "attention":
        # MoH changed only the attention blocks (which heads run, the refitted o_proj, the router): training them
        # alone skips the weight gradients of the MLPs and of the tied embedding/LM head.
        model.requires_grad_(False)
        for routing in routing_modules(model):
            routing.attention_block.requires_grad_(True)  # its router is a submodule of the block
        return model
    from peft import LoraConfig, get_peft_model

    lora = recipe.lora
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules
                        or plan.lora_targets, task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, config)
    except ValueError as error:
        raise MoHError(f"recipe key 'lora.target_modules': {str(error).splitlines()[0]}") from None
    # peft replaced q_proj/o_proj by wrappers (base layer + LoRA branch); MoH's hooks are still on the base layers,
    # so the LoRA branch would see o_proj's input ungated and the query-norm router would read queries without the
    # LoRA update. Re-attaching puts the hooks on the wrappers: training then sees what the merged model computes.
    for routing in routing_modules(model):
        routing.attach(routing.attention_block)
    if lora.save == "merged":
        # Merged saves keep every tensor, so learned routers (if any) train along with the adapters.
        for name, parameter in model.named_parameters():
            if is_router_parameter(name):
                parameter.requires_grad_(True)
    return model


def build_optimizer(model, recipe: TrainRecipe) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 and "norm" not in name else no_decay).append(parameter)
    if not decay and not no_decay:
        raise MoHError(f"recipe key 'trainable': {recipe.trainable!r} leaves no parameter to train")
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # On CPU the fused kernel is several times faster than torch's per-tensor default; elsewhere torch chooses.
    on_cpu = all(parameter.device.type == "cpu" for group in groups for parameter in group["params"])
    return torch.optim.AdamW([group for group in groups if group["params"]], lr=recipe.learning_rate,
                             betas=(recipe.adam_beta1, recipe.adam_beta2), eps=recipe.adam_epsilon,
                             fused=True if on_cpu else None)


def learning_rate_at(step: int, recipe: TrainRecipe, max_steps: int) -> float:
    """LR of optimizer step `step` (0-based): linear warmup, then cosine from learning_rate to final_learning_rate,
    reached at the last step."""
    if step < recipe.warmup_steps:
        return recipe.learning_rate * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, max_steps - recipe.warmup_steps - 1)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return recipe.final_learning_rate + (recipe.learning_rate - recipe.final_learning_rate) * cosine
