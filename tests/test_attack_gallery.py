"""``benchmarks/attack_gallery.py``: the small grid end to end in 2 processes (3 rules x 3 attacks, 20 steps, seed 0,
about 10 s on a quiet 2-core machine) and the generated block of the markdown."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "attack_gallery.py"


def load_gallery():
    spec = importlib.util.spec_from_file_location("attack_gallery", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_small_grid_writes_every_cell_and_the_mean_breaks_under_random_gradients(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--grid", "small", "--seeds", "1", "--jobs", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    gallery = load_gallery()
    rules, attacks = gallery.grid("small")
    results = json.loads((tmp_path / "attack_gallery.json").read_text())
    assert results["errors"] == {}
    assert (results["steps"], results["seeds"]) == (20, [0])
    accuracy = {rule: {attack: values[0] for attack, values in row.items()} for rule, row in results["accuracy"].items()}
    assert all(0.0 <= accuracy[r][a] <= 1.0 for r in rules for a in attacks)
    # Measured over seeds 0-5 at 20 steps: no attack 0.50-0.68; cwmed - mean under random 0.17-0.49 (seed 0: 0.27).
    assert all(accuracy[rule]["none"] > 0.3 for rule in rules)
    assert accuracy["cwmed"]["random"] - accuracy["mean"]["random"] > 0.1
    markdown = (tmp_path / "attack_gallery.md").read_text()
    assert "| rule | " + " | ".join(attacks) + " |" in markdown
    for rule in rules:
        (row,) = [line for line in markdown.splitlines() if line.startswith(f"| {rule} |")]
        assert row.count("|") == len(attacks) + 2 and "error" not in row
    assert "--grid small --seeds 1 --steps 20 --jobs 2" in markdown
    assert (tmp_path / "attack_gallery.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every gallery process
    try:
        _, again, _, error = gallery._run_task(("cwmed", "random", 0, 20))  # in this process, as --jobs 1 runs it
    finally:
        torch.set_num_threads(threads)
    assert error is None and again == accuracy["cwmed"]["random"]  # a cell's result is its seed's, wherever it ran


def test_the_generated_block_replaces_only_itself(tmp_path):
    gallery = load_gallery()
    path = tmp_path / "attack_gallery.md"
    path.write_text(f"# Title\n\nReading before.\n\n{gallery.BEGIN}\nold table\n{gallery.END}\n\nReading after.\n")
    gallery.write_block(path, "new table")
    assert path.read_text() == (f"# Title\n\nReading before.\n\n{gallery.BEGIN}\nnew table\n{gallery.END}\n\n"
                                "Reading after.\n")
