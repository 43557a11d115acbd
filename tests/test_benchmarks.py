"""Smoke tests of the benchmark harness and the profiler: tiny shapes, seconds of work.

They check that the harness measures what it says (the baselines compute the same attention as the
reference, the CPU memory method sees an allocation of known size, the timer runs what it is told)
and that each entry point writes its files. Speed itself is never asserted here.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import aanet_kernels
from aanet_kernels.reference import attention_2d_reference
from benchmarks import bench_attention, common
from benchmarks.roofline import Ceilings, roofline_time

TINY = bench_attention.PRESETS["tiny"]


@pytest.mark.parametrize("shape", TINY, ids=lambda s: s.label)
@pytest.mark.parametrize("method", ["cpu", "sdpa_dense", "sdpa_nobias"])
def test_baselines_compute_the_reference_attention(shape, method):
    if method not in bench_attention.methods_for(torch.device("cpu")):
        pytest.skip(f"{method} is not available here")
    x = bench_attention.make_inputs(shape, torch.float64, torch.device("cpu"), seed=3)
    out = bench_attention.forward_fn(method, x, shape)()
    bias = (None, None) if method == "sdpa_nobias" else (x["bias_h"], x["bias_w"])
    expected = attention_2d_reference(
        x["q"], x["k"], x["v"], *bias, height=shape.height, width=shape.width, scale=shape.dkh**-0.5
    )
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_fwdbwd_mode_gives_every_input_a_gradient():
    shape = TINY[1]
    x = bench_attention.make_inputs(shape, torch.float64, torch.device("cpu"))
    for t in x.values():
        t.requires_grad_(True)
    fn, setup = bench_attention.mode_fns(
        bench_attention.forward_fn("sdpa_dense", x, shape), x, "fwdbwd"
    )
    assert setup is None
    fn()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in x.values())


def test_time_fn_runs_warmup_then_repeats_with_setup_before_each():
    calls: list[str] = []
    timing = common.time_fn(
        lambda arg: calls.append(arg), "cpu", setup=lambda: calls.append("s") or "f",
        warmup=2, repeats=4, min_repeats=4, budget_s=0.0,
    )  # fmt: skip
    assert calls == ["s", "f"] * 6
    assert timing.repeats == 4 and 0 <= timing.min_s <= timing.median_s <= timing.max_s


def test_time_fn_rejects_bad_repeats():
    with pytest.raises(ValueError, match="min_repeats"):
        common.time_fn(lambda: None, "cpu", repeats=2, min_repeats=3)


def test_time_interleaved_runs_cases_in_rounds_and_records_failures():
    calls: list[str] = []

    def broken() -> None:
        raise RuntimeError("kernel exploded")

    cases = {
        "a": (lambda: calls.append("a"), None),
        "b": (lambda arg: calls.append(arg), lambda: "b"),
        "bad": (broken, None),
    }
    out = common.time_interleaved(cases, "cpu", warmup=1, repeats=3, min_repeats=3, budget_s=0)
    assert calls == ["a", "b"] * 4
    assert out["a"].repeats == out["b"].repeats == 3
    assert out["bad"].startswith("error: RuntimeError: kernel exploded")


def test_rss_peak_bytes_sees_a_known_allocation():
    # 64 MiB touched and freed inside the call, measured in a worker as the harness does.
    code = (
        "import json, torch; from benchmarks.common import rss_peak_bytes; "
        "f = lambda: torch.ones(16 << 20).sum(); f(); "
        "print(json.dumps([rss_peak_bytes(f), rss_peak_bytes(lambda: None)]))"
    )
    big, nothing = common.run_worker(["-c", code], None, timeout_s=120)
    assert 62 * 2**20 <= big <= 72 * 2**20
    assert nothing < 2 * 2**20


def test_roofline_time_takes_the_binding_ceiling():
    ceilings = Ceilings(1e12, 1e9, 1e11, "float32")
    assert roofline_time(2e12, 1e6, 1e9, ceilings) == (2.0, "matmul")
    assert roofline_time(1e9, 3e9, 1e9, ceilings) == (3.0, "exp")
    assert roofline_time(1e9, 1e6, 5e11, ceilings) == (5.0, "memory")


def test_bench_attention_tiny_writes_csv_markdown_and_plot(tmp_path):
    stem = f"attention_{common.device_slug('cpu')}"
    # An earlier run's plot of a family this run leaves out no longer matches the table: removed
    # (until 2026-12-04 it stayed). A tagged run's plot is another table's: kept.
    stale, tagged = tmp_path / f"{stem}_aaconv_dv8.png", tmp_path / f"{stem}_x_aaconv_dv8.png"
    stale.write_bytes(b"earlier run")
    tagged.write_bytes(b"a tagged run")
    methods = ["reference", "sdpa_dense", "sdpa_nobias"]
    rows = bench_attention.main([
        "--device", "cpu", "--preset", "tiny", "--methods", ",".join(methods),
        "--modes", "fwd,fwdbwd", "--warmup", "0", "--repeats", "3", "--budget", "0",
        "--out-dir", str(tmp_path),
    ])  # fmt: skip
    assert len(rows) == len(TINY) * len(methods) * 2
    assert all(r.status == "ok" and r.time_ms > 0 and r.peak_mib is not None for r in rows)
    assert not stale.exists() and tagged.read_bytes() == b"a tagged run"
    with (tmp_path / f"{stem}.csv").open() as f:
        written = list(csv.DictReader(f))
    assert len(written) == len(rows)
    assert {w["torch"] for w in written} == {torch.__version__}
    assert {w["device_name"] for w in written} == {common.device_name("cpu")}
    md = (tmp_path / f"{stem}.md").read_text()
    assert "## fwdbwd" in md and "sdpa_nobias" in md
    assert (tmp_path / f"{stem}_tiny.png").stat().st_size > 0


def test_bench_attention_skips_dense_methods_above_the_length_limit(tmp_path):
    rows = bench_attention.main([
        "--device", "cpu", "--preset", "tiny", "--methods", "reference,sdpa_nobias",
        "--modes", "fwd", "--max-dense-length", "10", "--no-memory", "--no-plot",
        "--warmup", "0", "--repeats", "3", "--budget", "0", "--out-dir", str(tmp_path),
    ])  # fmt: skip
    status = {(r.length, r.method): r.status for r in rows}
    assert status[(9, "reference")] == "ok"
    assert status[(15, "reference")].startswith("skipped")
    assert status[(15, "sdpa_nobias")] == "ok"


def test_bench_attention_rejects_unknown_method(tmp_path):
    with pytest.raises(SystemExit, match="--methods: expected"):
        bench_attention.main(["--device", "cpu", "--preset", "tiny", "--methods", "nope"])


def test_bench_train_tiny_writes_table(tmp_path):
    pytest.importorskip("aanet.model", reason="the AANet model is not in this checkout")
    pytest.importorskip("aanet.config", reason="the AANet config is not in this checkout")
    from benchmarks import bench_train

    rows = bench_train.main([
        "--device", "cpu", "--variants", f"reference,{bench_train.PLAIN}", "--batch-size", "2",
        "--input-size", "32", "--warmup", "1", "--repeats", "2", "--min-repeats", "2",
        "--budget", "0", "--out-dir", str(tmp_path), "--compile", "aot_eager",
    ])  # fmt: skip
    plain, compiled = bench_train.PLAIN, f"{bench_train.PLAIN}, aot_eager"
    assert [r["label"] for r in rows] == ["reference", plain, "reference, aot_eager", compiled]
    assert all(r["status"] == "ok" and r["steps_per_s"] > 0 and r["peak_mib"] > 0 for r in rows)
    assert all(r["first_step_s"] > 0 for r in rows)
    md = (tmp_path / f"train_{common.device_slug('cpu')}.md").read_text()
    assert "time / plain conv" in md and "reference, aot_eager" in md


def test_ablation_tiny_trains_both_variants_and_writes_table_and_plot(tmp_path):
    pytest.importorskip("aanet.train", reason="the AANet trainer is not in this checkout")
    from benchmarks import ablation_aanet

    config = tmp_path / "tiny.json"
    config.write_text(
        json.dumps(
            {
                "data_root": str(tmp_path / "data"),
                "num_train": 8,
                "num_test": 4,
                "image_size": 48,
                "input_size": 32,
                "width": 16,
                "blocks": [1, 1, 1],
                "batch_size": 4,
                "device": "cpu",
            }
        )
    )
    results = ablation_aanet.main([
        "--config", str(config), "--epochs", "1", "--runs-dir", str(tmp_path / "runs"),
        "--out-dir", str(tmp_path / "out"), "--name", "tiny", "--no-progress",
    ])  # fmt: skip
    # The variants differ in their layers, so in their parameter counts.
    assert results["attention"]["parameters"] != results["no-attention"]["parameters"]
    assert all(len(r["history"]) == 1 for r in results.values())
    md = (tmp_path / "out" / "aanet_ablation_tiny.md").read_text()
    assert "| AANet, attention |" in md and "| AANet, no-attention |" in md
    assert (tmp_path / "out" / "aanet_ablation_tiny.png").stat().st_size > 0
    assert (tmp_path / "runs" / "no-attention" / "last.pt").exists()


def test_profiler_writes_trace_with_named_phases(tmp_path):
    from aanet_kernels import profile

    profile.main([
        "--backend", "reference", "--device", "cpu", "--shape", "1,2,3,4,4,3", "--warmup", "1",
        "--steps", "1", "--out-dir", str(tmp_path),
    ])  # fmt: skip
    (trace,) = tmp_path.glob("*.trace.json")
    names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
    assert {"relative_logits", "attention_2d.forward", "attention_2d.backward"} <= names
    assert "attention_2d.forward" in next(tmp_path.glob("*.top.txt")).read_text()


def test_profiler_aaconv_single_launch_runs(capsys):
    from aanet_kernels import profile

    profile.main([
        "--op", "aaconv", "--backend", "reference", "--device", "cpu", "--shape", "1,2,4,4,4,2",
        "--warmup", "1", "--single-launch",
    ])  # fmt: skip
    assert "single launch of aaconv fwdbwd" in capsys.readouterr().out


def test_profiler_rejects_bad_shape():
    from aanet_kernels import profile

    with pytest.raises(SystemExit):
        profile.main(["--shape", "1,2,3"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is present")
def test_bench_attention_gpu_tiny_every_method(tmp_path):
    rows = bench_attention.main([
        "--device", "cuda", "--preset", "tiny", "--dtype", "float32", "--modes", "fwd,fwdbwd",
        "--repeats", "3", "--budget", "0", "--out-dir", str(tmp_path),
    ])  # fmt: skip
    methods = {r.method for r in rows}
    assert {"reference", "sdpa_dense", "sdpa_nobias", "flex"} <= methods
    assert set(aanet_kernels.available_backends("cuda")) <= methods
    assert all(r.time_ms and r.time_ms > 0 for r in rows if r.method != "flex")
    assert all(r.roofline_pct is not None for r in rows if r.time_ms)


@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")
@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(
                    not torch.cuda.is_available(), reason="needs a CUDA GPU; none is present"
                ),
            ],
        ),
    ],
)
def test_flex_baseline_computes_the_reference_attention(device, monkeypatch):
    """The ``flex`` method's ``score_mod``; on the CPU through FlexAttention's eager forward
    (compiling it, as the benchmark does, would take half a minute)."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    if device == "cpu":
        monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    monkeypatch.setattr(bench_attention, "_flex_compiled", {})
    shape = bench_attention.Shape("t", 1, 2, 4, 5, 16, 16)
    x = bench_attention.make_inputs(shape, torch.float32, torch.device(device), seed=1)
    out = bench_attention.forward_fn("flex", x, shape)()
    expected = attention_2d_reference(
        *(x[n].double() for n in ("q", "k", "v", "bias_h", "bias_w")),
        height=shape.height, width=shape.width, scale=shape.dkh**-0.5,
    )  # fmt: skip
    tol = 1e-5 if device == "cpu" else 1e-4  # CUDA: compiled, its exp and sums in other orders
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


