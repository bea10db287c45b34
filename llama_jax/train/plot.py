"""A training run's curves as a PNG: train loss and eval loss over steps (top), the
learning rate (bottom), from WORKDIR/metrics.jsonl.

    python -m llama_jax plot WORKDIR [--output PATH]      # default WORKDIR/plot.png (llama_jax/cli/plot.py)

Drawn with numpy and written with zlib (a PNG is a zlib stream of RGB rows), so plotting
needs no plotting library; train.py writes the same figure at the end of every run.
"""
from __future__ import annotations

import json
import os
import struct
import zlib

import numpy as np

WIDTH, HEIGHT = 900, 600
LEFT, RIGHT, TOP, GAP, BOTTOM = 90, 20, 40, 60, 50  # margins around the two panels, pixels
SCALE = 2  # font pixels per glyph pixel
COLORS = {"train loss": (31, 119, 180), "eval loss": (255, 127, 14), "lr": (44, 160, 44)}
INK, GRID = (0, 0, 0), (225, 225, 225)

# 3 x 5 glyphs, rows top to bottom: only what tick labels and legends use.
_FONT = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001010010",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    "+": "000010111010000", " ": "000000000000000", "e": "111100110100111", "a": "010101111101101",
    "i": "111010010010111", "l": "100100100100111", "n": "110101101101101", "o": "000111101101111",
    "p": "111101111100100", "r": "110101110101101", "s": "011100010001110", "t": "111010010010010",
    "v": "101101101101010",
}


def png_bytes(image: np.ndarray) -> bytes:
    """An RGB uint8 [H, W, 3] array as PNG file bytes (8-bit truecolour, no filtering)."""
    h, w, _ = image.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), image.reshape(h, w * 3)], axis=1).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # bit depth 8, colour type 2 (RGB)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def _text(img: np.ndarray, x: int, y: int, s: str, color=INK, align: str = "left") -> None:
    """Draws `s` with its top-left (or top-right, align="right") corner at (x, y)."""
    if align == "right":
        x -= len(s) * 4 * SCALE
    for i, ch in enumerate(s):
        bits = np.array([int(b) for b in _FONT.get(ch, _FONT[" "])], bool).reshape(5, 3)
        glyph = np.kron(bits, np.ones((SCALE, SCALE), bool))
        x0 = x + i * 4 * SCALE
        region = img[y:y + glyph.shape[0], x0:x0 + glyph.shape[1]]
        region[glyph[:region.shape[0], :region.shape[1]]] = color


def _line(img: np.ndarray, xs: np.ndarray, ys: np.ndarray, color) -> None:
    """A 2-pixel polyline through pixel coordinates (xs, ys)."""
    for x0, y0, x1, y1 in zip(xs[:-1], ys[:-1], xs[1:], ys[1:]):
        n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        px, py = np.linspace(x0, x1, n).round().astype(int), np.linspace(y0, y1, n).round().astype(int)
        for dx in (0, 1):
            for dy in (0, 1):
                img[np.clip(py + dy, 0, img.shape[0] - 1), np.clip(px + dx, 0, img.shape[1] - 1)] = color
    if len(xs) == 1:  # one point: a dot
        img[int(ys[0]) - 2:int(ys[0]) + 3, int(xs[0]) - 2:int(xs[0]) + 3] = color


def _label(v: float) -> str:
    return f"{v:.3g}"


def _ticks(lo: float, hi: float, n: int = 5) -> np.ndarray:
    """Round values (1, 2 or 5 times a power of ten apart) in [lo, hi], about n of them."""
    raw = (hi - lo) / max(n - 1, 1) or 1.0
    base = 10.0 ** np.floor(np.log10(raw))
    step = base * min((m for m in (1, 2, 5, 10) if m * base >= raw), default=10)
    return np.arange(np.ceil(lo / step) * step, hi + step * 1e-9, step)


