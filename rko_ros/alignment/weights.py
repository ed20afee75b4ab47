"""RPO/RKO similarity weights from observation embeddings of the frozen reference encoder.

W[i, j] = softmax_j(cos(z_w_i, z_l_j) / tau): rows are winners (desirable), columns losers. The
embeddings are detached and the weights carry no gradient: they say how much two samples are about
the same situation, they are not something to optimise. The trainer passes embeddings centred on
the labelled windows' mean (FinetuneConfig.center_embeddings): raw global conditions share a
large common part, their cosines all sit near 1 and the softmax at tau 0.15 hardly varies.
Imports torch only.
"""
import torch
import torch.nn.functional as F


def similarity_matrix(z_w, z_l, tau=0.15):
    """(Mw, D), (Ml, D) -> W (Mw, Ml), rows summing to 1."""
    if tau <= 0:
        raise ValueError(f'tau={tau} must be > 0 (DESIGN default 0.15)')
    z_w = F.normalize(z_w.detach().float(), dim=-1)
    z_l = F.normalize(z_l.detach().float(), dim=-1)
    return torch.softmax(z_w @ z_l.T / tau, dim=1)


def rko_weights(z, q, tau=0.15):
    """Per-sample stop-gradient weights for a batch with labels q (+1 winner, -1 loser).

    Winner i: s_i = 1 + max_j W[i, j] (more weight where a close undesirable example exists);
    loser j: s_j = sum_i W[i, j] (how strongly desirable samples point at it).
    A batch without both classes gets weight 1 everywhere (the KTO loss).
    """
    s = torch.ones(len(q), dtype=torch.float32, device=z.device)
    winners, losers = q > 0, q < 0
    if winners.any() and losers.any():
        W = similarity_matrix(z[winners], z[losers], tau)
        s[winners] = 1.0 + W.max(dim=1).values
        s[losers] = W.sum(dim=0)
    return s.detach()
