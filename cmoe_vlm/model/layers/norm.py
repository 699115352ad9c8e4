"""RMSNorm."""
import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Computed in fp32 (fp64 for fp64 inputs), returned in x's dtype; one fused op. (The dtype
        checks skip no-op `.to` calls: at decode a norm is a few µs and each call costs ~1 µs.)"""
        work = torch.promote_types(x.dtype, torch.float32)
        if x.dtype == work and self.weight.dtype == work:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return F.rms_norm(x.to(work), self.weight.shape, self.weight.to(work), self.eps).to(x.dtype)
