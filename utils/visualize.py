"""Pictures of retrieval results: ranked lists, CMC curves, per-query AP for best/worst picks.

Ranked list: the query (neutral blue frame) then the top-k gallery thumbnails at the model's
aspect ratio, each with its rank and distance; green frame = same identity, red = another
identity, grey dashed = same identity and same camera (ignored by the evaluation protocol),
no colour when identities are unknown. Ranked lists are drawn with Pillow (fast enough for one picture
per query of a large search), curves with matplotlib (Agg); files are written atomically.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from .distance import ranked_indices, ranking, row_blocks
from .errors import import_extra
from .fileio import atomic_write, save_figure
from .images import read_image
from .metrics import per_query_ap

# ranked_indices, row_blocks (utils.distance) and per_query_ap (utils.metrics) are offered here to the
# callers of the pictures: one ranking rule, one AP.
__all__ = ["Ranked", "match_status", "draw_ranked_list", "plot_cmc", "ranked_indices", "row_blocks", "per_query_ap",
           "rank_queries", "evaluation_pictures"]

MATCH, WRONG, IGNORED, UNKNOWN = "match", "wrong", "ignored", "unknown"
COLOURS = {MATCH: "#1a9850", WRONG: "#d73027", IGNORED: "#8c8c8c", UNKNOWN: "#bdbdbd", "query": "#2166ac"}


def _plt() -> Any:
    import_extra("matplotlib", "record").use("Agg")
    return import_extra("matplotlib.pyplot", "record")


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


TILE_HEIGHT = 256   # pixels of a thumbnail in the ranked-list picture


@functools.lru_cache(maxsize=4)
def _font(size: int, bold: bool = False) -> Any:
    """DejaVu Sans (shipped with matplotlib) at ``size`` px, or Pillow's default font."""
    from PIL import ImageFont
    try:
        from matplotlib import font_manager
        path = font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans",
                                                                 weight="bold" if bold else "normal"))
        return ImageFont.truetype(path, size)
    except (ImportError, OSError, ValueError):
        return ImageFont.load_default()


def _thumb(path: str, size_wh: tuple[int, int]) -> Image.Image:
    """The image resized to ``size_wh`` (the model's aspect ratio), or a grey tile when unreadable."""
    try:
        return read_image(path, retries=0).resize(size_wh, Image.BICUBIC)
    except OSError:
        tile = Image.new("RGB", size_wh, (215, 215, 215))
        ImageDraw.Draw(tile).text((8, 8), "unreadable", fill=(90, 90, 90), font=_font(14))
        return tile


def _rect(draw: Any, box: tuple[int, int, int, int], colour: str, width: int, dashed: bool = False) -> None:
    """A frame of ``width`` px around ``box`` (outside it); dashed as 10 px on / 6 px off."""
    x0, y0, x1, y1 = box[0] - width, box[1] - width, box[2] + width - 1, box[3] + width - 1
    if not dashed:
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=width)
        return
    for a, b, horizontal, fixed in ((x0, x1, True, y0), (x0, x1, True, y1 - width + 1),
                                    (y0, y1, False, x0), (y0, y1, False, x1 - width + 1)):
        for t in range(a, b + 1, 16):
            e = min(t + 9, b)
            draw.rectangle((t, fixed, e, fixed + width - 1) if horizontal else (fixed, t, fixed + width - 1, e),
                           fill=colour)


def _centred(draw: Any, cx: int, y: int, lines: Sequence[tuple[str, str, bool]], size: int) -> None:
    for text, colour, bold in lines:
        f = _font(size, bold)
        tw = draw.textlength(text, font=f)
        draw.text((cx - tw / 2, y), text, fill=colour, font=f)
        y += size + 4


def draw_ranked_list(query_path: str, entries: Sequence[Ranked], out_png: str, title: str = "",
                     size_hw: Sequence[int] = (256, 128), query_caption: str = "") -> str:
    """Write the ranked-list picture of one query (Pillow; ~20x faster than a figure); returns ``out_png``.

    Thumbnails are TILE_HEIGHT px high at the aspect ratio ``size_hw`` (the model's input).
    """
    h, w = int(size_hw[0]), int(size_hw[1])
    th = TILE_HEIGHT
    tw = max(24, round(th * w / h))
    fw, gap, sep, margin, fs = 6, 22, 34, 18, 14
    k = len(entries)
    title_h = 34 if title else 0
    cap_h = 3 * (fs + 4) + 6
    width = 2 * margin + (k + 1) * tw + k * gap + sep
    height = margin + title_h + th + 2 * fw + cap_h + margin // 2
    img = Image.new("RGB", (max(width, 420), height), "white")
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((margin - fw, margin - 6), title, fill="#222222", font=_font(16))
    top = margin + title_h + fw
    cap_y = top + th + fw + 7

    def tile(x: int, path: str) -> None:
        img.paste(_thumb(path, (tw, th)), (x, top))

    x = margin
    tile(x, query_path)
    _rect(draw, (x, top, x + tw, top + th), COLOURS["query"], fw + 1)
    _centred(draw, x + tw // 2, cap_y, [("query", COLOURS["query"], True)]
             + ([(query_caption, COLOURS["query"], True)] if query_caption else []), fs)
    x += tw + sep // 2
    draw.line((x, top - fw, x, top + th + fw), fill="#cccccc", width=2)
    x += sep // 2 + gap
    for e in entries:
        tile(x, e.path)
        colour = COLOURS[e.status]
        _rect(draw, (x, top, x + tw, top + th), colour, fw if e.status != UNKNOWN else 2, dashed=e.status == IGNORED)
        strong = e.status in (MATCH, WRONG)
        text_colour = colour if strong else "#444444"
        lines = [(f"#{e.rank}  {e.distance:.3f}", text_colour, strong)]
        if e.caption:
            lines.append((e.caption, text_colour, False))
        if e.status == IGNORED:
            lines.append(("same cam: ignored", "#777777", False))
        _centred(draw, x + tw // 2, cap_y, lines, fs)
        x += tw + gap
    atomic_write(out_png, lambda f: img.save(f, format="PNG"))
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
    save_figure(fig, out_png, dpi=130)
    plt.close(fig)
    return out_png


# ----------------------------------------------------------------------------- per-query AP
def rank_queries(blocks: Iterable[tuple[int, int, torch.Tensor]], q_pids: Any, g_pids: Any, q_camids: Any,
                 g_camids: Any, topk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(AP per query, top-k gallery indices, their distances) from row blocks of the distance matrix.

    AP is the evaluation's own (``utils.metrics.per_query_ap``: gallery entries of the same
    identity and camera removed; NaN when no true match is left); the top-k lists follow the
    project's ranking (``utils.distance.ranking``) and keep every entry (the pictures mark the
    removed ones). ``blocks`` yields ``(start, end, dist[start:end])``; memory stays at one block
    plus (num_query x topk).
    """
    qp, qc = np.asarray(q_pids), np.asarray(q_camids)
    gp, gc = np.asarray(g_pids), np.asarray(g_camids)
    nq = len(qp)
    k = min(int(topk), len(gp))
    ap = np.full(nq, np.nan)
    top_idx = np.zeros((nq, k), dtype=np.int64)
    top_dist = np.zeros((nq, k), dtype=np.float64)
    for s, e, d in blocks:
        d = d.float().cpu()
        order = ranking(d)[:, :k]
        top_idx[s:e] = order.numpy()
        top_dist[s:e] = torch.gather(d, 1, order).double().numpy()
        ap[s:e] = per_query_ap(d, qp[s:e], gp, qc[s:e], gc)
    return ap, top_idx, top_dist


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
