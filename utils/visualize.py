"""Pictures of retrieval results: ranked lists, CMC curves, per-query AP for best/worst picks.

Ranked list: the query (neutral blue frame) then the top-k gallery thumbnails at the model's
aspect ratio, each with its rank and distance; green frame = same identity, red = another
identity, grey dashed = same identity and same camera (ignored by the evaluation protocol),
no colour when identities are unknown. Matplotlib with the Agg backend; files are written
atomically.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from datasets.bases import read_image
from utils.fileio import atomic_write

MATCH, WRONG, IGNORED, UNKNOWN = "match", "wrong", "ignored", "unknown"
COLOURS = {MATCH: "#1a9850", WRONG: "#d73027", IGNORED: "#8c8c8c", UNKNOWN: "#bdbdbd", "query": "#2166ac"}


def _plt() -> Any:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


@dataclass
class Ranked:
    """One gallery entry of a ranked list."""

    path: str
    rank: int          # 1-based
    distance: float
    status: str = UNKNOWN   # MATCH / WRONG / IGNORED / UNKNOWN
    caption: str = ""  # e.g. the identity and camera, shown under the distance


def match_status(q_pid: int, q_cam: int, g_pid: int, g_cam: int) -> str:
    """MATCH / WRONG / IGNORED (same identity, same camera) for known ids (>= 0), else UNKNOWN."""
    if q_pid < 0 or g_pid < 0:
        return UNKNOWN
    if q_pid == g_pid:
        return IGNORED if (q_cam >= 0 and q_cam == g_cam) else MATCH
    return WRONG


def _thumb(path: str, size_hw: Sequence[int]) -> np.ndarray:
    """The image resized to ``size_hw`` (as the model sees it), or a grey tile when unreadable."""
    h, w = int(size_hw[0]), int(size_hw[1])
    try:
        img = read_image(path, retries=0).resize((w, h))
        return np.asarray(img)
    except OSError:
        return np.full((h, w, 3), 200, dtype=np.uint8)


def _frame(ax: Any, colour: str, dashed: bool = False, width: float = 5.0) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for sp in ax.spines.values():
        sp.set_visible(True)
        sp.set_edgecolor(colour)
        sp.set_linewidth(width)
        if dashed:
            sp.set_linestyle((0, (2, 1.5)))


def draw_ranked_list(query_path: str, entries: Sequence[Ranked], out_png: str, title: str = "",
                     size_hw: Sequence[int] = (256, 128), query_caption: str = "",
                     distance_name: str = "dist") -> str:
    """Write the ranked-list picture of one query; returns ``out_png``."""
    plt = _plt()
    h, w = int(size_hw[0]), int(size_hw[1])
    k = len(entries)
    tile_w = 1.25
    tile_h = tile_w * h / w
    fig_w = tile_w * (k + 1) + 0.35 + 0.3
    fig_h = tile_h + 1.25 + (0.3 if title else 0)
    fig = plt.figure(figsize=(max(fig_w, 4.5), fig_h))
    gs = fig.add_gridspec(1, k + 2, width_ratios=[1, 0.28] + [1] * k, wspace=0.12,
                          left=0.15 / fig_w, right=1 - 0.15 / fig_w,
                          top=1 - (0.55 if title else 0.15) / fig_h, bottom=0.7 / fig_h)
    ax = fig.add_subplot(gs[0, 0])
    ax.imshow(_thumb(query_path, (h, w)), aspect="auto")
    _frame(ax, COLOURS["query"], width=6)
    ax.set_xlabel("query" + (f"\n{query_caption}" if query_caption else ""), fontsize=8.5, color=COLOURS["query"],
                  fontweight="bold", labelpad=4)
    sep = fig.add_subplot(gs[0, 1])
    sep.axis("off")
    sep.axvline(0.5, color="#cccccc", lw=1)
    sep.set_xlim(0, 1)
    for i, e in enumerate(entries):
        ax = fig.add_subplot(gs[0, i + 2])
        ax.imshow(_thumb(e.path, (h, w)), aspect="auto")
        colour = COLOURS[e.status]
        _frame(ax, colour, dashed=e.status == IGNORED, width=5 if e.status != UNKNOWN else 1.5)
        label = f"#{e.rank}  {e.distance:.3f}"
        if e.caption:
            label += f"\n{e.caption}"
        if e.status == IGNORED:
            label += "\n(same cam: ignored)"
        ax.set_xlabel(label, fontsize=8, labelpad=4,
                      color="#333333" if e.status in (UNKNOWN, IGNORED) else colour,
                      fontweight="bold" if e.status in (MATCH, WRONG) else "normal")
    if title:
        fig.suptitle(title, fontsize=10, x=0.15 / fig_w, ha="left", y=1 - 0.12 / fig_h, va="top")
    _save(fig, out_png)
    plt.close(fig)
    return out_png


def plot_cmc(cmc: Sequence[float], mAP: float, out_png: str, title: str = "CMC", max_rank: int = 50,
             mINP: float | None = None) -> str:
    """CMC curve over ranks 1..max_rank with mAP and Rank-1 in the legend; returns ``out_png``."""
    plt = _plt()
    cmc = np.asarray(cmc, dtype=float)[:max_rank]
    ranks = np.arange(1, len(cmc) + 1)
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    label = f"mAP {100 * mAP:.1f}%   R1 {100 * cmc[0]:.1f}%"
    if mINP is not None:
        label += f"   mINP {100 * mINP:.1f}%"
    ax.plot(ranks, 100 * cmc, color="#2166ac", lw=2, label=label)
    ax.fill_between(ranks, 0, 100 * cmc, color="#2166ac", alpha=0.07)
    for r in (1, 5, 10):
        if r <= len(cmc):
            ax.plot([r], [100 * cmc[r - 1]], "o", color="#2166ac", ms=5)
            ax.annotate(f"R{r} {100 * cmc[r - 1]:.1f}", (r, 100 * cmc[r - 1]), textcoords="offset points",
                        xytext=(6, -12 if cmc[r - 1] > 0.15 else 6), fontsize=8, color="#333333")
    ax.set_xlim(1, max(len(cmc), 2))
    ax.set_ylim(0, 101)
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(loc="lower right", frameon=False, fontsize=9)
    fig.tight_layout()
    _save(fig, out_png)
    plt.close(fig)
    return out_png


def _save(fig: Any, path: str, dpi: int = 130) -> None:
    """Save a matplotlib figure as PNG through an atomic write."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi, facecolor="white"))


