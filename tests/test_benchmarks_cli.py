"""The benchmark and profiler command lines as a careless or hurried user meets them: bad arguments
refused by name before anything is measured, one failing case recorded instead of ending the run,
result files written whole or not at all, and the GPU suite's shell script on a machine without a
GPU (stand-in interpreters). Seconds of CPU work; speed is never asserted.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import bench_attention, common

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "run_gpu_suite.sh"
TINY = bench_attention.PRESETS["tiny"]


class KernelCompileError(Exception):
    """What a Triton compilation error or a library's failed check looks like to the harness: an
    ``Exception`` that is no ``RuntimeError``."""


def _module(name: str):
    return importlib.import_module(
        "aanet_kernels.profile" if name == "profile" else f"benchmarks.{name}"
    )


def _tiny_config(tmp_path: Path) -> Path:
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({
        "data_root": str(tmp_path / "data"), "num_train": 8, "num_test": 4, "image_size": 48,
        "input_size": 32, "width": 16, "blocks": [1, 1, 1], "batch_size": 4, "device": "cpu",
    }))  # fmt: skip
    return config


def _base_args(name: str, tmp_path: Path) -> list[str]:
    """Arguments that keep a run tiny, should a refusal under test not happen."""
    args = {
        "bench_attention": ["--device", "cpu", "--preset", "tiny", "--methods", "sdpa_nobias",
                            "--modes", "fwd", "--no-plot", "--no-memory", "--warmup", "0",
                            "--repeats", "3", "--budget", "0"],
        "bench_aaconv": ["--device", "cpu", "--batch", "1", "--channels", "256", "--sizes", "14",
                         "--methods", "conv2d", "--warmup", "0", "--repeats", "1"],
        "bench_train": ["--device", "cpu", "--variants", "plain_conv", "--batch-size", "2",
                        "--input-size", "32", "--no-memory", "--warmup", "0", "--repeats", "2",
                        "--min-repeats", "1", "--budget", "0"],
        "bench_per_sample_grads": ["--device", "cpu", "--samples", "2", "--channels", "24",
                                   "--sizes", "5", "--methods", "vmap_reference", "--warmup",
                                   "0", "--repeats", "1", "--budget", "0", "--no-memory"],
        "ablation_aanet": lambda: ["--config", str(_tiny_config(tmp_path)), "--epochs", "1",
                           "--runs-dir", str(tmp_path / "runs"), "--no-progress"],
        "profile": ["--device", "cpu", "--backend", "reference", "--shape", "1,2,3,4,4,3",
                    "--warmup", "0", "--steps", "1"],
    }[name]  # fmt: skip
    return args() if callable(args) else args


def _refusal(main, argv: list[str], capsys) -> str:
    """The one-line message of a refused command line (argparse's or a ``SystemExit``'s)."""
    with pytest.raises(SystemExit) as caught:
        main(argv)
    code = caught.value.code
    assert code not in (0, None), "refused with a success status"
    if isinstance(code, str):
        assert "\n" not in code.strip(), code
        return code
    return capsys.readouterr().err.strip().splitlines()[-1]


REFUSALS = [
    ("bench_attention", ["--device", "nope"], "--device: expected cpu or cuda, got 'nope'"),
    ("bench_attention", ["--device", "mps"], "--device: expected cpu or cuda, got 'mps'"),
    ("bench_attention", ["--repeats", "0"], "--repeats: expected a positive integer, got '0'"),
    ("bench_attention", ["--min-repeats", "5"], "--min-repeats: expected at most --repeats (3)"),
    ("bench_attention", ["--budget", "-1"], "--budget: expected a number >= 0, got '-1'"),
    ("bench_attention", ["--warmup", "-1"], "--warmup: expected an integer >= 0"),
    ("bench_attention", ["--max-dense-length", "0"], "--max-dense-length: expected a positive"),
    ("bench_aaconv", ["--batch", "0"], "--batch: expected a positive integer, got '0'"),
    ("bench_aaconv", ["--batch", "-1"], "--batch: expected a positive integer, got '-1'"),
    ("bench_aaconv", ["--channels", "100"], "--channels: invalid choice: 100"),
    ("bench_aaconv", ["--sizes", "7"], "--sizes: invalid choice: 7"),
    ("bench_aaconv", ["--methods", "nope"], "--methods: expected some of"),
    ("bench_aaconv", ["--repeats", "0"], "--repeats: expected a positive integer"),
    # --budget as elsewhere; --budget-s, its name until 2026-12-04, still parses
    ("bench_aaconv", ["--budget", "-1"], "--budget/--budget-s: expected a number >= 0"),
    ("bench_aaconv", ["--budget-s", "-1"], "--budget/--budget-s: expected a number >= 0"),
    # an empty list was read as "every one": the whole grid ran
    ("bench_aaconv", ["--methods"], "--methods: expected at least one argument"),
    ("bench_aaconv", ["--sizes"], "--sizes: expected at least one argument"),
    ("bench_train", ["--device", "nope"], "--device: expected cpu or cuda, got 'nope'"),
    ("bench_train", ["--batch-size", "0"], "--batch-size: expected a positive integer"),
    ("bench_train", ["--input-size", "20"], "--input-size: input_size: expected a multiple of 16"),
    ("bench_train", ["--repeats", "0"], "--repeats: expected a positive integer"),
    ("bench_train", ["--max-batch"], "--max-batch: expected --device cuda, got cpu"),  # ignored
    ("bench_per_sample_grads", ["--channels", "8"], "--channels 8: dv: expected fewer than"),
    ("bench_per_sample_grads", ["--budget", "-1"], "--budget: expected a number >= 0"),
    ("ablation_aanet", ["--config", "nope"], "config: no such file nope"),
    ("ablation_aanet", ["--epochs", "0"], "--epochs: expected a positive integer"),
    # the result files' names: checked only when writing them, after both variants trained
    ("ablation_aanet", ["--name", "../x"], "--name: expected letters, digits, '_' and '-' only"),
    ("profile", ["--device", "nope"], "--device: expected cpu or cuda, got 'nope'"),
    ("profile", ["--backend", "cuda"], "--backend cuda: the 'cuda' backend takes CUDA tensors"),
    ("profile", ["--steps", "0"], "--steps: expected an integer >= 1, got '0'"),
    ("profile", ["--warmup", "-1"], "--warmup: expected an integer >= 0, got '-1'"),
]


@pytest.mark.parametrize(
    ("name", "args", "expected"), REFUSALS, ids=[f"{n} {' '.join(a)}" for n, a, _ in REFUSALS]
)
def test_bench_cli_refuses_bad_arguments_by_name(name, args, expected, tmp_path, capsys):
    out = tmp_path / "out"
    argv = _base_args(name, tmp_path) + args + ["--out-dir", str(out)]
    assert expected in _refusal(_module(name).main, argv, capsys)
    assert not any(out.glob("*.csv")) and not any(out.glob("*.md"))  # nothing ran, nothing written


@pytest.mark.parametrize(
    "name",
    ["bench_attention", "bench_aaconv", "bench_train", "bench_per_sample_grads",
     "ablation_aanet", "kernel_resources", "profile"],
)  # fmt: skip
@pytest.mark.parametrize("kind", ["file", "under a file"])
def test_bench_cli_refuses_an_out_dir_that_is_a_file_before_measuring(
    name, kind, tmp_path, capsys, monkeypatch
):
    module = _module(name)
    measured: list[str] = []
    if name == "kernel_resources":  # its real work compiles every Triton configuration: minutes
        monkeypatch.setattr(module, "triton_rows", lambda: measured.append("compiled") or [])
    a_file = tmp_path / "taken"
    a_file.write_text("not a folder")
    out = a_file if kind == "file" else a_file / "sub"
    base = [] if name == "kernel_resources" else _base_args(name, tmp_path)
    message = _refusal(module.main, [*base, "--out-dir", str(out)], capsys)
    assert message.startswith(f"--out-dir {out}: ")
    assert not measured
    assert not (tmp_path / "runs").exists()  # the ablation trained nothing
    assert a_file.read_text() == "not a folder"


ENTRY_POINTS = {
    "bench_attention": ["benchmarks/bench_attention.py"],
    "bench_aaconv": ["benchmarks/bench_aaconv.py"],
    "bench_train": ["benchmarks/bench_train.py"],
    "bench_per_sample_grads": ["benchmarks/bench_per_sample_grads.py"],
    "ablation_aanet": ["benchmarks/ablation_aanet.py"],
    "kernel_resources": ["benchmarks/kernel_resources.py"],
    "profile": ["-m", "aanet_kernels.profile"],
}


@pytest.mark.parametrize("name", list(ENTRY_POINTS))
def test_bench_cli_refusal_is_one_line_and_exit_status_2(name, tmp_path):
    """A refusal of the scripts' own (not argparse's) exited 1 with the bare message: a bad
    command line read as a failed run. Now as argparse's: ``PROG: error: ...``, status 2."""
    taken = tmp_path / "taken"
    taken.write_text("")
    base = [] if name == "kernel_resources" else _base_args(name, tmp_path)
    run = subprocess.run(
        [sys.executable, *ENTRY_POINTS[name], *base, "--out-dir", str(taken)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    prog = "python -m aanet_kernels.profile" if name == "profile" else f"{name}.py"
    assert run.returncode == 2, run.stderr
    assert run.stderr.splitlines() == [f"{prog}: error: --out-dir {taken}: expected a folder, "
                                       "got a file"]  # fmt: skip


def test_bench_per_sample_grads_measures_a_repeated_size_once(tmp_path):
    """``--sizes 5 5`` measured the case twice: two rows, the second's ratio against the
    first's time (0.76x against itself)."""
    from benchmarks import bench_per_sample_grads as bench

    rows = bench.main([*_base_args("bench_per_sample_grads", tmp_path), "--sizes", "5", "5",
                       "--out-dir", str(tmp_path)])  # fmt: skip
    assert [(r["size"], r["method"]) for r in rows] == [(5, "vmap_reference")]


def test_benchmark_device_refuses_a_device_of_another_kind():
    for name in ("nope", "mps", "meta", "cuda:x"):
        with pytest.raises(SystemExit, match=r"--device: expected cpu or cuda"):
            common.benchmark_device(name)
    assert common.benchmark_device("cpu") == torch.device("cpu")


# ---------------------------------------------------------------- one failure, the rest measured


def test_time_interleaved_records_an_error_of_any_exception_type():
    def broken() -> None:
        raise KernelCompileError("ptxas: out of registers")

    out = common.time_interleaved(
        {"ok": (lambda: None, None), "bad": (broken, None), "assert": (lambda: _fail(), None)},
        "cpu", warmup=1, repeats=2, min_repeats=2, budget_s=0,
    )  # fmt: skip
    assert out["ok"].repeats == 2
    assert out["bad"] == "error: KernelCompileError: ptxas: out of registers"
    assert out["assert"].startswith("error: AssertionError: ")


def _fail() -> None:
    raise AssertionError("Q must be divisible by Q_BLOCK_SIZE")  # as FlexAttention's checks do


def test_bench_attention_memory_records_a_failing_method(monkeypatch):
    def forward_fn(method, x, shape):
        raise KernelCompileError("flex: head dim 4 is under 16")

    monkeypatch.setattr(bench_attention, "forward_fn", forward_fn)
    settings = bench_attention.Settings(torch.float32, 0, 1, 1, 0.0, None)
    out = bench_attention.measure_memory(
        TINY[0], "sdpa_nobias", ["fwd"], torch.device("cpu"), settings
    )
    assert out == {"fwd": "error: KernelCompileError: flex: head dim 4 is under 16"}


def test_bench_aaconv_memory_records_a_failing_method(monkeypatch):
    from benchmarks import bench_aaconv

    def make_step(*args):
        raise KernelCompileError("no kernel image")

    monkeypatch.setattr(bench_aaconv, "make_step", make_step)
    case = bench_aaconv.Case(1, 256, 14)
    out = bench_aaconv.measure_memory(case, "cpu", torch.device("cpu"), None)
    assert out == "error: KernelCompileError: no kernel image"


def _fail_variant(monkeypatch, variant: str, error: Exception) -> None:
    """Make bench_train's step of ``variant`` raise ``error`` when built; the others as they are."""
    from benchmarks import bench_train

    real = bench_train.make_step

    def make_step(job, device):
        if job.variant == variant:
            raise error
        return real(job, device)

    monkeypatch.setattr(bench_train, "make_step", make_step)


def test_bench_train_records_a_variant_that_fails_and_times_the_others(tmp_path, monkeypatch):
    pytest.importorskip("aanet.model", reason="the AANet model is not in this checkout")
    from benchmarks import bench_train

    _fail_variant(monkeypatch, "reference", KernelCompileError("inductor: lowering failed"))
    rows = bench_train.main([
        *_base_args("bench_train", tmp_path), "--variants", "reference,plain_conv",
        "--out-dir", str(tmp_path),
    ])  # fmt: skip
    status = {r["label"]: r["status"] for r in rows}
    assert status == {"reference": "error: KernelCompileError: inductor: lowering failed",
                      "plain_conv": "ok"}  # fmt: skip
    md = (tmp_path / f"train_{common.device_slug('cpu')}.md").read_text()
    assert "KernelCompileError" in md


def test_bench_train_memory_worker_measures_the_variants_after_one_that_fails(monkeypatch, capsys):
    """Until 2026-12-04 a variant whose step raised in the CPU memory worker ended the worker:
    no variant's memory was measured."""
    from benchmarks import bench_train

    jobs = [bench_train.Job(v, 2, 32, "float32") for v in ("reference", bench_train.PLAIN)]
    _fail_variant(monkeypatch, "reference", KernelCompileError("no kernel image"))
    for name, value in common._MALLOC_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps([dataclasses.asdict(j) for j in jobs])))
    bench_train.memory_worker_main()
    peaks = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert peaks["reference"] == "error: KernelCompileError: no kernel image"
    assert isinstance(peaks[bench_train.PLAIN], int)  # measured: bytes, not a reason


