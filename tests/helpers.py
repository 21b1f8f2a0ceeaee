"""Tiny models built in code for tests (no downloads, no tokenizer), and the smoke config's training fixtures."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from layerroute.adapters import RoutedModel, build_routed_model
from layerroute.config import LoraSettings, ModelConfig, RouterConfig, RunConfig
from layerroute.model import load_base

if TYPE_CHECKING:
    from layerroute.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"

TINY_SHAPES = ["shape:tiny-qwen2", "shape:tiny-llama"]


def tiny_routed(shape: str = "shape:tiny-qwen2", *, lora: bool = True, seed: int = 0, router=None,
                tokenizer=None) -> RoutedModel:
    """A tiny routed model whose LoRA B matrices are random (peft starts them at zero, which would hide bugs)."""
    cfg = ModelConfig(name=shape, seed=seed)
    loaded = load_base(cfg, tokenizer=False)
    loaded.tokenizer = tokenizer  # shape presets come without one; last_turn pooling reads its turn token
    rm = build_routed_model(cfg, router or RouterConfig(), LoraSettings(enabled=lora), loaded=loaded)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in rm.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    rm.model.eval()
    return rm


def random_batch(batch: int = 2, length: int = 12, context: int = 8, vocab: int = 1000, seed: int = 0):
    """input_ids [B, T] and a decision mask with `context` leading context positions per row."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=gen)
    mask = torch.zeros(batch, length)
    mask[:, :context] = 1
    return ids, mask


def lively(rm: RoutedModel, std: float = 0.15, seed: int = 0) -> RoutedModel:
    """Re-draw the base weights with a larger spread so greedy outputs vary from token to token (the default
    0.02 init makes a tiny model repeat one token, which would make token-for-token comparisons weak)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in rm.model.named_parameters():
            if ".router." in name or "lora_" in name or p.dim() < 2:
                continue
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return rm


def delete_blocks(model, keep: list[bool]):
    """A deep copy of a plain causal LM with the blocks where keep[i] is False removed from its layer list,
    `config.num_hidden_layers` (and `layer_types`) fixed and each attention's `layer_idx` renumbered: the
    reference a forced skip pattern must reproduce."""
    import copy

    from layerroute.nn.blocks import decoder_layers

    ref = copy.deepcopy(model)
    layers = decoder_layers(ref)
    kept = [layer for layer, k in zip(layers, keep, strict=True) if k]
    for i in reversed(range(len(layers))):
        del layers[i]
    for new_idx, layer in enumerate(kept):
        layer.self_attn.layer_idx = new_idx
        layers.append(layer)
    ref.config.num_hidden_layers = len(kept)
    if getattr(ref.config, "layer_types", None) is not None:
        ref.config.layer_types = [t for t, k in zip(ref.config.layer_types, keep, strict=True) if k]
    return ref


def synthetic_step(i: int, ctx: int, n: int, kind: str, ids: list[int] | None = None):
    """A Step with `ctx` context and `n` target tokens (ids default to zeros), for data-structure tests."""
    from layerroute.data.render import Step

    ids = ids if ids is not None else [0] * (ctx + n)
    return Step(input_ids=ids, labels=[-100] * ctx + ids[ctx:], decision_mask=[1] * ctx + [0] * n, step_type=kind,
                context_length=ctx, length=n, source="s", conversation_id=f"c{i}", step_index=0)


class TurnTokenizer:
    """Just enough tokenizer for `router.pooling=last_turn` on a tiny model: id TURN opens a turn."""

    TURN = 7
    unk_token, unk_token_id, pad_token_id, eos_token_id = "<unk>", 0, 0, None

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.TURN if token == "<|im_start|>" else self.unk_token_id


# ------------------------------------------------------------------------------------------------------------
# Training on configs/smoke.yaml (tiny-qwen2 shape, fixture tokenizer, the fixture conversations): shared by the
# tests/test_train*.py files. A test module that trains imports `smoke_data` (a module-scoped fixture) and the two
# autouse fixtures `one_thread` and `in_repo_root` by name: pytest registers an imported fixture as the module's own.


def smoke_cfg(*overrides: str) -> RunConfig:
    return RunConfig.from_yaml(SMOKE, list(overrides))


@pytest.fixture(scope="module")
def smoke_data():
    """The smoke config's step data, loaded once (the tests that load it themselves exercise that path)."""
    from transformers import AutoTokenizer

    from layerroute.data.build import load_steps

    cfg = smoke_cfg()
    return load_steps(cfg.data, AutoTokenizer.from_pretrained(str(ROOT / cfg.model.tokenizer)))


def trainable_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.rm.model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and two threads on a shared 2-core machine thrash (10x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the smoke config's tokenizer path is relative to the repository root


# ------------------------------------------------------------------------------------------------------------
# Scripts run in this process: a subprocess re-imports torch and transformers (10-40 s each on the shared 2-core
# machine; one test ran a script 7 times, 282 s), while the script's own main(argv) takes milliseconds.


class Ran:
    """What `subprocess.run(..., capture_output=True, text=True)` would have returned."""

    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_main(main, args, capsys) -> Ran:
    """Call a command's `main(argv)` as its `__main__` would (SystemExit('msg') = the message on stderr, status 1)."""
    import sys

    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit_:
        code = exit_.code
        if isinstance(code, str):
            print(code, file=sys.stderr)
            code = 1
    out = capsys.readouterr()
    return Ran(int(code or 0), out.out, out.err)


def script_main(path: str | Path):
    """The `main` of a script under benchmarks/ (not a package), imported from its file with its folder on sys.path
    while it imports, as `python benchmarks/x.py` has it (scripts import their siblings)."""
    import importlib.util
    import sys

    path = Path(path).resolve()
    spec = importlib.util.spec_from_file_location(f"_script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module.main
