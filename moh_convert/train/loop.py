"""The training loop, top to bottom, in the style of accelerate's examples:

    recipe -> validated before any model is loaded (plan.py)
    -> Accelerator (DDP / FSDP / DeepSpeed / CPU come from `accelerate launch --config_file ...`)
    -> tokenizer, model, what is trainable (all | routers | lora), AdamW (model_setup.py)
    -> packed token stream: every process reads the same stream and takes its own slice of each global batch,
       so a run gives the same losses whatever the number of processes (token_stream.py)
    -> the distillation teacher, when the recipe has `distill:` (distill.py): same process and device, no gradients
    -> per step: micro-batches with gradient accumulation, loss = LM loss (or the teacher's KL, distill.py)
       + routing losses (losses.py), clip, AdamW
    -> metrics.jsonl (+ TensorBoard when installed), held-out perplexity every `eval_every` steps,
       checkpoints every `save_every` steps and `--resume` (checkpoints.py)
    -> final model folder with the same layout as `moh convert` output and a Training section in its card (save.py).
"""
import contextlib
import importlib.util
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..model_folder import OutputLock, check_output_location, prepare_output_parent
from ..modeling.modeling_moh import routing_modules
from ..perplexity import perplexity
from .checkpoints import CHECKPOINTS_DIR, remove_unfinished_checkpoints, resume_point, save_checkpoint
from .distill import Teacher, distillation_losses, load_teacher, next_token_loss
from .generated_text import generated_data_source
from .losses import routing_losses
from .metrics import MetricsLog, RunOutcome, training_summary
from .model_setup import build_optimizer, enable_gradient_checkpointing, learning_rate_at, load_model, make_trainable
from .plan import TrainingPlan, plan_training, text_config_of
from .recipe import TrainRecipe, load_recipe
from .save import save_final_model
from .token_stream import heldout_windows, take, training_stream


def train(recipe: str | Path | dict | TrainRecipe, overrides: list[str] = (), resume: bool = False) -> Path:
    """Run a recipe (path, dict or TrainRecipe) in this process, under `accelerate launch` when distributed.
    Returns the final model folder (output_dir/model)."""
    from accelerate import PartialState

    if not isinstance(recipe, TrainRecipe):
        recipe = load_recipe(recipe, list(overrides))
    state = PartialState(cpu=cpu_multiprocess_launch())
    plan = plan_training(recipe, state.num_processes, str(state.distributed_type).split(".")[-1], resume)

    output_dir = Path(recipe.output_dir).expanduser().resolve()
    check_output_location(output_dir, [Path(plan.model_folder)])
    with contextlib.ExitStack() as run_lock:
        if state.is_main_process:
            # One run per output_dir at a time; what a killed run left half-written is removed (and said).
            prepare_output_parent(output_dir)
            run_lock.enter_context(OutputLock(output_dir))
            remove_unfinished_checkpoints(output_dir / CHECKPOINTS_DIR)
        return run_training(recipe, plan, output_dir, resume,
                            cpu=state.device.type == "cpu" and state.num_processes > 1)


