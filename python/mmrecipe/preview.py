"""`recipe preview`: samples rendered exactly as a build makes them, with the trained
tokens highlighted, the instruction template chosen, token counts and image runs."""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .builder import normalized
from .compile import batch_columns, make_compiler
from .errors import RecipeError
from .llm.pools import expand_pools
from .llm.stages import LLMStages
from .recipe import Plan, Recipe, load_recipe, resolve
from .sources.columns import ROW


@dataclass
class PreviewSample:
    source: str
    row: int
    template: int
    text: str
    input_ids: np.ndarray
    loss_mask: np.ndarray
    offsets: np.ndarray  # [n, 2] byte ranges in text
    image_runs: list[tuple[int, int]]
    error: str | None = None

    def pieces(self) -> list[tuple[str, str]]:
        """The rendered text cut into (kind, text) runs: "trained", "prompt" or "image"."""
        raw = self.text.encode("utf-8")
        kind = np.zeros(len(raw), dtype=np.int8)  # 0 prompt, 1 trained, 2 image
        for (a, b), m in zip(self.offsets, self.loss_mask):
            if m:
                kind[a:b] = 1
        for pos, n in self.image_runs:
            a, b = self.offsets[pos]
            kind[a:b] = 2
        out: list[tuple[str, str]] = []
        start = 0
        for i in range(1, len(raw) + 1):
            if i == len(raw) or kind[i] != kind[start]:
                name = ("prompt", "trained", "image")[kind[start]]
                out.append((name, raw[start:i].decode("utf-8", errors="replace")))
                start = i
        return out

    def header(self) -> str:
        if self.error:
            return f"{self.source} row {self.row}: error: {self.error}"
        images = sum(n for _, n in self.image_runs)
        return (
            f"{self.source} row {self.row} · template {self.template if self.template >= 0 else '-'} · "
            f"{len(self.input_ids)} tokens, {int(self.loss_mask.sum())} trained · "
            f"{len(self.image_runs)} image{'s' if len(self.image_runs) != 1 else ''} ({images} tokens)"
        )


def preview(recipe: str | Path | Recipe | Plan, n: int = 5, source: str | None = None) -> list[PreviewSample]:
    """The first `n` samples of each source (or of `source`) as the build renders them;
    LLM stages serve what their caches hold and make no calls."""
    plan = recipe if isinstance(recipe, Plan) else resolve(recipe if isinstance(recipe, Recipe) else load_recipe(recipe))
    names = [s.name for s in plan.sources]
    if source is not None and source not in names:
        raise RecipeError(f"--source: no source named '{source}' (sources: {', '.join(names)})")
    out = []
    with LLMStages(plan, mode="cache", progress=False) as stages:
        plan, _ = expand_pools(plan, stages)  # what the cache holds of generated pools
        picked = [s for s in plan.sources if source is None or s.name == source]
        firsts = [next(iter(normalized(s, stages))) for s in picked]
    compiler = make_compiler(plan, threads=0)
    for norm in firsts:
        results = compiler.preview_batch(norm.source.index, batch_columns(norm, 0, n))
        rows = norm.frame[ROW].head(n).to_list()
        for row, r in zip(rows, results):
            if isinstance(r, str):
                out.append(PreviewSample(norm.source.name, row, -1, "", np.zeros(0), np.zeros(0), np.zeros((0, 2)), [], error=r))
                continue
            text, ids, mask, offsets, template, runs = r
            out.append(PreviewSample(norm.source.name, row, template, text, ids, mask, offsets.reshape(-1, 2), list(runs)))
    return out


_ANSI = {"trained": "\x1b[1;32m", "image": "\x1b[35m", "prompt": "\x1b[2m"}


def _image_label(text: str, sample: PreviewSample, used: list[int]) -> str:
    k = used[0]
    used[0] += 1
    n = sample.image_runs[k][1] if k < len(sample.image_runs) else 0
    return f"[{text} × {n} tokens]"


def to_terminal(samples: list[PreviewSample], color: bool = True) -> str:
    blocks = []
    for s in samples:
        lines = [f"── {s.header()}"]
        if not s.error:
            body, used = [], [0]
            for kind, text in s.pieces():
                shown = _image_label(text, s, used) if kind == "image" else text
                body.append(f"{_ANSI[kind]}{shown}\x1b[0m" if color else (f"«{shown}»" if kind == "trained" else shown))
            lines.append("".join(body))
        blocks.append("\n".join(lines))
    legend = "trained tokens in bold green, prompt dimmed, images in magenta" if color else "«trained»"
    return "\n\n".join(blocks) + f"\n\n({legend})"


def to_html(samples: list[PreviewSample], title: str) -> str:
    parts = [
        "<!doctype html><meta charset='utf-8'><title>" + html.escape(title) + "</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}pre{white-space:pre-wrap;background:#f7f7f7;"
        "padding:1em;border-radius:6px}.trained{background:#c8f7c5}.image{background:#f0d0ff}.prompt{color:#555}"
        "h2{font-size:1em;font-family:monospace}</style>",
        f"<h1>{html.escape(title)}</h1><p><span class=trained>trained</span> · <span class=prompt>prompt</span> · "
        "<span class=image>image tokens</span></p>",
    ]
    for s in samples:
        parts.append(f"<h2>{html.escape(s.header())}</h2>")
        if s.error:
            continue
        used = [0]
        body = "".join(
            f"<span class={kind}>{html.escape(_image_label(text, s, used) if kind == 'image' else text)}</span>"
            for kind, text in s.pieces()
        )
        parts.append(f"<pre>{body}</pre>")
    return "\n".join(parts) + "\n"
