"""One training step's gradients for a whole pack: batched body, loss head member by member.

The body (embedding and blocks) runs batched over all K members. The loss head — logits
E·h (B, T, V) per member, the stabilizer's transform and loss term, the cross-entropy —
is most of a small model's work and memory (V ≫ H), so it never runs over the K members'
logits at once:

- ``head_chunk > 0`` (the default) and a stabilizer the chunked head serves: member after
  member, ``train_module.chunked_loss`` — the single run's chunked head (``bench.head``), with
  that member's stabilizer — so a pack holds one chunk of one member's logits, as an unpacked
  run does, and each member's loss is its unpacked run's computation.
- otherwise (``head_chunk = 0``, or a ``loss_term`` that reads the full logits): chunks of
  members whose logits fit ``HEAD_BYTES``, the hooks vmapped over them, each chunk's forward
  immediately followed by its backward; unchunked, a K = 16 ``micro`` pack with V = 8192
  would hold 3 × 256 MiB of logits-sized buffers (logits, log-softmax, gradient) at once,
  chunked it holds 3 × 16 MiB.

The head's gradients with respect to h are then back-propagated through the body in one
batched pass. Per member this is the computation of ``train_module.stabilized_loss`` + ``backward``.
"""
from __future__ import annotations

import torch

from ..model import ModelConfig
from .batched_model import _linear, packed_features
from .hooks import PackedStabilizer
from .store import FlatParams

HEAD_BYTES = 16 << 20  # logits per head chunk on CPU: about half the L3 cache of the 2-core machine
HEAD_BYTES_CUDA = 2 << 30  # on CUDA: large enough for full-size GEMMs, small beside 80 GB


