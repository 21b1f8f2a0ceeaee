"""Adapters remember how they were trained: the tokenizer and chat template travel with them, the base model is
known by a stable identity, and a missing chat template is one clear error naming model.chat_template."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import layerroute.cli.generate_cli as generate_cli
import layerroute.infer.generate as generate_mod
import layerroute.train as train_mod
from layerroute import chat_template
from layerroute.adapters import META_FILE, adapter_base_name, check_base_matches, load_adapter
from layerroute.chat_template import ChatTemplateMissing
from layerroute.cli import main as cli_main
from layerroute.config import ModelConfig, RunConfig
from layerroute.data.config import DataConfig, SourceConfig
from layerroute.data.records import Conversation
from layerroute.data.render import hermes_text_messages, render_prompt, render_steps
from layerroute.data.sources import iter_source
from layerroute.errors import AdapterError, ConfigError
from layerroute.identity import file_digest, tokenizer_identity
from layerroute.model import load_base, shape_config
from layerroute.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
SMOL = ROOT / "tests" / "fixtures" / "tokenizers" / "smollm2"
FIX = ROOT / "tests" / "fixtures" / "data"

# TRL's ChatML (setup_chat_format): no tools, no default system turn
PLAIN_CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERROUTE_CACHE", str(tmp_path / "cache"))  # file digests of this test only


def _no_template_tokenizer(path: Path) -> Path:
    """SmolLM2's tokenizer with its chat template deleted: a base model's tokenizer."""
    path.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SMOL / name, path / name)
    return path


def _wordlevel_tokenizer(path: Path) -> Path:
    """Another tokenizer, built in code (a word-level vocabulary), without a chat template either."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", "<|im_start|>", "<|im_end|>", "hello", "world"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    tok.save_pretrained(path)
    return path


def _base_folder(path: Path, tokenizer_dir: Path, preset: str = "tiny-llama", **changes) -> Path:
    """A tiny model saved as a local folder, with `tokenizer_dir`'s tokenizer as its own."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = shape_config(preset)
    for k, v in changes.items():
        setattr(config, k, v)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(path)
    return path


def _cfg(base: Path, tokenizer: Path, *extra: str) -> RunConfig:
    return RunConfig.from_yaml(SMOKE, [
        f"model.name={base}", f"model.tokenizer={tokenizer}", "train.steps=2", "train.batch_size=1",
        "train.grad_accum=1", "train.warmup_steps=0", "train.checkpoint_every=0", "train.eval_every=0",
        "train.eval_examples=2", "data.sources[0].limit=4", "data.sources[1].limit=4", *extra,
    ])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A base folder whose own tokenizer is a word-level one; an adapter trained on it with model.tokenizer
    pointing at a SmolLM2 tokenizer without a template, and model.chat_template=chatml."""
    root = tmp_path_factory.mktemp("identity")
    own = _wordlevel_tokenizer(root / "own_tok")
    smol = _no_template_tokenizer(root / "smol_tok")
    base = _base_folder(root / "base", own)
    trainer = Trainer(_cfg(base, smol, "model.chat_template=chatml"), root / "run")
    result = trainer.run()
    return {"root": root, "own": own, "smol": smol, "base": base, "trainer": trainer, "adapter": result.adapter_dir}


# ------------------------------------------------------------------------------------------------------------
# the chatml preset


def _fixture_convs():
    out = []
    for name, path in [("hermes", "hermes_function_calling_v1.json"), ("glaive", "glaive_function_calling_v2.json"),
                       ("jsonl", "messages.jsonl"), ("gsm8k_hub", "gsm8k_main.jsonl")]:
        out += [r for r in iter_source(SourceConfig(name, path=str(FIX / path)), DataConfig())
                if isinstance(r, Conversation)]
    return out


