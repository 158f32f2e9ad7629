"""Smoke test of the benchmark runner (tempnet bench) on tiny CPU shapes."""

import json

import torch

from tempnet import bench
from tempnet._validation import value_checks_enabled


def test_runner_measures_every_implementation_and_writes_reports(tmp_path):
    cases = [bench.Case("ce", {"N": 32, "V": 300}, "float32", "dro")]
    meta, results = bench.run(cases, torch.device("cpu"), repeats=2, warmup=1, measure_memory=True,
                              progress=lambda _: None)
    assert value_checks_enabled(), "the runner must restore the value checks it switched off"
    assert meta["tempnet_backend"] == "cpp"
    names = [r.impl for r in results]
    assert names[0] == "tempnet" and {"eager", "torch.compile", "tempnet inplace_backward"} <= set(names)
    for result in results:
        assert result.total_ms > 0 and result.forward_ms > 0
        assert result.peak_mb is not None and result.peak_mb >= 0
    assert results[0].ratio_to_first is None and all(r.ratio_to_first > 0 for r in results[1:])
    assert meta["ceilings"]["copy_GBps"] > 0 and meta["value_checks"] is False
    table = bench.markdown_table(results)
    assert table.count("\n") == len(results) + 1 and "1.00 (first)" in table


def test_cli_entry_writes_json(tmp_path):
    parser = bench.argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--device", "cpu", "--quick", "--ops", "contrastive", "--repeats", "1",
                              "--warmup", "0", "--no-memory", "--out", str(tmp_path)])
    path = bench.main_from_args(args)
    payload = json.loads(path.read_text())
    assert {r["impl"] for r in payload["results"]} >= {"tempnet", "eager"}
    assert payload["meta"]["torch"] == torch.__version__
