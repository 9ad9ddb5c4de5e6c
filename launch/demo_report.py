"""OUT/report.html for `maskvid demo`: one self-contained page (every image embedded as a data:
URI, so it can be mailed or attached) showing generated videos with their prompts, real and
reconstructed clips side by side, loss and metric curves, the metrics and the exact commands.

The images are also written under OUT/report/ for reuse (slides, READMEs).
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from maskvid.launch.demo_checks import read_metrics, video_path

UPSCALE = 4  # 32x32 frames are unreadable at 1:1 in a browser
FRAME_MS = 125  # 8 fps, the rate the demo renders and generates at


def _gif(frames: np.ndarray, path: Path) -> Path:
    """uint8 [T, H, W, 3] -> an upscaled, looping GIF."""
    from maskvid.lightning_modules.media import encode_gif

    path.write_bytes(encode_gif(frames, fps=1000 / FRAME_MS, scale=UPSCALE))
    return path


def _data_uri(path: Path) -> str:
    kind = {"gif": "image/gif", "png": "image/png"}[path.suffix.lstrip(".")]
    return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode()}"


def _img(path: Path, out: Path, alt: str) -> str:
    # The data: URI makes the page self-contained; data-file names the copy beside it.
    rel = path.relative_to(out)
    return f'<img src="{_data_uri(path)}" alt="{html.escape(alt)}" data-file="{html.escape(str(rel))}">'


def generated_gifs(out: Path, folder: Path, name: str, limit: int = 24) -> list[tuple[Path, str]]:
    from maskvid.datamodules.video_io import decode_all

    index = json.loads((folder / "index.json").read_text())
    gifs = []
    for i, item in enumerate(index[:limit]):
        frames = decode_all(video_path(item, folder / "index.json").read_bytes())
        gifs.append((_gif(frames, out / f"report/generated_{name}_{i:03d}.gif"), item["prompt"]))
    return gifs


def reconstructions(out: Path, tokenizer_ckpt: Path, val_shards: str, count: int, workers: int, num_frames: int = 17
                    ) -> tuple[list[tuple[Path, str]], Optional[dict[str, Any]]]:
    """Real | reconstructed GIFs of the first `count` val clips, and their mean PSNR (frames in [0, 1])."""
    import torch

    from maskvid.datamodules.pixels import to_uint8
    from maskvid.datamodules.video_datamodule import VideoDataModule
    from maskvid.video_tokenizer import VideoTokenizer

    tokenizer = VideoTokenizer.from_checkpoint(tokenizer_ckpt).network
    dm = VideoDataModule(val_shards=val_shards, num_frames=num_frames, resolution=tokenizer.image_size, batch_size=count,
                         num_workers=workers)
    batch = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        recon = tokenizer(batch["video"])[0].clamp(-1, 1)
    frames = recon.shape[2]
    real = batch["video"][:, :, :frames]
    mse = ((real - recon) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    psnr = float((10 * torch.log10(1 / mse)).mean())
    pairs = []
    for i, (a, b) in enumerate(zip(to_uint8(real).numpy(), to_uint8(recon).numpy())):
        gap = np.full((a.shape[0], a.shape[1], 1, 3), 255, np.uint8)
        pairs.append((_gif(np.concatenate([a, gap, b], axis=2), out / f"report/recon_{i:03d}.gif"),
                      batch["caption"][i]))
    return pairs, {"value": round(psnr, 3), "clips": len(pairs), "source": "computed on val clips by the report"}


def plot_curves(path: Path, panels: Sequence[tuple[str, Sequence[str], list[dict[str, float]]]]) -> Optional[Path]:
    """One PNG with a panel per (title, columns, rows); None when no panel has data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = [(t, cols, rows) for t, cols, rows in panels
             if any(not math.isnan(r.get(c, math.nan)) for r in rows for c in cols)]
    if not drawn:
        return None
    fig, axes = plt.subplots(1, len(drawn), figsize=(4.2 * len(drawn), 3.2), squeeze=False)
    for ax, (title, cols, rows) in zip(axes[0], drawn):
        for col in cols:
            points = [(r["step"], r[col]) for r in rows if "step" in r and not math.isnan(r.get(col, math.nan))]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if len(points) < 20 else None, ms=3, label=col)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_accuracy(path: Path, accuracy: dict[str, Any]) -> Optional[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = {k: v for k, v in (accuracy or {}).items() if v and v.get("joint") is not None}
    if not sets:
        return None
    names = ["colour", "shape", "direction", "joint"]
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    width = 0.8 / len(sets)
    for i, (label, acc) in enumerate(sets.items()):
        ax.bar([j + i * width for j in range(len(names))], [acc[n] for n in names], width,
               label=f"{label} (n={int(acc['n'])})")
    ax.set_xticks([j + width * (len(sets) - 1) / 2 for j in range(len(names))], names)
    ax.set_ylim(0, 1)
    ax.set_title("caption accuracy of generated videos (oracle)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _grid(items: list[tuple[Path, str]], out: Path) -> str:
    cells = "".join(f"<figure>{_img(p, out, c)}<figcaption>{html.escape(c)}</figcaption></figure>" for p, c in items)
    return f'<div class="grid">{cells}</div>'


def _value(metric: Any) -> str:
    if metric is None:
        return "n/a"
    if isinstance(metric, dict):
        if metric.get("value", 0) is None:
            return f"null ({html.escape(str(metric.get('reason', '')))})"
        for key in ("joint", "value", "fvd", "clipsim"):
            if key in metric:
                extra = f" (n={int(metric['n'])})" if "n" in metric else ""
                return f"{metric[key]:.4g}{extra}"
    return html.escape(str(metric))


CSS = """body{font-family:system-ui,sans-serif;margin:24px;max-width:1240px;color:#222}
h1{margin-bottom:4px} .grid{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;width:140px;font-size:11px} figure img{image-rendering:pixelated;display:block}
figure.wide{width:270px} table{border-collapse:collapse;font-size:13px} td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
pre{background:#f4f4f4;padding:8px;font-size:11px;white-space:pre-wrap;word-break:break-all} .note{color:#666;font-size:13px}"""


def write_report(out: Path, summary: dict[str, Any], tokenizer_ckpt: Path, val_shards: str, recon_clips: int,
                 workers: int, num_frames: int = 17) -> Path:
    """Render OUT/report.html from the run's outputs; adds tokenizer_psnr_recon_clips to summary['metrics']."""
    (out / "report").mkdir(exist_ok=True)
    budget = "fixed steps" if summary["budget_minutes"] is None else f"budget {summary['budget_minutes']} min"
    parts = [f"<h1>maskvid demo</h1><p class='note'>backbone {html.escape(summary['backbone'])}, "
             f"{budget}, data {html.escape(summary['data']['train_shards'])}</p>"]

    parts.append("<h2>Generated videos</h2>")
    order = {"seen": 0, "heldout": 1}
    for index in sorted((out / "generated").glob("*/index.json"), key=lambda p: (order.get(p.parent.name, 2), p)):
        name = index.parent.name
        acc = (summary["metrics"].get("caption_accuracy") or {}).get(name)
        parts.append(f"<h3>{html.escape(name)} prompts — caption accuracy (joint) {_value(acc)}</h3>")
        parts.append(_grid(generated_gifs(out, index.parent, name), out))

    pairs, psnr = reconstructions(out, tokenizer_ckpt, val_shards, recon_clips, workers, num_frames)
    summary["metrics"]["tokenizer_psnr_recon_clips"] = psnr
    parts.append(f"<h2>Tokenizer: real | reconstructed</h2><p class='note'>PSNR on these clips {_value(psnr)} dB</p>")
    parts.append(_grid(pairs, out).replace("<figure>", '<figure class="wide">'))

    parts.append("<h2>Training curves</h2>")
    tok_rows = read_metrics(out / "runs/tokenizer_demo")
    s2_rows = read_metrics(out / f"runs/{summary['backbone']}_demo")
    tok_plot = plot_curves(out / "report/curves_tokenizer.png", [
        ("tokenizer train loss", ["train/loss"], tok_rows),
        ("tokenizer val", ["val/recon_loss"], tok_rows),
        ("tokenizer val PSNR (dB)", ["val/psnr"], tok_rows),
    ])
    s2_plot = plot_curves(out / "report/curves_stage2.png", [
        ("stage-2 loss", ["train/loss", "val/loss"], s2_rows),
        ("stage-2 masked-token accuracy", ["train/masked_accuracy", "val/masked_accuracy"], s2_rows),
    ])
    acc_plot = plot_accuracy(out / "report/caption_accuracy.png", summary["metrics"].get("caption_accuracy"))
    for plot, alt in ((tok_plot, "tokenizer curves"), (s2_plot, "stage-2 curves"), (acc_plot, "caption accuracy")):
        parts.append(_img(plot, out, alt) + "<br>" if plot else f"<p class='note'>{alt}: nothing logged yet</p>")

    parts.append("<h2>Data check</h2>")
    for name in ("preview-train.png", "preview-val.png"):
        if (out / name).is_file():
            parts.append(f'<img style="max-width:100%" src="{_data_uri(out / name)}" alt="{name}" data-file="{name}"><br>')

    m = summary["metrics"]
    rows = [("tokenizer PSNR (val/psnr, fit log)", _value(m.get("tokenizer_psnr"))),
            ("tokenizer PSNR (report's val clips)", _value(psnr)),
            ("data-pipeline oracle accuracy on val clips", _value(m.get("data_oracle_accuracy"))),
            ("oracle accuracy of tokenizer reconstructions (stage 2's ceiling)",
             _value(m.get("reconstruction_oracle_accuracy")))]
    for key in ("caption_accuracy", "fvd", "clipsim"):
        for name, value in (m.get(key) or {}).items():
            rows.append((f"{key} — {name}", _value(value)))
    rows += [(f"time: {k}", f"{v:.0f} s") for k, v in summary["seconds"].items()]
    rows += [("checkpoint: " + k, html.escape(str(v))) for k, v in summary["checkpoints"].items()]
    parts.append("<h2>Metrics</h2><table>" + "".join(f"<tr><th>{html.escape(a)}</th><td>{b}</td></tr>" for a, b in rows)
                 + "</table>")

    parts.append("<h2>Reproduce</h2><p class='note'>The exact commands each step ran (output in commands.log).</p>")
    for step, commands in summary["commands"].items():
        if commands:
            parts.append(f"<h4>{html.escape(step)}</h4><pre>{html.escape(chr(10).join(commands))}</pre>")

    page = out / "report.html"
    page.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>maskvid demo</title>"
                    f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>")
    return page
