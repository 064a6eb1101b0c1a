"""The README's Python examples run as written, and do what the README says they do."""
from __future__ import annotations

import pathlib
import re

import pytest
import torch

from genkernels import reference
from genkernels.testing import assert_close

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def run_block(marker: str) -> dict:
    blocks = [b for b in python_blocks() if marker in b]
    assert len(blocks) == 1, f"expected one README example containing {marker!r}, found {len(blocks)}"
    namespace: dict = {}
    exec(compile(blocks[0], f"README.md ({marker})", "exec"), namespace)  # noqa: S102 - our own README
    return namespace


def test_every_python_block_is_checked():
    # a new example needs a test of what it claims, not only that it runs
    assert len(python_blocks()) == 2


def test_generation_loop_example():
    torch.manual_seed(0)
    ns = run_block("gk.PagedKVCache(")
    cache, seqs, q, k, out = ns["cache"], ns["seqs"], ns["q"], ns["k"], ns["out"]
    prompt, steps = 100, 8
    assert out.shape == (2, 1, 32, 128) and out.dtype == torch.bfloat16
    # the freed sequence is gone; the other one holds the prompt and every decoded token
    with pytest.raises(KeyError):
        cache.length(seqs[0])
    live = seqs[1]
    assert cache.length(live) == prompt + steps
    # its last cached key is the last step's key, rotated at its position
    positions = torch.tensor([[prompt + steps - 1]])
    want = reference.apply_rotary(k[1:2], ns["cos"], ns["sin"], positions)
    block_table, seqlens = cache.block_table([live]), cache.seqlens([live])
    last = reference.gather_kv(cache.k, prompt + steps, 0, block_table)[-1]
    # the kernel rounds its fp32 rotation once to bf16: at most one bf16 step from the rounded exact value
    torch.testing.assert_close(last.float(), want[0, 0].to(torch.bfloat16).float(), rtol=2**-7, atol=0)
    # the last step's output for that sequence is attention over everything in its cache
    want, _ = reference.decode_attention(q[1:2], cache.k, cache.v, seqlens, block_table=block_table)
    base, _ = reference.decode_attention(q[1:2], cache.k, cache.v, seqlens, block_table=block_table, dtype=q.dtype)
    assert_close("README decode example", out[1:2], want, base)  # tolerance: as test_decode's


def test_transformers_example():
    """The example generates with attn_implementation="genkernels" what SDPA generates."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    ns = run_block('attn_implementation="genkernels"')
    model, tokens = ns["model"], ns["tokens"]
    assert model.config._attn_implementation == "genkernels"
    assert tokens.shape == (2, 12 + 16)
    model.set_attn_implementation("sdpa")
    want = model.generate(input_ids=ns["prompts"], attention_mask=ns["attention_mask"], max_new_tokens=16,
                          do_sample=False, pad_token_id=0, cache_implementation="static")  # fmt: skip
    assert torch.equal(tokens, want)