@pytest.mark.skipif(
    "cpu" not in aanet_kernels.available_backends("cpu"),
    reason="the C++ extension is not built (run `make test`, which builds it)",
)
def test_bench_per_sample_grads_tiny_checks_and_writes_table(tmp_path):
    from benchmarks import bench_per_sample_grads as bench

    methods = ["vmap_reference", "loop_reference", "vmap_cpu"]
    methods += ["compiled_cpu"] if bench.COMPILES else []  # torch 2.11: see the module docstring
    rows = bench.main([
        "--device", "cpu", "--samples", "2", "--channels", "24", "--sizes", "5",
        "--methods", ",".join(methods), "--warmup", "0",
        "--repeats", "1", "--budget", "0", "--out-dir", str(tmp_path),
    ])  # fmt: skip
    assert [r["method"] for r in rows] == methods
    assert all(r["status"] == "ok" and r["time_ms"] > 0 and "peak_mib" in r for r in rows)
    md = (tmp_path / f"per_sample_grads_{common.device_slug('cpu')}.md").read_text()
    assert "speed vs vmap_reference" in md


def test_bench_per_sample_grads_disagreement_sees_a_wrong_gradient():
    from benchmarks import bench_per_sample_grads as bench

    expected = {"w": torch.ones(2, 3)}
    assert bench.disagreement({"w": torch.ones(2, 3)}, expected) == 0
    assert bench.disagreement({"w": torch.ones(2, 3) * 1.01}, expected) > 1e-3