def test_bench_train_largest_batch_search_failure_keeps_the_row(monkeypatch):
    from benchmarks import bench_train

    def largest_batch(job, device, limit):
        raise ValueError("batch * heads: expected at most 65535 (a grid axis)")

    monkeypatch.setattr(bench_train, "largest_batch", largest_batch)
    job = bench_train.Job("triton", 32, 128, "bfloat16")
    cell = bench_train.largest_batch_cell(job, torch.device("cpu"), 4096)
    assert (
        cell
        == "search failed: error: ValueError: batch * heads: expected at most 65535 (a grid axis)"
    )


@pytest.mark.parametrize("failing", ["vmap_reference", "loop_reference"])
def test_bench_per_sample_grads_records_a_failing_method(failing, tmp_path, monkeypatch):
    from benchmarks import bench_per_sample_grads as bench

    real = bench.make_per_sample_grads

    def make(case, method, device):
        if method == failing:
            raise KernelCompileError("inductor: assert_tensor_metadata failed")
        return real(case, method, device)

    monkeypatch.setattr(bench, "make_per_sample_grads", make)
    rows = bench.main([
        *_base_args("bench_per_sample_grads", tmp_path), "--methods",
        "vmap_reference,vmap_cpu" if "cpu" in bench.aanet_kernels.available_backends("cpu")
        else "vmap_reference", "--out-dir", str(tmp_path),
    ])  # fmt: skip
    status = {r["method"]: r["status"] for r in rows}
    error = "error: KernelCompileError: inductor: assert_tensor_metadata failed"
    if failing == "vmap_reference":  # that method alone
        assert status.pop("vmap_reference") == error
        assert set(status.values()) <= {"ok"}
    else:  # the oracle: nothing can be checked, so nothing is timed
        assert set(status.values()) == {f"loop_reference failed: {error}"}
        assert not any("time_ms" in r for r in rows)
    assert (tmp_path / f"per_sample_grads_{common.device_slug('cpu')}.csv").exists()