def test_chatml_preset_writes_what_the_hermes_convention_writes():
    """The preset renders tools natively exactly as the text convention through plain ChatML does, so a model
    trained with one sees the same text as with the other."""
    from transformers import AutoTokenizer

    preset, plain = AutoTokenizer.from_pretrained(str(SMOL)), AutoTokenizer.from_pretrained(str(SMOL))
    chat_template.apply(preset, "chatml")
    plain.chat_template = PLAIN_CHATML
    convs = _fixture_convs()
    checked = 0
    for conv in convs:
        for i in range(1, len(conv.messages) + 1):
            msgs = conv.messages[:i]
            kw = {"tools": conv.tools} if conv.tools else {}
            for gen in (False, True):
                a = preset.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, **kw)
                b = plain.apply_chat_template(hermes_text_messages(msgs, conv.tools), tokenize=False,
                                              add_generation_prompt=gen)
                assert a == b
                checked += 1
        assert render_steps(conv, preset, max_length=4096)  # every fixture conversation renders into steps
    assert checked > 50 and any(c.tools for c in convs)


def test_chat_template_setting_is_validated_at_config_load(tmp_path):
    for value in ("no-such-preset", str(tmp_path / "missing.jinja")):
        with pytest.raises(ConfigError, match=r"model\.chat_template"):
            RunConfig.from_yaml(SMOKE, [f"model.chat_template={value}"])
    jinja = tmp_path / "t.jinja"
    jinja.write_text(PLAIN_CHATML)
    assert RunConfig.from_yaml(SMOKE, [f"model.chat_template={jinja}"]).model.chat_template == str(jinja)
    assert chat_template.resolve(str(jinja)) == PLAIN_CHATML


def test_preset_refuses_a_tokenizer_without_its_turn_tokens(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(_wordlevel_tokenizer(tmp_path / "w")))
    vocab_less = AutoTokenizer.from_pretrained(str(tmp_path / "w"))
    vocab_less.get_vocab = lambda: {"hello": 0}
    with pytest.raises(ConfigError, match=r"model\.chat_template=chatml.*<\|im_start\|>"):
        chat_template.apply(vocab_less, "chatml")
    chat_template.apply(tok, "chatml")  # has both turn tokens
    assert tok.chat_template == chat_template.CHATML


# ------------------------------------------------------------------------------------------------------------
# one error for a missing template


def test_training_without_a_template_stops_naming_the_setting(world, tmp_path, capsys):
    with pytest.raises(ChatTemplateMissing, match=r"model\.chat_template"):
        Trainer(_cfg(world["base"], world["smol"]), tmp_path / "run").setup()
    path = tmp_path / "c.yaml"
    path.write_text(SMOKE.read_text())
    rc = train_mod.main(["--config", str(path), "--output-dir", str(tmp_path / "cli"), "--set",
                         f"model.name={world['base']}", "--set", f"model.tokenizer={world['smol']}"])
    assert rc == 2
    assert "has no chat template: set model.chat_template" in capsys.readouterr().err


def test_generate_and_serve_without_a_template_give_the_same_error(world, capsys):
    rc = cli_main(["generate", "--model", str(world["base"]), "--prompt", "hello", "--max-new-tokens", "1",
                   "--device", "cpu"])
    assert rc == 2
    assert "has no chat template: set model.chat_template" in capsys.readouterr().err
    from layerroute.serve.engine import Engine

    rm = generate_mod.load_for_inference(str(world["base"]), None, device="cpu")
    with pytest.raises(ChatTemplateMissing, match=r"model\.chat_template"):
        Engine(rm)
    rm = generate_mod.load_for_inference(str(world["base"]), None, device="cpu", chat_template="chatml")
    assert render_prompt(rm.tokenizer, [{"role": "user", "content": "hello"}])  # --chat-template fixes it


# ------------------------------------------------------------------------------------------------------------
# the adapter carries its tokenizer and template


def test_adapter_saves_the_tokenizer_and_template_it_trained_with(world):
    meta = json.loads((world["adapter"] / META_FILE).read_text())
    trained_tok = world["trainer"].rm.tokenizer
    assert meta["chat_template"] == chat_template.CHATML
    assert meta["tokenizer"]["sha256"] == tokenizer_identity(trained_tok)["sha256"]
    assert (world["adapter"] / "tokenizer.json").is_file() and (world["adapter"] / "chat_template.jinja").is_file()
    assert meta["base_model"]["name"] == str(world["base"])


