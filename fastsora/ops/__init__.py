"""Functional ops: torch.library custom ops with fake implementations and registered autograd.

Each family's op module dispatches through :func:`fastsora.backend.select_backend` to its Triton launcher
(``fastsora.kernels.<family>``) or to its torch reference (``fastsora.reference.<family>``).
"""
from .causal_conv3d import causal_conv3d  # noqa: F401
from .lfq import lfq, lfq_code_sums, lfq_codebook_entropy, lfq_entropy_of_sums, lfq_quantize  # noqa: F401,E402
from .varlen_attention import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func,  # noqa: F401
                               flash_attn_varlen_func, flash_attn_varlen_kvpacked_func,
                               flash_attn_varlen_qkvpacked_func, memory_efficient_attention, varlen_attention)
from .varlen_attention_bias import (BlockDiagonalCausalFromBottomRightMask, BlockDiagonalCausalMask,  # noqa: F401
                                    BlockDiagonalCausalLocalAttentionFromBottomRightMask,
                                    BlockDiagonalCausalLocalAttentionMask, BlockDiagonalMask,
                                    LocalAttentionFromBottomRightMask, LowerTriangularFromBottomRightLocalAttentionMask,
                                    LowerTriangularFromBottomRightMask, LowerTriangularMask)
from .varlen_attention_padding import (index_first_axis, index_first_axis_residual,  # noqa: F401
                                       index_put_first_axis, pad_input, unpad_input,
                                       unpad_input_for_concatenated_sequences)