# ----------------------------------------------------------------------------- per-query AP
def ranked_indices(distmat: torch.Tensor | np.ndarray) -> np.ndarray:
    """Gallery indices of each query row by ascending distance (ties keep gallery order)."""
    d = torch.as_tensor(distmat)
    return torch.sort(d, dim=1, stable=True).indices.cpu().numpy()


def rank_queries(blocks: Iterable[tuple[int, int, torch.Tensor]], q_pids: Any, g_pids: Any, q_camids: Any,
                 g_camids: Any, topk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(AP per query, top-k gallery indices, their distances) from row blocks of the distance matrix.

    AP follows the evaluation protocol (gallery entries of the same identity and camera are
    removed; NaN when no true match is left); the top-k lists keep every entry (the pictures
    mark the removed ones). ``blocks`` yields ``(start, end, dist[start:end])``; memory stays
    at one block plus (num_query x topk).
    """
    qp, qc = torch.as_tensor(np.asarray(q_pids)), torch.as_tensor(np.asarray(q_camids))
    gp, gc = torch.as_tensor(np.asarray(g_pids)), torch.as_tensor(np.asarray(g_camids))
    nq = len(qp)
    k = min(int(topk), len(gp))
    ap = np.full(nq, np.nan)
    top_idx = np.zeros((nq, k), dtype=np.int64)
    top_dist = np.zeros((nq, k), dtype=np.float64)
    for s, e, d in blocks:
        d = d.float().cpu()
        order = torch.sort(d, dim=1, stable=True).indices
        top_idx[s:e] = order[:, :k].numpy()
        top_dist[s:e] = torch.gather(d, 1, order[:, :k]).double().numpy()
        same = gp[order] == qp[s:e, None]
        keep = ~(same & (gc[order] == qc[s:e, None]))
        hits = (same & keep).double()
        rank = keep.double().cumsum(1)              # 1-based rank among the kept entries
        prec = hits.cumsum(1) / rank.clamp(min=1)
        n_hits = hits.sum(1)
        block_ap = (prec * hits).sum(1) / n_hits.clamp(min=1)
        block_ap[n_hits == 0] = float("nan")
        ap[s:e] = block_ap.numpy()
    return ap, top_idx, top_dist


def row_blocks(distmat: torch.Tensor | np.ndarray, rows: int = 256) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(start, end, block)`` slices of a full distance matrix."""
    d = torch.as_tensor(distmat)
    for s in range(0, d.shape[0], rows):
        yield s, min(s + rows, d.shape[0]), d[s:s + rows]


def per_query_ap(distmat: torch.Tensor | np.ndarray, q_pids: Any, g_pids: Any, q_camids: Any, g_camids: Any
                 ) -> np.ndarray:
    """AP of every query with the evaluation protocol (same id + same camera removed); NaN without a match."""
    return rank_queries(row_blocks(distmat), q_pids, g_pids, q_camids, g_camids, topk=1)[0]


def evaluation_pictures(blocks: Iterable[tuple[int, int, torch.Tensor]], q_samples: Sequence[tuple],
                        g_samples: Sequence[tuple], results: dict[str, Any], out_dir: str, n: int = 10,
                        topk: int = 10, size_hw: Sequence[int] = (256, 128), dataset: str = "",
                        distance: str = "distance") -> dict[str, Any]:
    """CMC curve and the ranked lists of the ``n`` worst and ``n`` best queries by AP.

    ``blocks`` are row blocks of the query x gallery distances; ``q_samples``/``g_samples``
    are ``(path, pid, camid, ...)`` in the same order. Returns {'cmc': path, 'worst': [paths],
    'best': [paths]}.
    """
    os.makedirs(out_dir, exist_ok=True)
    title = (f"CMC — {dataset}: {len(q_samples)} queries, {len(g_samples)} gallery images"
             + (", re-ranked" if results.get("re_ranking") else ""))
    cmc_png = plot_cmc(results["cmc"], results["mAP"], os.path.join(out_dir, "cmc.png"), title=title,
                       mINP=results.get("mINP"))
    g_pids, g_cams = [s[1] for s in g_samples], [s[2] for s in g_samples]
    ap, top_idx, top_dist = rank_queries(blocks, [s[1] for s in q_samples], g_pids, [s[2] for s in q_samples],
                                         g_cams, topk)
    valid = np.flatnonzero(~np.isnan(ap))
    by_ap = valid[np.argsort(ap[valid], kind="stable")]
    out: dict[str, Any] = {"cmc": cmc_png, "worst": [], "best": []}
    for kind, picks in (("worst", by_ap[:n]), ("best", by_ap[::-1][:n])):
        for j, qi in enumerate(picks, start=1):
            qp, qpid, qcam = q_samples[qi][:3]
            entries = [Ranked(g_samples[g][0], r, float(top_dist[qi, r - 1]),
                              match_status(qpid, qcam, g_pids[g], g_cams[g]), f"id {g_pids[g]}  c{g_cams[g] + 1}")
                       for r, g in enumerate(top_idx[qi], start=1)]
            png = os.path.join(out_dir, f"{kind}_{j:02d}.png")
            draw_ranked_list(qp, entries, png, size_hw=size_hw, query_caption=f"id {qpid}  c{qcam + 1}",
                             title=f"{kind} #{j}: AP {100 * ap[qi]:.1f}%   query {os.path.basename(qp)}   "
                                   f"({distance})")
            out[kind].append(png)
    return out
