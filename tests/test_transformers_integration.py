"""attn_implementation="genkernels" in Hugging Face transformers models (random small configs:
no model hub here).

Reference: the same model in float64 with eager attention, each sequence run on its own without
padding (transformers' float64 eager path turns left-padded rows into NaN). Baseline (tolerance
rule): the padded batch in the test dtype with SDPA (eager for Gemma 2's softcap), which runs
every other op exactly as ours does."""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import genkernels.integrations.transformers as gkt  # noqa: E402
from genkernels.testing import assert_close  # noqa: E402

gkt.register()

VOCAB = 97


def _config(kind: str):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    if kind == "llama":  # GQA groups of 4
        return transformers.LlamaConfig(**common)
    if kind == "mistral":  # sliding window shorter than the sequences
        return transformers.MistralConfig(**common, sliding_window=5)
    if kind == "qwen2_mqa":  # MQA, q/k/v biases
        return transformers.Qwen2Config(**{**common, "num_key_value_heads": 1})
    if kind == "gemma2":  # logit softcap, sliding and global layers alternating, head_dim 16
        return transformers.Gemma2Config(**{**common, "head_dim": 16}, sliding_window=4, attn_logit_softcapping=7.0,
                                         final_logit_softcapping=None, query_pre_attn_scalar=16)  # fmt: skip
    raise AssertionError(kind)


_MODELS: dict = {}


def _model(kind: str, impl: str, dtype: torch.dtype):
    key = (kind, impl, dtype)
    if key not in _MODELS:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(_config(kind), attn_implementation="eager").eval()
        # initialise visibly away from tiny weights so that attention is not near-uniform
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0, 0.2)
        model = model.to(dtype)
        model.set_attn_implementation(impl)
        model.generation_config.eos_token_id = None  # always generate every step (no early stop)
        _MODELS[key] = model
    return _MODELS[key]