def test_bench_per_sample_grads_memory_records_a_failing_method(monkeypatch):
    from benchmarks import bench_per_sample_grads as bench

    def make(case, method, device):
        raise KernelCompileError("out of registers")

    monkeypatch.setattr(bench, "make_per_sample_grads", make)
    out = bench.measure_memory(bench.Case(2, 24, 5), "vmap_reference", torch.device("cpu"))
    assert out == "error: KernelCompileError: out of registers"


# ---------------------------------------------------------------- files whole or not at all


def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(".")]


def test_write_csv_that_fails_midway_leaves_the_old_table(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("the previous run's table\n")
    rows = [{"a": 1, "b": 2}] * 1000 + [{"a": 1, "c": 3}]  # the last row's key breaks DictWriter
    with pytest.raises(ValueError, match="fields not in fieldnames"):
        common.write_csv(rows, path)
    assert path.read_text() == "the previous run's table\n"
    assert not _leftovers(tmp_path)
    common.write_csv(rows[:2], path)
    assert list(csv.DictReader(path.open())) == [{"a": "1", "b": "2"}] * 2


def test_plot_that_fails_midway_leaves_the_old_png(tmp_path, monkeypatch):
    import matplotlib.figure

    def savefig(self, fname, **kwargs):
        Path(fname).write_bytes(b"\x89PNG half")
        raise OSError("No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    path = tmp_path / "plot.png"
    path.write_bytes(b"old png")
    with pytest.raises(OSError, match="No space"):
        common.plot_family({"fwd": {"m": [(1, 1.0), (2, 2.0)]}}, title="t", xlabel="x",
                           ylabel="y", path=path)  # fmt: skip
    assert path.read_bytes() == b"old png"
    assert not _leftovers(tmp_path)


def test_profiler_trace_that_fails_midway_is_not_left_half_written(tmp_path, monkeypatch):
    from aanet_kernels import profile

    def export(self, path):
        Path(path).write_text('{"traceEvents": [')
        raise OSError("No space left on device")

    monkeypatch.setattr(torch.profiler.profile, "export_chrome_trace", export)
    with pytest.raises(OSError, match="No space"):
        profile.main([*_base_args("profile", tmp_path), "--out-dir", str(tmp_path)])
    assert not list(tmp_path.iterdir())  # neither the trace, half of it, nor its temporary


# ---------------------------------------------------------------- the numbers


def test_work_model_matches_a_hand_count():
    """B=8, Nh=8, 32x32, dkh=16, dvh=8 (the issue-2 shape), counted by hand from DESIGN.md."""
    shape = bench_attention.Shape("x", 8, 8, 32, 32, 16, 8)
    pairs = 8 * 8 * 1024 * 1024  # (b, h, i, j)
    # forward: S = q k^T (2 dkh per pair), O = P v (2 dvh per pair)
    assert bench_attention.flops(shape, "fwd") == pairs * (2 * 16 + 2 * 8) == 3_221_225_472
    # backward: S again, dV = P^T dO, dP = dO v^T, dQ = dS k, dK = dS^T q
    assert bench_attention.flops(shape, "bwd") == pairs * 2 * (16 + 8 + 8 + 16 + 16)
    rows = 8 * 8 * 1024
    q_k, v_o, tables, lse = 2 * rows * 16, rows * 8, rows * (32 + 32), 4 * rows
    # fp32: read q, k, v, bias_h, bias_w; write out and the fp32 log-sum-exp
    assert bench_attention.ideal_bytes(shape, "fwd", 4) == 4 * (q_k + 2 * v_o + tables) + lse
    assert bench_attention.ideal_bytes(shape, "fwd", 4) == 29_622_272
    # bwd: read q, k, v, tables, out, dout, lse; write dq, dk, dv and both table gradients
    bwd = 4 * (q_k + 3 * v_o + tables) + lse + 4 * (q_k + v_o + tables)
    assert bench_attention.ideal_bytes(shape, "bwd", 4) == bwd
    assert bench_attention.exps(shape, "fwdbwd") == 2 * pairs


def test_flex_is_a_cpu_method_with_its_missing_backward_named(monkeypatch):
    """FlexAttention runs forward on the CPU (compiled by Inductor) but has no CPU backward: the
    CPU tables get its forward, and its backward rows say why they are empty instead of
    recording a NotImplementedError."""
    cpu = torch.device("cpu")
    assert "flex" in bench_attention.methods_for(cpu)
    monkeypatch.setattr(
        bench_attention, "forward_fn", lambda *a: pytest.fail("a skipped case was prepared")
    )
    shape = bench_attention.Shape("t", 1, 1, 2, 2, 16, 16)
    settings = bench_attention.Settings(torch.float32, 0, 1, 1, 0.0, None)
    results = bench_attention.time_shape(shape, ["flex"], ["bwd", "fwdbwd"], cpu, settings)
    assert set(results.values()) == {"skipped (FlexAttention has no CPU backward)"}
    memory = bench_attention.measure_memory(shape, "flex", ["bwd"], cpu, settings)
    assert memory == {"bwd": "skipped (FlexAttention has no CPU backward)"}


# ---------------------------------------------------------------- run_gpu_suite.sh


def _stub_python(tmp_path: Path, backends_exit: int = 0, backends: str = "cuda triton") -> Path:
    stub = tmp_path / "python"
    stub.write_text(
        "#!/usr/bin/env bash\n"
        f'if [[ "$1" == "-c" && "$2" == *available_backends* ]]; then echo "{backends}"; '
        f"exit {backends_exit}; fi\n"
        'if [[ "$1" == "-c" ]]; then exit 0; fi\n'
        'echo "ran: $*"\n'
    )
    stub.chmod(0o755)
    return stub


def _suite(env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SUITE)], env={**os.environ, **env}, cwd=cwd,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_gpu_suite_script_parses():
    assert subprocess.run(["bash", "-n", str(SUITE)], capture_output=True).returncode == 0


@pytest.mark.parametrize(("exit_code", "backends"), [(1, ""), (0, "")])
def test_gpu_suite_counts_profile_as_failed_without_a_gpu_backend(tmp_path, exit_code, backends):
    """A broken build (the import fails) or no GPU backend: the profile step fails, by name,
    instead of running nothing and reporting every step passed."""
    stub = _stub_python(tmp_path, exit_code, backends)
    run = _suite({"PYTHON": str(stub), "OUT": str(tmp_path / "out"), "STEPS": "profile"})
    assert run.returncode == 1, run.stdout + run.stderr
    assert "FAILED steps: profile" in run.stdout
    assert "no GPU backend" in run.stderr


def test_gpu_suite_profiles_each_gpu_backend(tmp_path):
    stub = _stub_python(tmp_path)
    run = _suite({"PYTHON": str(stub), "OUT": str(tmp_path / "out"), "STEPS": "profile"})
    assert run.returncode == 0, run.stdout + run.stderr
    logs = sorted(p.name for p in (tmp_path / "out").glob("profile_*.log"))
    assert logs == [f"profile_{op}_{b}.log" for op in ("aaconv", "attention") for b in
                    ("cuda", "triton")]  # fmt: skip


def test_gpu_suite_out_is_relative_to_the_callers_folder(tmp_path):
    stub = _stub_python(tmp_path)
    run = _suite({"PYTHON": str(stub), "OUT": "rel/out", "STEPS": "build"}, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "rel" / "out" / "build.log").exists()
    assert (tmp_path / "rel" / "out" / "times.txt").exists()
    assert not (ROOT / "rel").exists()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"STEPS": "atention"}, "STEPS: expected some of: build tests attention"),  # ran nothing
        ({"STEPS": " "}, "STEPS: expected some of: build tests attention"),
        ({"STEPS": "build", "STEP_TIMEOUT": "3 min"}, "STEP_TIMEOUT=3 min: expected seconds"),
    ],
)
def test_gpu_suite_refuses_unknown_steps_and_bad_timeouts_before_any_step(tmp_path, env, expected):
    """A misspelt step ran nothing and said "all steps passed"; a STEP_TIMEOUT that timeout(1)
    cannot read failed every step, each with timeout's usage."""
    stub = _stub_python(tmp_path)
    run = _suite({"PYTHON": str(stub), "OUT": str(tmp_path / "out"), **env})
    assert run.returncode == 2, run.stdout + run.stderr
    assert expected in run.stderr
    assert "===" not in run.stdout and "passed" not in run.stdout


