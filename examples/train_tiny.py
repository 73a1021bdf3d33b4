"""Trains a tiny causal language model on a release for a few steps, in plain PyTorch.

It shows what a model must do with the batch contract of `mmrecipe.torch` so that packing
changes nothing: attend only within a segment (a block-diagonal causal mask built from
`segment_ids`), take positions from `position_ids` (they restart at 0 in every segment),
and never predict across a segment boundary (`labels` is -100 on each segment's first
token). With `--flash` and FlashAttention installed on a CUDA machine, the same model reads
the padding-free `[1, T]` form and attends with `flash_attn_varlen_func` over `cu_seqlens`.

    recipe build recipes/demo.toml -o out/demo
    python examples/train_tiny.py out/demo --steps 10

Runs in well under 30 s on a CPU. tests/test_training_loss.py checks that this model's
loss on a packed batch equals the loss of the same samples run one by one."""

from __future__ import annotations

import argparse
import sys
import time
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from mmrecipe.torch import IGNORE_INDEX, PackedDataset, dataloader


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, L, L] boolean mask, True where query i may attend to key j: same segment and
    j <= i. Padding (segment 0) attends to padding, so no row is fully masked (which would
    give NaN), and no real token ever sees it."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(segment_ids.shape[1], segment_ids.shape[1], dtype=torch.bool, device=segment_ids.device).tril()
    return (same & causal)[:, None]


class Block(nn.Module):
    """Pre-norm transformer block: self-attention, then a GELU MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).unbind(2)
        return q, k, v  # each [B, L, H, D/H]

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.transpose(1, 2) for t in self._qkv(x))  # [B, H, L, D/H]
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.out(attn.transpose(1, 2).reshape(x.shape))
        return x + self.mlp(self.norm2(x))

    def forward_varlen(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """x is [1, T, D], the flattened form; FlashAttention keeps every segment apart."""
        from flash_attn import flash_attn_varlen_func

        q, k, v = (t[0] for t in self._qkv(x))  # [T, H, D/H]
        attn = flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True)
        x = x + self.out(attn.reshape(x.shape))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    """Token + learned position embeddings, a few blocks, a head tied to the embedding.
    Learned absolute positions (rather than rotary, which only sees distances) make the
    model depend on `position_ids` restarting per segment, so the packing test checks it."""

    def __init__(self, vocab_size: int, max_positions: int, dim: int = 64, heads: int = 4, layers: int = 2):
        super().__init__()
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, dim)
        self.position = nn.Embedding(max_positions, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        # Small embeddings: the tied head then starts near uniform (loss ≈ ln vocab_size).
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.position.weight, std=0.02)

    def _embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        if int(input_ids.max()) >= self.vocab_size:
            raise ValueError(f"token id {int(input_ids.max())} does not fit vocab_size {self.vocab_size}; pass --vocab-size")
        return self.embed(input_ids) + self.position(position_ids)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, L, dim] of a padded batch."""
        x = self._embed(input_ids, position_ids)
        mask = block_causal_mask(segment_ids)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    def forward_varlen(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """Hidden states [1, T, dim] of the flattened form, through FlashAttention varlen."""
        x = self._embed(input_ids, position_ids)
        for block in self.blocks:
            x = cast(Block, block).forward_varlen(x, cu_seqlens, max_seqlen)
        return self.norm(x)


def summed_loss(model: TinyLM, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy and the number of predicted tokens. The head runs
    only on positions with a label: most tokens have none, and the vocabulary is large."""
    h, y = hidden[:, :-1], labels[:, 1:]
    keep = y != IGNORE_INDEX
    logits = h[keep] @ model.embed.weight.T
    return F.cross_entropy(logits.float() if logits.dtype == torch.bfloat16 else logits, y[keep], reduction="sum"), int(keep.sum())


def flash_available() -> str | None:
    """None when the FlashAttention path can run, else why not."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return "flash_attn is not installed"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("release", nargs="?", default="out/demo", help="release folder (default: out/demo)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--vocab-size", type=int, default=49153, help="the tokenizer's size (default: SmolLM2's 49152 + the demo's <image> token)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flash", action="store_true", help="use flash_attn_varlen_func on CUDA over the flattened form")
    args = p.parse_args(argv)

    use_flash = False
    if args.flash:
        why = flash_available()
        if why:
            print(f"--flash skipped: {why}; training with scaled_dot_product_attention on the CPU")
        use_flash = why is None
    device = torch.device("cuda" if use_flash else "cpu")

    torch.manual_seed(args.seed)
    loader = dataloader(args.release, batch_size=args.batch_size, flatten=use_flash, shuffle=True, generator=torch.Generator().manual_seed(args.seed))
    dataset = cast(PackedDataset, loader.dataset)
    seq_len = dataset.seq_len
    model = TinyLM(args.vocab_size, seq_len).to(device)  # positions restart per segment: < seq_len
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters, {len(dataset)} sequences of ≤ {seq_len} tokens, {'flash_attn varlen' if use_flash else 'SDPA with a block-diagonal mask'} on {device}")

    step, start = 0, time.perf_counter()
    while step < args.steps:
        for batch in loader:
            ids, pos, labels = (batch[k].to(device) for k in ("input_ids", "position_ids", "labels"))
            if use_flash:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    hidden = model.forward_varlen(ids, pos, batch["cu_seqlens"].to(device), batch["max_seqlen"])
            else:
                hidden = model(ids, pos, batch["segment_ids"].to(device))
            loss, n = summed_loss(model, hidden, labels)
            opt.zero_grad()
            (loss / max(n, 1)).backward()
            opt.step()
            step += 1
            print(f"step {step:3d}  loss {loss.item() / max(n, 1):.4f}  ({n} trained tokens)")
            if step == args.steps:
                break
    print(f"{args.steps} steps in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
