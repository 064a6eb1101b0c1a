"""Every torch custom op of genkernels: schemas, real implementations and fake (meta)
implementations, in one place. The ops work under ``torch.compile`` and pass
``torch.library.opcheck``; the public functions in the op modules call them through
``torch.ops.genkernels``."""
from __future__ import annotations

import torch
from torch import Tensor

from . import merge as _merge


@torch.library.custom_op("genkernels::merge_attention_states", mutates_args=())
def merge_attention_states(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    return _merge.merge_pair_impl(out_a, lse_a, out_b, lse_b)


merge_attention_states.register_fake(_merge.merge_pair_fake)


@torch.library.custom_op("genkernels::merge_attention_states_n", mutates_args=())
def merge_attention_states_n(outs: Tensor, lses: Tensor) -> tuple[Tensor, Tensor]:
    return _merge.merge_stacked_impl(outs, lses)


merge_attention_states_n.register_fake(_merge.merge_stacked_fake)
