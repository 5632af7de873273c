"""Names vulture (`make lint`, config in pyproject.toml) reports but that are used: reached by a
framework, another process, or read only by the tests that pin a format. Each with its reason.
Not imported by anything; vulture reads it as code that "uses" these names."""
# ruff: noqa: B018, F821

from analysis import schema
from analysis.report import AnalyzeResult
from hapo_cli.data.synthetic import Task
from hapo_cli.learner.dcp_checkpoint import Checkpointer
from hapo_cli.learner.gloo_reduce import SlicedReduceScatter
from hapo_cli.recipe import Recipe
from hapo_cli.rollout import base, server_worker, vllm_plugin

# PEP 562 module __getattr__: the lazy exports of `analysis` and `hapo_cli.rewards`
__getattr__

# analysis.schema: the run-directory format, every key named once; tests check files against
# these (test_analysis_io.py, test_architecture.py) and the docs list them
schema.METRICS_NAMES, schema.ROW_KEYS, schema.CLIP_SIDES, schema.MANIFEST_KEYS
schema.RUN_STATUSES, schema.EVAL_N, schema.EVAL_PASS, schema.EVAL_CRITICAL_THRESHOLD
schema.EVAL_MAJ_RE, schema.eval_setting, schema.ABLATION_KEYS, schema.PLAN_KEYS
schema.is_declared_metric  # the metric-name contract: test_architecture.py and test_byo_e2e.py check
# every key a run logs against it
AnalyzeResult.report_html  # the HTML report's path, returned to callers (tests read it)
NAMES  # hapo_cli.components.NAMES: the component letters' names, read by tests and bench

Task.description  # synthetic task metadata (the data preview shows it)

# attributes set on third-party objects (tokenizers, a tokenizers.Tokenizer, configs)
padding_side, pad_token, pre_tokenizer, decoder, bos_token_id

Checkpointer.last_stall_s  # how long a save blocked the loop; read by tests/dcp_worker.py
Checkpointer.last_step_wait_s  # how long the next optimizer step waited; read by bench_checkpoint.py
LiveState.stage  # DCP's AsyncStager interface: async_save calls it
Recipe.content_hash  # hashes recipe sections (tests/test_recipe.py)

# rollout engines: a field every RolloutBatch carries (pinned by the engines' tests)
base.RolloutBatch.logp_includes_truncation

# vLLM calls these: the worker extension of `vllm serve` (its weight-transfer hooks) and the
# V1 logits-processor interface (names and signatures fixed by vLLM)
server_worker.HapoWorkerExtension.hapo_model_signature
server_worker.HapoWorkerExtension.hapo_reload_from_path
init_info_cls, update_info_cls, supports_draft_weight_update
init_transfer_engine, start_weight_update, update_weights, finish_weight_update
vllm_plugin._active, validate_params, add_request, apply_staged_writes
is_pin_memory, is_argmax_invariant, update_state

# FSDP2 calls a custom reduce-scatter comm's `allocate` for its buffers (torch `_fsdp_api.Comm`)
SlicedReduceScatter.allocate
