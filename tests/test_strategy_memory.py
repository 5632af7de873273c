"""DeepSpeed's buffer sizes (`zero_memory.zero_buckets`): filled from the model's hidden size where
the config leaves them out or says `auto`, never over a value the user set."""

from types import SimpleNamespace

from hapo_cli.learner.zero_memory import zero_buckets


def _model(hidden):
    return SimpleNamespace(config=SimpleNamespace(hidden_size=hidden))


def test_zero3_buckets_come_from_hidden_size_unless_set():
    cfg = {"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto",
                                 "stage3_param_persistence_threshold": 123}}
    zero_buckets(cfg, _model(100))
    assert cfg["zero_optimization"] == {
        "stage": 3,
        "reduce_bucket_size": 10_000,  # 100 * 100
        "allgather_bucket_size": 10_000,
        "stage3_prefetch_bucket_size": 9_000,  # 0.9 * 100 * 100
        "stage3_param_persistence_threshold": 123,  # the user's value stays
    }


def test_zero2_gets_no_stage3_keys_and_a_model_without_hidden_size_nothing():
    cfg = {"zero_optimization": {"stage": 2}}
    zero_buckets(cfg, _model(64))
    assert cfg["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 4096,
                                        "allgather_bucket_size": 4096}
    cfg = {"zero_optimization": {"stage": 3}}
    zero_buckets(cfg, SimpleNamespace())
    assert cfg == {"zero_optimization": {"stage": 3}}