def test_generate_with_an_adapter_uses_its_tokenizer_and_template_not_the_bases(world, monkeypatch, capsys):
    own = load_base(ModelConfig(name=str(world["base"]), device="cpu")).tokenizer
    smol = tokenizer_identity(world["trainer"].rm.tokenizer)
    assert tokenizer_identity(own)["sha256"] != smol["sha256"] and own.chat_template is None

    rm = load_adapter(world["adapter"])
    assert tokenizer_identity(rm.tokenizer)["sha256"] == smol["sha256"]
    assert rm.tokenizer.chat_template == chat_template.CHATML
    # the prompt of a training step's context, rendered at inference, is token for token that context
    for step in world["trainer"].train_steps[:4]:
        assert render_prompt(rm.tokenizer, step.context_messages, step.tools) == step.context_ids

    seen = []
    real = generate_cli.routed_generate  # looked up by `layerroute generate` in its own module
    monkeypatch.setattr(generate_cli, "routed_generate", lambda rm, prompts, **kw: seen.append(prompts) or real(
        rm, prompts, **kw))
    rc = cli_main(["generate", "--adapter", str(world["adapter"]), "--prompt", "What is 2+2?", "--skip-fraction",
                   "0.25", "--max-new-tokens", "2", "--device", "cpu", "--system", "Be brief."])
    assert rc == 0
    assert "(skipped 25%)" in capsys.readouterr().out  # the forced pattern ran
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    trained = world["trainer"].rm.tokenizer  # the tokenizer + template that rendered the training steps
    assert seen[0] == [render_prompt(trained, messages)]
    text = trained.decode(seen[0][0])
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n" \
                   "<|im_start|>assistant\n"


def test_a_different_tokenizer_or_template_is_refused_naming_both(world):
    with pytest.raises(AdapterError) as err:
        load_adapter(world["adapter"], ModelConfig(name=str(world["base"]), tokenizer=str(world["own"])))
    msg = str(err.value)
    assert str(world["smol"]) in msg and str(world["own"]) in msg and "model.tokenizer" in msg
    # the recorded tokenizer given explicitly is accepted
    load_adapter(world["adapter"], ModelConfig(name=str(world["base"]), tokenizer=str(world["smol"])))
    jinja = world["root"] / "other.jinja"
    jinja.write_text(PLAIN_CHATML)
    with pytest.raises(AdapterError, match=r"another chat template .*model\.chat_template="):
        load_adapter(world["adapter"], ModelConfig(name=str(world["base"]), chat_template=str(jinja)))


def test_a_different_base_is_refused_naming_both(world, tmp_path):
    other = _base_folder(tmp_path / "other", world["own"], num_hidden_layers=2)
    with pytest.raises(AdapterError) as err:
        load_adapter(world["adapter"], ModelConfig(name=str(other)))
    msg = str(err.value)
    assert str(world["base"]) in msg and str(other) in msg and "num_hidden_layers" in msg


def test_a_local_file_base_is_known_by_its_hash_and_found_again_when_moved(tmp_path):
    gguf = tmp_path / "a" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"weights" * 1000)
    from layerroute.identity import file_identity

    ident = {"name": str(gguf), "hidden_size": 64, **file_identity(str(gguf))}
    assert ident["file"] == "model.gguf" and ident["size"] == 7000 and len(ident["sha256"]) == 64
    moved = tmp_path / "b" / "renamed.gguf"
    moved.parent.mkdir()
    gguf.rename(moved)
    meta = {"base_model": ident}
    with pytest.raises(AdapterError, match="no longer at .*pass its new path with --model"):
        adapter_base_name("ADAPTER", meta)
    check_base_matches(meta, {"name": str(moved), "hidden_size": 64, **file_identity(str(moved))}, "ADAPTER")
    moved.write_bytes(b"other weights" * 1000)
    with pytest.raises(AdapterError) as err:
        check_base_matches(meta, {"name": str(moved), "hidden_size": 64, **file_identity(str(moved))}, "ADAPTER")
    assert "model.gguf" in str(err.value) and "renamed.gguf" in str(err.value) and "sha256" in str(err.value)