def test_bench_per_sample_grads_rejects_unknown_method(tmp_path):
    from benchmarks import bench_per_sample_grads as bench

    with pytest.raises(SystemExit, match="--methods"):
        bench.main(["--device", "cpu", "--methods", "vmap_nope", "--out-dir", str(tmp_path)])


def test_gpu_suite_stops_a_step_past_its_time_limit_and_reports_it(tmp_path):
    """benchmarks/run_gpu_suite.sh with a stand-in interpreter (no GPU needed): a step over
    STEP_TIMEOUT is stopped and named as failed, the others still run, every step is timed."""
    stub = tmp_path / "python"
    stub.write_text(
        "#!/usr/bin/env bash\n"
        '[[ "$1" == "-c" ]] && exit 0\n'  # the environment report
        '[[ "$1 $2" == "-m pytest" ]] && exec sleep 60\n'  # the GPU tests: too slow
        "exit 0\n"  # pip install: fine
    )
    stub.chmod(0o755)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "run_gpu_suite.sh"
    env = {**os.environ, "PYTHON": str(stub), "OUT": str(tmp_path / "out"),
           "STEPS": "build tests", "STEP_TIMEOUT": "1"}  # fmt: skip
    run = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "FAILED steps: pytest_gpu" in run.stdout
    times = (tmp_path / "out" / "times.txt").read_text().split("\n")
    assert [line.split()[0] for line in times if line] == ["build", "pytest_gpu"]
    assert int(times[1].split()[1]) < 30  # stopped at the limit, not after the step's 60 s


