"""One routed model behind a server: chat rendering, per-conversation KV-cache sessions, generation with
streaming, and per-request routing / FLOP accounting.

The HTTP layer (`layerroute.serve`) is a thin shell around `Engine.generate`, which is *not* thread-safe:
the server calls it from one worker thread (requests queue in front of it).

Prompts
-------
`data.render.render_prompt` renders OpenAI messages + tools with the data pipeline's own renderer
(`layerroute.data.render.StepRenderer`), so a request's prompt is token for token the context a training step
had (tokenizer chat template; Hermes/Qwen2.5 text convention for templates without tools).

Sessions (the ``kv_preserving`` policy)
---------------------------------------
Each finished request leaves a `CachedSession` in the engine's `SessionStore` (`layerroute.serve.session_store`,
which says when a later request may reuse one); `Engine.take_session` takes the best for a prompt,
`Engine.keep_session` stores a finished one.

A `CachedSession` is one finished request's cache, not a conversation (that is `layerroute.infer.session.Session`);
this module is the minimum a server needs (single-row sessions), not a general batched session API.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from ..data.render import PromptRenderer
from ..flops import step_flops
from ..infer.generate import inference_weights, plain_blocks, synchronize
from ..infer.stop import StopRule
from ..nn.kv_cache import RoutedCache
from ..nn.routed import find_routed_layers, gate_records, routing
from ..special_tokens import pad_token_id, stop_token_ids
from .session_store import CachedSession, Pools, SessionStore

log = logging.getLogger(__name__)

GREEDY_BELOW = 1e-5  # temperature at or below this decodes greedily (OpenAI accepts 0)


# -- generation hooks ----------------------------------------------------------------------------------------
class _Streamer:
    """generate() streamer: timestamps each generated token (after a device sync) and forwards it."""

    def __init__(self, device, on_token: Callable[[int], None] | None):
        self.device, self.on_token = device, on_token
        self.times: list[float] = []
        self.forwards = 0
        self._seen_prompt = False

    def put(self, value) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        synchronize(self.device)
        # one token per decode forward; a prompt-lookup verification puts every token it accepted ([1, n])
        tokens = value.reshape(-1).tolist() if value.dim() > 1 else [int(value.reshape(-1)[0])]
        now = time.perf_counter()
        self.times.extend([now] * len(tokens))
        self.forwards += 1
        if self.on_token is not None:
            for t in tokens:
                self.on_token(int(t))

    def end(self) -> None:
        pass


class _Cancel(StoppingCriteria):
    """Stops generation when the client went away."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _Scripted(LogitsProcessor):
    """Forces the generated tokens to a given sequence, then an end-of-turn token (tests and demos only: the
    whole real path runs, routing and cache included; only the token choice is imposed)."""

    def __init__(self, tokens: list[int], prompt_len: int, eos: int):
        self.tokens, self.prompt_len, self.eos = tokens, prompt_len, eos

    def __call__(self, input_ids, scores):
        i = input_ids.shape[1] - self.prompt_len
        target = self.tokens[i] if i < len(self.tokens) else self.eos
        forced = torch.full_like(scores, float("-inf"))
        forced[:, target] = 0.0
        return forced


# -- the engine ----------------------------------------------------------------------------------------------
@dataclass
class SamplingParams:
    max_new_tokens: int
    temperature: float | None = None  # None or ~0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # benchmarks: always generate max_new_tokens
    grammar: object | None = None  # a compiled xgrammar grammar the turn must follow (`Engine.grammars`)


@dataclass
class Completion:
    """What one request produced, and how the model got there."""

    tokens: list[int]  # generated ids, the end-of-turn token that ended them kept (`layerroute.infer.stop`)
    text: str
    finish_reason: str  # stop | length | cancelled (`layerroute.infer.stop.FINISH_REASONS`)
    prompt_tokens: int
    cached_tokens: int  # prompt tokens served from a session
    gates: list[bool]  # per block: True = ran
    router_probs: list[float]  # per block sigmoid(logit) (empty for the dense model)
    router_logits: list[float]
    timings: dict
    flops: dict
    cache: dict
    token_times: list[float] = field(default_factory=list)  # perf_counter when each token came (inter-token latency)
    content_tokens: list[int] = field(default_factory=list)  # `tokens` without the end-of-turn token (usage counts)
    drafts: dict = field(default_factory=dict)  # per drafter: tokens drafted, accepted (empty: no drafts)


