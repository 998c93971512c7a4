"""The training record: ``metrics.jsonl``, TensorBoard event files and ``curves.png``.

One :class:`TrainingRecord` per run. Each :meth:`TrainingRecord.log` call appends one JSON
object to ``OUTPUT_DIR/metrics.jsonl`` (flushed at once, so a crashed run keeps every line
written so far) and writes the numeric values as TensorBoard scalars under
``OUTPUT_DIR/tensorboard``. :func:`plot_curves` turns the JSON lines into a picture.

Record kinds: ``period`` (every LOG_PERIOD iterations: running averages of the epoch so
far), ``epoch`` (end-of-epoch averages) and ``eval`` (mAP, mINP, R1/R5/R10 and the CMC).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

from .errors import ConfigError, UserError, import_extra
from .fileio import append_error, save_figure

logger = logging.getLogger("svllreid")

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CURVES_FILE = "curves.png"


def _jsonable(v: Any) -> Any:
    """Python scalars / lists for JSON; NaN and inf become null (JSON has no such numbers)."""
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


class TrainingRecord:
    """Appends metrics to ``metrics.jsonl`` and TensorBoard; a no-op when ``enabled`` is false.

    ``enabled`` is false on the non-main processes of a distributed run, so only rank 0
    writes. TensorBoard is skipped with one warning when the package is missing.
    """

    def __init__(self, output_dir: str, enabled: bool = True, tensorboard: bool = True) -> None:
        self.output_dir = output_dir
        self.enabled = enabled
        self.path = os.path.join(output_dir, METRICS_FILE)
        self._file = None
        self._writer = None
        self._failed = False
        self._t0 = time.time()
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._writer = SummaryWriter(os.path.join(output_dir, TENSORBOARD_DIR))
            except ImportError as e:   # the package is optional
                logger.warning("TensorBoard event files are not written (%s)", e)

    def log(self, stage: int, epoch: int, iteration: int | None = None, kind: str = "period",
            step: int | None = None, **values: Any) -> None:
        """Write one record: stage, epoch, iteration, kind, wall time and ``values``.

        ``step`` is the TensorBoard x-axis (the iteration counted over the whole stage for
        ``period`` records, the epoch otherwise); numeric values become scalars tagged
        ``stage<S>/<kind>/<name>``; lists (the CMC curve) go to the JSON line only.
        """
        if not self.enabled:
            return
        now = time.time()
        rec = {"stage": stage, "epoch": epoch, "iteration": iteration, "kind": kind,
               "time": round(now, 3), "elapsed": round(now - self._t0, 3)}
        rec.update({k: _jsonable(v) for k, v in values.items()})
        try:
            self._file.write(json.dumps(rec) + "\n")
            self._file.flush()
        except OSError as e:   # a full disk: one clear error naming the file; earlier lines stay
            self._failed = True
            raise append_error(self.path, e) from None
        if self._writer is not None:
            x = step if step is not None else epoch
            try:
                for k, v in values.items():
                    v = _jsonable(v)
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        self._writer.add_scalar(f"stage{stage}/{kind}/{k}", v, x)
                self._writer.flush()
            except OSError as e:
                self._failed = True
                raise append_error(os.path.join(self.output_dir, TENSORBOARD_DIR), e) from None

    def log_eval(self, stage: int, epoch: int, results: dict[str, Any]) -> None:
        """An ``eval`` record from the results dict of an evaluation (mAP, mINP, R1/R5/R10, CMC)."""
        self.log(stage, epoch, kind="eval", **eval_scalars(results))

    def close(self) -> None:
        """Close the files (idempotent)."""
        if self._file is not None:
            f, self._file = self._file, None
            try:
                f.close()
            except OSError as e:   # the buffered rest of a line that already failed is dropped
                if not self._failed:
                    raise append_error(self.path, e) from None
        if self._writer is not None:
            w, self._writer = self._writer, None
            try:
                w.close()
            except OSError as e:
                if not self._failed:
                    raise append_error(os.path.join(self.output_dir, TENSORBOARD_DIR), e) from None

    def __enter__(self) -> TrainingRecord:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def eval_scalars(results: dict[str, Any]) -> dict[str, Any]:
    """mAP, mINP, R1/R5/R10 and the CMC curve of an evaluation's results dict."""
    cmc = list(results.get("cmc", []))
    out = {"mAP": results["mAP"], "mINP": results.get("mINP")}
    out.update({f"R{r}": cmc[r - 1] for r in (1, 5, 10) if r <= len(cmc)})
    out["cmc"] = cmc
    return out


NULL_RECORD = TrainingRecord("", enabled=False)


KINDS = ("period", "epoch", "eval")


def _usable(rec: Any) -> bool:
    """A record :func:`plot_curves` can place: a JSON object with a known kind and integer stage and epoch."""
    return isinstance(rec, dict) and rec.get("kind") in KINDS and all(
        isinstance(rec.get(k), int) and not isinstance(rec.get(k), bool) for k in ("stage", "epoch"))


