"""deeparch-bench / python -m deeparch_kernels: argument parsing, usage errors (exit 2), a real
quick run on the CPU to a temporary directory (JSON schema, markdown), compare and plot."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deeparch_kernels import cli
from deeparch_kernels.bench import schema

ROOT = Path(__file__).resolve().parents[1]


def test_help(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for opt in ("--device", "--ops", "--models", "--dtypes", "--shapes", "--batch", "--backends", "--quick",
                "--no-verify", "--no-bench", "--no-compile", "--out", "--reps", "--warmup"):
        assert opt in out


@pytest.mark.parametrize("argv,needle", [
    (["--backends", "cpu,nope"], "unknown backend 'nope'"),
    (["--ops", "conv,matmul"], "unknown op 'matmul'"),
    (["--models", "alexnet"], "unknown model 'alexnet'"),
    (["--dtypes", "fp8"], "unknown dtype 'fp8'"),
    (["--shapes", "huge"], "unknown shape set 'huge'"),
    (["--shapes", "conv:64"], "bad conv shape"),
    (["--batch", "0"], "--batch"),
    (["--batch", "x"], "--batch"),
    (["--device", "tpu"], "--device"),
    (["--image-size", "8"], "--image-size"),
    (["--frobnicate"], "unrecognized arguments"),
])
def test_usage_errors_exit_2(argv, needle, capsys):
    assert cli.main(argv) == 2
    assert needle in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_without_cuda_is_a_usage_error(capsys):
    assert cli.main(["--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_defaults_on_cpu():
    cfg = cli.parse_config([] if not torch.cuda.is_available() else ["--device", "cpu"])
    assert cfg.device.type == "cpu" and cfg.shapes == ["cpu"]
    assert cfg.ops == ["add_relu", "add_relu_", "fused_conv2d"]
    assert cfg.models == ["vgg16", "resnet18", "resnet50"] and cfg.model_batch == 8 and cfg.latency
    assert cfg.compile and cfg.compile_models  # whole models too: freezing compiles take seconds here
    off = cli.parse_config(["--device", "cpu", "--no-compile-models"])
    assert off.compile and not off.compile_models
    assert cli.parse_config(["--device", "cpu", "--compile-models"]).compile_models  # the old flag still parses
    assert "cpu" in cfg.bench_backends and "reference" not in cfg.bench_backends
    assert "triton" not in cfg.bench_backends  # never timed through the interpreter
    assert "auto" in cfg.verify_backends and "reference" in cfg.verify_backends
    assert cfg.verify_dtypes == [torch.float32] and cfg.budget_s > 0
    assert cfg.out == Path("deeparch-results")


def test_options_parse():
    cfg = cli.parse_config(["--device", "cpu", "--ops", "add", "--models", "none", "--dtypes", "bf16,fp32",
                            "--shapes", "conv:64x56x1,add:2x3x4x5", "--batch", "1,4", "--backends", "cpu,aten",
                            "--no-compile", "--no-verify", "--reps", "7", "--warmup", "0", "--seed", "5",
                            "--memory-format", "contiguous", "--no-save", "--budget", "0"])
    assert cfg.ops == ["add_relu", "add_relu_"] and cfg.models == []
    assert cfg.dtypes == [torch.bfloat16, torch.float32] and cfg.batch == [1, 4] and cfg.model_batch == 4
    assert cfg.shapes == ["conv:64x56x1", "add:2x3x4x5"] and cfg.memory_format == "contiguous"
    assert cfg.verify_backends == ["cpu", "aten"] and cfg.bench_backends == ["cpu", "aten"]
    assert not cfg.compile and not cfg.verify and (cfg.reps, cfg.warmup, cfg.seed) == (7, 0, 5)
    assert cfg.out is None and cfg.budget_s == 0
    assert cli.parse_config(["--device", "cpu", "--ops", "conv"]).ops == ["fused_conv2d"]
    q = cli.parse_config(["--device", "cpu", "--quick"])
    assert q.shapes == ["tiny"] and q.models == ["resnet18"] and q.quick and q.image_size == 64


def test_unavailable_backend_is_a_note_not_an_error():
    cfg = cli.parse_config(["--device", "cpu", "--backends", "cuda,cpu"])
    assert cfg.verify_backends == ["cuda", "cpu"] and cfg.bench_backends == ["cpu"]
    assert any("'cuda' is not available" in n for n in cfg.notes)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick")
    # explicit backends: the Triton interpreter (TRITON_INTERPRET=1 in the tests) costs seconds
    rc = cli.main(["--device", "cpu", "--quick", "--no-compile", "--models", "resnet18", "--image-size", "32",
                   "--model-batch", "1", "--backends", "cpu,reference", "--reps", "3", "--max-time", "0.02",
                   "--out", str(out), "--seed", "11", "-q", "--no-plots", "--system-malloc"])
    return rc, out


def test_quick_run_writes_valid_results(quick_run, capsys):
    rc, out = quick_run
    assert rc == 0
    (jpath,) = out.glob("*.json")
    assert jpath.name.endswith("-cpu.json")
    data = json.loads(jpath.read_text())
    assert schema.validate(data) == []
    assert data["env"]["device_type"] == "cpu" and data["env"]["git"]["commit"]
    assert "malloc_kept_bytes" in data["env"]
    assert data["verification"]["seed"] == 11 and data["verification"]["summary"]["fail"] == 0
    assert {c["op"] for c in data["verification"]["results"]} == {"add_relu", "add_relu_", "fused_conv2d", "model"}
    ops = {r["op"] for r in data["timings"]}
    assert ops == {"add_relu", "add_relu_", "fused_conv2d", "model"}
    ours = [r for r in data["timings"] if r["kind"] == "ours" and r["section"] == "op"]
    assert ours and all(r["status"] == "ok" and r["speedup_vs_eager"] > 0 for r in ours)
    assert {r["provider"] for r in data["timings"] if r["section"] == "model"} >= {"torchvision", "compile"}
    md = jpath.with_suffix(".md").read_text()
    assert md.startswith("# deeparch-bench") and "residual add + ReLU" in md and "| provider |" in md


def test_compare_subcommand(quick_run, tmp_path, capsys):
    _, out = quick_run
    (a,) = out.glob("*.json")
    data = json.loads(a.read_text())
    for r in data["timings"]:
        if r["median_ms"]:
            r["median_ms"] *= 0.5
    b = tmp_path / "b.json"
    b.write_text(json.dumps(data))
    capsys.readouterr()
    assert cli.main(["compare", str(a), str(b)]) == 0
    text = capsys.readouterr().out
    assert "B/A" in text and "0.500" in text
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema_version": 1}')
    assert cli.main(["compare", str(a), str(bad)]) == 2
    assert "not a valid deeparch-bench result" in capsys.readouterr().err


def test_plot_subcommand(quick_run, tmp_path, capsys):
    _, out = quick_run
    (a,) = out.glob("*.json")
    rc = cli.main(["plot", str(a), "--out", str(tmp_path)])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert rc == 1 and "matplotlib" in capsys.readouterr().err
        return
    assert rc == 0 and sorted(p.name.split("-cpu-")[1] for p in tmp_path.glob("*.png")) == [
        "add_relu.png", "fused_conv2d.png", "models.png"]


def test_python_m_entry_point_exit_codes():
    """``python -m deeparch_kernels`` is the same program: a usage error exits 2 with the message."""
    p = subprocess.run([sys.executable, "-m", "deeparch_kernels", "--backends", "bogus"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "unknown backend 'bogus'" in p.stderr


def test_defaults_on_a_gpu_machine(monkeypatch):
    """What a plain run picks on a GPU machine (scripts/gpu_check.sh runs it with no arguments),
    checked here with CUDA faked."""
    import deeparch_kernels.backends as be

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    avail = {"cuda": be.Availability(True, ""), "triton": be.Availability(True, ""),
             "cpu": be.Availability(False, "the 'cpu' backend runs CPU tensors"),
             "aten": be.Availability(True, ""), "reference": be.Availability(True, "")}
    monkeypatch.setattr(be, "available_backends", lambda device=None: avail)
    cfg = cli.parse_config([])
    assert cfg.device == torch.device("cuda", 0) and cfg.shapes == ["anchors"]
    assert cfg.verify_dtypes == [torch.float32, torch.float16, torch.bfloat16]
    assert cfg.verify_backends == ["cuda", "triton", "aten", "reference", "auto"]
    assert cfg.bench_backends == ["cuda", "triton", "aten"] and cfg.model_backends == ["auto"]
    assert cfg.compile and cfg.compile_models and cfg.model_batch == 64 and cfg.latency
    assert cfg.model_dtypes == [torch.float16] and 200 <= cfg.budget_s <= 240


@pytest.mark.parametrize("native", [False, True])
def test_cpu_models_run_bf16_too_where_the_cpu_multiplies_it_natively(monkeypatch, native):
    """On a CPU the models run in fp32, and in bf16 too where the CPU has native bf16
    (AVX512-BF16 or AMX, env.cpu_bf16_isa); --dtypes overrides both; the report's header names
    the bf16 ISA it ran on."""
    from deeparch_kernels.bench import env, report

    monkeypatch.setattr(env, "cpu_runs_bf16_natively", lambda: native)
    cfg = cli.parse_config(["--device", "cpu"])
    assert cfg.model_dtypes == [torch.float32] + ([torch.bfloat16] if native else [])
    assert cfg.budget_s == 370.0 + (216.0 if native else 0.0)  # the bf16 models: their reserve
    assert cli.parse_config(["--device", "cpu", "--dtypes", "bf16"]).model_dtypes == [torch.bfloat16]
    e = env.environment(torch.device("cpu"))
    assert e["cpu_bf16_isa"] in (None, "avx512_bf16", "amx_bf16")
    head = report.header_text({"env": e, "created": "now"})
    assert f"native bf16: {e['cpu_bf16_isa'] or 'none'}" in head


def test_cpu_runs_keep_freed_memory_unless_system_malloc(monkeypatch):
    """On a CPU the main job first has glibc keep freed memory (deeparch_kernels.keep_freed_memory,
    for every provider), says so in its notes and header; --system-malloc leaves malloc alone."""
    import deeparch_kernels as dk
    from deeparch_kernels.bench import report
    from deeparch_kernels.bench.runner import run

    assert cli.parse_config(["--device", "cpu"]).keep_freed_memory
    assert not cli.parse_config(["--device", "cpu", "--system-malloc"]).keep_freed_memory
    calls = []
    monkeypatch.setattr(dk, "keep_freed_memory", lambda: calls.append(1) or True)
    argv = ["--device", "cpu", "--ops", "none", "--models", "none", "--no-verify", "--no-save", "-q"]
    for extra, kept in (([], True), (["--system-malloc"], False)):
        calls.clear()
        result = run(cli.parse_config(argv + extra))
        assert calls == ([1] if kept else [])
        assert any("keeps up to 1024 MiB of freed memory" in n for n in result["notes"]) == kept
    assert report._malloc({"malloc_kept_bytes": 1 << 30}) == "malloc keeps 1024 MiB freed"
    assert report._malloc({"malloc_kept_bytes": None}) == "system malloc"