def test_gpu_suite_without_a_gpu_says_so_before_any_step(tmp_path):
    """Without a GPU every step failed on its own (after minutes of building), each deep in its
    log; now the suite stops first, saying why."""
    stub = tmp_path / "python"
    stub.write_text(
        "#!/usr/bin/env bash\n"
        'if [[ "$2" == *"sys.exit(0 if torch.cuda.is_available()"* ]]; then exit 1; fi\n'
        'echo "ran: $*"\n'
    )
    stub.chmod(0o755)
    run = _suite({"PYTHON": str(stub), "OUT": str(tmp_path / "out"), "STEPS": "build attention"})
    assert run.returncode == 2, run.stdout + run.stderr
    assert "no CUDA GPU is visible to" in run.stderr
    assert "===" not in run.stdout


def test_gpu_suite_refuses_an_out_that_is_a_file(tmp_path):
    stub = _stub_python(tmp_path)
    taken = tmp_path / "taken"
    taken.write_text("")
    run = _suite({"PYTHON": str(stub), "OUT": str(taken), "STEPS": "build"})
    assert run.returncode == 2
    assert f"OUT={taken}: expected a writable folder" in run.stderr
    assert "=== build" not in run.stdout


def test_a_tag_names_the_result_files_and_must_be_a_plain_word(tmp_path, capsys):
    args = ["--device", "cpu", "--preset", "tiny", "--methods", "sdpa_nobias", "--modes", "fwd"]
    args += ["--warmup", "0", "--repeats", "1", "--min-repeats", "1", "--budget", "0"]
    args += ["--no-memory", "--no-plot"]
    with pytest.raises(SystemExit):
        bench_attention.main([*args, "--tag", "../x", "--out-dir", str(tmp_path)])
    assert "argument --tag: expected letters, digits and '-' only" in capsys.readouterr().err
    bench_attention.main([*args, "--tag", "flex-fwd", "--out-dir", str(tmp_path)])
    stem = f"attention_{common.device_slug('cpu')}_flex-fwd"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{stem}.csv", f"{stem}.md"]


