"""Multi-step agent sessions: one growing conversation, one gate decision per step, two cache policies.

A `Session` holds a conversation's tokens. Each step adds the new turn's tokens (a user message or tool result
plus the assistant header), then generates (`generate`) or scores a given reply (`score`, teacher-forced).

- ``exact``: every step re-prefills its whole context with the step's own decisions (fresh cache), so a step
  sees exactly what training sees: the states of every context token computed with this step's gates.
  Costs a full prefill per step.
- ``kv_preserving``: the cache is kept across steps and each step prefills only its new tokens. A block that a
  step skips still writes its K/V (from the residual stream it would have received), so a later step that runs
  it finds a complete cache. The decision pools over the whole conversation from per-block running sums
  (`session_pooling`), which cover every token the cache holds. The approximation: the context's states and
  K/V were computed under the earlier steps' gates, not this step's.

`compare_policies` measures the difference on multi-turn conversations (teacher-forced NLL of each step's
reference reply, greedy agreement, decision agreement) and the time cache reuse saves; `bfcl_multi_turn` renders
BFCL's multi_turn_base conversations with the data module's renderer.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError
from ..nn.kv_cache import RoutedCache
from ..nn.routed import routing
from ..nn.state import KV_POLICIES
from .generate import (
    DEFAULT,
    _eos_ids,
    _row_gates,
    inference_weights,
    model_pad_id,
    run_generate,
    skip_pattern,
    stop_ids,
    synchronize,
)
from .stop import StopRule


@dataclass
class StepResult:
    """One session step: what it produced, which blocks ran, what it processed and how long it took."""

    tokens: list[int]  # generated ids (EOS kept when reached); for `score`, the reference reply
    gates: list[bool]  # per block: True = ran for this step
    prefill_tokens: int  # tokens the step's prefill processed (whole context under exact, new ones under kv)
    total_s: float
    ttft_s: float = float("nan")
    decode_s_per_token: float = float("nan")
    cpu_total_s: float = float("nan")  # process CPU time of the step
    nll_sum: float | None = None  # score(): summed negative log-likelihood of the reply (nats)
    router_logits: list[float] = field(default_factory=list)
    finish: str | None = None  # generate(): stop | length (`layerroute.infer.stop`); None for score()

    @property
    def nll(self) -> float | None:
        return None if self.nll_sum is None else self.nll_sum / max(1, len(self.tokens))


def _truncate_cache(cache: RoutedCache, length: int) -> None:
    """Drop every cached position from `length` on (undo a step)."""
    for layer in cache.layers:
        if layer.get_seq_length() > length:
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]


class Session:
    """One conversation served step by step (batch 1).

    forced / threshold set defaults for every step (a step may override them); policy is 'exact' or
    'kv_preserving'. The routers' running context sums live here between steps, not on the shared model, so
    several sessions can take turns on one model.
    """

    def __init__(self, rm, policy: str = "kv_preserving", *, forced=None, threshold: float | None = None,
                 merge_lora: bool = True):
        if policy not in KV_POLICIES:
            raise ConfigError(f"session policy must be one of {KV_POLICIES}, got {policy!r}")
        self.rm = rm
        self.policy = policy
        self.forced = forced
        self.threshold = threshold
        self.merge_lora = merge_lora
        self.tokens: list[int] = []
        self.cache: RoutedCache | None = RoutedCache() if policy == "kv_preserving" else None
        self._pool: list[tuple] | None = None  # per block (running sum [1, H], count [1, 1]) of context states
        self.steps: list[StepResult] = []

    # -- state ----------------------------------------------------------------------------------------------
    @property
    def cached_tokens(self) -> int:
        return self.cache.get_seq_length() if self.cache is not None else 0

    @property
    def pending(self) -> list[int]:
        """Tokens the next step's prefill will process."""
        return self.tokens[self.cached_tokens :]

    def add(self, tokens) -> Session:
        """Append tokens to the conversation (a new user turn or tool result, ending with the assistant header)."""
        self.tokens.extend(int(t) for t in tokens)
        return self

    def _snapshot(self):
        return self.cached_tokens, copy.copy(self._pool), len(self.tokens)

    def _restore(self, snap) -> None:
        cached, pool, n_tokens = snap
        if self.cache is not None:
            _truncate_cache(self.cache, cached)
        self._pool = pool
        del self.tokens[n_tokens:]

    @contextmanager
    def _step(self, forced, threshold):
        rm = self.rm
        forced = self.forced if forced is None else forced
        threshold = self.threshold if threshold is None else threshold
        with torch.no_grad(), inference_weights(rm, self.merge_lora) as model:
            if self.policy == "exact":
                with routing(rm.model, "skip", forced=forced, threshold=threshold, kv_policy="exact"):
                    yield model
                return
            with routing(rm.model, "skip", forced=forced, threshold=threshold, kv_policy="kv_preserving",
                         session_pooling=True) as state:
                held = None
                try:
                    with state.request_sums(self._pool) as held:  # this session's running sums on the shared layers
                        yield model
                finally:
                    self._pool = held.sums if held is not None else self._pool

    def _gates_and_logits(self):
        from ..nn.routed import gate_records

        gates = _row_gates(self.rm.model, 1)[0]
        logits = [float(r.logit[0]) for r in gate_records(self.rm.model)]
        return gates, logits

    # -- steps ----------------------------------------------------------------------------------------------
    def generate(
        self,
        max_new_tokens: int = 64,
        *,
        forced=None,
        threshold: float | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        eos_token_id=DEFAULT,
        commit: bool = True,
        seed: int | None = None,
    ) -> StepResult:
        """Generate the next assistant turn. commit=False leaves the session as it was (cache and sums too)."""
        if not self.pending:
            raise ConfigError("nothing new to prefill: add() the next turn's tokens before a step")
        if seed is not None:
            torch.manual_seed(seed)
        snap = self._snapshot()
        prefill = len(self.pending) if self.policy == "kv_preserving" else len(self.tokens)
        eos = stop_ids(self.rm, eos_token_id)
        ids = torch.tensor([self.tokens], dtype=torch.long)
        with self._step(forced, threshold) as model:
            cache = self.cache if self.policy == "kv_preserving" else RoutedCache()
            out, t = run_generate(
                model, ids, torch.ones_like(ids), cache=cache, max_new_tokens=max_new_tokens, do_sample=do_sample,
                temperature=temperature, top_p=top_p, eos_token_id=eos, pad_token_id=model_pad_id(self.rm),
            )
            gates, logits = self._gates_and_logits()
        rule = StopRule(max_new_tokens, stop_ids=frozenset(_eos_ids(eos)))
        new = rule.cut(out[0, ids.shape[1] :].tolist())
        result = StepResult(tokens=new, gates=gates, prefill_tokens=prefill, router_logits=logits,
                            finish=rule.finished(new), **t_fields(t))
        if commit:
            self.tokens.extend(new)
            self.steps.append(result)
        else:
            self._restore(snap)
        return result

    def score(self, target, *, forced=None, threshold: float | None = None, commit: bool = True) -> StepResult:
        """Teacher-forced step: the summed NLL of `target` as the next assistant turn, decisions from the context
        only (prefill the pending context, decide, then run the target tokens with the same decisions).
        commit=True appends the target to the conversation (the session continues from the reference)."""
        target = [int(t) for t in target]
        if not self.pending or not target:
            raise ConfigError("score() needs pending context tokens and a non-empty target")
        snap = self._snapshot()
        context = self.pending if self.policy == "kv_preserving" else list(self.tokens)
        device = self.rm.device
        with self._step(forced, threshold) as model:
            cache = self.cache if self.policy == "kv_preserving" else RoutedCache()
            synchronize(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            first = model(input_ids=torch.tensor([context], device=device), past_key_values=cache, use_cache=True,
                          logits_to_keep=1)
            rest = model(input_ids=torch.tensor([target], device=device), past_key_values=cache, use_cache=True)
            logits = torch.cat([first.logits[:, -1:], rest.logits[:, :-1]], dim=1)[0].float()  # [T, V]
            nll = F.cross_entropy(logits, torch.tensor(target, device=device), reduction="sum").item()
            synchronize(device)
            elapsed, cpu_elapsed = time.perf_counter() - start, time.process_time() - cpu_start
            gates, router_logits = self._gates_and_logits()
        result = StepResult(tokens=target, gates=gates, prefill_tokens=len(context), total_s=elapsed,
                            cpu_total_s=cpu_elapsed, nll_sum=nll, router_logits=router_logits)
        if commit:
            self.tokens.extend(target)
            self.steps.append(result)
        else:
            self._restore(snap)
        return result


def t_fields(t: dict) -> dict:
    return {"ttft_s": t["ttft_s"], "decode_s_per_token": t["decode_s_per_token"], "total_s": t["total_s"],
            "cpu_total_s": t["cpu_total_s"]}


# -- multi-turn data -----------------------------------------------------------------------------------------
@dataclass
class SessionTurn:
    """One step of a multi-turn conversation: the tokens that precede it since the last step, and the reply."""

    new_tokens: list[int]  # what the conversation adds before this step (ends with the assistant header)
    target: list[int]  # the reference assistant turn (end-of-turn token included)
    step_type: str = "tool_call"


def turns_from_steps(steps) -> list[SessionTurn]:
    """Rendered steps of one conversation (layerroute.data Step objects, in order) -> incremental turns.

    Checks that each step's context extends the previous step's context + target token for token."""
    turns, seen = [], []
    for step in steps:
        ctx = list(step.context_ids)
        if ctx[: len(seen)] != seen:
            raise DataError(f"{step.id}: context does not extend the previous step (template not prefix-stable)")
        turns.append(SessionTurn(ctx[len(seen) :], list(step.target_ids), step.step_type))
        seen = ctx + list(step.target_ids)
    return turns


def bfcl_multi_turn(tokenizer, limit: int = 8, *, max_length: int = 4096, used_tools_only: bool = True,
                    category: str = "multi_turn_base") -> list[list[SessionTurn]]:
    """BFCL multi-turn conversations as session turns, rendered with the data module's renderer.

    Each user turn is followed by one assistant turn holding that turn's ground-truth calls (BFCL executes
    them and feeds results back; without the executor the results are omitted, so the next user turn follows
    directly). used_tools_only keeps only the functions the ground truth calls (the full class docs make a
    3-4k-token system turn, too slow to re-prefill per step on CPU).
    """
    import glob
    import os

    from ..data.records import Conversation
    from ..data.render import render_steps
    from ..data.toolcalls import to_openai_tool_calls
    from ..tasks.bfcl import bfcl_data_dir, bfcl_tool
    from ..tasks.bfcl_multi_turn import bfcl_calls

    folder = bfcl_data_dir()
    docs = {}
    for path in glob.glob(os.path.join(folder, "multi_turn_func_doc", "*.json")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    fn = json.loads(line)
                    docs.setdefault(fn["name"], fn)
    answers = {}
    with open(os.path.join(folder, "possible_answer", f"BFCL_v4_{category}.json"), encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                answers[row["id"]] = row["ground_truth"]
    conversations = []
    with open(os.path.join(folder, f"BFCL_v4_{category}.json"), encoding="utf-8") as f:
        for line in f:
            if len(conversations) >= limit:
                break
            row = json.loads(line)
            truth = answers.get(row["id"])
            if truth is None or len(truth) != len(row["question"]):
                continue
            try:
                per_turn = [bfcl_calls(calls, docs) for calls in truth]
            except (DataError, ValueError, SyntaxError):
                continue
            if any(not calls for calls in per_turn):
                continue  # a turn without calls (BFCL expects a refusal/clarification): not a tool-call step
            names = sorted({c["name"] for calls in per_turn for c in calls}) if used_tools_only else sorted(
                n for n in docs if any(n == p.split(".")[-1] for p in row.get("path", []))
            )
            tools = [bfcl_tool(docs[n]) for n in names if n in docs]
            messages = []
            for question, calls in zip(row["question"], per_turn, strict=True):
                messages.extend({"role": m["role"], "content": m["content"]} for m in question)
                messages.append({"role": "assistant", "content": "", "tool_calls": to_openai_tool_calls(calls)})
            conv = Conversation(f"bfcl:{row['id']}", "bfcl_multi_turn", messages, tools, category=category)
            steps = render_steps(conv, tokenizer, max_length)
            if len(steps) == len(per_turn):
                conversations.append(turns_from_steps(steps))
    return conversations


# -- the comparison ------------------------------------------------------------------------------------------
def rotating_patterns(num_layers: int, fraction: float) -> list[list[bool]]:
    """Per-step forced patterns that change from step to step (the case where the policies can differ): the
    evenly spread pattern, all open, and the same pattern shifted by one block (kept off blocks 0, 1 and L-1)."""
    base = skip_pattern(num_layers, fraction)
    shifted = [True] * num_layers
    for i, run in enumerate(base):
        if not run:
            j = i + 1 if i + 1 < num_layers - 1 else i - 1
            shifted[j] = False
    return [base, [True] * num_layers, shifted]


def compare_policies(
    rm,
    conversations: list[list[SessionTurn]],
    *,
    schedule: list[list[bool]] | None = None,
    max_new_tokens: int = 48,
    generate: bool = True,
    log=None,
) -> dict:
    """Run every conversation under both policies, step by step on the reference replies.

    At each step: both policies generate greedily from the same context (kv_preserving: from its cache, prefilling
    only the new tokens; exact: re-prefilling the whole context), then score the reference reply teacher-forced
    and continue from it, so both sessions always hold the same conversation. schedule: forced gate pattern per
    step (cycled), or None for the routers' own decisions.

    Returns per-step records and a summary: mean NLL per reference token under each policy and their difference,
    greedy exact-match and token agreement, decision agreement, and time (generation steps summed) per policy.
    """
    records = []
    for c, turns in enumerate(conversations):
        sessions = {p: Session(rm, p) for p in ("exact", "kv_preserving")}
        for k, turn in enumerate(turns):
            forced = schedule[k % len(schedule)] if schedule else None
            rec = {"conversation": c, "step": k, "step_type": turn.step_type, "target_tokens": len(turn.target)}
            for p, s in sessions.items():
                s.add(turn.new_tokens)
                rec["context_tokens"] = len(s.tokens)
                if generate:
                    g = s.generate(max_new_tokens, forced=forced, commit=False)
                    rec[f"{p}_generated"] = g.tokens
                    rec[f"{p}_gen_s"] = g.total_s
                    rec[f"{p}_gen_cpu_s"] = g.cpu_total_s
                    rec[f"{p}_ttft_s"] = g.ttft_s
                    rec[f"{p}_prefill_tokens"] = g.prefill_tokens
                    rec[f"{p}_gen_gates"] = g.gates
                sc = s.score(turn.target, forced=forced)
                rec[f"{p}_nll_sum"] = sc.nll_sum
                rec[f"{p}_score_s"] = sc.total_s
                rec[f"{p}_score_cpu_s"] = sc.cpu_total_s
                rec[f"{p}_gates"] = sc.gates
                rec[f"{p}_router_logits"] = sc.router_logits
            records.append(rec)
            if log:
                log(f"conv {c} step {k}: ctx {rec['context_tokens']} nll exact "
                    f"{rec['exact_nll_sum'] / len(turn.target):.3f} kv {rec['kv_preserving_nll_sum'] / len(turn.target):.3f}"
                    + (f" gen {rec['exact_gen_s']:.2f}s vs {rec['kv_preserving_gen_s']:.2f}s" if generate else ""))
    return {"steps": records, "summary": summarise_comparison(records, generate)}


def _agreement(a: list[int], b: list[int]) -> float:
    """Fraction of positions (over the longer sequence) where the two sequences agree, up to the first divergence."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n / max(len(a), len(b), 1)


def summarise_comparison(records: list[dict], generate: bool = True) -> dict:
    n_tok = sum(r["target_tokens"] for r in records)
    out = {"steps": len(records), "conversations": len({r["conversation"] for r in records})}
    for p in ("exact", "kv_preserving"):
        out[f"{p}_nll_per_token"] = sum(r[f"{p}_nll_sum"] for r in records) / n_tok
        out[f"{p}_score_s"] = sum(r[f"{p}_score_s"] for r in records)
        out[f"{p}_score_cpu_s"] = sum(r[f"{p}_score_cpu_s"] for r in records)
    out["nll_diff_kv_minus_exact"] = out["kv_preserving_nll_per_token"] - out["exact_nll_per_token"]
    diffs = [(r["kv_preserving_nll_sum"] - r["exact_nll_sum"]) / r["target_tokens"] for r in records]
    out["nll_diff_per_step_max_abs"] = max(abs(d) for d in diffs) if diffs else 0.0
    gate_pairs = [(a, b) for r in records for a, b in zip(r["exact_gates"], r["kv_preserving_gates"], strict=True)]
    out["decision_agreement"] = sum(a == b for a, b in gate_pairs) / max(1, len(gate_pairs))
    later = [r for r in records if r["step"] > 0]
    if later:
        n_later = sum(r["target_tokens"] for r in later)
        out["later_steps_nll_diff"] = (
            sum(r["kv_preserving_nll_sum"] - r["exact_nll_sum"] for r in later) / n_later
        )
    if generate:
        out["greedy_exact_match"] = statistics.mean(
            r["exact_generated"] == r["kv_preserving_generated"] for r in records
        )
        out["greedy_token_agreement"] = statistics.mean(
            _agreement(r["exact_generated"], r["kv_preserving_generated"]) for r in records
        )
        for p in ("exact", "kv_preserving"):
            out[f"{p}_gen_s"] = sum(r[f"{p}_gen_s"] for r in records)
            out[f"{p}_gen_cpu_s"] = sum(r[f"{p}_gen_cpu_s"] for r in records)
            out[f"{p}_ttft_s"] = sum(r[f"{p}_ttft_s"] for r in records)
            out[f"{p}_prefill_tokens"] = sum(r[f"{p}_prefill_tokens"] for r in records)
        out["cache_reuse_speedup_gen"] = out["exact_gen_s"] / out["kv_preserving_gen_s"]
        out["cache_reuse_speedup_gen_cpu"] = out["exact_gen_cpu_s"] / out["kv_preserving_gen_cpu_s"]
        out["cache_reuse_speedup_ttft"] = out["exact_ttft_s"] / out["kv_preserving_ttft_s"]
        out["time_saved_fraction_gen"] = 1.0 - out["kv_preserving_gen_s"] / out["exact_gen_s"]
    return out


__all__ = [
    "Session",
    "SessionTurn",
    "StepResult",
    "bfcl_multi_turn",
    "compare_policies",
    "rotating_patterns",
    "summarise_comparison",
    "turns_from_steps",
]