def test_file_digest_is_cached_by_path_size_and_mtime(tmp_path):
    import hashlib

    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    assert file_digest(path) == hashlib.sha256(b"abc").hexdigest()
    (entry,) = (tmp_path / "cache" / "digests").iterdir()
    record = json.loads(entry.read_text())
    entry.write_text(json.dumps({**record, "sha256": "from-the-cache"}))
    assert file_digest(path) == "from-the-cache"  # not recomputed
    os.utime(path, ns=(1, 1))  # another version of the file: another key
    assert file_digest(path) == hashlib.sha256(b"abc").hexdigest()


def test_an_adapter_from_before_the_change_still_loads(world, tmp_path):
    """layerroute.json without tokenizer/template/file fields and no tokenizer files: the base's tokenizer, as
    before (so committed results stay reproducible)."""
    old = tmp_path / "old"
    shutil.copytree(world["adapter"], old)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (old / name).unlink()
    meta = json.loads((old / META_FILE).read_text())
    del meta["tokenizer"], meta["chat_template"]
    (old / META_FILE).write_text(json.dumps(meta))
    rm = load_adapter(old)
    own = load_base(ModelConfig(name=str(world["base"]), device="cpu")).tokenizer
    assert tokenizer_identity(rm.tokenizer)["sha256"] == tokenizer_identity(own)["sha256"]
    new = load_adapter(world["adapter"])
    x = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(rm.model(input_ids=x).logits, new.model(input_ids=x).logits)
    # an old adapter on a base without a template takes model.chat_template like a new run
    rm = load_adapter(old, ModelConfig(name=str(world["base"]), tokenizer=str(world["smol"]), chat_template="chatml"))
    assert rm.tokenizer.chat_template == chat_template.CHATML


def test_data_command_renders_with_model_tokenizer_and_chat_template(tmp_path, capsys):
    """`layerroute data` renders as training does: model.tokenizer (not model.name's) and model.chat_template."""
    smol = _no_template_tokenizer(tmp_path / "smol")
    args = ["data", "--config", str(SMOKE), "--stats", "--json", "--set", f"model.tokenizer={smol}",
            "--set", "data.sources[0].limit=2", "--set", "data.sources[1].limit=2"]
    assert cli_main(args) == 2
    assert "has no chat template: set model.chat_template" in capsys.readouterr().err
    assert cli_main([*args, "--set", "model.chat_template=chatml"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["tokenizer"] == str(smol)


@pytest.mark.slow
def test_real_model_adapter_carries_its_own_tokenizer_and_template(tmp_path):
    """The packaged SmolLM2: an adapter saved from it reloads with the same tokenizer, template and prompt."""
    from layerroute.adapters import build_routed_model

    rm = build_routed_model(ModelConfig(name="smollm2-135m-instruct", device="cpu"))
    out = rm.save(tmp_path / "adapter")
    meta = json.loads((out / META_FILE).read_text())
    assert meta["base_model"]["name"] == "smollm2-135m-instruct" and meta["tokenizer"]["vocab_size"] == 49152
    back = load_adapter(out)
    assert tokenizer_identity(back.tokenizer)["sha256"] == meta["tokenizer"]["sha256"]
    assert back.tokenizer.chat_template == rm.tokenizer.chat_template == meta["chat_template"]
    messages = [{"role": "user", "content": "List the files"}]
    assert render_prompt(back.tokenizer, messages) == render_prompt(rm.tokenizer, messages)


def test_init_lora_refuses_an_adapter_trained_with_another_tokenizer(world):
    from layerroute.adapters import build_routed_model, init_lora_from
    from layerroute.config import LoraSettings

    # the base folder with its own (word-level) tokenizer: not the one the adapter's LoRA learned
    rm = build_routed_model(ModelConfig(name=str(world["base"]), device="cpu"), lora_cfg=LoraSettings(r=4, alpha=8))
    with pytest.raises(AdapterError, match="this run's tokenizer"):
        init_lora_from(rm, world["adapter"])