def head_chunk(n_members: int, tokens: int, vocab: int, itemsize: int = 4, cuda: bool = False) -> int:
    """Members per head chunk: as many as fit HEAD_BYTES (HEAD_BYTES_CUDA on CUDA) of logits, at least 1."""
    budget = HEAD_BYTES_CUDA if cuda else HEAD_BYTES
    return max(1, min(n_members, budget // max(tokens * vocab * itemsize, 1)))


class PackStep:
    """Computes every member's gradient of one batch into ``store.grad`` (no optimizer step)."""

    def __init__(self, mcfg: ModelConfig, store: FlatParams, stab: PackedStabilizer, e_name: str,
                 autocast, cos: torch.Tensor, sin: torch.Tensor, features=packed_features, *,
                 precision: str = "fp32", chunk: int = 0, gemm: str = "aten"):
        self.mcfg, self.store, self.stab, self.e_name = mcfg, store, stab, e_name
        self.autocast, self.cos, self.sin = autocast, cos, sin
        self.features = features  # packed_features, or its torch.compile'd version
        self.tied = mcfg.weight_tying
        self.precision = precision  # the resolved precision ``autocast`` applies (the chunked head's own GEMMs)
        self.chunk = chunk if chunk > 0 and stab.cls.chunkable() else 0  # tokens per chunk; 0: members in chunks
        self.gemm = gemm  # the library of the chunked head's products (bench.gemm); the batched body's are ATen's

    def __call__(self, x: torch.Tensor, y: torch.Tensor, n_micro: int, stats: bool):
        """Gradients of mean-over-micro-batches (ce + reg) per member for batch (x, y) of shape (B, T).

        Returns ce (K,), reg (K,) averaged over micro-batches, and when ``stats`` the last
        micro-batch's per-member logit mean, |logit| max and mean (log Z)², each (K,).
        """
        store, mcfg = self.store, self.mcfg
        params = store.params
        names = [s.name for s in store.slots]
        body_names = names[1:] + ([self.e_name] if self.tied else [])
        K, B, T, V = store.k, x.shape[0], x.shape[1], mcfg.vocab_size
        mb = B // n_micro
        kc = head_chunk(K, mb * T, V, cuda=x.device.type == "cuda")
        g_e = store.grad_columns([self.e_name])
        g_body = store.grad_columns(names[1:])
        ce_acc = reg_acc = 0.0
        out_stats = None
        for i in range(n_micro):
            xs, ys = x[i * mb:(i + 1) * mb], y[i * mb:(i + 1) * mb]
            with self.autocast:
                h = self.features(mcfg, params, xs, self.cos, self.sin)  # (K, mb·T, H)
            E = params[self.e_name].detach()
            dh = torch.empty_like(h)
            want_stats = stats and i == n_micro - 1
            if self.chunk:
                ces, regs, st = self._head_by_member(h, E, ys, n_micro, dh, g_e, i > 0, want_stats)
            else:
                ces, regs, st = self._head_by_member_chunk(h, E, ys, n_micro, kc, dh, g_e, i > 0, want_stats)
            leaves = [params[n] for n in body_names]
            grads = torch.autograd.grad(h, leaves, grad_outputs=dh)
            if self.tied:  # the token embedding is E: its body gradient adds to the head's
                *grads, g_wte = grads
                g_e += g_wte.reshape(K, -1)
            FlatParams.write_grads(g_body, list(grads), add=i > 0)
            ce_acc = ce_acc + torch.cat(ces) / n_micro
            reg_acc = reg_acc + torch.cat(regs) / n_micro
            if st:
                out_stats = torch.cat(st)
        return ce_acc, reg_acc, out_stats

    def _head_by_member(self, h, E, ys, n_micro, dh, g_e, add, want_stats):
        """The chunked head (``train_module.chunked_loss``), one member at a time, with its own stabilizer:
        h (K, mb·T, H), E (K, V, H), ys (mb, T). Writes ∂/∂h into dh and ∂/∂E into g_e (added when ``add``);
        returns per-member ce, reg (1,) each and, when ``want_stats``, stats rows (1, 3)."""
        from ..train_module import chunked_loss

        mb, T = ys.shape
        ces, regs, st = [], [], []
        for j, stab in enumerate(self.stab.members):
            hj = h[j].detach().requires_grad_()
            Ej = E[j].requires_grad_()
            out = chunked_loss(stab, hj.view(mb, T, -1), Ej, ys, chunk=self.chunk, precision=self.precision,
                               stats=want_stats, gemm=self.gemm)
            gh, gE = torch.autograd.grad(out.total / n_micro, [hj, Ej])
            dh[j] = gh
            FlatParams.write_grads(g_e[j:j + 1], [gE.unsqueeze(0)], add=add)
            ces.append(out.ce.reshape(1))
            regs.append(out.reg.reshape(1))
            if want_stats:  # [mean logit, max |logit|, mean (log Z)²], as the member-chunked path computes them
                st.append(out.logit_summary(E.shape[1]).unsqueeze(0))
        return ces, regs, st

    def _head_by_member_chunk(self, h, E, ys, n_micro, kc, dh, g_e, add, want_stats):
        """The unchunked head over chunks of ``kc`` members, the hooks vmapped over each chunk (see the module
        docstring); arguments and results as ``_head_by_member``'s, per chunk of members."""
        K, (mb, T), V = h.shape[0], ys.shape, E.shape[1]
        ces, regs, st = [], [], []
        for c0 in range(0, K, kc):
            rows = slice(c0, min(c0 + kc, K))
            hc = h[rows].detach().requires_grad_()
            Ec = E[rows].requires_grad_()
            with self.autocast:
                logits = _linear(hc, Ec)
            n = logits.shape[0]
            ce, reg, lt, lse = self.stab.loss(logits.view(n, mb, T, V), hc.view(n, mb, T, -1), Ec, ys, rows)
            gh, gE = torch.autograd.grad(((ce + reg) / n_micro).sum(), [hc, Ec])
            dh[rows] = gh
            FlatParams.write_grads(g_e[rows], [gE], add=add)
            ces.append(ce.detach())
            regs.append(reg.detach())
            if want_stats:
                with torch.no_grad():
                    st.append(torch.stack([lt.mean(dim=(1, 2, 3)), lt.abs().amax(dim=(1, 2, 3)),
                                           lse.square().mean(dim=(1, 2))], dim=1))
            del logits, lt, lse, ce, reg
        return ces, regs, st
