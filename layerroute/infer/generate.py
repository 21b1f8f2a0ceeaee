"""Routed generation with a KV cache: skipped blocks are never called, in prefill or in decode.

One agent step = one call: the prompt is the step's context. At the prefill every routed layer decides its gate
from the hidden states entering it, pooled over the prompt's real tokens (left padding excluded), and the
decision holds for every token the step decodes. Generation itself is transformers' own ``generate()`` with a
`RoutedCache` passed as ``past_key_values`` (a cache whose length is its longest layer's, because under the
``exact`` policy a skipped block writes no K/V).

Batches whose rows decide differently are served in one call: a block that some rows run and others skip runs
on the rows that run it only (``RoutedLayer._forward_rows`` gathers them), so every row gets exactly its own
decisions and a block costs in proportion to the rows that run it. One row's decision is never applied to the
batch.

For inference LoRA is merged into the base weights and the PEFT wrappers are taken out of the forward path
(`inference_weights`), so a routed step costs the plain model's blocks that run plus one router per block at
the prefill; both are restored on exit.

    layerroute generate --model smollm2-135m-instruct --prompt "What is 2+2?" --skip-fraction 0.25

(the command's flags and entry point: `layerroute.cli.generate_cli`)
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..nn.blocks import decoder_layers
from ..nn.kv_cache import RoutedCache
from ..nn.routed import RoutedLayer, gate_records, routing
from ..special_tokens import pad_token_id, stop_token_ids
from .stop import StopRule

DEFAULT = "default"  # eos_token_id sentinel: the one stop rule (layerroute.special_tokens.stop_token_ids)


# -- timing --------------------------------------------------------------------------------------------------
def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for queued device work so `time.perf_counter()` measures it (no-op on CPU)."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device is not None and device.type == "mps":
        torch.mps.synchronize()


class TimingStreamer:
    """A generate() streamer that timestamps each emitted token (after a device sync).

    generate() puts the prompt first, then one [B] tensor per generated step; the tokens are moved to the host by
    generate() itself (``tokens.cpu()``), which is already a sync point, so timing adds no extra stall on GPU."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.times: list[float] = []
        self.cpu_times: list[float] = []  # process CPU time: robust to other processes on a shared CPU
        self.forwards = 0  # decode forwards after the prefill (fewer than tokens under prompt lookup)
        self._seen_prompt = False

    def put(self, value) -> None:
        if not self._seen_prompt:  # the prompt
            self._seen_prompt = True
            return
        synchronize(self.device)
        # one [B] tensor per decode forward; assisted generation (prompt lookup) puts the [1, n] tokens one
        # verification forward accepted, which land together: each gets the same time, the forward counts once
        n = value.shape[-1] if value.dim() > 1 else 1
        now, cpu_now = time.perf_counter(), time.process_time()
        self.times.extend([now] * n)
        self.cpu_times.extend([cpu_now] * n)
        self.forwards += 1

    def end(self) -> None:
        pass


