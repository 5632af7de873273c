"""Every paper recipe against the HAPO authors' released script, field by field (issue #14).

The values are transcribed from the scripts in the authors' repository (recipe/*.sh, commit
7671dde); nothing is read from the network. Script variable -> recipe field:
"""

from __future__ import annotations

import pytest

from hapo_cli.recipe import load_recipe

# Shared by the four scripts (qwen2.5_math_1.5b.sh, qwen2.5_math_7b.sh, qwen3_8b.sh,
# llama3.1_8b_instruct.sh); `None` marks a script value expressed by a recipe choice.
SCRIPT_COMMON = {
    "data.max_prompt_length": 1024,  # max_prompt_length=$((1024 * 1))
    "data.truncation": "left",  # data.truncation='left'
    "data.train_verifier": "dapo",  # data_source math_dapo -> math_dapo.compute_score
    "rollout.n": 16,  # n_resp_per_prompt
    "rollout.temperature": 1.0,  # temperature
    "rollout.top_p": 1.0,  # top_p
    "rollout.top_k": 0,  # top_k=-1 (off)
    "rollout.vllm.gpu_memory_utilization": 0.8,
    "algo.baseline": "dapo",  # token-mean, no KL (use_kl_loss=False, kl_coef=0)
    "algo.loss_agg": "token-mean",  # loss_agg_mode
    "algo.eps_low": 0.2,  # clip_ratio_low
    "algo.clip_c": 10.0,  # clip_ratio_c
    "algo.tau": 0.05,  # rollout.temperature_tau
    "algo.entropy_pivot": 0.8,  # actor.entropy_pivot
    "algo.alpha": 1.0,  # actor.clip_alpha
    "algo.beta": 1.0,  # actor.adv_beta
    "train.prompts_per_step": 512,  # train_prompt_bsz
    "train.mini_batch_prompts": 32,  # train_prompt_mini_bsz
    "train.ppo_epochs": 1,  # verl default ppo_epochs
    "train.lr": 1e-6,  # optim.lr
    "train.warmup_steps": 10,  # optim.lr_warmup_steps
    "train.warmup_unit": "training",  # fsdp_workers.update_actor steps the scheduler
    "train.warmup_start": "zero",  # get_constant_schedule_with_warmup: k / n
    "train.weight_decay": 0.1,  # optim.weight_decay
    "train.grad_clip": 1.0,  # actor.grad_clip
    "train.incorrect_score": -1.0,  # math_dapo.compute_score: -1.0 if not correct
    "train.nonfinite_grad": "skip",  # dp_actor._optimizer_step
    "train.dynamic_sampling.enabled": True,  # enable_filter_groups=True
    "train.dynamic_sampling.metric": "acc",  # filter_groups_metric=acc
    "train.dynamic_sampling.max_num_gen_batches": 16,
    # what DAPO's trainer does with those flags (recipe/dapo/dapo_ray_trainer.py)
    "train.dynamic_sampling.on_exhausted": "raise",
    "train.dynamic_sampling.refill": "same",
    "train.overlong.buffer_len": 4096,  # overlong_buffer_len=$((1024 * 4))
    "train.overlong.penalty": 1.0,  # overlong_penalty_factor
    "eval.every": 5,  # trainer.test_freq
    "eval.at_start": True,  # trainer.val_before_train
    "eval.n": 8,  # val_kwargs.n
    "eval.temperature": 0.5,  # val_kwargs.temperature
    "eval.top_p": 0.7,  # val_top_p
    "log.checkpoint_every": 50,  # trainer.save_freq
}
SCRIPT_SPECIFIC = {
    "qwen2.5-math-1.5b": {"rollout.max_new_tokens": 10240, "train.overlong.enabled": True},
    "qwen2.5-math-7b": {"rollout.max_new_tokens": 10240, "train.overlong.enabled": True},
    "qwen3-8b": {"rollout.max_new_tokens": 12288, "train.overlong.enabled": True},
    # llama3.1_8b_instruct.sh: max_response_length=$((1024 * 4)), enable_overlong_buffer=False
    "llama-3.1-8b-instruct": {"rollout.max_new_tokens": 4096, "train.overlong.enabled": False},
}
HAPO = {
    "algo.adaptive_temperature": True,  # rollout.adaptive_temperature=True
    "algo.token_level_advantage": True,  # adv_estimator=hapo
    "algo.redistribute": True,  # actor.adaptive_advantage=True
    "algo.adaptive_clip": True,  # actor.adaptive_clip=True
    "algo.eps_high": 0.2,  # clip_ratio_high
}
# The DAPO baselines follow DAPO as published (arXiv 2503.14476): clip-higher eps_high = 0.28.
DAPO = {
    "algo.adaptive_temperature": False,
    "algo.token_level_advantage": False,
    "algo.redistribute": False,
    "algo.adaptive_clip": False,
    "algo.eps_high": 0.28,
}


def _get(recipe, dotted: str):
    node = recipe
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


@pytest.mark.parametrize("model", sorted(SCRIPT_SPECIFIC))
@pytest.mark.parametrize("algo", ["hapo", "dapo"])
def test_paper_recipe_matches_the_authors_script(model, algo):
    recipe = load_recipe(f"paper/{model}-{algo}")
    expected = {**SCRIPT_COMMON, **SCRIPT_SPECIFIC[model], **(HAPO if algo == "hapo" else DAPO)}
    got = {k: _get(recipe, k) for k in expected}
    assert got == expected
    assert recipe.components == ("ABCD" if algo == "hapo" else "none")
    # validation: graded per row by data_source, as verl's default_compute_score
    assert recipe.data.val_verifier == "source"
