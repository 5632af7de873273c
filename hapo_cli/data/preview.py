"""The first training prompt exactly as the model sees it (`hapo recipes show --prompt`): the
recipe's tokenizer, chat template, data.system_prompt, prompt_template and chat_template_kwargs
applied, then decoded from the token ids the rollout gets."""

from __future__ import annotations

from typing import Any


def recipe_tokenizer(recipe: Any) -> Any:
    """The tokenizer a run of `recipe` uses: the tiny model's (init=warmup) or model.path's."""
    if recipe.model.init == "warmup":
        from ..models import build_tokenizer

        return build_tokenizer()
    from ..model_dirs import auto_tokenizer

    return auto_tokenizer(recipe.model.path, recipe.model.trust_remote_code)


def first_prompt(recipe: Any, tokenizer: Any = None) -> tuple[str, int]:
    """(text decoded from the prompt's token ids, number of tokens) of the first training row."""
    from . import load_examples, synthetic_example

    tok = tokenizer if tokenizer is not None else recipe_tokenizer(recipe)
    data = recipe.data
    if data.source == "synthetic":
        ex = synthetic_example(data.task, data.difficulty, "train", recipe.seed, 0, tok,
                               data.apply_chat_template, shape=data)
    else:
        ex = load_examples(data.train_files[0], data, tok, data.train_verifier)[0]
    return tok.decode(list(ex.prompt_ids), skip_special_tokens=False), len(ex.prompt_ids)
