"""Evaluation output: trajectories as JSONL with PNG images, and a static HTML page to browse them.

`write_report(out_dir, trajectories, rows)` writes::

    out_dir/
      trajectories.jsonl      one JSON object per episode (`trajectory_record`)
      metrics.json            the metrics table, one object per row
      images/00007/00.png     every image episode 7 showed the policy, in conversation order
      images/00007/episode.png  the env's picture of the episode (crops drawn), when rendered
      index.html              metrics, then every episode: question, turns, images, answer

The page links the PNG files by relative path, so the folder can be copied or served as is.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from agents.metrics import COLUMNS, Metrics
from agents.rollout import Trajectory

CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; max-width: 1100px; color: #222; }
table { border-collapse: collapse; } td, th { padding: 2px 10px; border-bottom: 1px solid #ddd; text-align: right; }
td:first-child, th:first-child { text-align: left; }
section.episode { border: 1px solid #ccc; border-radius: 6px; padding: 0.6em 1em; margin: 1em 0; }
section.correct { border-left: 6px solid #3a3; } section.wrong { border-left: 6px solid #c33; }
pre { white-space: pre-wrap; background: #f6f6f6; padding: 0.4em; margin: 0.3em 0; }
pre.action { background: #eef4ff; } .error { color: #b00; } img { margin: 2px; border: 1px solid #ccc; }
img.episode { max-width: 640px; } img.view { max-height: 180px; }
"""


def _jsonable(value: Any) -> Any:
    """`value` with numpy scalars and arrays, tuples and non-finite floats made JSON-safe."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def trajectory_record(trajectory: Trajectory, index: int, image_paths: Sequence[str],
                      render_path: str | None) -> dict[str, Any]:
    """The JSON object of one episode; image paths are relative to the output folder."""
    record: dict[str, Any] = {
        "index": index, "sample_id": trajectory.sample_id, "family": trajectory.family, "seed": trajectory.seed,
        "group": trajectory.group, "member": trajectory.member, "reward": trajectory.reward,
        "terminated": trajectory.terminated, "truncated": trajectory.truncated,
        "reset_info": trajectory.reset_info, "info": trajectory.info,
        "turns": [{"observation": t.observation, "images": [image_paths[i] for i in t.image_indices],
                   "action": t.action, "reward": t.reward, "info": t.info} for t in trajectory.turns],
        "render": render_path,
    }
    if trajectory.has_tokens:
        record["tokens"] = {"token_ids": trajectory.token_ids, "generated_mask": trajectory.generated_mask,
                            "logprobs": trajectory.logprobs}
    return _jsonable(record)


def _metrics_html(rows: Mapping[str, Metrics]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ("family",) + COLUMNS)
    body = []
    for name, metrics in rows.items():
        values = metrics.as_dict()
        cells = [html.escape(name)] + [
            "-" if values[c] is None else str(values[c]) if isinstance(values[c], int) else f"{values[c]:.3f}"
            for c in COLUMNS]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _episode_html(record: Mapping[str, Any]) -> str:
    info = record["info"]
    verdict = "correct" if info.get("correct") else "wrong"
    title = (f"#{record['index']} {record['sample_id']} ({record['family']}): score {info.get('score', 0):.2f}, "
             f"{info.get('n_visual_ops', 0)} op(s), {info.get('n_op_errors', 0)} error(s), "
             f"reward {record['reward']:.3f}")
    parts = [f'<section class="episode {verdict}" id="ep-{record["index"]}"><h3>{html.escape(title)}</h3>']
    if record["render"]:
        parts.append(f'<img class="episode" loading="lazy" src="{html.escape(record["render"])}" alt="episode">')
    parts.append("<ol>")
    for turn in record["turns"]:
        images = "".join(f'<img class="view" loading="lazy" src="{html.escape(p)}" alt="view">' for p in turn["images"])
        error = turn["info"].get("action_error")
        parts.append(
            f"<li><pre>{html.escape(turn['observation'])}</pre>{images}"
            f'<pre class="action">{html.escape(str(turn["action"]))}</pre>'
            + (f'<div class="error">error: {html.escape(str(error))}</div>' if error else "") + "</li>")
    parts.append("</ol>")
    gold = info.get("gold_answers")
    parts.append(f"<p>answer <b>{html.escape(repr(info.get('answer')))}</b>"
                 + (f", gold {html.escape(repr(gold))}" if gold is not None else "") + "</p></section>")
    return "".join(parts)


def write_report(out_dir: str | Path, trajectories: Sequence[Trajectory], rows: Mapping[str, Metrics],
                 title: str = "pxr eval", config: Mapping[str, Any] | None = None) -> Path:
    """Write the JSONL, images, metrics and HTML page of an evaluation; returns the HTML path."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for index, trajectory in enumerate(trajectories):
        folder = out / "images" / f"{index:05d}"
        folder.mkdir(exist_ok=True)
        paths = []
        for j, image in enumerate(trajectory.images):
            Image.fromarray(image).save(folder / f"{j:02d}.png")
            paths.append(f"images/{index:05d}/{j:02d}.png")
        render_path = None
        if trajectory.render is not None:
            Image.fromarray(trajectory.render).save(folder / "episode.png")
            render_path = f"images/{index:05d}/episode.png"
        records.append(trajectory_record(trajectory, index, paths, render_path))
    with open(out / "trajectories.jsonl", "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
    metrics = {"config": _jsonable(dict(config or {})), "rows": {name: m.as_dict() for name, m in rows.items()}}
    (out / "metrics.json").write_text(json.dumps(_jsonable(metrics), indent=1, sort_keys=True), encoding="utf-8")
    config_html = "".join(f"<li>{html.escape(str(k))}: {html.escape(str(v))}</li>" for k, v in (config or {}).items())
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1><ul>{config_html}</ul>"
            f"{_metrics_html(rows)}<h2>{len(records)} episodes</h2>"
            + "".join(_episode_html(r) for r in records) + "</body></html>")
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
