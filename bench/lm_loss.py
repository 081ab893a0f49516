"""The next-token loss through the LM head alone, forward + backward: objective.head_nll against the
checkpointed chunks it replaced (each chunk's logits recomputed in backward), in one process.

    python bench/lm_loss.py [--tokens 4096 --hidden 256 --vocab 32000 --chunk 1024 --runs 6 --frozen]

Prints each run's seconds, the medians, and the largest gradient difference between the two.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from llara_dist.model.objective import head_nll


def checkpointed(head, h, t, chunk):
    """The previous way: a chunk's logits computed in forward and again in backward."""
    def nll(x, y):
        return F.cross_entropy(head(x).float(), y, reduction="sum")
    return sum(checkpoint(nll, h[i:i + chunk], t[i:i + chunk], use_reentrant=False) for i in range(0, len(t), chunk))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--runs", type=int, default=6)
    p.add_argument("--frozen", action="store_true", help="a head that does not train (LoRA)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False).requires_grad_(not args.frozen)
    h = torch.randn(args.tokens, args.hidden, requires_grad=True)
    t = torch.randint(0, args.vocab, (args.tokens,))
    ways = {"checkpointed": checkpointed, "head_nll": head_nll}
    times, grads = {name: [] for name in ways}, {}
    for _ in range(args.runs):
        for name, way in ways.items():  # alternating: the box's load drifts
            h.grad, head.weight.grad = None, None
            start = time.perf_counter()
            way(head, h, t, args.chunk).backward()
            times[name].append(time.perf_counter() - start)
            grads[name] = [g.clone() for g in (h.grad, head.weight.grad) if g is not None]
    for name, ts in times.items():
        print(f"{name:13s} {' '.join(f'{x:.2f}' for x in ts)}  median {statistics.median(ts):.2f} s")
    diff = max(float((a - b).abs().max()) for a, b in zip(grads["checkpointed"], grads["head_nll"]))
    print(f"largest gradient difference {diff:.1e}; head_nll / checkpointed (medians) "
          f"{statistics.median(times['head_nll']) / statistics.median(times['checkpointed']):.2f}")


if __name__ == "__main__":
    main()
