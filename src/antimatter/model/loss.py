"""Cross-entropy of the output head without the full logits in memory.

The plain loss computes the (tokens x vocabulary) logits, keeps them (and their float copy) for backward,
and reads them again there: at seed-300m's micro-batch 32 that is 65,536 x 50,304 values, several GB per
pass. `linear_cross_entropy` instead walks the tokens in chunks and, for each chunk, computes the logits, the
loss, and at once the gradient of the loss with respect to the logits (softmax minus the one-hot target),
which it turns into the chunk's gradients for the hidden states and the head's weight before moving on. The
backward pass only scales those by the incoming gradient. The matmuls are the same three as the plain
forward and backward (no recomputation, unlike checkpointing the loss); the logits of one chunk are the only
ones alive. The same scheme as Liger-Kernel's fused linear cross-entropy, written with torch ops so that
torch.compile fuses each chunk's softmax, loss and gradient into a few kernels.
"""

from __future__ import annotations

import torch


def _chunked(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int, cap: float,
             chunk: int, grads: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(summed loss, its gradient for x, for weight), chunk by chunk; without `grads` the loss alone."""
    total = x.new_zeros((), dtype=torch.float32)
    grad_x, grad_w = [], torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grads else None
    padded = torch.arange(weight.shape[0], device=x.device) >= vocab_size
    for xs, ts in zip(x.split(chunk), targets.split(chunk)):
        logits = (xs @ weight.t()).float()
        if cap > 0:
            capped = torch.tanh(logits / cap)
            logits = cap * capped
        logits = logits.masked_fill(padded, float("-inf"))  # padding columns: zero probability
        valid = ts != -1
        target = ts.clamp(min=0).unsqueeze(1)
        lse = torch.logsumexp(logits, dim=-1)
        total = total + torch.where(valid, lse - logits.gather(1, target).squeeze(1), 0.0).sum()
        if not grads:
            continue
        # d(sum of losses)/d(logits) = softmax - one-hot, zero on ignored rows
        grad = torch.exp(logits - lse.unsqueeze(1)).scatter_add(1, target, torch.full_like(target, -1.0,
                                                                                           dtype=torch.float32))
        grad = grad * valid.unsqueeze(1)
        if cap > 0:
            grad = grad * (1 - capped * capped)  # through cap * tanh(z / cap)
        grad = grad.to(x.dtype)
        grad_x.append(grad @ weight)
        grad_w = grad_w + (grad.t() @ xs).float()
    if not grads:
        return total, None, None
    return total, torch.cat(grad_x), grad_w.to(weight.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int, cap: float,
                chunk: int) -> torch.Tensor:
        total, grad_x, grad_w = _chunked(x, weight, targets, vocab_size, cap, chunk, grads=True)
        ctx.save_for_backward(grad_x, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_total, grad_w * grad_total, None, None, None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                         cap: float = 0.0, chunk: int = 8192) -> torch.Tensor:
    """Summed cross-entropy of `x @ weight.T` (its first `vocab_size` columns; the rest are padding, left out)
    against `targets` (-1 = ignored), optionally soft-capped (cap * tanh(logits / cap)), `chunk` tokens at a
    time. Under autocast the matmuls run in the autocast dtype, as the plain head's would; the softmax in
    float32. Without gradients (evaluation) only the loss is computed, chunk by chunk."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(x, weight, targets, vocab_size, cap, chunk)
    return _chunked(x, weight, targets, vocab_size, cap, chunk, grads=False)[0]