def _read_records(path: str) -> tuple[list[dict[str, Any]], list[int]]:
    """(usable records, line numbers of the other non-empty lines) of a ``metrics.jsonl``."""
    out, bad = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                rec = None
            if _usable(rec):
                out.append(rec)
            else:
                bad.append(n)
    return out, bad


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The usable records of a ``metrics.jsonl``.

    Lines that are not JSON (e.g. the torn last line of a killed run), not an object, or
    lack the kind / stage / epoch are skipped with one warning that names the file, counts
    them and gives the first one's line number.
    """
    out, bad = _read_records(path)
    _warn_skipped(path, bad, len(out))
    return out


def _warn_skipped(path: str, bad: list[int], n_good: int) -> None:
    if bad:
        logger.warning("%s: %d of %d line(s) skipped (not a JSON record with kind, stage and epoch; first: line %d)",
                       path, len(bad), len(bad) + n_good, bad[0])


LOSS_KEYS = ("loss", "id", "tri", "i2t", "t2i", "ssl")
_LOSS_LABELS = {"loss": "total", "id": "ID", "tri": "triplet", "i2t": "image→text", "t2i": "text→image",
                "ssl": "self-supervised"}


def plot_curves(metrics_jsonl: str, out_png: str, title: str | None = None) -> str:
    """Draw the loss components per stage, the stage-2 accuracy and the mAP / R1 over epochs.

    Refuses (ConfigError) a file without a single usable record. Uses the ``epoch`` records
    (falling back to the last ``period`` record of each epoch)
    and the ``eval`` records; when a resumed run repeats an epoch the last record wins.
    Written atomically; returns ``out_png``.
    """
    import_extra("matplotlib", "record").use("Agg")
    plt = import_extra("matplotlib.pyplot", "record")

    recs, bad = _read_records(metrics_jsonl)
    if not recs:
        raise ConfigError(f"{metrics_jsonl} holds no usable record (JSON objects with kind "
                          f"{'/'.join(KINDS)}, stage and epoch, one per line): nothing to draw")
    _warn_skipped(metrics_jsonl, bad, len(recs))
    per_epoch: dict[tuple[int, int], dict[str, Any]] = {}
    evals: dict[int, dict[str, Any]] = {}
    for r in recs:
        key = (r.get("stage"), r.get("epoch"))
        if r.get("kind") == "eval":
            evals[r["epoch"] if r.get("stage") == 2 else 0] = r
        elif r.get("kind") == "epoch" or (r.get("kind") == "period" and per_epoch.get(key, {}).get("kind") != "epoch"):
            per_epoch[key] = r
    stages = sorted({s for s, _ in per_epoch if s in (1, 2)})
    panels = [f"stage {s} losses" for s in stages] + ["stage 2 accuracy", "evaluation"]

    from matplotlib.ticker import MaxNLocator
    cols = 2 if len(panels) == 4 else len(panels)
    rows_n = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.6 * cols, 3.9 * rows_n), squeeze=False)
    axes = axes.ravel()
    colours = {"loss": "#222222", "id": "#1f77b4", "tri": "#ff7f0e", "i2t": "#2ca02c", "t2i": "#9467bd",
               "ssl": "#d62728"}
    for ax, s in zip(axes, stages):
        rows = sorted((e, r) for (st, e), r in per_epoch.items() if st == s)
        for k in LOSS_KEYS:
            pts = [(e, r[k]) for e, r in rows if isinstance(r.get(k), (int, float))]
            if pts and any(v != 0 for _, v in pts):
                ax.plot(*zip(*pts), label=_LOSS_LABELS[k], color=colours[k], lw=2.2 if k == "loss" else 1.4,
                        marker="o" if len(pts) < 15 else None, ms=3)
        ax.set_title(f"Stage {s}: {'prompt learning' if s == 1 else 'image encoder'} losses (epoch means)")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.legend(frameon=False, fontsize=8)
    ax = axes[len(stages)]
    pts = sorted((e, r["acc"]) for (st, e), r in per_epoch.items()
                 if st == 2 and isinstance(r.get("acc"), (int, float)))
    if pts:
        ax.plot(*zip(*[(e, 100 * a) for e, a in pts]), color="#1f77b4", marker="o" if len(pts) < 15 else None, ms=3)
    ax.set_title("Stage 2: ID accuracy on training batches")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax = axes[-1]
    if evals:
        xs = sorted(evals)
        for k, lab, c in (("mAP", "mAP", "#d62728"), ("R1", "Rank-1", "#1f77b4"), ("mINP", "mINP", "#7f7f7f")):
            ys = [(x, 100 * evals[x][k]) for x in xs if isinstance(evals[x].get(k), (int, float))]
            if ys:
                ax.plot(*zip(*ys), label=lab, color=c, marker="o", ms=4, lw=1.8)
        ax.legend(frameon=False, fontsize=8)
    else:
        ax.text(0.5, 0.5, "no evaluation yet", ha="center", va="center", transform=ax.transAxes, color="#777777")
    ax.set_title("Evaluation" + (" (epoch 0: untrained)" if 0 in evals else ""))
    ax.set_xlabel("epoch")
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    save_figure(fig, out_png)
    plt.close(fig)
    return out_png


def write_curves(output_dir: str, enabled: bool = True) -> str | None:
    """``OUTPUT_DIR/curves.png`` from ``OUTPUT_DIR/metrics.jsonl`` (logged); None when disabled or no record."""
    path = os.path.join(output_dir, METRICS_FILE)
    if not enabled or not os.path.isfile(path) or os.path.getsize(path) == 0:
        return None
    try:
        out = plot_curves(path, os.path.join(output_dir, CURVES_FILE), title=f"Training record of {output_dir}")
    except UserError as e:   # matplotlib missing: the run itself is complete
        logger.warning("%s not drawn: %s", CURVES_FILE, e)
        return None
    logger.info("Training record: %s, %s (TensorBoard: tensorboard --logdir %s), %s", path,
                os.path.join(output_dir, TENSORBOARD_DIR), output_dir, out)
    return out
