"""The benchmark timing loop: interleaved measurement (the op, its baseline and its companions
take turns batch by batch over one shared rotation of input sets), the input-set count, and how
companions are reported."""
from __future__ import annotations

import statistics

import pytest
import torch

from genkernels.bench import registry, runner, timing


def test_interleaved_turns_and_shared_rotation(monkeypatch):
    monkeypatch.setattr(timing, "MIN_BATCH_S", 0.0)  # one call per batch
    monkeypatch.setattr(timing, "SETTLE_S", 0.0)  # no untimed calls before a batch
    log = []
    fns = [lambda s, name=name: log.append((name, s)) for name in "abc"]
    sets = [(i,) for i in range(5)]
    samples = timing.measure_interleaved(fns, sets, torch.device("cpu"), repeats=4, warmup=2)
    assert [len(s) for s in samples] == [4, 4, 4] and all(t >= 0 for s in samples for t in s)
    # warm-up: two calls each, then one batch each per repeat, reversed on odd repeats
    names = "".join(n for n, _ in log)
    assert names == "aabbcc" + "abc" + "cba" + "abc" + "cba"
    # one rotation over the sets, shared by all fns: every call takes the next set
    assert [s for _, s in log] == [i % 5 for i in range(len(log))]


def test_untimed_calls_precede_each_batch(monkeypatch):
    monkeypatch.setattr(timing, "MIN_BATCH_S", 0.0)
    monkeypatch.setattr(timing, "settle_calls", lambda per_call: 2)
    log = []
    fns = [lambda s, name=name: log.append((name, s)) for name in "ab"]
    samples = timing.measure_interleaved(fns, [(i,) for i in range(3)], torch.device("cpu"), repeats=2, warmup=2)
    assert [len(s) for s in samples] == [2, 2]
    # warm-up, then per repeat and fn: two untimed calls and the timed one, in the shared rotation
    assert "".join(n for n, _ in log) == "aabb" + "aaabbb" + "bbbaaa"
    assert [s for _, s in log] == [i % 3 for i in range(len(log))]


def test_settle_calls():
    assert timing.settle_calls(10 * timing.SETTLE_S) == 0  # long calls: none
    assert timing.settle_calls(timing.SETTLE_S) == 1
    assert timing.settle_calls(timing.SETTLE_S / 4) == 4
    assert timing.settle_calls(timing.SETTLE_S * 3) == 1  # at least one below 10x
    assert timing.settle_calls(0.0) == 100_000


def test_measure_is_the_single_fn_case(monkeypatch):
    monkeypatch.setattr(timing, "MIN_BATCH_S", 0.0)
    monkeypatch.setattr(timing, "SETTLE_S", 0.0)
    calls = []
    out = timing.measure(lambda s: calls.append(s), [(0,), (1,)], torch.device("cpu"), repeats=3)
    assert len(out) == 3 and calls == [0, 1, 0, 1, 0]


def test_input_sets_span_llc_span_caches():
    llc = 32 << 20
    assert timing.input_sets_needed(32 << 20, llc) == timing.LLC_SPAN
    assert timing.input_sets_needed(1 << 30, llc) == 1
    assert timing.input_sets_needed(1, llc) == timing.MAX_INPUT_SETS
    assert timing.input_sets_needed(0, llc) == 1


def test_tensor_bytes_counts_each_byte_once():
    a, b = torch.zeros(1000), torch.zeros(10, dtype=torch.bfloat16)
    assert timing.tensor_bytes((a, b)) == 4000 + 20
    # the same tensor twice, overlapping or nested views: the memory under them, once
    assert timing.tensor_bytes((a, a, b, [a[:10], a[500:]])) == 4000 + 20
    assert timing.tensor_bytes((a[:100], a[50:200])) == 800
    assert timing.tensor_bytes((a[:100], a[200:300])) == 800  # disjoint views of one buffer
    assert timing.tensor_bytes((a.view(10, 100).t(), None, 3)) == 4000
    assert timing.tensor_bytes(()) == 0 and timing.tensor_bytes((a[:0],)) == 0


def test_contiguous_decode_sets_span_the_intended_bytes():
    """The contiguous decode inputs name k and v twice (cache and logical copy); the rotation must
    count them once."""
    from genkernels.bench.suites import decode as suite

    case = next(c for c in registry.all_cases() if c.suite == "decode" and c.op == "decode_attention"
                and c.shape == f"(1,1,{suite.HEADS_Q},{suite.HEAD_DIM}) kv{suite.HEADS_KV}x1024"
                and c.dtype == torch.bfloat16)
    inputs = case.make_inputs(torch.device("cpu"), torch.Generator().manual_seed(0))
    kv = 2 * 1024 * suite.HEADS_KV * suite.HEAD_DIM * 2
    q = suite.HEADS_Q * suite.HEAD_DIM * 2
    assert timing.tensor_bytes(inputs) == kv + q + 4


