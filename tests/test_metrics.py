"""Metrics: exact parameter and MAC counts on layers whose cost is known by hand; latency helpers behave."""

import torch
import torch.nn as nn

import graphopt
from graphopt.pipeline.metrics import fixed_threads


def test_param_count_counts_shared_tensors_once():
    lin = nn.Linear(10, 4)
    tied = nn.Sequential(lin, nn.ReLU(), lin)
    assert graphopt.count_params(lin) == 44
    assert graphopt.count_params(tied) == 44


def test_macs_match_hand_counts():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert graphopt.count_macs(conv, torch.randn(1, 3, 8, 8)) == 8 * 3 * 9 * 64
    assert graphopt.count_macs(nn.Linear(10, 4), torch.randn(5, 10)) == 5 * 10 * 4
    grouped = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
    assert graphopt.count_macs(grouped, torch.randn(2, 8, 4, 4)) == 2 * 8 * 9 * 16


def test_traced_graph_has_the_same_macs_as_the_model():
    from graphopt.examples.models import example_model
    model, inputs = example_model()
    assert graphopt.count_macs(graphopt.trace(model, inputs), inputs) == graphopt.count_macs(model, inputs)


def test_model_bytes():
    model = nn.Sequential(nn.Linear(10, 4), nn.BatchNorm1d(4))
    params = 44 + 8
    buffers = 4 + 4 + 1  # running mean/var (float32) and num_batches_tracked (int64)
    assert graphopt.model_bytes(model) == 4 * params + 4 * 8 + 8 * (buffers - 8)


def test_latency_helpers_time_interleaved_and_restore_threads():
    before = torch.get_num_threads()
    calls = []
    lat = graphopt.paired_latency({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                  warmup=2, repeats=5, threads=1)
    assert calls[4:] == ["a", "b"] * 5  # after 2 warmups each, rounds alternate
    assert lat["a"].runs == 5 and lat["a"].median_ms >= 0 and lat["a"].p10_ms <= lat["a"].p90_ms
    assert torch.get_num_threads() == before
    single = graphopt.measure_latency(lambda: torch.ones(100).sum(), repeats=7)
    assert single.runs == 7 and single.median_ms > 0
    with fixed_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