def run_training(recipe: TrainRecipe, plan: TrainingPlan, output_dir: Path, resume: bool, cpu: bool) -> Path:
    """The run itself, once the recipe is planned and output_dir is this run's."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    accelerator = Accelerator(
        gradient_accumulation_steps=plan.gradient_accumulation_steps,
        mixed_precision=recipe.mixed_precision,
        log_with=["tensorboard"] if importlib.util.find_spec("tensorboard") is not None else None,
        project_dir=str(output_dir),
        cpu=cpu,
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    set_seed(recipe.seed)

    # ---- tokenizer, model, trainable parameters, optimizer
    tokenizer = AutoTokenizer.from_pretrained(plan.model_folder)
    model = load_model(recipe, plan)
    routings = routing_modules(model)
    if recipe.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model = make_trainable(model, recipe, plan)
    optimizer = build_optimizer(model, recipe)
    model, optimizer = accelerator.prepare(model, optimizer)
    teacher = None
    if plan.teacher is not None:  # not prepared by accelerate: it only runs forward, a full copy per process
        teacher = load_teacher(plan.teacher, recipe.distill, accelerator.device,
                               text_config_of(plan.source_config)["vocab_size"], output_dir)
        accelerator.print(f"distilling from {teacher.describe()}")
    model.train()

    # ---- data: the same packed stream in every process; each takes its slice of every global batch
    data = generated_data_source(recipe, plan.teacher or plan.model_folder, tokenizer, output_dir,
                                 accelerator.is_main_process, accelerator.wait_for_everyone, accelerator.device)
    stream = training_stream(data, tokenizer, recipe.seq_len, recipe.data_keys())
    eval_windows = heldout_windows(recipe, tokenizer, stream)  # from the stream: training starts after them

    def evaluate_heldout() -> float:
        return perplexity(model, eval_windows, recipe.micro_batch_size, progress=False, accelerator=accelerator)

    # ---- resume: model/optimizer/RNG from accelerate, step and data position from trainer_state.json
    checkpoints = output_dir / CHECKPOINTS_DIR
    start = resume_point(accelerator, checkpoints, stream, resume)
    metrics_log = MetricsLog(accelerator, output_dir)
    metrics_log.start(recipe, start)
    sequences_consumed, first_ppl = start.sequences_consumed, start.heldout_perplexity_before
    if eval_windows is not None and start.step == 0:
        first_ppl = evaluate_heldout()
        accelerator.print(f"held-out perplexity before training: {first_ppl:.3f}")

    tokens_per_step = plan.sequences_per_step * recipe.seq_len
    progress = tqdm(total=plan.max_steps, initial=start.step, desc="Training", unit="step",
                    disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    last_ppl, train_started, last_loss = first_ppl, time.perf_counter(), None
    rank = accelerator.process_index

    for step in range(start.step, plan.max_steps):
        step_started = time.perf_counter()
        global_batch = take(stream, plan.sequences_per_step)
        sequences_consumed += plan.sequences_per_step
        my_rows = global_batch[rank * plan.sequences_per_process:(rank + 1) * plan.sequences_per_process]
        lr = learning_rate_at(step, recipe, plan.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr

        losses = optimizer_step(accelerator, model, optimizer, routings, my_rows, recipe, plan, teacher)
        last_loss = losses.loss
        done = step + 1
        metrics = {"step": done, "tokens": done * tokens_per_step, "sequences_consumed": sequences_consumed,
                   "lr": lr, "loss": last_loss, "load_balance_loss": losses.load_balance_loss,
                   "z_loss": losses.z_loss, "load_spread": losses.load_spread,
                   **({"distill_kl": losses.distill_kl, "distill_hidden": losses.distill_hidden} if teacher else {}),
                   "tokens_per_s": tokens_per_step / (time.perf_counter() - step_started)}
        if recipe.eval_every and eval_windows is not None and (done % recipe.eval_every == 0 or done == plan.max_steps):
            last_ppl = metrics["heldout_perplexity"] = evaluate_heldout()
        if done % recipe.log_every == 0 or done == plan.max_steps or "heldout_perplexity" in metrics:
            metrics_log.write(metrics)
        progress.set_postfix(loss=f"{last_loss:.3f}", **({"kl": f"{losses.distill_kl:.4f}"} if teacher else {}),
                             lb=f"{metrics['load_balance_loss']:.3f}", spread=f"{metrics['load_spread']:.2f}",
                             tok_s=f"{metrics['tokens_per_s']:.0f}")
        progress.update(1)
        if recipe.save_every and done % recipe.save_every == 0 and done < plan.max_steps:
            trainer_state = {"step": done, "sequences_consumed": sequences_consumed, "lr": lr, "loss": last_loss,
                             "heldout_perplexity_before": first_ppl, "data_state": stream.state_dict()}
            save_checkpoint(accelerator, checkpoints, trainer_state, recipe.keep_checkpoints)
    progress.close()

    if eval_windows is not None and (not recipe.eval_every or last_ppl is None):
        last_ppl = evaluate_heldout()
    outcome = RunOutcome(last_loss, first_ppl, last_ppl, time.perf_counter() - train_started)
    summary = training_summary(recipe, plan, accelerator.mixed_precision, outcome, teacher)
    output = save_final_model(accelerator, model, recipe, plan, summary, tokenizer)
    accelerator.end_training()
    accelerator.print(f"Trained model written to {output}")
    return output


@dataclass
class StepLosses:
    """Means over the global batch of one optimizer step (every process gets the same numbers)."""

    loss: float  # the plain next-token loss (also when distilling: comparable across runs)
    load_balance_loss: float
    z_loss: float
    load_spread: float
    distill_kl: float = 0.0
    distill_hidden: float = 0.0


def optimizer_step(accelerator, model, optimizer, routings: list, rows: torch.Tensor, recipe: TrainRecipe,
                   plan: TrainingPlan, teacher: Teacher | None = None) -> StepLosses:
    """One optimizer step over this process's rows of the global batch, in micro-batches with gradient
    accumulation: loss = LM loss + load_balance_coef * load-balance loss + router_z_loss_coef * z-loss; when
    distilling, the LM loss weighs distill.lm_loss_weight and the teacher's KL (and hidden-state) terms are added."""
    sums = torch.zeros(6, dtype=torch.float64)  # lm loss, load-balance loss, z-loss, load spread, KL, hidden
    distill = recipe.distill
    with_hidden = teacher is not None and distill.hidden_states_weight > 0
    for micro_batch in rows.split(recipe.micro_batch_size):
        with accelerator.accumulate(model):  # syncs gradients (and steps) only on the last micro-batch
            micro_batch = micro_batch.to(accelerator.device)
            # Distilling without a next-token term: that loss is only logged, so it stays out of the graph (its
            # backward is a [tokens, vocabulary] pass of its own).
            lm_in_graph = teacher is None or distill.lm_loss_weight > 0
            outputs = model(input_ids=micro_batch, labels=micro_batch if lm_in_graph else None,
                            output_hidden_states=with_hidden)
            lm_loss = outputs.loss if lm_in_graph else next_token_loss(outputs.logits, micro_batch)
            aux = routing_losses(routings, plan.aux_loss, with_z_loss=plan.router_z_loss_coef > 0)
            loss = plan.load_balance_coef * aux.load_balance_loss + plan.router_z_loss_coef * aux.z_loss
            if teacher is None:
                loss = loss + lm_loss
                kd = None
            else:
                with torch.no_grad():
                    teacher_outputs = teacher.model(input_ids=micro_batch, output_hidden_states=with_hidden)
                kd = distillation_losses(outputs, teacher_outputs, distill)
                loss = loss + distill.kl_weight * kd.kl + distill.hidden_states_weight * kd.hidden
                if lm_in_graph:
                    loss = loss + distill.lm_loss_weight * lm_loss
            accelerator.backward(loss)  # divided by gradient_accumulation_steps inside
            if accelerator.sync_gradients and recipe.max_grad_norm is not None:
                accelerator.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
        distill_values = [kd.kl.item(), kd.hidden.item()] if kd is not None else [0.0, 0.0]
        sums += torch.tensor([lm_loss.item(), *aux.values(), *distill_values], dtype=torch.float64)
    # Every micro-batch has the same token count, so the mean of their means is the global batch's mean.
    means = accelerator.reduce(sums.to(accelerator.device) / plan.gradient_accumulation_steps, "mean").cpu()
    return StepLosses(*means.tolist())


def cpu_multiprocess_launch() -> bool:
    """True for a multi-process launch (torchrun-style LOCAL_RANK) on a machine without GPUs: accelerate then needs
    cpu=True to use torch.distributed's gloo backend. (accelerate's own MULTI_CPU launcher needs mpirun; the
    cpu_2proc config launches through torchrun instead, see recipes/accelerate/cpu_2proc.yaml.)"""
    return "LOCAL_RANK" in os.environ and not torch.cuda.is_available() and not (
        hasattr(torch, "xpu") and torch.xpu.is_available())
