"""Drop-in nn.Modules backed by fastsora's ops."""
from .causal_conv3d import CausalConv3d  # noqa: F401
from .lfq import LFQ  # noqa: F401,E402
from .varlen_attention import VarlenAttention  # noqa: F401