def test_gpu_suite_sanitizes_both_gpu_backends(tmp_path):
    """The sanitize step's pytest selection (read from what the script hands compute-sanitizer)
    collects tests of the CUDA kernels and of the Triton kernels, in fp32 and bf16."""
    stub_dir = tmp_path / "bin"
    stub_dir.mkdir()
    sanitizer = stub_dir / "compute-sanitizer"
    sanitizer.write_text(f'#!/usr/bin/env bash\nprintf "%s\\0" "$@" > "{tmp_path}/args_$2"\n')
    sanitizer.chmod(0o755)
    python = stub_dir / "python"  # answers the suite's GPU check (only named to the sanitizer)
    python.write_text("#!/usr/bin/env bash\nexit 0\n")
    python.chmod(0o755)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PATH": f"{stub_dir}:{os.environ['PATH']}", "PYTHON": str(python),
           "OUT": str(tmp_path / "out"), "STEPS": "sanitize"}  # fmt: skip
    run = subprocess.run(["bash", str(root / "benchmarks" / "run_gpu_suite.sh")], env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    for tool in ("memcheck", "racecheck"):
        args = (tmp_path / f"args_{tool}").read_text().split("\0")[:-1]
        pytest_args = args[args.index("pytest") + 1 :]
        collected = subprocess.run(
            [sys.executable, "-m", "pytest", "--collect-only", "-p", "no:cacheprovider",
             *pytest_args],  # the script's own -q lists the test ids
            cwd=root, capture_output=True, text=True, timeout=300,
        ).stdout  # fmt: skip
        ids = [line for line in collected.splitlines() if "::" in line]
        for file in ("tests/test_cuda_gpu.py", "tests/test_triton_gpu.py"):
            for dtype in ("float32", "bfloat16"):
                assert any(i.startswith(file) and dtype in i for i in ids), (tool, file, dtype)


def test_cpu_exp_ceiling_is_timed_on_one_thread_and_scaled(monkeypatch):
    """Left to ATen, the small exp calls woke the thread pool each time and, on a loaded
    machine, timed the wake-ups (70x under the rate); one thread is timed, then scaled."""
    from benchmarks import roofline

    seen = []

    def fake_time_fn(fn, device, **kwargs):
        seen.append(torch.get_num_threads())
        return common.Timing(median_s=1.0, min_s=1.0, max_s=1.0, repeats=1)

    threads = torch.get_num_threads()
    monkeypatch.setattr(roofline, "time_fn", fake_time_fn)
    rate = roofline._cpu_exp_rate(torch.device("cpu"))
    assert seen == [1] and torch.get_num_threads() == threads
    assert rate == (1 << 14) * 500 * threads