class Engine:
    """A routed model ready to serve: LoRA merged once, routers in skip mode, sessions per conversation.

    kv_policy: 'kv_preserving' (sessions reusable) or 'exact' (every request re-prefills; no sessions).
    dense: serve the plain model (the original blocks put back, no routers): the baseline.
    forced: a gate pattern [L] applied instead of the routers' decisions (e.g. to measure real skipping without
    a trained adapter).
    prompt_lookup: draft up to this many tokens per forward from n-grams of the prompt (transformers' prompt lookup;
    every draft is verified, so outputs are the model's own). Off for a request with a grammar (the constraint's
    matcher advances token by token and cannot take back rejected drafts) and for one that continues a session
    (transformers' assisted generation re-feeds the whole input at its first forward, cache or not). A routed
    session left by a drafted request keeps only its prompt checkpoint: the later running sums count rejected
    drafts too.
    drafts: lossless drafters for greedy requests (`layerroute.infer.drafts`, e.g. ['grammar', 'lookup', 'suffix']):
    verified in one forward under the request's grammar and its budget rule (the same tokens as without drafts),
    sessions continued; the suffix drafter reads earlier requests with the same grammar (tool set and choice).
    Replaces prompt_lookup where both are set; not for a request with stop strings (decoded as before)."""

    def __init__(self, rm, *, kv_policy: str = "kv_preserving", cache_sessions: int = 16, dense: bool = False,
                 forced=None, threshold: float | None = None, scripted: Callable | None = None,
                 prompt_lookup: int = 0, drafts=None):
        if drafts:
            from ..infer.drafts import SuffixStores, make_drafters

            make_drafters(drafts, rm.tokenizer)  # the names are checked here, not at the first request
            self._suffix = SuffixStores()
        self.drafts = ([d.strip() for d in drafts.split(",") if d.strip()] if isinstance(drafts, str)
                       else list(drafts or []))
        if prompt_lookup < 0:
            raise ValueError(f"prompt_lookup must be >= 0 (0 = off), not {prompt_lookup}")
        self.prompt_lookup = int(prompt_lookup)
        if rm.tokenizer is None:
            raise ValueError("serving needs a tokenizer on the routed model (rm.tokenizer)")
        if kv_policy not in ("exact", "kv_preserving"):
            raise ValueError(f"kv_policy must be 'exact' or 'kv_preserving', not {kv_policy!r}")
        self.rm, self.kv_policy, self.dense, self.forced, self.threshold = rm, kv_policy, dense, forced, threshold
        self.scripted = scripted
        self.tokenizer = rm.tokenizer
        self.prompts = PromptRenderer(rm.tokenizer)
        self.lock = threading.Lock()  # one generation at a time (the server's worker holds it)
        self._stack = ExitStack()
        # LoRA merged into the weights once for the server's lifetime (not per request)
        self.model = self._stack.enter_context(inference_weights(rm))
        if dense:
            self._stack.enter_context(plain_blocks(self.model))
        self.routed_layers = [] if dense else find_routed_layers(rm.model)
        reusable = dense or kv_policy == "kv_preserving"
        self.sessions = SessionStore(cache_sessions if reusable else 0, any_prefix=dense)
        # running context sums per block only when a session may continue (they cost a small op per block per
        # token); without them the decision pools over the prompt at once (same mean)
        self._pooling = not dense and self.sessions.capacity > 0
        self.device = next(self.model.parameters()).device
        # the one stop and pad rules (layerroute.special_tokens): evaluation scores the steps the server would end
        self.eos_ids = stop_token_ids(self.tokenizer, rm.base_model.generation_config)
        self.pad_id = pad_token_id(self.tokenizer, rm.base_model.generation_config)
        self.context_length = int(getattr(rm.config, "max_position_embeddings", 0) or 0) or None
        self._grammars = None
        self._router_hidden = rm.router_spec.flop_width

    @property
    def grammars(self):
        """The compiler and cache of constrained-decoding grammars for this model (built at first use: the
        tokenizer's vocabulary is read once, ~0.1 s for SmolLM2's 49k tokens)."""
        if self._grammars is None:
            from ..infer.constrain import grammars_for

            self._grammars = grammars_for(self.tokenizer, int(self.rm.config.vocab_size), self.eos_ids)
        return self._grammars

    def grammar_processor(self, params: SamplingParams):
        """The `GrammarLogitsProcessor` of a request with a grammar, under the budget rule (its max_new_tokens):
        a constrained call or JSON answer ends complete whenever the budget holds the shortest one."""
        from ..infer.constrain import GrammarLogitsProcessor

        sampled = params.temperature is not None and params.temperature > GREEDY_BELOW
        return GrammarLogitsProcessor([params.grammar], self.eos_ids, budgets=params.max_new_tokens,
                                      closer=self.grammars.closer, sampled=sampled)

    def close(self) -> None:
        self.sessions.clear()
        self._stack.close()

    def take_session(self, prompt: list[int], reuse: bool = True):
        """(session or None, cached tokens, its cache cropped to them or a fresh RoutedCache, the running sums at
        that checkpoint or None): the best stored session for `prompt`, taken out of the store."""
        session, cached = self.sessions.take(prompt) if reuse and self.sessions.capacity else (None, 0)
        if session is None:
            return None, 0, RoutedCache(), None
        cache = session.cache
        if cache.get_seq_length() > cached:
            cache.crop(cached - cache.get_seq_length())
        return session, cached, cache, session.checkpoints.get(cached)

    # -- one request --------------------------------------------------------------------------------------
    def generate(self, prompt: list[int], params: SamplingParams, *, on_token: Callable[[int], None] | None = None,
                 cancel: threading.Event | None = None, reuse: bool = True, scripted_text: str | None = None
                 ) -> Completion:
        """Generate one assistant turn for `prompt` (token ids). Not thread-safe: hold `self.lock`."""
        t0 = time.perf_counter()
        session, cached, cache, pools = self.take_session(prompt, reuse)
        n_prompt, n_new = len(prompt), len(prompt) - cached
        ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
        mask = torch.ones_like(ids)

        gen_kwargs = dict(max_new_tokens=params.max_new_tokens, pad_token_id=self.pad_id, use_cache=True,
                          num_beams=1, past_key_values=cache)
        greedy = params.temperature is None or params.temperature <= GREEDY_BELOW
        if greedy:
            gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            gen_kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
        gen_kwargs["eos_token_id"] = None if params.ignore_eos else self.eos_ids
        if params.stop:
            gen_kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        if cancel is not None:
            gen_kwargs["stopping_criteria"] = StoppingCriteriaList([_Cancel(cancel)])
        if scripted_text is not None:  # imposes the tokens: a grammar is not applied on top
            script = self.tokenizer(scripted_text, add_special_tokens=False)["input_ids"]
            gen_kwargs["logits_processor"] = LogitsProcessorList([_Scripted(script, n_prompt, self.eos_ids[0])])
        elif params.grammar is not None:
            gen_kwargs["logits_processor"] = LogitsProcessorList([self.grammar_processor(params)])
        # transformers' assisted generation (5.23) feeds the whole input to its first forward whatever the cache
        # holds, so a request that continues a session decodes without drafts (the prefix cache saves more there)
        drafting = bool(self.drafts) and greedy and scripted_text is None and not params.stop
        lookup = (self.prompt_lookup if scripted_text is None and params.grammar is None and not cached
                  and not drafting else 0)
        if lookup:
            gen_kwargs["prompt_lookup_num_tokens"] = lookup
        streamer = _Streamer(self.device, on_token)
        if params.seed is not None:
            torch.manual_seed(params.seed)

        snapshots: dict[int, tuple] = {}
        hooks = []
        with ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            if not self.dense:
                state = stack.enter_context(routing(
                    self.rm.model, "skip", decision_mask=torch.ones(1, n_new, device=self.device),
                    forced=self.forced, threshold=self.threshold, kv_policy=self.kv_policy,
                    session_pooling=self._pooling, drafts=lookup > 0,
                ))
                # this request's running sums on the layers; the next request brings its own
                stack.enter_context(state.request_sums(pools if self._pooling else None))
                for i, layer in enumerate(self.routed_layers if self._pooling else []):

                    def snap(module, args, output, i=i):  # after the prefill: the running sums at the prompt's end
                        if i not in snapshots:
                            snapshots[i] = module.sums

                    hooks.append(layer.register_forward_hook(snap))
            try:
                synchronize(self.device)
                start = time.perf_counter()
                if drafting:
                    drafted = self._drafted(prompt, params, cache, streamer, cancel)
                    out = torch.tensor([prompt + drafted.tokens])
                else:
                    out = self.model.generate(ids, attention_mask=mask, streamer=streamer, **gen_kwargs)
                synchronize(self.device)
                end = time.perf_counter()
                if self.dense:
                    gates, probs, logits = [True] * self.rm.num_layers, [], []
                else:
                    recs = gate_records(self.rm.model)
                    gates = [bool(r.gate.reshape(-1)[0] > 0.5) for r in recs]
                    probs = [float(r.prob.reshape(-1)[0]) for r in recs]
                    logits = [float(r.logit.reshape(-1)[0]) for r in recs]
                    final_pools = state.sums()
            finally:
                for h in hooks:
                    h.remove()

        new = out[0, n_prompt:].tolist()
        if self.sessions.capacity:  # under drafts the final running sums also hold rejected drafts' states
            at_prompt = None if self.dense else [snapshots[i] for i in range(len(self.routed_layers))]
            final = None if self.dense else final_pools
            self.keep_session(prompt, new, cache, at_prompt, final,
                              final_checkpoint=self.dense or not (lookup or drafting))
        times = streamer.times or [end]
        timings = {
            "ttft_s": times[0] - start,
            "decode_s_per_token": (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None,
            "generate_s": end - start,
            "engine_s": time.perf_counter() - t0,
            "forwards": streamer.forwards,  # < generated tokens when prompt-lookup drafts were accepted
            "drafting": drafting,  # decoded with lossless drafts (layerroute.infer.drafts)
        }
        c = self.completion(prompt, new, params, cancelled=cancel is not None and cancel.is_set(), cached=cached,
                            reused=session is not None, gates=gates, probs=probs, logits=logits, timings=timings,
                            token_times=streamer.times)
        if drafting:
            c.drafts = drafted.by_source()
        return c

    def _drafted(self, prompt: list[int], params: SamplingParams, cache: RoutedCache, streamer: _Streamer,
                 cancel: threading.Event | None):
        """One greedy request through the lossless drafts (`layerroute.infer.verify.draft_generate`), under its
        grammar's budget rule as `grammar_processor` decodes it."""
        from ..infer.drafts import make_drafters
        from ..infer.verify import draft_generate

        # earlier requests under the same compiled grammar (tool set and choice; the grammar cache hands out one object)
        store = self._suffix.get(id(params.grammar), owner=params.grammar)
        drafters = make_drafters(self.drafts, self.tokenizer, suffix_store=store)

        def on_token(tok: int) -> None:  # the streamer's per-token bookkeeping (forwards are counted apart)
            synchronize(self.device)
            streamer.times.append(time.perf_counter())
            if streamer.on_token is not None:
                streamer.on_token(tok)

        res = draft_generate(self.model, prompt, max_new_tokens=params.max_new_tokens,
                             stop_ids=None if params.ignore_eos else self.eos_ids, grammar=params.grammar,
                             closer=None if params.grammar is None else self.grammars.closer, drafters=drafters,
                             cache=cache, on_token=on_token,
                             cancel=cancel.is_set if cancel is not None else None)
        streamer.forwards = res.forwards
        return res

    # -- shared by the lone path above and the batch scheduler (`layerroute.serve.scheduler`) ---------------------
    def keep_session(self, prompt: list[int], new: list[int], cache: RoutedCache, at_prompt: Pools | None,
                     final: Pools | None, final_checkpoint: bool = True) -> None:
        """Store a finished request's cache (prompt + generated tokens but the last, never fed back) as a session,
        with its routing running sums at the prompt's end and (final_checkpoint) at the cache's end."""
        cached_ids = prompt + new[:-1] if new else list(prompt)
        if cache.get_seq_length() != len(cached_ids):
            log.warning("cache length %d != %d tokens seen; session dropped", cache.get_seq_length(), len(cached_ids))
            return
        cache.compact()  # no spare decode columns in the store (layerroute.nn.kv_cache)
        checkpoints = {len(prompt): at_prompt}
        if final_checkpoint:
            checkpoints[len(cached_ids)] = final
        self.sessions.put(CachedSession(cached_ids, cache, checkpoints))

    def completion(self, prompt: list[int], new: list[int], params: SamplingParams, *, cancelled: bool, cached: int,
                   reused: bool, gates: list[bool] | None, probs: list[float], logits: list[float], timings: dict,
                   token_times: list[float]) -> Completion:
        """The `Completion` of a request that generated `new` (raw ids, end-of-turn token included)."""
        gates = [True] * self.rm.num_layers if gates is None else gates
        n_prompt, n_new = len(prompt), len(prompt) - cached
        rule = self.stop_rule(params)
        tokens = rule.cut(new)  # the end-of-turn token kept, as every result type keeps it
        finish = rule.finished(tokens, cancelled=cancelled)  # the one stop rule, as the scheduler's per token
        content = rule.content(tokens)
        text = self.tokenizer.decode(content, skip_special_tokens=True)
        stopped_on = rule.stopped_on(tokens)
        if stopped_on is not None:
            text = text[: text.index(stopped_on)]
        n_gen = len(new)
        processed = n_new + max(n_gen - 1, 0)  # tokens that went through the blocks in this request
        fl = step_flops(
            self.rm.config, cached, processed, gates, kv_preserving=self.kv_policy == "kv_preserving",
            lm_head_positions=max(n_gen, 1), router_hidden=self._router_hidden, count_routers=not self.dense,
            bridge_rank=0 if self.dense else self.rm.router_cfg.bridge_rank,
        )
        flops = {
            "block_flops_skipped": fl["block_skipped_fraction"],
            "total_flops_skipped": fl["total_skipped_fraction"],
            "total_dense": fl["total_dense"],
            "total_routed": fl["total_routed"],
            "policy": fl["policy"],
        }
        cache_info = {
            "reused": reused, "cached_tokens": cached, "prefilled_tokens": n_new, "sessions": len(self.sessions),
        }
        return Completion(
            tokens=tokens, text=text, finish_reason=finish, prompt_tokens=n_prompt, cached_tokens=cached,
            gates=gates, router_probs=probs, router_logits=logits, timings=timings, flops=flops, cache=cache_info,
            token_times=list(token_times), content_tokens=content,
        )

    def stop_rule(self, params: SamplingParams) -> StopRule:
        """When a request's row ends (`layerroute.infer.stop`): the end-of-turn ids unless ignore_eos, its budget,
        its stop strings in the decoded text."""
        return StopRule(params.max_new_tokens, stop_ids=frozenset(() if params.ignore_eos else self.eos_ids),
                        stop_strings=tuple(params.stop), decode=self._decode_text if params.stop else None)

    def _decode_text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

__all__ = ["Completion", "Engine", "SamplingParams"]