def test_rotation_spans_what_each_callable_reads():
    """A paged decode set holds the pool and its contiguous copy, and each callable reads one of
    the two: the rotation is sized on the bytes read per call (``Case.read_bytes``)."""
    from genkernels.bench.suites import decode as suite

    shape = f"(1,1,{suite.HEADS_Q},{suite.HEAD_DIM}) kv{suite.HEADS_KV}x1024"
    cases = {c.shape: c for c in registry.all_cases()
             if c.op == "decode_attention" and c.dtype == torch.bfloat16 and c.shape.startswith(shape)}
    llc = 8 << 20
    cache = 2 * 1024 * suite.HEADS_KV * suite.HEAD_DIM * 2  # 4 MiB
    for s, case in cases.items():
        assert case.read_bytes == cache
        sets = runner.build_input_sets(case, torch.device("cpu"), llc)
        assert len(sets) == timing.LLC_SPAN * llc // cache, s
        assert timing.tensor_bytes(sets[0]) >= (2 * cache if "page" in s else cache)
    assert len(cases) == 2


def test_companions_are_timed_and_reported(monkeypatch):
    monkeypatch.setattr(timing, "MIN_BATCH_S", 0.0)
    x = torch.randn(1 << 16)

    def make(device, gen):
        return (x,)

    case = registry.Case(
        suite="t", op="op", shape="s", dtype=torch.float32, make_inputs=make,
        genkernels=lambda t: t.sum(), baseline=lambda t: t.sum(), bytes_moved=x.numel() * 4, cold=False,
        companions=(registry.Companion("sum", lambda t: t.sum(), "rate"), registry.Companion("twice", lambda t: (t.sum(), t.sum()))),
    )  # fmt: skip
    row = runner.run_case(case, torch.device("cpu"), repeats=3, peaks={"copy_gbps": 10.0}, llc_bytes=32 << 20)
    ours = row["genkernels_us"]
    rate, time_ = row["companions"]
    assert (rate["label"], rate["report"], time_["report"]) == ("sum", "rate", "time")
    assert len(rate["samples_us"]) == 3
    # ratios pair the samples of one repeat (timed a batch apart), then take the median
    ours_s = row["genkernels_samples_us"]
    assert rate["ratio"] == pytest.approx(statistics.median(c / o for c, o in zip(rate["samples_us"], ours_s)))
    assert time_["ratio"] == pytest.approx(statistics.median(o / c for c, o in zip(time_["samples_us"], ours_s)))
    assert row["speedup"] == pytest.approx(statistics.median(b / o for b, o in zip(row["baseline_samples_us"], ours_s)))
    text = runner.format_table([row])
    assert "same-loop refs" in text and f"{100 * rate['ratio']:.0f}% of sum" in text and f"{time_['ratio']:.2f}x twice" in text
    # tables without companions keep their columns
    assert "same-loop refs" not in runner.format_table([{**row, "companions": []}])


