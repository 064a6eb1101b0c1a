"""merge_attention_states as a torch op (opcheck, torch.compile) and its input validation."""
from __future__ import annotations

import pytest
import torch

import genkernels as gk


def _pair(dtype=torch.float32, shape=(2, 3, 4, 16)):
    b, s, h, d = shape
    return torch.randn(shape).to(dtype), torch.randn(b, h, s), torch.randn(shape).to(dtype), torch.randn(b, h, s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_pair(dtype):
    torch.library.opcheck(torch.ops.genkernels.merge_attention_states, _pair(dtype))


def test_opcheck_stacked():
    torch.library.opcheck(torch.ops.genkernels.merge_attention_states_n, (torch.randn(3, 2, 5, 4, 8), torch.randn(3, 2, 4, 5)))


def test_torch_compile_fullgraph():
    def f(oa, la, ob, lb):
        out, lse = gk.merge_attention_states(oa * 2, la, ob, lb)
        return out + 1, lse

    args = _pair()
    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    got = compiled(*args)
    want = f(*args)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def test_outputs_do_not_alias_inputs():
    oa, la, ob, lb = _pair()
    out, lse = gk.merge_attention_states_n(oa.unsqueeze(0), la.unsqueeze(0))
    assert out.data_ptr() != oa.data_ptr()
    torch.testing.assert_close(out, oa)


BAD_CASES = [
    ("out_a", lambda oa, la, ob, lb: (oa[..., 0], la, ob, lb), ValueError, "out_a must have 4 dimensions"),
    ("lse_a", lambda oa, la, ob, lb: (oa, la.double(), ob, lb), TypeError, "lse_a must have dtype float32"),
    ("lse_b", lambda oa, la, ob, lb: (oa, la, ob, lb.transpose(1, 2)), ValueError, "lse_b must have shape"),
    ("out_b", lambda oa, la, ob, lb: (oa, la, ob[:, :2], lb[:, :, :2]), ValueError, "out_b must have shape"),
    ("out_b dtype", lambda oa, la, ob, lb: (oa, la, ob.half(), lb), TypeError, "out_b has dtype"),
    ("int out", lambda oa, la, ob, lb: (oa.int(), la, ob.int(), lb), TypeError, "out_a must have dtype"),
    ("last dim", lambda oa, la, ob, lb: (oa.transpose(2, 3).contiguous().transpose(2, 3), la, ob, lb), ValueError, "contiguous last dimension"),
    ("not tensor", lambda oa, la, ob, lb: (oa.tolist(), la, ob, lb), TypeError, "out_a must be a torch.Tensor"),
    ("meta", lambda oa, la, ob, lb: (oa, la, ob.to("meta"), lb), ValueError, "out_b"),
]


@pytest.mark.parametrize("name,mutate,exc,msg", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_raises_naming_the_argument(name, mutate, exc, msg):
    with pytest.raises(exc, match=msg):
        gk.merge_attention_states(*mutate(*_pair()))


def test_stacked_bad_inputs():
    with pytest.raises(ValueError, match="outs must have 5 dimensions"):
        gk.merge_attention_states_n(torch.randn(2, 3, 4, 5), torch.randn(2, 3, 5, 4))
    with pytest.raises(ValueError, match="at least one partial"):
        gk.merge_attention_states_n(torch.randn(0, 1, 2, 3, 4), torch.randn(0, 1, 3, 2))
    with pytest.raises(ValueError, match="lses must have shape"):
        gk.merge_attention_states_n(torch.randn(2, 1, 2, 3, 4), torch.randn(3, 1, 3, 2))


def test_native_rechecks_sizes():
    """The C++ entry point refuses impossible problems itself (ValueError), not only Python."""
    from genkernels import _native

    with pytest.raises(ValueError, match="at least one partial"):
        _native._C.merge_attention_states(0, 0, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 8, *([0] * 12), 1, 1, 0, 1)
    with pytest.raises(ValueError, match="unknown dtype"):
        _native._C.merge_attention_states(0, 7, 1, 1, 1, 1, 2, 0, 0, 1, 1, 1, 8, *([0] * 12), 1, 1, 0, 1)
    with pytest.raises(ValueError, match="null pointer"):
        _native._C.merge_attention_states(0, 0, 0, 0, 0, 0, 2, 0, 0, 1, 1, 1, 8, *([0] * 12), 0, 0, 0, 1)


def test_out_buffers_are_written_in_place():
    oa, la, ob, lb = _pair(torch.bfloat16)
    want_out, want_lse = gk.merge_attention_states(oa, la, ob, lb)
    out = torch.full_like(want_out, float("nan"))
    lse = torch.full_like(want_lse, float("nan"))
    got_out, got_lse = gk.merge_attention_states(oa, la, ob, lb, out=out, lse_out=lse)
    assert got_out is out and got_lse is lse
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    outs, lses = torch.stack([oa, ob]), torch.stack([la, lb])
    out2 = torch.empty_like(want_out)
    got2, lse2 = gk.merge_attention_states_n(outs, lses, out=out2)
    assert got2 is out2 and torch.equal(out2, want_out) and torch.equal(lse2, want_lse)


def test_out_buffer_validation():
    oa, la, ob, lb = _pair()
    with pytest.raises(ValueError, match="out must have shape"):
        gk.merge_attention_states(oa, la, ob, lb, out=torch.empty(2, 3, 4, 8))
    with pytest.raises(TypeError, match="out has dtype"):
        gk.merge_attention_states(oa, la, ob, lb, out=torch.empty_like(oa, dtype=torch.half))
    with pytest.raises(ValueError, match="out must be contiguous"):
        gk.merge_attention_states(oa, la, ob, lb, out=torch.empty(2, 4, 3, 16).transpose(1, 2))
    with pytest.raises(ValueError, match="out overlaps the memory of out_a"):
        gk.merge_attention_states(oa, la, ob, lb, out=oa)
    with pytest.raises(TypeError, match="lse_out must have dtype float32"):
        gk.merge_attention_states(oa, la, ob, lb, lse_out=torch.empty(2, 4, 3, dtype=torch.float64))


def test_opcheck_out_variant():
    oa, la, ob, lb = _pair()
    out, lse = torch.empty_like(oa), torch.empty_like(la)
    torch.library.opcheck(torch.ops.genkernels.merge_attention_states_out, (oa, la, ob, lb, out, lse))
