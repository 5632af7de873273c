"""Local HF model folders: loading them quietly, and checking, cheaply and before anything is
written, that everything a folder needs (config, tokenizer, weights) loads. Apart from
`models.py` (the tiny policy and its warm-up), which re-exports these names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .errors import HapoError, first_line


class ModelError(HapoError):
    """A bad model path or model directory: one line naming the path."""


def quiet_transformers() -> None:
    """Silence HF progress bars ("Loading weights", "Writing model shards") and info logs."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_policy(
    path: str | Path, dtype: str | torch.dtype = "float32", trust_remote_code: bool = False
) -> tuple[Any, Any]:
    """(model, tokenizer) from a local HF directory, quietly. The tokenizer pads on the left
    (what generation needs) and falls back to <eos> as the pad token when it has none."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: no config.json (not an HF model directory)")
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch_dtype, local_files_only=True, trust_remote_code=trust_remote_code
    )
    return model, load_tokenizer(path, trust_remote_code)


# what `PreTrainedTokenizerFast.save_pretrained` declares in transformers 5 (and 4)
GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def auto_tokenizer(path: str | Path, trust_remote_code: bool = False) -> Any:
    """`AutoTokenizer.from_pretrained(path)`, except that a folder whose tokenizer_config.json
    declares the generic class gets exactly its tokenizer.json. transformers 5 maps a config's
    model_type (qwen2) to its own class (Qwen2Tokenizer) even then, and that class rebuilds the
    pre-tokenizer from its own recipe: the tiny character tokenizer reloaded that way silently
    dropped every space ("be brief" encoded as "bebrief")."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        declared = json.loads((Path(path) / "tokenizer_config.json").read_text(
            encoding="utf-8")).get("tokenizer_class")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        declared = None
    if declared in GENERIC_TOKENIZER_CLASSES and (Path(path) / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    return AutoTokenizer.from_pretrained(path, local_files_only=True,
                                         trust_remote_code=trust_remote_code)


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> Any:
    """The policy's tokenizer, padding on the left (what generation needs), <eos> as the pad
    token when it has none."""
    tokenizer = auto_tokenizer(path, trust_remote_code)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def check_model_dir(path: str | Path) -> None:
    """ModelError (one line) unless `path` looks loadable: a JSON-object config.json with a
    model_type, tokenizer files, and weight files whose headers read. Cheap (headers only), so
    `hapo train` / `evaluate` fail before anything is written, not half-way with a traceback."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not path.is_dir():
        raise ModelError(f"{path}: not a directory (expected a local HF model directory)")
    if not cfg_file.is_file():
        raise ModelError(f"{path}: no config.json (not an HF model directory)")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ModelError(f"{cfg_file}: not valid JSON") from None
    if not isinstance(cfg, dict) or not cfg.get("model_type"):
        raise ModelError(f"{cfg_file}: expected a JSON object with a 'model_type' key")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(f"{path}: no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)})")
    weights = sorted(path.glob("*.safetensors"))
    if not weights and not any(path.glob("pytorch_model*.bin")):
        raise ModelError(f"{path}: no weight files (*.safetensors)")
    from safetensors import safe_open

    for w in weights:
        try:
            with safe_open(str(w), framework="pt") as f:
                f.keys()
        except Exception as exc:  # SafetensorError, OSError: corrupt or truncated file
            raise ModelError(f"{w}: not a readable safetensors file ({first_line(exc)})") from None
    check_tokenizer(path)


# Characters every math model's vocabulary holds (the tiny character tokenizer's too).
TOKENIZER_PROBE = "1+2=3"


def check_tokenizer(path: str | Path) -> None:
    """ModelError unless the folder's tokenizer loads and knows TOKENIZER_PROBE. Without its
    vocabulary file (tokenizer.json), transformers still builds a tokenizer from
    tokenizer_config.json alone, one of a few special tokens that encodes every prompt to
    nothing; a folder is loadable only if what it needs loads. A tokenizer that needs
    remote code is left to `load_policy`, which knows `model.trust_remote_code`."""
    quiet_transformers()
    try:
        tok = auto_tokenizer(path)
    except Exception as exc:  # OSError, ValueError, KeyError, tokenizers' own Exception
        if "trust_remote_code" in str(exc):
            return
        raise ModelError(
            f"{path}: the tokenizer does not load ({type(exc).__name__}: {first_line(exc)})"
        ) from None
    ids = tok(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    if not ids or all(i == tok.unk_token_id for i in ids):
        missing = [f for f in ("tokenizer.json",) if not (Path(path) / f).is_file()]
        why = f" (no {missing[0]})" if missing else ""
        raise ModelError(
            f"{path}: the tokenizer has no vocabulary{why}: it encodes {TOKENIZER_PROBE!r} to "
            f"{len(ids)} known tokens ({len(tok)} tokens in all); restore its tokenizer files"
        )

