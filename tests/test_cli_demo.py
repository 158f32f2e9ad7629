"""The ``tempnet`` command line: ``demo`` end to end at small sizes, ``generate``, knob checks, wiring."""

import json
import math

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
from tempnet.cli import main

SMALL = ["--vocab-size", "300", "--seq-len", "32", "--batch-size", "4", "--hidden-size", "32", "--layers", "1",
         "--heads", "2", "--tempnet-width", "16", "--backend", "torch", "--no-progress"]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--steps", "20", "--out", str(out), *SMALL]) == 0
    return out


def test_demo_writes_its_report(demo_dir):
    report = json.loads((demo_dir / "demo_report.json").read_text())
    assert (demo_dir / "demo_report.png").stat().st_size > 10_000
    assert {"settings", "corpus", "baseline", "tempnet", "tau", "correlation", "wall_seconds", "paths"} <= set(report)
    assert report["corpus"]["source"] == "pydoc_data.topics"
    assert report["settings"]["steps"] == 20
    assert math.isfinite(report["baseline"]["val_ppl"]) and report["baseline"]["val_ppl"] > 1
    for key in ("val_ppl_tau1", "val_ppl_tempnet"):
        assert math.isfinite(report["tempnet"][key]) and report["tempnet"][key] > 1
    tau = report["tau"]
    settings = report["settings"]
    assert settings["tau_min"] < tau["min"] <= tau["quantiles"]["0.5"] <= tau["max"] < settings["tau_max"]
    assert sum(tau["histogram"]["counts"]) == report["corpus"]["eval_tokens"]
    assert -1 <= report["correlation"]["spearman"] <= 1 and -1 <= report["correlation"]["pearson"] <= 1
    assert len(report["baseline"]["train_curve"]) == len(report["tempnet"]["train_curve"]) >= 4


def test_generate_from_the_demo_model(demo_dir, capsys):
    assert main(["generate", "--model", str(demo_dir / "model"), "--prompt", "The", "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out
    assert "with TempNet temperatures" in printed and "per-token temperature" in printed


def test_user_text_and_rho_check(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 400)
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--text", str(text), "--rho", "6.0", "--out", str(tmp_path / "out"), *SMALL])
    assert exit_info.value.code == 2
    assert "--rho=6.0 must be below log V" in capsys.readouterr().err


def test_tau_bounds_must_bracket_one(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--tau-min", "1.5", "--tau-max", "3", "--out", str(tmp_path), *SMALL])
    assert "must bracket 1" in capsys.readouterr().err


def test_train_clip_is_wired(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train-clip", "--help"])
    assert exit_info.value.code == 0
    assert "train-clip" in capsys.readouterr().out