def _batch(padding: str, batch: int = 3, length: int = 13, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    pads = [0, 4, 9][:batch]
    for b, n in enumerate(pads):
        if padding == "left" and n:
            mask[b, :n] = 0
        elif padding == "right" and n:
            mask[b, length - n:] = 0
    return ids, mask


def _logits(kind, impl, dtype, **inputs):
    with torch.no_grad():
        return _model(kind, impl, dtype)(**inputs).logits


def _reference(kind, ids, mask):
    """float64 eager logits of each sequence's valid tokens run on its own (no padding at all),
    flattened in the order of ``mask.bool()``."""
    rows = [_logits(kind, "eager", torch.float64, input_ids=ids[b][mask[b].bool()][None])[0]
            for b in range(ids.shape[0])]  # fmt: skip
    return torch.cat(rows)


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2_mqa", "gemma2"])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_forward_matches_reference(kind, padding, dtype):
    ids, mask = _batch(padding)
    # positions count valid tokens only, as generate() computes them
    inputs = dict(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    if padding == "none":
        inputs = dict(input_ids=ids)
    out = _logits(kind, gkt.NAME, dtype, **inputs)
    base = _logits(kind, "eager" if kind == "gemma2" else "sdpa", dtype, **inputs)
    valid = mask.bool()  # padded positions' outputs are not defined by either implementation
    assert_close(f"{kind}/{padding}", out[valid].float(), _reference(kind, ids, mask), base[valid])


def _generate(kind, impl, dtype, cache, **inputs):
    with torch.no_grad():
        return _model(kind, impl, dtype).generate(
            **inputs, max_new_tokens=9, do_sample=False, output_logits=True, return_dict_in_generate=True,
            cache_implementation=cache, pad_token_id=0,
        )  # fmt: skip


@pytest.mark.parametrize("kind", ["llama", "mistral", "gemma2"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("padding", ["none", "left"])
def test_generate_matches_reference(kind, cache, padding):
    """Greedy generation: the decoding steps run the decode kernel over the model's own cache
    (left padding through one-token pages); every step's logits against the float64 model."""
    ids, mask = _batch(padding, length=11)
    inputs = dict(input_ids=ids, attention_mask=mask)
    out = _generate(kind, gkt.NAME, torch.float32, cache, **inputs)
    base = _generate(kind, "eager" if kind == "gemma2" else "sdpa", torch.float32, cache, **inputs)
    # reference: each sequence on its own, unpadded, in float64
    refs = [_generate(kind, "eager", torch.float64, cache, input_ids=ids[b][mask[b].bool()][None]) for b in range(3)]
    new_tokens = out.sequences[:, ids.shape[1]:]
    assert torch.equal(new_tokens, torch.cat([r.sequences[:, -new_tokens.shape[1]:] for r in refs]))
    ref_logits = torch.cat([torch.stack(r.logits) for r in refs], 1)
    assert_close(f"{kind}/{cache}/{padding}", torch.stack(out.logits), ref_logits, torch.stack(base.logits))


def _count_calls(monkeypatch):
    calls = {"decode": 0, "decode_paged": 0, "flash": 0, "varlen": 0}

    def wrap(name, fn):
        def counted(*args, **kwargs):
            calls[name + ("_paged" if kwargs.get("block_table") is not None else "")] += 1
            return fn(*args, **kwargs)

        return counted

    monkeypatch.setattr(gkt, "decode_attention", wrap("decode", gkt.decode_attention))
    monkeypatch.setattr(gkt, "flash_attention", wrap("flash", gkt.flash_attention))
    monkeypatch.setattr(gkt, "flash_attention_varlen", wrap("varlen", gkt.flash_attention_varlen))
    return calls


@pytest.mark.parametrize("padding", ["none", "left"])
def test_generate_runs_the_kernels(monkeypatch, padding):
    """Prefill through the flash kernel (varlen when padded), every later step through the decode
    kernel (paged over one-token pages when padded): no call falls back to anything else."""
    calls = _count_calls(monkeypatch)
    ids, mask = _batch(padding, length=11)
    _generate("llama", gkt.NAME, torch.float32, "dynamic", input_ids=ids, attention_mask=mask)
    layers, steps = 2, 9
    if padding == "none":
        assert calls == {"decode": layers * (steps - 1), "decode_paged": 0, "flash": layers, "varlen": 0}
    else:
        assert calls == {"decode": 0, "decode_paged": layers * (steps - 1), "flash": 0, "varlen": layers}


def test_chunked_decoding_with_cache():
    """Several new tokens at once against a filled cache (speculative / chunked decoding): the
    decode kernel with bottom-right causal masking, left padding included."""
    ids, mask = _batch("left", length=15)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    outs = {}
    for impl in (gkt.NAME, "sdpa"):
        model = _model("llama", impl, torch.float32)
        with torch.no_grad():
            first = model(input_ids=ids[:, :11], attention_mask=mask[:, :11], position_ids=pos[:, :11], use_cache=True)
            outs[impl] = model(input_ids=ids[:, 11:], attention_mask=mask, position_ids=pos[:, 11:],
                               past_key_values=first.past_key_values).logits  # fmt: skip
    # reference: each sequence's valid tokens in one float64 forward; its last 4 positions
    ref = torch.stack([_logits("llama", "eager", torch.float64, input_ids=ids[b][mask[b].bool()][None])[0, -4:]
                       for b in range(3)])  # fmt: skip
    assert_close("chunk", outs[gkt.NAME], ref, outs["sdpa"])


def test_packed_sequences_match_separate_runs():
    """One row holding two sequences (position_ids restarting at 0, as transformers' flattening
    collator packs them) equals the two sequences run on their own."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(1, VOCAB, (1, 7), generator=g), torch.randint(1, VOCAB, (1, 5), generator=g)
    packed_ids = torch.cat((a, b), 1)
    position_ids = torch.cat((torch.arange(7), torch.arange(5)))[None]
    out = _logits("llama", gkt.NAME, torch.float32, input_ids=packed_ids, position_ids=position_ids)
    ref = torch.cat([_logits("llama", "eager", torch.float64, input_ids=x) for x in (a, b)], 1)
    base = torch.cat([_logits("llama", "sdpa", torch.float32, input_ids=x) for x in (a, b)], 1)
    assert_close("packed", out, ref, base)


def test_unsupported_inputs_raise():
    model = _model("llama", gkt.NAME, torch.float32)
    ids, mask = _batch("none")
    holed = mask.clone()
    holed[0, 5] = 0
    with pytest.raises(ValueError, match="not one run per sequence"):
        _logits("llama", gkt.NAME, torch.float32, input_ids=ids, attention_mask=holed)
    with pytest.raises(ValueError, match="output_attentions"):
        with torch.no_grad():
            model(input_ids=ids, output_attentions=True)
    # right padding with a cache: the new tokens would not be the last of each sequence
    right = _batch("right", length=11)[1]
    with torch.no_grad():
        first = model(input_ids=ids[:, :11], attention_mask=right, use_cache=True)
        with pytest.raises(ValueError, match="right padding with a cache"):
            model(input_ids=ids[:, 11:12], attention_mask=torch.cat((right, right[:, -1:]), 1),
                  past_key_values=first.past_key_values)  # fmt: skip
    q = torch.zeros(1, 8, 3, 8)
    kv = torch.zeros(1, 2, 3, 8)
    module = torch.nn.Module()
    module.train()
    with pytest.raises(ValueError, match="dropout"):
        gkt.attention_forward(module, q, kv, kv, None, dropout=0.1)
    with pytest.raises(ValueError, match="s_aux"):
        gkt.attention_forward(module.eval(), q, kv, kv, None, s_aux=torch.zeros(8))
    with pytest.raises(ValueError, match="attention_mask must be a 2-D padding mask"):
        gkt.attention_forward(module, q, kv, kv, torch.ones(1, 1, 3, 3, dtype=torch.bool))


def test_padding_mask_builder():
    full = torch.ones(2, 6, dtype=torch.bool)
    assert gkt.padding_mask(2, 1, 6, attention_mask=full) is None
    # no padding: None while the keys are exactly the filled ones (a dynamic cache, or no cache)
    assert gkt.padding_mask(2, 6, 6, attention_mask=None) is None
    assert gkt.padding_mask(2, 1, 6, q_offset=5, attention_mask=None) is None
    # a StaticCache's 8 slots with 6 filled: the mask bounds the keys to those 6
    assert torch.equal(gkt.padding_mask(2, 1, 8, q_offset=torch.tensor(5), attention_mask=None), full)
    # a sliding layer's keys start at kv_offset
    assert torch.equal(gkt.padding_mask(2, 1, 8, q_offset=9, kv_offset=4, attention_mask=None), full)
    with pytest.raises(ValueError, match="model-specific mask"):
        gkt.padding_mask(2, 6, 6, attention_mask=None, use_vmap=True)
    left = full.clone()
    left[0, :2] = False
    assert torch.equal(gkt.padding_mask(2, 1, 6, attention_mask=left), left)
    # a StaticCache's keys outrun the mask: the mask is kept to bound them
    assert torch.equal(gkt.padding_mask(2, 1, 8, attention_mask=full), full)
    # a sliding layer's shorter key range: the mask's last kv_length columns (all valid here)
    assert gkt.padding_mask(2, 1, 4, attention_mask=left) is None
    assert torch.equal(gkt.padding_mask(2, 1, 5, attention_mask=left), left[:, -5:])


@pytest.mark.parametrize("inference", [False, True])
def test_mask_analysis_follows_in_place_edits(inference):
    """The mask analysis and page table kept for the next layers are not reused for a mask edited
    in place (nor for a new mask): each call equals a call with nothing kept."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, h, n, 16, generator=g) for h, n in ((8, 1), (2, 9), (2, 9)))
    module = torch.nn.Module().eval()
    with torch.inference_mode(inference):
        mask = torch.ones(2, 9, dtype=torch.bool)
        mask[1, :3] = False
        first = gkt.attention_forward(module, q, k, v, mask)[0]
        mask[1, :3] = True
        mask[0, :5] = False  # the same object, other padding
        second = gkt.attention_forward(module, q, k, v, mask)[0]
        gkt._last_runs[:] = [None, None]
        gkt._last_pages[0] = None
        fresh = gkt.attention_forward(module, q, k, v, mask.clone())[0]
    assert torch.equal(second, fresh)
    assert not torch.equal(first, second)


def _teacher_forced(model, ids, mask, continuation, cache: str):
    """Logits of each continuation token's prediction: the prompt in one forward, then the
    continuation one token per step through the cache (the last token's logits each time)."""
    batch, n = ids.shape
    steps = continuation.shape[1]
    if cache == "static":
        past = transformers.StaticCache(config=model.config, max_cache_len=n + steps)
    else:
        past = transformers.DynamicCache(config=model.config)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=True)
        logits = [out.logits[:, -1]]
        for j in range(steps - 1):
            mask = torch.cat((mask, torch.ones(batch, 1, dtype=mask.dtype)), 1)
            pos = pos[:, -1:] + 1
            out = model(input_ids=continuation[:, j:j + 1], attention_mask=mask, position_ids=pos, past_key_values=past,
                        use_cache=True)  # fmt: skip
            logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


@pytest.mark.emulated
def test_integration_on_the_cuda_kernels_emulated():
    """The CUDA kernels (run by the emulator) behind the integration's views of the model's
    tensors: bf16, head dim 64, GQA groups of 2; prefill through the flash kernel (varlen when
    padded), decoding steps through the decode kernel (paged over one-token pages when padded),
    dynamic and static caches, against the float64 model run on each sequence alone."""
    from genkernels.testing import emulate_cuda, has_emulation

    if not has_emulation():
        pytest.skip("built without emulation")
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=64)  # fmt: skip
    torch.manual_seed(0)
    ref_model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in ref_model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    models = {}
    for impl in (gkt.NAME, "sdpa"):
        # (a config of its own: models made from one config object share its attention choice)
        models[impl] = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=impl)
        models[impl].load_state_dict(ref_model.state_dict())
        models[impl].eval().to(torch.bfloat16)
    assert [m.config._attn_implementation for m in models.values()] == [gkt.NAME, "sdpa"]
    ref_model.to(torch.float64)
    g = torch.Generator().manual_seed(7)
    continuation = torch.randint(1, VOCAB, (3, 4), generator=g)
    for padding in ("none", "left"):
        ids, mask = _batch(padding, length=11)
        ref = torch.stack([
            ref_model(input_ids=torch.cat((ids[b][mask[b].bool()], continuation[b, :-1]))[None]).logits[0, -4:]
            for b in range(3)
        ]).detach()  # fmt: skip
        for cache in ("dynamic", "static"):
            base = _teacher_forced(models["sdpa"], ids, mask, continuation, cache)
            with emulate_cuda():
                out = _teacher_forced(models[gkt.NAME], ids, mask, continuation, cache)
            assert_close(f"emulated/{padding}/{cache}", out.float(), ref, base)


@pytest.mark.parametrize("kind", ["self", "cross"])
def test_non_causal_attention_with_padding(kind):
    """Encoder self-attention (right padding) and cross-attention to padded encoder states
    (``module.is_causal = False``): every valid query attends to every valid key."""
    g = torch.Generator().manual_seed(11)
    batch, heads_q, heads_kv, d = 3, 4, 2, 16
    q_len, kv_len = (9, 9) if kind == "self" else (5, 9)
    q = torch.randn(batch, heads_q, q_len, d, generator=g)
    k, v = (torch.randn(batch, heads_kv, kv_len, d, generator=g) for _ in range(2))
    mask = torch.ones(batch, kv_len, dtype=torch.bool)
    mask[1, 6:] = False  # right padding
    mask[2, :4] = False  # left padding
    module = torch.nn.Module().eval()
    module.is_causal = False
    out = gkt.attention_forward(module, q, k, v, mask)[0]
    rep = heads_q // heads_kv
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1), attn_mask=mask[:, None, None, :]
    ).transpose(1, 2)  # fmt: skip
    rows = mask if kind == "self" else torch.ones(batch, q_len, dtype=torch.bool)  # the valid queries
    assert_close(f"non-causal/{kind}", out[rows], ref[rows])


def test_torch_compile_generate():
    """A compiled forward (graph breaks where the mask is analysed) generates what eager does:
    left-padded batch, static cache (prefill through varlen, steps through the paged decode)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config("llama"), attn_implementation=gkt.NAME).eval()
    model.generation_config.eos_token_id = None
    ids, mask = _batch("left", length=11)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                  cache_implementation="static", output_logits=True, return_dict_in_generate=True)  # fmt: skip
    with torch.no_grad():
        want = model.generate(**kwargs)
        model.forward = torch.compile(model.forward)
        got = model.generate(**kwargs)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), rtol=1e-5, atol=1e-5)
