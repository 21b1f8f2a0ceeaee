"""The trainer: setup / fit / validate for one run, on `accelerate` (CPU, one GPU, or DDP under `accelerate launch`).

- ``setup``: config -> seeds -> base model + routers + LoRA -> step data -> optimizer/schedule -> (resume).
- ``fit``: the optimisation loop (the loss: `objective`). Checkpoints every N steps; a non-finite loss stops the run.
- ``validate``: teacher-forced loss and run rates per step type on a small, fixed eval subset.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import write_text_atomic
from ..calibrate.setup import INFLUENCE_STEPS, fit_skip_bridges, spread_router_biases, static_oracle_targets
from ..config import STATIC_ORACLES, RunConfig
from ..errors import ConfigError, TrainingError
from ..special_tokens import pad_token_id
from .batches import BatchOrder, eval_subset, target_count
from .checkpoint import (
    CHECKPOINT_DIR,
    _optimizer_to_files,
    _rng_state,
    list_checkpoints,
    read_state,
    restore_checkpoint,
    write_checkpoint,
)
from .metrics import METRICS_FILE, _finite_or_none, make_sinks, truncate_metrics
from .objective import RoutedStepLoss, loss_parts
from .schedule import clip_gradients, lr_factor, optimizer_groups

STEP_TYPES = ("tool_call", "planning")


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    steps: int
    metrics: dict
    wall_s: float
    is_main_process: bool = True


class Trainer:
    """setup / fit / validate for one run. `data` (an object with .train and .eval lists of Step) bypasses
    `load_steps` (tests); otherwise the data section of the config is loaded with the model's tokenizer."""

    def __init__(
        self,
        cfg: RunConfig,
        output_dir: str | Path | None = None,
        *,
        resume: bool = False,
        data=None,
        accelerator=None,
    ):
        self.cfg = cfg
        out = output_dir or cfg.train.output_dir
        if not out:
            raise ConfigError("train.output_dir is not set: pass --output-dir OUT (or set train.output_dir)")
        self.output_dir = Path(out)
        self.resume = resume
        self.data = data
        self.accelerator = accelerator
        self.start_step = 0
        self.last_checkpoint: Path | None = None
        self.wall_before = 0.0  # wall time of earlier sessions of this run (resume)
        self.history: dict = {}

    # -- helpers -----------------------------------------------------------------------------------------------
    def _print(self, msg: str) -> None:
        if self.accelerator.is_main_process:
            print(msg, file=sys.stderr, flush=True)

    def _sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over processes (a no-op on one process)."""
        tensor = tensor.to(self.accelerator.device)
        return self.accelerator.reduce(tensor, reduction="sum") if self.world > 1 else tensor

    # -- setup -------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from ..adapters import build_routed_model, init_lora_from
        from ..model import load_base, parameter_counts, resolve_device, resolve_model_config

        t0 = self._t0 = time.perf_counter()
        tc = self.cfg.train
        if self.accelerator is None:
            # cpu=True on a CPU model is what lets accelerate see a torchrun-style launch (WORLD_SIZE > 1) as
            # multi-process CPU training over gloo; without it every process would train alone.
            cpu = resolve_device(self.cfg.model.device).type == "cpu"
            self.accelerator = Accelerator(mixed_precision="bf16" if tc.precision == "bf16" else "no", cpu=cpu)
        acc = self.accelerator
        self.world, self.rank = acc.num_processes, acc.process_index
        checkpoints = list_checkpoints(self.output_dir)
        if checkpoints and not self.resume:
            raise ConfigError(
                f"{self.output_dir} already holds checkpoints (last: {checkpoints[-1].name}): pass --resume to "
                "continue that run, or choose another --output-dir"
            )
        self._print(f"[setup] output {self.output_dir}, {self.world} process(es) on {acc.device}, precision {tc.precision}")

        # Model: the backbone's random weights (shape presets) come from model.seed; LoRA init from train.seed.
        # model.dtype 'auto' is resolved here once (bf16 where native, else float32), and the run records the dtype it
        # used: config.json, checkpoints and the adapter's training config say float32 or bfloat16, never auto.
        requested = self.cfg.model.dtype
        model_cfg = resolve_model_config(dataclasses.replace(self.cfg.model, device=str(acc.device)))
        self.cfg.model = dataclasses.replace(self.cfg.model, dtype=model_cfg.dtype)
        loaded = load_base(model_cfg, tokenizer=self.data is None)
        set_seed(tc.seed)
        rm = build_routed_model(model_cfg, self.cfg.router, self.cfg.lora, loaded=loaded)
        self.rm = rm
        if tc.experimental.init_lora:  # before anything measures the model (router-bias influence, drop_* oracle costs)
            n = init_lora_from(rm, tc.experimental.init_lora)
            self._print(f"[setup] LoRA starts from {tc.experimental.init_lora} ({n} tensors)")
        counts = parameter_counts(rm.model)
        self._print(
            f"[setup] {model_cfg.name}: {rm.num_layers} blocks, frozen weights in {loaded.dtype}"
            + (f" (model.dtype {requested})" if requested != loaded.dtype else "") + f"; trainable {counts['trainable']:,} "
            f"(LoRA {counts['lora']:,} + routers {counts['router']:,}"
            + (f" + skip bridges {counts['bridge']:,}" if counts["bridge"] else "") + f") of {counts['backbone']:,} frozen"
        )

        # Data
        if self.data is None:
            from ..data.build import load_steps

            if rm.tokenizer is None:
                raise ConfigError("model.tokenizer is not set and the model has none: name a tokenizer folder")
            with acc.main_process_first():
                self.data = load_steps(self.cfg.data, rm.tokenizer)
        self.train_steps = list(self.data.train)
        if not self.train_steps:
            raise ConfigError("the data section produced no training steps (check data.sources)")
        self.eval_steps = eval_subset(list(getattr(self.data, "eval", [])), tc.eval_examples)
        self.pad_id = pad_token_id(self.rm.tokenizer, self.rm.config)  # the one pad rule (special_tokens)
        self.n_targets = [target_count(s) for s in self.train_steps]
        self.order = BatchOrder(self.train_steps, tc.batch_size, tc.seed)
        n_tool = sum(s.step_type == "tool_call" for s in self.train_steps)
        self._print(
            f"[setup] data: {len(self.train_steps):,} train steps ({n_tool:,} tool calls), "
            f"{len(self.eval_steps)} val steps, {self.order.batches_per_epoch:,} micro-batches per epoch; "
            f"{tc.steps:,} steps x {tc.batch_size} x {tc.grad_accum} x {self.world} = "
            f"{tc.steps * tc.batch_size * tc.grad_accum * self.world / max(1, len(self.train_steps)):.2f} epochs"
        )

        if self.cfg.router.bridge_rank and tc.bridge_calibration_steps:
            # after init_lora (the bridges fit the blocks as LoRA has them) and before the drop_* oracle (which then
            # measures what a removal costs with its bridge standing in). A resumed run refits, then the checkpoint
            # overwrites them with their trained values.
            explained, n_calib = fit_skip_bridges(rm, self.train_steps, tc, self.pad_id,
                                                  progress=tc.progress and self.accelerator.is_main_process)
            self.bridge_explained = explained
            self._print(f"[setup] skip bridges (rank {self.cfg.router.bridge_rank}) fitted on {n_calib} steps: "
                        "share of each block's update explained " + " ".join(f"{e:.2f}" for e in explained))

        if self.cfg.router.init_bias_spread > 0:
            influence = spread_router_biases(rm, self.train_steps[:INFLUENCE_STEPS], self.cfg.router, tc, self.pad_id)
            self._print("[setup] router biases spread by block influence: "
                        + " ".join(f"{b:.2f}" for b in (r.output_bias.item() for r in rm.routers()))
                        + f" (influence min {min(influence):.3f}, max {max(influence):.3f})")

        # Optimizer: routers, skip bridges and LoRA in their own groups (schedule.optimizer_groups says why).
        groups = optimizer_groups(rm.model, tc)
        optimizer = torch.optim.AdamW(groups, lr=tc.lr, betas=(0.9, 0.999), eps=1e-8)
        # Not passed to accelerate: its scheduler wrapper steps once per process under DDP.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, tc))
        self.trainable = [p for g in groups for p in g["params"]]
        self.trainable_names = [n for n, p in rm.model.named_parameters() if p.requires_grad]

        self.step_module = RoutedStepLoss(rm.model, self.cfg.train)
        if tc.router_loss == "targets" and tc.oracle_source in STATIC_ORACLES:
            self.step_module.static_targets, self.oracle_record = static_oracle_targets(
                rm, self.train_steps, tc, self.pad_id, main_process=acc.is_main_process, log=self._print
            )
        rm.model.train()  # LoRA dropout on; the frozen backbone's own dropouts are 0 in these families
        self.model, self.optimizer = acc.prepare(self.step_module, optimizer)
        self.inner_optimizer = optimizer

        if self.resume:
            self._load_latest()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if acc.is_main_process:
            write_text_atomic(self.output_dir / "config.json", json.dumps(self.cfg.to_dict(), indent=2, default=str))
        # Every process has its own RNG stream (LoRA dropout differs between ranks); rank 0 = the seed itself.
        if self.start_step == 0:
            set_seed(tc.seed, device_specific=True)
        self.sinks = make_sinks(self.output_dir, tc.steps, self.start_step, progress=tc.progress,
                                main_process=acc.is_main_process)
        self.setup_s = time.perf_counter() - t0
        self._print(f"[setup] done in {self.setup_s:.1f} s")

    # -- checkpoints -------------------------------------------------------------------------------------------
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        params = dict(self.rm.model.named_parameters())
        return {n: params[n].detach().to("cpu").contiguous() for n in self.trainable_names}

    def save_checkpoint(self, step: int) -> Path:
        """OUT/checkpoints/step-NNNNNN, written to a temp folder and renamed (all processes must call this)."""
        from accelerate.utils import gather_object

        acc = self.accelerator
        rng = gather_object([_rng_state()]) if self.world > 1 else [_rng_state()]
        path = self.output_dir / CHECKPOINT_DIR / f"step-{step:06d}"
        if acc.is_main_process:
            tensors, opt_meta = _optimizer_to_files(self.inner_optimizer)
            state = {
                "step": step,
                "world_size": self.world,
                "data_position": self.order.position(step * self.cfg.train.grad_accum * self.world),
                "scheduler": self.scheduler.state_dict(),
                "optimizer": opt_meta,
                "trainable_names": self.trainable_names,
                "wall_s": self.wall_before + (time.perf_counter() - self.t_start),
                "history": self.history,
                "config": self.cfg.to_dict(),
            }
            write_checkpoint(path, self._trainable_state(), tensors, rng, state)
            for old in list_checkpoints(self.output_dir)[: -self.cfg.train.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        self.last_checkpoint = path
        return path

    def _load_latest(self) -> None:
        checkpoints = list_checkpoints(self.output_dir)
        if not checkpoints:
            self._print(f"[setup] --resume: no checkpoint under {self.output_dir / CHECKPOINT_DIR}; starting at step 0")
            return
        path = checkpoints[-1]
        state = read_state(path, self.world, self.cfg.to_dict(), self.trainable_names)
        restore_checkpoint(path, state, self.rm.model, self.trainable_names, self.inner_optimizer, self.scheduler,
                           self.rank)
        self.start_step = state["step"]
        self.wall_before = state["wall_s"]
        self.history = state.get("history", {})
        self.last_checkpoint = path
        # metrics.jsonl: drop records the interrupted session wrote after this checkpoint
        metrics = self.output_dir / METRICS_FILE
        if self.accelerator.is_main_process and metrics.is_file():
            damaged = truncate_metrics(metrics, self.start_step)
            if damaged:  # a kill mid-append leaves a cut line: say so rather than crash the resume
                self._print(f"[setup] {metrics}: dropped {damaged} unreadable line(s)")
        self.accelerator.wait_for_everyone()
        self._print(f"[setup] resumed from {path} (step {self.start_step})")

    # -- fit ---------------------------------------------------------------------------------------------------
    def _batch(self, indices: list[int], steps: list) -> dict[str, torch.Tensor]:
        from ..data.collate import collate_steps

        batch = collate_steps([steps[i] for i in indices], self.pad_id)
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}

    def _new_window(self) -> dict:
        L = self.rm.num_layers
        return {
            "steps": 0, "loss": 0.0, "lm": 0.0, "reg": 0.0, "bce": 0.0, "distill": 0.0, "grad_norm": 0.0, "tokens": 0,
            "gate_sum": torch.zeros(2, L, dtype=torch.float64), "rows": torch.zeros(2, dtype=torch.float64),
            "prob_sum": torch.zeros(2, L, dtype=torch.float64),
            "t0": time.perf_counter(),
        }

    def fit(self) -> dict:
        acc, tc = self.accelerator, self.cfg.train
        A, W = tc.grad_accum, self.world
        self.t_start = time.perf_counter()
        self._print(f"[fit] steps {self.start_step + 1}..{tc.steps}")
        window = self._new_window()
        last = {}
        for step in range(self.start_step, tc.steps):
            # Every process knows the whole step's micro-batches, so the loss denominators are global.
            micro = [[self.order.batch((step * A + k) * W + r) for r in range(W)] for k in range(A)]
            tokens_total = sum(self.n_targets[i] for mb in micro for b in mb for i in b)
            rows_total = sum(len(b) for mb in micro for b in mb)
            local = torch.zeros(5, dtype=torch.float64)  # loss, lm, reg, bce, distill (this process's share)
            for k in range(A):
                batch = self._batch(micro[k][self.rank], self.train_steps)
                sync = nullcontext() if k == A - 1 else acc.no_sync(self.model)
                with sync:
                    row_sum, _, prob, gate, extras = self.model(
                        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        labels=batch["labels"], decision_mask=batch["decision_mask"],
                        is_tool_call=batch["is_tool_call"],
                    )
                    parts = loss_parts(
                        tc, row_sum, prob.float(), gate.float(), batch["is_tool_call"], kl_row=extras["kl_row"],
                        oracle_target=extras["oracle_target"],
                        tokens_total=tokens_total, rows_total=rows_total, micro_total=A * W,
                    )
                    # DDP averages gradients over processes; the parts are shares of the global sum: undo the mean.
                    acc.backward(parts.total * W)
                local += torch.tensor(
                    [parts.total.item(), parts.lm.item(), parts.reg.item(), parts.bce.item(), parts.distill.item()],
                    dtype=torch.float64,
                )
                hard = gate.detach().round().double().cpu()  # [L, B] in {0, 1}
                soft = prob.detach().double().cpu()  # [L, B]: shows the routers drifting before a gate flips
                tool = batch["is_tool_call"].cpu()
                for t, sel in enumerate((tool, ~tool)):
                    window["gate_sum"][t] += hard[:, sel].sum(dim=1)
                    window["prob_sum"][t] += soft[:, sel].sum(dim=1)
                    window["rows"][t] += int(sel.sum())
                window["tokens"] += int(batch["attention_mask"].sum())
            max_norm = tc.max_grad_norm if tc.max_grad_norm > 0 else float("inf")
            grad_norm = clip_gradients(acc, [g["params"] for g in self.inner_optimizer.param_groups], max_norm,
                                       per_group=tc.clip_per_group)
            totals = self._sum(local.clone())  # the step's global loss terms, summed over processes
            if not (torch.isfinite(totals).all() and math.isfinite(grad_norm)):
                self._stop_non_finite(step + 1, totals, grad_norm)
            lrs = [g["lr"] for g in self.inner_optimizer.param_groups]  # the lrs this step applies
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            done = step + 1
            window["steps"] += 1
            for i, key in enumerate(("loss", "lm", "reg", "bce", "distill")):
                window[key] += float(totals[i])
            window["grad_norm"] += grad_norm
            self.sinks[0].advance()
            if done % tc.log_every == 0 or done == tc.steps:
                last = self._log_window(done, window, lrs)
                window = self._new_window()
            if tc.eval_every and done % tc.eval_every == 0 and done != tc.steps:
                self.validate(done)
            if tc.checkpoint_every and done % tc.checkpoint_every == 0:
                self.save_checkpoint(done)
        self.fit_s = time.perf_counter() - self.t_start
        return last

    def _stop_non_finite(self, step: int, totals: torch.Tensor, grad_norm: float) -> None:
        loss, lm, reg, bce, _ = (float(x) for x in totals)
        where = (
            f"last good checkpoint: {self.last_checkpoint} (continue with --resume after the fix)"
            if self.last_checkpoint
            else f"no checkpoint was written before it (train.checkpoint_every={self.cfg.train.checkpoint_every})"
        )
        for sink in self.sinks:
            if hasattr(sink, "close"):
                sink.close()
        raise TrainingError(
            f"non-finite loss at step {step}: loss={loss} lm={lm} reg={reg} bce={bce} grad_norm={grad_norm}; "
            f"the parameters were not updated with it. {where}. Usual causes: too high a train.lr / "
            "train.router_lr, fp16 overflow, or a step without target tokens."
        )

    def _log_window(self, step: int, window: dict, lrs: list[float]) -> dict:
        n = window["steps"]
        gate_sum = self._sum(window["gate_sum"].clone()).cpu()
        prob_sum = self._sum(window["prob_sum"].clone()).cpu()
        rows = self._sum(window["rows"].clone()).cpu()
        tokens = float(self._sum(torch.tensor([float(window["tokens"])], dtype=torch.float64))[0])
        elapsed = time.perf_counter() - window["t0"]
        metrics = {
            "step": step,
            "epoch": round(step * self.cfg.train.grad_accum * self.world / max(1, self.order.batches_per_epoch), 4),
            "lr": lrs[0],
            "router_lr": lrs[-1],
            "loss": window["loss"] / n,
            "lm_loss": window["lm"] / n,
            "reg": window["reg"] / n,
            "bce": window["bce"] / n,
            "distill": window["distill"] / n,
            "grad_norm": window["grad_norm"] / n,
            "tokens_per_s": tokens / max(elapsed, 1e-9),
        }
        layer = {}
        for t, name in enumerate(STEP_TYPES):
            rate = (gate_sum[t] / rows[t]).tolist() if rows[t] > 0 else [None] * gate_sum.shape[1]
            metrics[f"run_rate/{name}"] = float(gate_sum[t].mean() / rows[t]) if rows[t] > 0 else float("nan")
            metrics[f"prob/{name}"] = float(prob_sum[t].mean() / rows[t]) if rows[t] > 0 else float("nan")
            layer[f"layer_run_rate/{name}"] = [round(x, 4) if x is not None else None for x in rate]
            layer[f"layer_prob/{name}"] = [round(x, 4) for x in (prob_sum[t] / rows[t]).tolist()] if rows[t] > 0 else None
        all_rows = float(rows.sum())
        metrics["run_rate/all"] = float(gate_sum.sum() / gate_sum.shape[1] / all_rows) if all_rows else float("nan")
        metrics.update(layer)
        metrics["elapsed_s"] = round(self.wall_before + time.perf_counter() - self.t_start, 2)
        self._emit(metrics)
        self.history["train"] = {k: v for k, v in metrics.items() if not k.startswith("layer_")}
        return metrics

    def _emit(self, metrics: dict) -> None:
        clean = {k: (_finite_or_none(v) if isinstance(v, float) else v) for k, v in metrics.items()}
        for sink in self.sinks:
            sink.log(clean)

    # -- validate ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, step: int | None = None) -> dict:
        """Teacher-forced LM loss and run rates per step type on the val subset (processes share the batches)."""
        if not self.eval_steps:
            return {}
        acc = self.accelerator
        t0 = time.perf_counter()
        L = self.rm.num_layers
        nll = torch.zeros(2, dtype=torch.float64)
        toks = torch.zeros(2, dtype=torch.float64)
        gate_sum = torch.zeros(2, L, dtype=torch.float64)
        rows = torch.zeros(2, dtype=torch.float64)
        order = sorted(range(len(self.eval_steps)), key=lambda i: len(self.eval_steps[i].input_ids))
        bs = self.cfg.train.batch_size
        batches = [order[i : i + bs] for i in range(0, len(order), bs)]
        # eval() on the loss module, not only on the model: its own `training` flag switches off block dropping,
        # distillation and oracle targets (the model's eval() alone left them on: val then dropped blocks)
        self.step_module.eval()  # dropout off too: validation consumes no random numbers
        try:
            for indices in batches[self.rank :: self.world]:
                batch = self._batch(indices, self.eval_steps)
                row_sum, row_count, prob, gate, _ = self.step_module(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    labels=batch["labels"], decision_mask=batch["decision_mask"],
                )
                tool = batch["is_tool_call"].cpu()
                hard = gate.round().double().cpu()
                for t, sel in enumerate((tool, ~tool)):
                    nll[t] += row_sum.double().cpu()[sel].sum()
                    toks[t] += row_count.double().cpu()[sel].sum()
                    gate_sum[t] += hard[:, sel].sum(dim=1)
                    rows[t] += int(sel.sum())
        finally:
            self.step_module.train()
        nll, toks, gate_sum, rows = (self._sum(x).cpu() for x in (nll, toks, gate_sum, rows))
        metrics = {"step": step if step is not None else self.cfg.train.steps,
                   "val/lm_loss": float(nll.sum() / toks.sum().clamp_min(1))}
        for t, name in enumerate(STEP_TYPES):
            metrics[f"val/lm_loss/{name}"] = float(nll[t] / toks[t]) if toks[t] > 0 else float("nan")
            metrics[f"val/run_rate/{name}"] = float(gate_sum[t].mean() / rows[t]) if rows[t] > 0 else float("nan")
            metrics[f"val/steps/{name}"] = int(rows[t])
        for t, name in enumerate(STEP_TYPES):
            metrics[f"val/layer_run_rate/{name}"] = (
                [round(x, 4) for x in (gate_sum[t] / rows[t]).tolist()] if rows[t] > 0 else None
            )
        metrics["val/seconds"] = round(time.perf_counter() - t0, 2)
        self._emit(metrics)
        self.history["val"] = {k: v for k, v in metrics.items() if "layer_" not in k}
        acc.wait_for_everyone()
        return metrics

    # -- the whole run -----------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        if not hasattr(self, "rm"):
            self.setup()
        last = self.fit()
        val = self.validate(self.cfg.train.steps)
        for sink in self.sinks:
            if hasattr(sink, "close"):
                sink.close()
        wall = self.wall_before + (time.perf_counter() - self._t0)
        adapter_dir = self.output_dir / "adapter"
        summary = {
            "steps": self.cfg.train.steps,
            "processes": self.world,
            "wall_s": round(wall, 2),
            "setup_s": round(self.setup_s, 2),
            "resumed_from": str(self.last_checkpoint) if self.resume and self.start_step else None,
            "final_train": self.history.get("train", {k: v for k, v in last.items() if not k.startswith("layer_")}),
            "final_val": self.history.get("val", {}),
            "oracle_targets": getattr(self, "oracle_record", None),  # drop_*: the measured costs and skip set
            "bridge_explained": getattr(self, "bridge_explained", None),  # skip bridges' closed-form fit, per block
            "config": self.cfg.to_dict(),
        }
        if self.accelerator.is_main_process:
            self.rm.save(adapter_dir, extra={"training": summary})
            write_text_atomic(self.output_dir / "summary.json", json.dumps(summary, indent=2, default=str))
        self.accelerator.wait_for_everyone()
        self._print(f"[fit] done: {self.cfg.train.steps} steps in {wall:.1f} s; adapter {adapter_dir}")
        return TrainResult(
            self.output_dir, adapter_dir, self.cfg.train.steps, {**last, **val}, wall, self.accelerator.is_main_process
        )


def train(cfg: RunConfig, output_dir: str | Path | None = None, *, resume: bool = False, data=None) -> TrainResult:
    """Run setup, fit and a final validate; returns where the adapter went and the last metrics."""
    return Trainer(cfg, output_dir, resume=resume, data=data).run()
