"""``dynalora report DIR``: Table 1 and Figures 1-5 from tiny run folders written here.

The run folders hold only what the report reads (config.json, metrics.json, log.jsonl), with
numbers chosen so that every expected value is worked out by hand below.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dynalora.analysis import grid_report
from dynalora.analysis.grid_report import load_grid, table1, write_report
from dynalora.cli import main

MODULES = [f"bert.encoder.layer.{i}.attention.self.{t}" for i in range(2) for t in ("query", "value")]


def make_run(root: Path, name: str, *, task: str = "rt", seed: int = 0, score: float = 0.8, method: str = "lora",
             dynamic: dict | None = None, val_losses: tuple[float, ...] = (0.7, 0.6), targets: str | None = None,
             saved: int = 2**20, active_steps: dict | None = None, epochs: float = 1.0) -> Path:  # fmt: skip
    folder = root / name
    folder.mkdir(parents=True)
    config = {"model": "tiny", "task": task, "method": method, "seed": seed, "targets": targets, "lr": 2e-3,
              "dynamic": dynamic is not None, "output_dir": str(folder), "period": None, "k": None,
              "epochs": epochs}  # fmt: skip
    dyn = None
    if dynamic is not None:
        dyn = {"measure": "gradient", "allocator": "discounted_stochastic", "k": 0.5, "period": 10,
               "optimizer": "global", "seed": seed, "k_modules": 2} | dynamic  # fmt: skip
    metrics = {
        "task": task, "model": "tiny", "method": method, "dynamic": dyn, "main_metric": "accuracy",
        "validation": {"accuracy": score}, "test": {"accuracy": score}, "trainable_params": 1000,
        "mean_active_trainable_params": 500.0 if dyn else 1000.0, "num_steps": 20, "num_modules": 4,
        "module_active_steps": active_steps or ({m: 10 for m in MODULES} if dyn else {}), "seed": seed,
        "memory": {"peak_saved_activations": saved, "peak_gradients": 2**19, "peak_optimizer_state": 2**20,
                   "peak_total": saved + 2**19 + 2**20},
        "peak_memory_bytes": 3 * 2**20, "peak_memory_kind": "cpu_peak_rss",
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "metrics.json").write_text(json.dumps(metrics))
    records = [{"type": "eval", "split": "validation", "step": 10 * (i + 1), "loss": loss, "metrics": {}}
               for i, loss in enumerate(val_losses)]  # fmt: skip
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_table1_means_and_sample_stds_over_seeds(tmp_path):
    for seed, (a, b) in enumerate([(0.80, 0.70), (0.81, 0.72), (0.82, 0.74)]):
        make_run(tmp_path, f"lora-rt-{seed}", seed=seed, score=a)
        make_run(tmp_path, f"lora-pol-{seed}", seed=seed, score=b, task="pol", epochs=2.5)
    make_run(tmp_path, "dyn-rt-0", dynamic={}, score=0.79)
    configs = load_grid(tmp_path)
    # sorted folders: dyn-rt-0 first; pol's own epochs belong to the task and split no configuration
    assert [len(c.runs) for c in configs] == [1, 6]
    runs = [r for c in configs for r in c.runs]
    assert grid_report.task_settings(runs) == {"pol": {"epochs": 2.5}, "rt": {"epochs": 1.0}}
    table = table1(configs)
    lines = table.splitlines()
    assert lines[0] == "| Configuration | Trainable params | Mean active params | pol | rt | Mean |"
    lora = next(line for line in lines if line.startswith("| LoRA "))
    # rt: 80, 81, 82 -> 81.0 ± 1.0; pol: 70, 72, 74 -> 72.0 ± 2.0; mean of the two: 76.5
    assert lora == "| LoRA | 1,000 | 1,000 (100%) | 72.0 ± 2.0 (3) | 81.0 ± 1.0 (3) | 76.5 |"
    dyn = next(line for line in lines if line.startswith("| DynaLoRA"))
    assert "| 500 (50%) |  | 79.0 (1) |" in dyn  # no pol run: empty cell, no mean
    assert dyn.endswith("|  |")


def test_configurations_are_named_by_what_sets_them_apart(tmp_path):
    make_run(tmp_path, "a", dynamic={})
    make_run(tmp_path, "b", dynamic={}, seed=1)
    make_run(tmp_path, "c", dynamic={"period": 5})
    labels = sorted(c.label for c in load_grid(tmp_path))
    assert labels == [
        "DynaLoRA (gradient/discounted_stochastic, k=2/4)",
        "DynaLoRA (gradient/discounted_stochastic, k=2/4) [period=5]",
    ]


def test_a_flag_added_mid_grid_does_not_split_a_configuration(tmp_path):
    """Runs written before a flag existed lack it; those that record it all at one value are the
    same configuration as the older ones. Reporting flags never split one."""
    make_run(tmp_path, "old", dynamic={})
    new = make_run(tmp_path, "new", dynamic={"inactive_dtype": "fp32"}, seed=1)
    config = json.loads((new / "config.json").read_text())
    (new / "config.json").write_text(json.dumps(config | {"max_grad_norm": 0.0, "report_to": "none",
                                                          "resolved_dynamic": {"seed": 1}}))  # fmt: skip
    assert [len(c.runs) for c in load_grid(tmp_path)] == [2]
    # once the grid varies the flag, a run without it cannot be placed: it stays on its own
    make_run(tmp_path, "other", dynamic={"inactive_dtype": "bf16"}, seed=2)
    assert [len(c.runs) for c in load_grid(tmp_path)] == [1, 1, 1]


def _grid(root: Path) -> None:
    """Runs for every figure: plain LoRA, forward/gradient at k 1, 2, 4, random at 1, 2, periods, all-linear."""
    for seed in (0, 1):
        make_run(root, f"lora-{seed}", seed=seed, val_losses=(0.70 + seed / 10, 0.60), saved=4 * 2**20)
        for measure in ("forward", "gradient"):
            for k in (1, 2, 4):
                make_run(root, f"{measure}-k{k}-{seed}", seed=seed, saved=k * 2**20, score=0.7 + k / 100,
                         dynamic={"measure": measure, "k": k, "k_modules": k},
                         val_losses=(0.9 - k / 10, 0.8 - k / 10 + seed / 10))  # fmt: skip
        for k in (1, 2):
            make_run(root, f"random-k{k}-{seed}", seed=seed, dynamic={"allocator": "random", "k": k, "k_modules": k})
        for period in (5, 20):
            make_run(root, f"period{period}-{seed}", seed=seed, score=0.6 + period / 100,
                     dynamic={"k": 2, "k_modules": 2, "period": period})  # fmt: skip
    steps = {m: 4 * (i + 1) for i, m in enumerate(MODULES)}
    make_run(root, "wide-0", dynamic={"k": 2}, targets="all-linear", active_steps=steps)
    make_run(root, "wide-1", dynamic={"k": 2}, targets="all-linear", active_steps={m: 0 for m in MODULES}, seed=1)


def test_every_figure_from_a_grid(tmp_path):
    _grid(tmp_path)
    configs = load_grid(tmp_path)
    out = tmp_path / "report"
    out.mkdir()

    fig1 = grid_report.figure_loss(configs, out)
    lines = {line.get_label(): line for line in fig1.figure.axes[0].get_lines()}
    assert set(lines) == {"LoRA (2 seeds)", "DynaLoRA, forward importance (2 seeds)",
                          "DynaLoRA, gradient importance (2 seeds)"}  # fmt: skip
    np.testing.assert_allclose(lines["LoRA (2 seeds)"].get_ydata(), [0.75, 0.60])  # (0.7 + 0.8) / 2
    # the dynamic configuration closest to the most common settings: k = 2 (k 1, 2, 4 tie on runs;
    # period 5/20 and random make k=2 the most common value)
    np.testing.assert_allclose(lines["DynaLoRA, gradient importance (2 seeds)"].get_ydata(), [0.7, 0.65])
    np.testing.assert_array_equal(lines["LoRA (2 seeds)"].get_xdata(), [10, 20])

    fig2 = grid_report.figure_memory(configs, out)
    ax = fig2.figure.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4", "4 (LoRA)"]
    saved = [p.get_height() for p in ax.containers[0]]
    assert saved == [1.0, 2.0, 4.0, 4.0]  # MiB of saved activations: k, and LoRA's 4
    stacked = [p.get_height() for c in ax.containers for p in c]
    assert sum(stacked) == pytest.approx(sum([1, 2, 4, 4]) + 4 * (0.5 + 1.0))

    fig3 = grid_report.figure_low_k(configs, out)
    by_label = {c.get_label(): c for c in fig3.figure.axes[0].containers}
    assert set(by_label) == {"discounted_stochastic, forward", "discounted_stochastic, gradient", "random"}
    np.testing.assert_allclose(
        by_label["discounted_stochastic, gradient"].lines[0].get_ydata().astype(float), [71, 72, 74]
    )
    np.testing.assert_array_equal(by_label["random"].lines[0].get_xdata(), [1, 2])

    fig4 = grid_report.figure_period(configs, out)
    (container,) = fig4.figure.axes[0].containers
    np.testing.assert_array_equal(container.lines[0].get_xdata(), [5, 10, 20])
    np.testing.assert_allclose(container.lines[0].get_ydata().astype(float), [65, 72, 80])  # the k=2 default: 0.72

    fig5 = grid_report.figure_activity(configs, out)
    image = fig5.figure.axes[0].images[0].get_array()
    # mean of the two seeds (4, 8, 12, 16 and 0) over 20 steps, layers down, query/value across
    np.testing.assert_allclose(image, [[0.1, 0.2], [0.3, 0.4]])

    path = write_report(tmp_path, out)
    text = path.read_text()
    for name in ("fig1_validation_loss.png", "fig2_memory.png", "fig3_allocators.png", "fig4_period.png",
                 "fig5_module_activity.png"):  # fmt: skip
        assert f"]({name})" in text
        assert (out / name).stat().st_size > 10_000
    assert "skipped" not in text
    assert "## Table 1" in text


def test_figures_without_their_runs_are_skipped_with_a_note(tmp_path, capsys):
    make_run(tmp_path, "lora-0")
    make_run(tmp_path, "lora-1", seed=1)
    assert main(["report", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == f"report in {tmp_path / 'report.md'}"
    text = (tmp_path / "report.md").read_text()
    assert text.count("skipped:") == 5
    assert "| LoRA | 1,000 | 1,000 (100%) | 80.0 ± 0.0 (2) | 80.0 |" in text
    assert not list(tmp_path.glob("*.png"))


def test_report_dir_and_single_runs(tmp_path, capsys):
    run = make_run(tmp_path / "grid", "lora-0")
    assert main(["report", str(tmp_path / "grid"), "--report-dir", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "report.md").is_file()
    assert not (tmp_path / "grid" / "report.md").exists()
    capsys.readouterr()
    assert main(["report", str(run)]) == 0  # one run folder: the table, as before
    assert "LoRA" in capsys.readouterr().out
    assert main(["report", str(run), "--report-dir", str(tmp_path / "x")]) == 2
    assert "--report-dir is for a folder of run folders" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["markdown", "text"])  # text, the table's default, was accepted and ignored
def test_format_is_refused_for_a_grid(tmp_path, capsys, fmt):
    make_run(tmp_path / "grid", "lora-0")
    assert main(["report", str(tmp_path / "grid"), "--format", fmt]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "a grid's report is report.md" in err
    assert not (tmp_path / "grid" / "report.md").exists()


def test_a_stale_run_beside_its_replacement_is_not_a_second_seed(tmp_path, capsys):
    # the grid gained `lr`: the old seed-0 folder stayed beside the new one, and the cell read "(2)"
    make_run(tmp_path, "seed=0", score=0.70)
    make_run(tmp_path, "lr=0.001,seed=0", score=0.72)
    with pytest.raises(grid_report.UsageError, match="seed=0 are the same configuration, task and seed"):
        load_grid(tmp_path)
    # a sweep's folder: only the runs its sweep.json lists are results of it
    (tmp_path / "sweep.json").write_text(json.dumps({"name": "g", "runs": [{"name": "lr=0.001,seed=0"}]}))
    (config,) = load_grid(tmp_path)
    assert [Path(r["run_dir"]).name for r in config.runs] == ["lr=0.001,seed=0"]
    assert config.scores("rt") == [0.72]


def test_a_cell_reads_one_split(tmp_path):
    # a run without a test score was averaged on validation with the others' test scores
    make_run(tmp_path, "a", seed=0, score=0.70)
    make_run(tmp_path, "b", seed=1, score=0.70)
    nan_test = make_run(tmp_path, "c", seed=2, score=0.90)
    metrics = json.loads((nan_test / "metrics.json").read_text())
    metrics["test"] = {"accuracy": None}
    (nan_test / "metrics.json").write_text(json.dumps(metrics))
    (config,) = load_grid(tmp_path)
    assert config.split("rt") == "test" and config.scores("rt") == [0.70, 0.70]
    assert "| 70.0 ± 0.0 (2) |" in table1([config])
    for folder in ("a", "b"):  # no test scores at all: validation, and the cell says so
        metrics = json.loads((tmp_path / folder / "metrics.json").read_text())
        metrics["test"] = {}
        (tmp_path / folder / "metrics.json").write_text(json.dumps(metrics))
    (config,) = load_grid(tmp_path)
    assert config.split("rt") == "validation" and sorted(config.scores("rt")) == [0.70, 0.70, 0.90]
    assert "(3, validation) |" in table1([config])


def test_a_method_that_differs_by_task_is_a_configuration_not_a_recipe(tmp_path):
    # LoRA on one task and VeRA on the other became one row "LoRA" averaging both
    make_run(tmp_path, "lora-a", task="a", method="lora", score=0.9)
    make_run(tmp_path, "vera-b", task="b", method="vera", score=0.5)
    configs = load_grid(tmp_path)
    assert sorted(c.label for c in configs) == ["LoRA", "VeRA"]
    assert "method" not in grid_report.task_settings([r for c in configs for r in c.runs]).get("a", {})


def test_configurations_that_differ_by_their_cap_have_different_labels(tmp_path):
    make_run(tmp_path, "free", dynamic={"allocator": "topk"})
    make_run(tmp_path, "cap35", dynamic={"allocator": "topk", "memory_cap": 0.35, "cap_mode": "recompute"})
    make_run(tmp_path, "cap50", dynamic={"allocator": "topk", "memory_cap": 0.5, "cap_mode": "recompute"})
    labels = sorted(c.label for c in load_grid(tmp_path))
    assert labels == [
        "DynaLoRA (gradient/topk, k=2/4)",
        "DynaLoRA (gradient/topk, k=2/4, cap=0.35 recompute)",
        "DynaLoRA (gradient/topk, k=2/4, cap=0.5 recompute)",
    ]


def test_runs_without_config_json_are_not_refused_as_one_seed(tmp_path):
    for seed in (0, 1):  # recorded only in metrics.json
        (make_run(tmp_path, f"s{seed}", seed=seed, score=0.7 + seed / 10) / "config.json").unlink()
    (config,) = load_grid(tmp_path)
    assert sorted(config.scores("rt")) == pytest.approx([0.7, 0.8])
