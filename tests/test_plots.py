"""Learning-curve plots: smoothing and seed aggregation by hand, PNGs from runs and the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agents.logger import MetricLogger
from agents.plots import aggregate, ema, main, plot_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(path: Path, seed: int, curious: bool, steps: int = 12) -> Path:
    rng = np.random.default_rng(seed)
    with MetricLogger(path, tensorboard=False) as logger:
        for step in range(steps):
            rapr = 0.5 + (0.02 if curious else -0.04) * step + 0.02 * rng.standard_normal()
            logger.log(step, {"train/rapr": rapr})
            if step % 4 == 0:
                logger.log(step, {"eval/accuracy": 0.4 + 0.01 * step})
    return path


def test_ema_debiased_by_hand() -> None:
    np.testing.assert_allclose(ema([1.0, 2.0, 3.0], 0.5), [1.0, 1.25 / 0.75, 2.125 / 0.875])
    np.testing.assert_array_equal(ema([1.0, 5.0], 0.0), [1.0, 5.0])
    with pytest.raises(ValueError, match="smoothing"):
        ema([1.0], 1.0)


def test_aggregate_interpolates_onto_the_shared_range() -> None:
    a = (np.array([0.0, 1.0, 2.0]), np.array([0.0, 1.0, 2.0]))
    b = (np.array([0.0, 2.0, 4.0]), np.array([2.0, 3.0, 4.0]))
    steps, mean, std = aggregate([a, b])
    np.testing.assert_array_equal(steps, [0.0, 1.0, 2.0])
    np.testing.assert_allclose(mean, [1.0, 1.75, 2.5])
    np.testing.assert_allclose(std, [1.0, 0.75, 0.5])
    with pytest.raises(ValueError, match="overlap"):
        aggregate([a, (np.array([5.0, 6.0]), np.array([0.0, 0.0]))])


def test_plot_curves_with_seed_bands(tmp_path: Path) -> None:
    runs = [_run(tmp_path / f"curious-s{s}", s, True) for s in range(2)] + [_run(tmp_path / "plain-s0", 0, False)]
    out = plot_curves(
        runs, ["train/rapr", "eval/accuracy"], tmp_path / "fig" / "curves.png",
        labels=["curiosity", "curiosity", "plain"], smooth=0.6,
    )
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 5000
    with pytest.raises(ValueError, match="no run logged 'eval/rapr'.*train/rapr"):
        plot_curves(runs, ["eval/rapr"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="one label per run"):
        plot_curves(runs, ["train/rapr"], tmp_path / "x.png", labels=["a"])


def test_cli_writes_the_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = [str(_run(tmp_path / name, i, i == 0)) for i, name in enumerate(["with", "without"])]
    out = tmp_path / "curves.png"
    assert main([*runs, "--keys", "train/rapr", "eval/accuracy", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC and str(out) in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing"), "--keys", "train/rapr", "--out", str(out)])


def test_module_entry_point(tmp_path: Path) -> None:
    run = _run(tmp_path / "run", 0, True)
    out = tmp_path / "m.png"
    done = subprocess.run(
        [sys.executable, "-m", "agents.plots", str(run), "--keys", "train/rapr", "--out", str(out)],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == PNG_MAGIC