def test_a_memory_worker_that_dies_leaves_the_timings_written(tmp_path, monkeypatch):
    """A CPU memory worker killed by a signal (a segfault in one case) ended the whole run after
    every timing was taken; now the run writes its table, each row's status saying why its
    memory is missing."""
    crashing = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
    real_run_worker = common.run_worker
    monkeypatch.setattr(
        common,
        "run_worker",
        lambda args, payload, timeout_s=None: real_run_worker(["-c", crashing], payload),
    )
    rows = bench_attention.main([
        "--device", "cpu", "--preset", "tiny", "--methods", "sdpa_nobias", "--modes", "fwd",
        "--warmup", "0", "--repeats", "1", "--min-repeats", "1", "--budget", "0", "--no-plot",
        "--out-dir", str(tmp_path),
    ])  # fmt: skip
    assert rows and all(r.time_ms > 0 and r.peak_mib is None for r in rows)
    assert all(r.status.startswith("memory not measured: memory worker") for r in rows)
    assert "exit -11" in rows[0].status
    assert (tmp_path / f"attention_{common.device_slug('cpu')}.md").is_file()


@pytest.mark.parametrize(
    "name",
    ["bench_attention", "bench_aaconv", "bench_train", "bench_per_sample_grads",
     "ablation_aanet", "kernel_resources", "profile"],
)  # fmt: skip
def test_help_reads_as_text_without_rest_literal_marks(name, capsys):
    """The descriptions come from the docstrings, whose double backquotes showed in --help
    (``attention_2d``) until 2026-12-04."""
    with pytest.raises(SystemExit) as caught:
        _module(name).main(["--help"])
    assert caught.value.code == 0
    shown = capsys.readouterr().out
    assert "usage:" in shown and "``" not in shown
