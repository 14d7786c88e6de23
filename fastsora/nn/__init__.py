"""Drop-in nn.Modules backed by fastsora's ops."""
from .lfq import LFQ  # noqa: F401,E402
