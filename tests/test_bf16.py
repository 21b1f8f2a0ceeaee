"""bf16 backbones: frozen weights bf16, everything that trains (LoRA, routers, skip bridges) and its optimizer state
fp32; open gates reproduce the plain bf16 model bit for bit; LoRA merges into bf16 weights for inference and the
frozen weights come back bit for bit; a saved adapter loads onto a bf16 base and generates with real skipping."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora import LoraLayer

from layerroute.adapters import build_routed_model, save_adapter
from layerroute.config import LoraSettings, ModelConfig, RouterConfig
from layerroute.infer.generate import (
    inference_weights,
    load_for_inference,
    pad_left,
    plain_blocks,
    routed_generate,
    run_generate,
)
from layerroute.model import load_base
from layerroute.nn.routed import find_routed_layers, routing
from tests.helpers import TINY_SHAPES, delete_blocks, lively, random_batch, tiny_routed

TRAINABLE = (".router.", ".bridge.", "lora_")
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [100, 200, 300]]


def _trains(name: str) -> bool:
    return any(key in name for key in TRAINABLE)


def bf16_routed(shape: str, *, bridge_rank: int = 0, seed: int = 0):
    """A tiny routed model on a bf16 backbone with random LoRA B (peft starts it at zero) and random skip bridges."""
    cfg = ModelConfig(name=shape, seed=seed, dtype="bfloat16")
    rm = build_routed_model(cfg, RouterConfig(bridge_rank=bridge_rank), LoraSettings(),
                            loaded=load_base(cfg, tokenizer=False))
    lively(rm)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in rm.model.named_parameters():
            if "lora_B" in name or ".bridge.up" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    rm.model.eval()
    return rm


@pytest.fixture(scope="module", params=[(shape, 4) for shape in TINY_SHAPES] + [("shape:tiny-llama", 0)],
                ids=lambda p: f"{p[0].split(':')[1]}-bridge{p[1]}")
def rm(request):
    shape, bridge_rank = request.param
    return bf16_routed(shape, bridge_rank=bridge_rank)


def test_frozen_weights_are_bf16_and_everything_that_trains_is_fp32(rm):
    kinds = set()
    for name, p in rm.model.named_parameters():
        if _trains(name):
            kinds.add(next(k for k in TRAINABLE if k in name))
            assert p.dtype == torch.float32 and p.requires_grad, name
        else:
            assert p.dtype == torch.bfloat16 and not p.requires_grad, name
    assert kinds == set(TRAINABLE) - ({".bridge."} if rm.router_cfg.bridge_rank == 0 else set())


def _logits(model, ids):
    return model(input_ids=ids).logits


@pytest.mark.parametrize("lora", [True, False])
def test_open_gates_equal_the_plain_bf16_model_bit_for_bit(rm, lora):
    """Every path with every gate open returns the plain model's logits exactly: mix (forced and router-decided,
    with the straight-through gradient on), skip, off. The mix h + g * (block(h) - h) would round twice per block."""
    ids, mask = random_batch(vocab=rm.config.vocab_size)
    ctx = rm.lora_disabled() if not lora else torch.enable_grad()
    with ctx:
        with torch.no_grad(), plain_blocks(rm.model):
            plain = _logits(rm.model, ids)
        outs = {}
        with torch.no_grad(), routing(rm.model, "mix", decision_mask=mask, forced="open"):
            outs["mix_forced"] = _logits(rm.model, ids)
        with routing(rm.model, "mix", decision_mask=mask):  # routers at init: every gate open; grad on
            outs["mix_router_grad"] = _logits(rm.model, ids).detach()
            assert all(bool(layer.record.gate.detach().eq(1).all()) for layer in find_routed_layers(rm.model))
        with torch.no_grad(), routing(rm.model, "skip", decision_mask=mask):
            outs["skip"] = _logits(rm.model, ids)
        with torch.no_grad(), routing(rm.model, "off"):
            outs["off"] = _logits(rm.model, ids)
    assert plain.dtype == torch.bfloat16
    for name, out in outs.items():
        assert torch.equal(out, plain), name


def test_router_pools_bf16_states_in_fp32(rm):
    """The pooled vector a router reads is fp32 (a bf16 mean over hundreds of positions keeps ~3 digits)."""
    ids, mask = random_batch(vocab=rm.config.vocab_size)
    seen = []
    hook = rm.routers()[1].register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
    try:
        with torch.no_grad(), routing(rm.model, "mix", decision_mask=mask):
            rm.model(input_ids=ids)
        with torch.no_grad(), routing(rm.model, "skip"):
            rm.model(input_ids=ids)
    finally:
        hook.remove()
    assert seen == [torch.float32, torch.float32]


def test_lora_merges_into_bf16_weights_and_unmerge_restores_them_bit_for_bit(rm):
    ids, _ = random_batch(vocab=rm.config.vocab_size)
    frozen = {n: p.detach().clone() for n, p in rm.model.named_parameters() if not _trains(n)}
    with torch.no_grad():
        side = _logits(rm.model, ids)  # LoRA computed on the side, in fp32
        with rm.lora_disabled():
            base = _logits(rm.model, ids)
        with inference_weights(rm) as model:
            assert not any(isinstance(m, LoraLayer) for m in model.modules()), "wrappers still in the forward path"
            merged_weights = [p for n, p in model.named_parameters() if "q_proj" in n and p.dim() == 2]
            assert merged_weights and all(p.dtype == torch.bfloat16 for p in merged_weights)
            merged = _logits(model, ids)
        again = _logits(rm.model, ids)
    # merging rounds W + BA to bf16 once: far closer to LoRA on the side than to the model without LoRA
    assert (merged - side).abs().max() < 0.25 * (base - side).abs().max()
    assert torch.equal(again, side)
    for name, p in rm.model.named_parameters():
        if not _trains(name):
            assert torch.equal(p.detach(), frozen[name]), f"{name} drifted across merge/unmerge"


@pytest.mark.parametrize("shape", TINY_SHAPES)
def test_fp32_adapter_loads_on_a_bf16_base_and_generates_with_a_forced_skip(tmp_path, shape):
    trained = tiny_routed(shape, router=RouterConfig(bridge_rank=4))
    with torch.no_grad():
        for name, p in trained.model.named_parameters():
            if ".router." in name or ".bridge.up" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.05)
    adapter = save_adapter(trained, tmp_path / "adapter")
    rm16 = load_for_inference(None, str(adapter), dtype="bfloat16", device="cpu")  # the adapter's own base
    saved = dict(trained.model.named_parameters())
    for name, p in rm16.model.named_parameters():
        if _trains(name):  # the fp32 values as trained, not rounded through bf16
            assert p.dtype == torch.float32 and torch.equal(p, saved[name]), name
        else:
            assert p.dtype == torch.bfloat16, name
    lively(rm16)  # the shape preset's 0.02 init repeats one token; put the bridges it redraws back
    with torch.no_grad():
        for name, p in rm16.model.named_parameters():
            if ".bridge." in name:
                p.copy_(saved[name])
    frozen = {n: p.detach().clone() for n, p in rm16.model.named_parameters() if not _trains(n)}
    pattern = [True, False, True, True]
    for policy in ("exact", "kv_preserving"):
        out = routed_generate(rm16, PROMPTS, max_new_tokens=8, eos_token_id=None, forced=pattern, kv_policy=policy)
        assert out.gates == [pattern] * len(PROMPTS) and all(len(t) == 8 for t in out.tokens)
    assert len(set(out.tokens[0])) > 2, "outputs too uniform to test"
    # the routers decide too (no forced pattern), and a whole skipped bridge-less run equals deleting the block
    routed_generate(rm16, PROMPTS, max_new_tokens=4, eos_token_id=None)
    for layer in find_routed_layers(rm16.model):
        layer.bridge_saved, layer.bridge = layer.bridge, None
    try:
        skipped = routed_generate(rm16, PROMPTS, max_new_tokens=8, eos_token_id=None, forced=pattern)
        with torch.no_grad(), inference_weights(rm16) as model, plain_blocks(model):
            reference = delete_blocks(model, pattern)
            ids, mask = pad_left(PROMPTS, 0)
            ref, _ = run_generate(reference, ids, mask, max_new_tokens=8, eos_token_id=None, pad_token_id=0)
        assert skipped.tokens == ref[:, ids.shape[1]:].tolist()
    finally:
        for layer in find_routed_layers(rm16.model):
            layer.bridge = layer.bridge_saved
    for name, p in rm16.model.named_parameters():
        if not _trains(name):
            assert torch.equal(p.detach(), frozen[name]), f"{name} changed by generation"


def test_eval_loads_adapters_in_the_configs_dtype(tmp_path, monkeypatch):
    import layerroute.eval.runner as runner  # run_eval looks load_adapter up in its own module
    from layerroute.config import EvalConfig

    adapter = save_adapter(tiny_routed("shape:tiny-qwen2"), tmp_path / "adapter")
    seen = []

    def stop(path, cfg):
        seen.append(cfg)
        raise RuntimeError("stop")

    monkeypatch.setattr(runner, "load_adapter", stop)
    with pytest.raises(RuntimeError, match="stop"):
        runner.run_eval([str(adapter)], None, EvalConfig(), None, tmp_path / "eval", dtype="bfloat16")
    assert seen[0].name == "shape:tiny-qwen2" and seen[0].dtype == "bfloat16"


def test_bf16_training_moves_fp32_trainables_with_fp32_optimizer_state_and_leaves_frozen_bf16(tmp_path, monkeypatch):
    from layerroute.train import Trainer
    from tests.helpers import ROOT, smoke_cfg

    monkeypatch.chdir(ROOT)  # the smoke config's tokenizer path is relative to the repository root
    cfg = smoke_cfg("model.dtype=bfloat16", "router.bridge_rank=4", "train.steps=2", "train.checkpoint_every=2",
                    "train.eval_every=0", "train.eval_examples=2")
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.setup()
    before = {n: p.detach().clone() for n, p in trainer.rm.model.named_parameters()}
    trainer.run()
    groups = {g["name"]: g["params"] for g in trainer.inner_optimizer.param_groups}
    assert set(groups) == {"lora", "router", "bridge"}
    for name, p in trainer.rm.model.named_parameters():
        moved = not torch.equal(before[name], p.detach())
        if _trains(name):
            assert p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32), name
            state = trainer.inner_optimizer.state[p]
            assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32, name
            if ".bridge." not in name:  # a bridge whose block never closes gets no gradient (by design)
                assert moved, f"trainable {name} did not change"
        else:
            assert p.dtype == torch.bfloat16 and not moved, f"frozen {name} changed or is not bf16"


def test_serving_engine_runs_a_bf16_model_with_a_forced_skip_as_routed_generate_does():
    from transformers import AutoTokenizer

    from layerroute.data.render import render_prompt
    from layerroute.serve.engine import Engine, SamplingParams
    from tests.test_serve import TOKENIZER

    rm16 = bf16_routed("shape:tiny-qwen2", bridge_rank=4)
    rm16.tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    frozen = {n: p.detach().clone() for n, p in rm16.model.named_parameters() if not _trains(n)}
    pattern = [True, False, True, True]
    engine = Engine(rm16, forced=pattern, cache_sessions=2)
    try:
        prompt = render_prompt(rm16.tokenizer, [{"role": "user", "content": "Plan a short trip to the coast."}])
        done = engine.generate(prompt, SamplingParams(max_new_tokens=6, ignore_eos=True))
        with engine.lock:  # the engine holds the merged bf16 weights
            ref = routed_generate(rm16, [prompt], max_new_tokens=6, eos_token_id=None, forced=pattern,
                                  kv_policy="kv_preserving", merge_lora=False)
        assert done.gates == pattern and done.tokens == ref.tokens[0]
    finally:
        engine.close()
    for name, p in rm16.model.named_parameters():
        if not _trains(name):
            assert torch.equal(p.detach(), frozen[name]), f"{name} changed by serving"


def test_bf16_lm_head_gets_standard_strides_and_the_same_logits():
    """generate()'s prefill slices hidden[:, -1:, :] (batch stride T * H), which sends a bf16 CPU matmul down a path
    that copies the whole LM head each call; the loader's pre-hook hands the head a standard-strided copy."""
    cfg = ModelConfig(name="shape:tiny-llama", dtype="bfloat16")
    model = load_base(cfg, tokenizer=False).model
    head = model.get_output_embeddings()
    seen = []
    handle = head.register_forward_pre_hook(lambda _m, args: seen.append(args[0].stride()))  # runs after the loader's
    try:
        hidden = torch.randn(2, 7, model.config.hidden_size).bfloat16()
        with torch.no_grad():
            sliced = head(hidden[:, -1:, :])
            fresh = head(hidden[:, -1:, :].clone(memory_format=torch.contiguous_format))
    finally:
        handle.remove()
    assert seen[0] == (model.config.hidden_size, model.config.hidden_size, 1) and torch.equal(sliced, fresh)
    fp32 = load_base(ModelConfig(name="shape:tiny-llama"), tokenizer=False).model
    assert not fp32.get_output_embeddings()._forward_pre_hooks  # fp32 runs exactly as before


def test_machine_names_the_cpu_and_asks_the_same_probe(monkeypatch):
    import layerroute.model as model

    for native in (True, False):
        monkeypatch.setattr(model, "native_bf16", lambda device, native=native: native)
        m = model.machine()
        assert m["bf16_native_cpu"] is native and m["cpu"] and m["cores"] >= 1