def _panel(img, box, x_range, series: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Axes in `box` (x0, y0, x1, y1), grid and tick labels, then each (steps, values) series."""
    x0, y0, x1, y1 = box
    values = np.concatenate([v for _, v in series.values()])
    lo, hi = float(values.min()), float(values.max())
    pad = (hi - lo) * 0.05 or abs(hi) * 0.05 or 1.0
    lo, hi = lo - pad, hi + pad
    sx = lambda s: x0 + (np.asarray(s, float) - x_range[0]) / max(x_range[1] - x_range[0], 1) * (x1 - x0)
    sy = lambda v: y1 - (np.asarray(v, float) - lo) / (hi - lo) * (y1 - y0)
    for t in _ticks(lo + pad, hi - pad):
        y = int(round(float(sy(t))))
        img[y, x0:x1] = GRID
        _text(img, x0 - 8, y - 5, _label(t), align="right")
    for t in _ticks(*x_range, n=6):
        x = int(round(float(sx(t))))
        img[y0:y1, x] = GRID
        label = str(int(round(t)))
        _text(img, x - len(label) * 2 * SCALE, y1 + 8, label)  # centred under its grid line
    img[y0, x0:x1 + 1] = img[y1, x0:x1 + 1] = INK
    img[y0:y1 + 1, x0] = img[y0:y1 + 1, x1] = INK
    for k, (name, (steps, vals)) in enumerate(series.items()):
        _line(img, sx(steps), sy(vals), COLORS[name])
        lx, ly = x1 - 170, y0 + 10 + 16 * k
        img[ly + 4:ly + 7, lx:lx + 24] = COLORS[name]
        _text(img, lx + 32, ly, name)


def _series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)


def render(rows: list[dict]) -> np.ndarray:
    """The figure of metrics rows (dicts with `step`, `loss_mean` or `loss`, `eval_loss`, `lr`)."""
    img = np.full((HEIGHT, WIDTH, 3), 255, np.uint8)
    train = _series(rows, "loss_mean") if any("loss_mean" in r for r in rows) else _series(rows, "loss")
    series = {"train loss": train, "eval loss": _series(rows, "eval_loss")}
    series = {k: v for k, v in series.items() if len(v[0])}
    lr = _series(rows, "lr")
    steps = np.concatenate([s for s, _ in [*series.values(), lr]] or [np.zeros(1)])
    x_range = (0.0, max(float(steps.max()), 1.0))
    panel_h = (HEIGHT - TOP - GAP - BOTTOM) * 2 // 3
    if series:
        _panel(img, (LEFT, TOP, WIDTH - RIGHT, TOP + panel_h), x_range, series)
    if len(lr[0]):
        _panel(img, (LEFT, TOP + panel_h + GAP, WIDTH - RIGHT, HEIGHT - BOTTOM), x_range, {"lr": lr})
    _text(img, WIDTH // 2 - 16, HEIGHT - 22, "step")
    return img


def read_metrics(workdir: str) -> list[dict]:
    """The rows of WORKDIR/metrics.jsonl, a step logged twice (before and after a resume)
    keeping its last row; unparseable lines (a run killed mid-write) are skipped."""
    rows: dict[int, dict] = {}
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "step" in row:
                rows[row["step"]] = {**rows.get(row["step"], {}), **row}
    return [rows[s] for s in sorted(rows)]


def plot_run(workdir: str, output: str | None = None, rows: list[dict] | None = None) -> str:
    """Writes the run's figure to `output` (default WORKDIR/plot.png); returns the path."""
    from llama_jax.errors import input_error
    rows = read_metrics(workdir) if rows is None else rows
    if not any(isinstance(r.get(k), (int, float)) for r in rows for k in ("loss", "loss_mean", "lr")):
        raise input_error(os.path.join(workdir, "metrics.jsonl"), "no logged steps to plot",
                          "rows with loss and lr", "none")
    output = output or os.path.join(workdir, "plot.png")
    with open(output + ".tmp", "wb") as f:
        f.write(png_bytes(render(rows)))
    os.replace(output + ".tmp", output)
    return output
