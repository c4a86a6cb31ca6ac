import json

from llava_circuits.cli import main


def test_bench_capture_prints_ratio_json(capsys):
    assert main(["bench", "capture", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["ratios"]["capture_overhead"] > 0
    assert set(result["seconds"]) == {"plain", "capture"}


def test_transcoders_scale_reports_throughput_and_state_per_layer_count():
    from llava_circuits.transcoders.bench import bench_transcoders_scale

    result = bench_transcoders_scale("llava-1.5-7b-geometry:64", layer_counts=(2, 32), n_features=256, k=8, batch=2,
                                     seq=16, steps=2, warmup=1)
    assert result["d_model"] == 64 and set(result["runs"]) == {"2", "32"}
    for count, run in result["runs"].items():
        assert run["layers"] == int(count) and run["tokens_per_second"] > 0
        assert run["transcoder_state_gb"] == int(count) * (2 * 256 * 64 + 256 + 64) * 16 / 1e9