def test_paired_ratio():
    # the op twice as slow as its reference in two repeats of three, with the machine's speed
    # changing between repeats: the paired median is 2x, the ratio of the two medians 0.4x
    num, den = [2.0, 4.0, 30.0], [1.0, 10.0, 15.0]
    assert timing.paired_ratio(num, den) == 2.0
    assert timing.median(num) / timing.median(den) == pytest.approx(0.4)
    assert timing.paired_ratio([3.0, 1.0, 8.0], [1.0, 1.0, 1.0]) == 3.0
    with pytest.raises(ValueError, match="equal"):
        timing.paired_ratio([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="equal"):
        timing.paired_ratio([], [])


def test_companion_report_is_checked():
    with pytest.raises(ValueError, match="report"):
        registry.Companion("x", lambda: None, "speed")


def test_decode_cases_carry_the_read_probe_and_contiguous_refs():
    cases = {c.name: c for c in registry.select(["decode_attention"])}
    paged = cases["decode_attention/(1,1,32,128) kv8x4096 page16/bf16"]
    assert [c.label for c in paged.companions] == ["torch.sum", "contiguous"]
    assert [c.label for c in cases["decode_attention/(1,1,32,128) kv8x4096/bf16"].companions] == ["torch.sum"]
    # the probe reads exactly the cache bytes the case counts
    q, kp, vp, lens, table, k, v = paged.make_inputs(torch.device("cpu"), torch.Generator().manual_seed(0))
    assert (kp.numel() * kp.element_size()) + (vp.numel() * vp.element_size()) == paged.bytes_moved
    s = paged.companions[0].fn(q, kp, vp, lens, table, k, v)
    assert len(s) == 2 and all(t.dtype == torch.float32 for t in s)
    out = paged.companions[1].fn(q, kp, vp, lens, table, k, v)
    torch.testing.assert_close(out, paged.genkernels(q, kp, vp, lens, table, k, v), rtol=0, atol=0)


def test_append_and_rotary_cases_compare_like_with_like():
    """The append_kv_cache / apply_rotary baselines do what the ops do (same cache contents and
    lengths; the rotation within fp32 rounding), and a repeated call starts from the same lengths."""
    cases = registry.select(["append_kv_cache", "apply_rotary"])
    assert {c.op for c in cases} == {"append_kv_cache", "apply_rotary"} and len(cases) == 12
    for case in cases:
        args = case.make_inputs(torch.device("cpu"), torch.Generator().manual_seed(0))
        clone = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
        rtol = 2**-7 if case.dtype == torch.bfloat16 else 0  # one fp32 rounding apart can be one bf16 step
        if case.op == "apply_rotary":
            torch.testing.assert_close(case.genkernels(*args).float(), case.baseline(*clone).float(), rtol=rtol, atol=1e-5)
            continue
        for _ in range(2):
            case.genkernels(*args)
            case.baseline(*clone)
        k_new, v_new, k_cache, v_cache, lens, lens0 = args[:6]
        assert torch.equal(lens, clone[4]) and torch.equal(lens, lens0 + k_new.shape[1]), case.name
        assert torch.equal(v_cache, clone[3]) and v_cache.count_nonzero() == v_new.count_nonzero(), case.name
        torch.testing.assert_close(k_cache.float(), clone[2].float(), rtol=rtol, atol=1e-5)
        assert case.bytes_moved == 2 * (k_new.numel() + v_new.numel()) * k_new.element_size()


def test_bench_runs_summary():
    """scripts/bench_runs.py: per case, the median over runs of each figure, with its range."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_runs", Path(__file__).parents[1] / "scripts" / "bench_runs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def doc(us, speedup, frac, read):
        # 1 MB per call; torch.sum in the same loop took us * frac (rate ratio = frac)
        row = {"name": "op/s/fp32", "op": "op", "genkernels_us": us, "rate": 1000 / us, "rate_unit": "GB/s",
               "bytes_moved": 1_000_000, "speedup": speedup,
               "companions": [{"label": "torch.sum", "report": "rate", "ratio": frac, "us": us * frac},
                              {"label": "contiguous", "report": "time", "ratio": 1.1, "us": us * 1.1}]}
        return {"peaks": {"read_gbps": read}, "rows": [row, {**row, "name": "other/s/fp32", "op": "other"}]}

    docs = [doc(100, 2.0, 0.8, 50), doc(200, 3.0, 0.6, 70), doc(150, 2.5, 0.9, 60)]
    text = mod.summarise(docs, "op")
    assert "3 runs; read peak at the start of each: 50.0, 70.0, 60.0 GB/s" in text
    assert "| op/s/fp32 | 150 [100-200] | 6.7 GB/s [5.0-10.0] | 2.50x [2.00-3.00] |" in text
    # the reference's own rate: 1 MB in 80, 120 and 135 us
    assert "80% [60-90] of torch.sum (8 [7-12] GB/s); 1.10x [1.10-1.10] contiguous |" in text
    assert "other/s/fp32" not in text
    # --split-rate keeps the rows whose reference read below / at or above the threshold
    assert mod.reference_rate(docs[0]["rows"][0]) == pytest.approx(12.5)
    fast = mod.summarise(docs, "op", lambda r: mod.reference_rate(r) >= 10)
    assert "| op/s/fp32 | 100 | 10.0 GB/s | 2.00x | 80% of torch.sum (12 GB/s); 1.10x contiguous |" in fast


def test_hf_cases_compare_like_with_like():
    """The transformers-integration cases: genkernels' attention function and transformers' SDPA
    one return the same attention on each case's inputs (the padded ones with each side's mask),
    and the rates count the valid tokens' keys and values."""
    pytest.importorskip("transformers")
    cases = registry.select(["hf"])
    assert len(cases) == 8 and {c.op for c in cases} == {"hf_decode_attention"}
    for case in cases:
        args = case.make_inputs(torch.device("cpu"), torch.Generator().manual_seed(0))
        out, ref = case.genkernels(*args), case.baseline(*args)
        tol = 2e-2 if case.dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol, msg=case.name)
        k, mask2d = args[2], args[4]
        tokens = k.shape[0] * k.shape[2] if mask2d is None else int(mask2d.sum())
        assert case.bytes_moved == 2 * tokens * k.shape[1] * k.shape[3] * k.element_size(), case.name