# -- weights and blocks for inference -----------------------------------------------------------------------
def _lora_layers(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    found = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and hasattr(module, "base_layer"):
            parent_name, _, child = name.rpartition(".")
            found.append((model.get_submodule(parent_name) if parent_name else model, child, module))
    return found


@contextmanager
def inference_weights(rm, merge_lora: bool = True):
    """Yield the module to call for inference: LoRA merged into the base weights and the PEFT wrappers taken
    out of the forward path (each LoRA Linear replaced by its own `base_layer`, which now holds W + BA), so the
    routed model runs plain `nn.Linear`s. On exit the wrappers are put back and LoRA is unmerged.

    merge_lora=False yields the PEFT model unchanged (LoRA computed on the side: slower, for comparison)."""
    if getattr(rm, "_inference_weights_active", False):  # re-entrant: already merged and swapped
        yield rm.base_model
        return
    if not merge_lora or not rm.has_lora:
        yield rm.model
        return
    with rm.merged():
        swapped = _lora_layers(rm.model)
        for parent, child, module in swapped:
            setattr(parent, child, module.base_layer)
        rm._inference_weights_active = True
        try:
            yield rm.base_model
        finally:
            rm._inference_weights_active = False
            for parent, child, module in swapped:
                setattr(parent, child, module)


@contextmanager
def plain_blocks(model: nn.Module):
    """Temporarily put the original decoder blocks back in place of the routed layers (the dense baseline:
    the plain transformers forward, no router code at all); the routed layers are restored on exit."""
    layers = decoder_layers(model)
    routed = list(layers)
    for i, layer in enumerate(routed):
        if isinstance(layer, RoutedLayer):
            layers[i] = layer.block
    try:
        yield model
    finally:
        for i, layer in enumerate(routed):
            layers[i] = layer


# -- prompts -------------------------------------------------------------------------------------------------
def pad_left(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (input_ids [B, T], attention_mask [B, T]) with left padding (decoder-only generation)."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("every prompt needs at least one token")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return ids, mask


def as_batch(prompts, tokenizer=None, pad_id: int = 0, attention_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Accepts token id lists, one id list, strings (with a tokenizer), a mapping with input_ids/attention_mask,
    or a padded [B, T] tensor (with `attention_mask`, else all ones). Returns left-padded ids and mask."""
    if isinstance(prompts, dict) or hasattr(prompts, "keys"):
        attention_mask = prompts.get("attention_mask", attention_mask)
        prompts = prompts["input_ids"]
    if isinstance(prompts, torch.Tensor):
        ids = prompts if prompts.dim() == 2 else prompts.unsqueeze(0)
        mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask).to(ids.device)
        if bool((mask[:, -1] == 0).any()):
            raise ValueError("prompts are right-padded; decoder-only generation needs left padding")
        return ids.long(), mask.long()
    if isinstance(prompts, str):
        prompts = [prompts]
    if prompts and isinstance(prompts[0], int):
        prompts = [prompts]
    if prompts and isinstance(prompts[0], str):
        if tokenizer is None:
            raise ValueError("string prompts need a tokenizer")
        prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    return pad_left([list(map(int, p)) for p in prompts], pad_id)


def stop_ids(rm, eos_token_id=DEFAULT) -> list[int] | None:
    """The ids a routed generation stops on: DEFAULT = the one stop rule (the generation config's eos, the
    tokenizer's eos and its end-of-turn tokens: what evaluation and the server stop on); None = never stop before
    max_new_tokens; else the given id(s)."""
    if eos_token_id == DEFAULT:
        return stop_token_ids(rm.tokenizer, rm.base_model.generation_config) or None
    return sorted(_eos_ids(eos_token_id)) or None


def model_pad_id(rm) -> int:
    """The one pad-id rule (layerroute.special_tokens.pad_token_id) for a loaded RoutedModel."""
    return pad_token_id(rm.tokenizer, rm.base_model.generation_config)


def _eos_ids(eos) -> set[int]:
    if eos is None:
        return set()
    if isinstance(eos, int):
        return {eos}
    if isinstance(eos, torch.Tensor):
        return set(eos.flatten().tolist())
    return set(int(e) for e in eos)


# -- generation ----------------------------------------------------------------------------------------------
@dataclass
class GenerationResult:
    """What one routed generation call produced and how long it took."""

    tokens: list[list[int]]  # generated ids per row (prompt excluded; cut after the first stop id, which is kept)
    gates: list[list[bool]]  # per row, per block: True = the block ran for this step
    ttft_s: float  # call start -> first token on the host (prefill, including routers)
    decode_s_per_token: float  # mean time per decode step after the first token (whole batch)
    total_s: float  # call start -> generate() returned
    steps: int  # decode steps taken (tokens per row, before EOS cuts)
    prompt_lengths: list[int] = field(default_factory=list)
    # the same three in process CPU time (CPU only: on GPU they count host time, not device time)
    cpu_ttft_s: float = float("nan")
    cpu_decode_s_per_token: float = float("nan")
    cpu_total_s: float = float("nan")
    forwards: int = 0  # model forwards that produced the tokens (prefill included): < steps under prompt lookup
    finish: list[str] = field(default_factory=list)  # per row: stop | length (`layerroute.infer.stop`)

    @property
    def tokens_per_forward(self) -> float:
        return self.steps / self.forwards if self.forwards else float("nan")

    @property
    def skipped_fraction(self) -> list[float]:
        """Fraction of blocks each row skipped."""
        return [1.0 - sum(g) / len(g) if g else 0.0 for g in self.gates]

    def to_dict(self) -> dict:
        return {**asdict(self), "skipped_fraction": self.skipped_fraction, "tokens_per_forward": self.tokens_per_forward}


def run_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    cache=None,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    eos_token_id=DEFAULT,
    pad_token_id: int = 0,
    logits_processor=None,
    prompt_lookup: int = 0,
    **generate_kwargs,
) -> tuple[torch.Tensor, dict]:
    """model.generate() with timings. Returns (sequences [B, T + steps], timings dict).

    `input_ids` may extend what `cache` already holds (a session): generate() prefills only the uncached tail.
    prompt_lookup: draft up to this many tokens per forward by n-gram lookup in the context (transformers'
    ``prompt_lookup_num_tokens``; batch 1). Every draft is verified by the model, so greedy outputs are its own (up
    to the rounding of a multi-token forward). A routed model must be in `routing(..., drafts=True)`: transformers'
    first forward holds the prompt and the first drafts, and the routers decide from the prompt's positions only.
    logits_processor: one transformers LogitsProcessor or a list of them (e.g. `constrain.GrammarLogitsProcessor`);
    other generate_kwargs (e.g. ``stopping_criteria``) go to generate() unchanged."""
    device = next(model.parameters()).device
    gen_kwargs = dict(
        max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad_token_id, use_cache=True,
        num_beams=1,
    )
    if do_sample:
        gen_kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k if top_k is not None else 0)
    else:  # keep a model's sampling defaults (temperature, top_p in its generation config) out of greedy runs
        gen_kwargs.update(temperature=None, top_p=None, top_k=None)
    if eos_token_id != DEFAULT:
        gen_kwargs["eos_token_id"] = eos_token_id
    if cache is not None:
        gen_kwargs["past_key_values"] = cache
    if logits_processor is not None:
        from transformers import LogitsProcessorList

        procs = logits_processor if isinstance(logits_processor, list | tuple) else [logits_processor]
        gen_kwargs["logits_processor"] = LogitsProcessorList(procs)
    gen_kwargs.update(generate_kwargs)
    if prompt_lookup:
        if input_ids.shape[0] != 1:
            raise ValueError("prompt_lookup drafts for one row at a time (transformers' assisted generation)")
        gen_kwargs["prompt_lookup_num_tokens"] = int(prompt_lookup)
    streamer = TimingStreamer(device)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    out = model.generate(input_ids, attention_mask=attention_mask, streamer=streamer, **gen_kwargs)
    synchronize(device)
    end, cpu_end = time.perf_counter(), time.process_time()
    steps = len(streamer.times)
    # each put after the prompt's is one forward: the prefill's (the first token), then one per decode step or, under
    # prompt lookup, per verification (which puts every token it accepted)
    timings = {"steps": steps, "forwards": streamer.forwards}
    for prefix, marks, t0, t1 in (("", streamer.times, start, end), ("cpu_", streamer.cpu_times, cpu_start, cpu_end)):
        marks = marks or [t1]
        timings[f"{prefix}ttft_s"] = marks[0] - t0
        timings[f"{prefix}decode_s_per_token"] = (marks[-1] - marks[0]) / (steps - 1) if steps > 1 else float("nan")
        timings[f"{prefix}total_s"] = t1 - t0
    return out, timings


def _row_gates(model: nn.Module, batch: int) -> list[list[bool]]:
    records = gate_records(model)
    columns = [r.gate.detach().float().cpu().expand(batch) > 0.5 for r in records]  # L x [B]
    return [[bool(col[row]) for col in columns] for row in range(batch)]


def routed_generate(
    rm,
    prompts,
    *,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    forced=None,
    threshold: float | None = None,
    kv_policy: str = "exact",
    merge_lora: bool = True,
    eos_token_id=DEFAULT,
    attention_mask: torch.Tensor | None = None,
    mode: str = "skip",
    seed: int | None = None,
    prompt_full_depth: bool = False,
    logits_processor=None,
    **generate_kwargs,
) -> GenerationResult:
    """Generate one agent step for each prompt with real block skipping.

    prompts: token id lists (left-padded here), a padded [B, T] tensor (+ `attention_mask`), a tokenizer output,
    or strings (tokenised without special tokens; render chat templates yourself).
    forced: None (the routers decide), 'open', 'closed', a bool pattern [L] or per row [B, L] (True = run).
    kv_policy: 'exact' (skipped blocks write no K/V) or 'kv_preserving' (they write their K/V: a session that
    continues from this cache finds every block complete).
    eos_token_id: DEFAULT = the one stop rule (`stop_ids`: what evaluation and the server stop on); None = never
    stop before `max_new_tokens`.
    mode: 'skip' (real skipping) or 'off' (routers bypassed: every block runs, no router evaluated).
    prompt_full_depth: the prompt's prefill runs every block; the decisions apply to the generated tokens only.
    logits_processor: a transformers LogitsProcessor (or list) applied at every step, e.g. the schema constraint
    of `layerroute.infer.constrain.tool_call_processor` (one grammar per row). Single use: build one per call.
    prompt_lookup=K (batch 1): draft up to K tokens per forward from n-grams of the context, verified by the routed
    model (`run_generate`); the routers still decide from the prompt alone. Not with prompt_full_depth.
    Other generate_kwargs are passed through to transformers' generate() per call.
    Many steps with their own budgets: `layerroute.infer.batched.generate_batched`.
    """
    pad_id = model_pad_id(rm)
    input_ids, mask = as_batch(prompts, rm.tokenizer, pad_id, attention_mask)
    if seed is not None:
        torch.manual_seed(seed)
    eos = stop_ids(rm, eos_token_id)
    batch = input_ids.shape[0]
    with torch.no_grad(), inference_weights(rm, merge_lora) as model:
        device = next(model.parameters()).device
        # the decision reads the prompt's real tokens only: left padding is excluded
        lookup = int(generate_kwargs.get("prompt_lookup") or 0)
        with routing(rm.model, mode, decision_mask=mask.to(device).float(), forced=forced, threshold=threshold,
                     kv_policy=kv_policy, prompt_full_depth=prompt_full_depth, drafts=lookup > 0 and mode == "skip"):
            out, timings = run_generate(
                model, input_ids, mask, cache=RoutedCache(), max_new_tokens=max_new_tokens, do_sample=do_sample,
                temperature=temperature, top_p=top_p, top_k=top_k, eos_token_id=eos, pad_token_id=pad_id,
                logits_processor=logits_processor, **generate_kwargs,
            )
            gates = _row_gates(rm.model, batch) if mode == "skip" else [[True] * rm.num_layers] * batch
    new = out[:, input_ids.shape[1] :].cpu().tolist()
    rule = StopRule(max_new_tokens, stop_ids=frozenset(_eos_ids(eos)))
    tokens = [rule.cut(row) for row in new]
    return GenerationResult(tokens=tokens, gates=gates, prompt_lengths=mask.sum(1).tolist(),
                            finish=[rule.finished(row) for row in tokens], **timings)


# -- CLI: `layerroute generate` ------------------------------------------------------------------------------
def skip_pattern(num_layers: int, fraction: float) -> list[bool]:
    """A forced gate pattern skipping round(fraction * L) blocks, spread evenly over the middle: never the first
    two blocks nor the last (measured as indispensable on SmolLM2 before this repository existed). True = run."""
    from ..errors import ConfigError

    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"skip fraction must be in [0, 1), got {fraction}")
    candidates = list(range(2, num_layers - 1))
    n_skip = round(fraction * num_layers)
    if n_skip > len(candidates):
        raise ConfigError(
            f"cannot skip {n_skip} of {num_layers} blocks while keeping the first two and the last"
        )
    pattern = [True] * num_layers
    if n_skip == 0:
        return pattern
    # evenly spaced picks over the candidates (centred in each of n_skip equal bins)
    for k in range(n_skip):
        pattern[candidates[int((k + 0.5) * len(candidates) / n_skip)]] = False
    return pattern


def load_for_inference(
    model_name: str | None, adapter: str | None, dtype: str = "auto", device: str = "auto", lora: bool = True,
    chat_template: str | None = None,
):
    """A RoutedModel from an adapter directory (with its saved tokenizer and chat template), or a freshly wrapped
    base model (routers at their init, which opens every gate, and a fresh LoRA, whose zero B matrices leave the
    model unchanged; merged for inference it costs nothing, so timings match a trained adapter's).
    `chat_template` is model.chat_template (a base model without a template; an adapter's must match)."""
    from ..adapters import adapter_base_name, build_routed_model, load_adapter
    from ..config import LoraSettings, ModelConfig

    if adapter:
        # the adapter's own base unless --model names another, in the dtype asked for (a bf16 base takes the fp32
        # LoRA and routers as they are: peft keeps LoRA fp32, and merging rounds W + BA to bf16 once)
        cfg = ModelConfig(name=model_name or adapter_base_name(adapter), dtype=dtype, device=device,
                          chat_template=chat_template)
        return load_adapter(adapter, cfg)
    cfg = ModelConfig(name=model_name or "smollm2-135m-instruct", dtype=dtype, device=device,
                      chat_template=chat_template)
    rm = build_routed_model(cfg, lora_cfg=LoraSettings(enabled=lora))
    for p in rm.model.parameters():
        p.requires_grad_(False)
    rm.model.eval()
    return rm


__all__ = [
    "GenerationResult",
    "TimingStreamer",
    "as_batch",
    "inference_weights",
    "load_for_inference",
    "pad_left",
    "plain_blocks",
    "routed_generate",
    "run_generate",
    "skip_pattern",
    "synchronize",
]
