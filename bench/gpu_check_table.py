#!/usr/bin/env python3
"""Merges what bench/gpu_check.sh measured into one table: the CUDA back end beside PyTorch.

Inputs (each optional, missing or broken files are reported and skipped):
  --models   Google Benchmark JSON of clip-bench-cuda-models (cases `<model>_<image|text|train>/<batch>`
             with an items_per_second and a `TFLOP/s` counter, and `bf16_gemm_peak/<n>`);
  --kernels  Google Benchmark JSON of clip-bench-cuda-kernels (printed as a second table: every
             case with its counters);
  --pytorch  JSON lines of bench/pytorch_gpu.py (one or more files: eager and compile runs);
  --tests    a tab-separated file of `test<TAB>status<TAB>seconds` lines written by gpu_check.sh.

The targets (issue 5): inference at least 1.5x PyTorch eager, training at least 1.2x
torch.compile, and more than 50% of the card's measured bf16 matrix-product peak for ViT-B/16 and
ViT-L/14 images. The last column says whether each row meets its targets.

    python3 bench/gpu_check_table.py --models m.json --kernels k.json --pytorch eager.jsonl compile.jsonl
"""
import argparse
import json
import sys

CASES = ["ViT-B-32_image", "ViT-B-16_image", "ViT-L-14_image", "RN50_image", "ViT-B-32_text", "ViT-L-14_text",
         "ViT-B-32_train", "RN50_train"]
INFERENCE_VS_EAGER = 1.5
TRAINING_VS_COMPILE = 1.2
PEAK_FRACTION = 0.5
PEAK_CASES = {"ViT-B-16_image", "ViT-L-14_image"}


def warn(message):
    print(f"gpu_check_table: {message}", file=sys.stderr)


def load_gbench(path):
    """Google Benchmark's JSON -> its list of benchmarks (aggregates and errors kept)."""
    if not path:
        return []
    try:
        with open(path) as f:
            return json.load(f).get("benchmarks", [])
    except (OSError, ValueError) as e:
        warn(f"cannot read {path}: {e}")
        return []


def load_jsonl(paths):
    records = []
    for path in paths or []:
        try:
            with open(path) as f:
                for line in f:
                    line = line.strip()
                    if line.startswith("{"):
                        try:
                            records.append(json.loads(line))
                        except ValueError:
                            warn(f"{path}: not JSON: {line[:80]}")
        except OSError as e:
            warn(f"cannot read {path}: {e}")
    return records


def seconds(bench):
    """real_time of one Google Benchmark entry, in seconds."""
    scale = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}[bench.get("time_unit", "ns")]
    return bench["real_time"] * scale


def fmt(value, spec):
    return "—" if value is None else format(value, spec)


def ratio(a, b):
    return a / b if a and b else None


def measured_peak(models, pytorch):
    """The bf16 matrix-product peak in TFLOP/s: cuBLASLt's (the C++ case) or else torch.matmul's."""
    for b in models:
        if b.get("name", "").startswith("bf16_gemm_peak") and "error_occurred" not in b and "TFLOP/s" in b:
            return b["TFLOP/s"], "cuBLASLt " + b["name"]
    for r in pytorch:
        if r.get("case") == "bf16_gemm_peak" and "tflops" in r:
            return r["tflops"], "torch.matmul"
    return None, None


def model_table(models, pytorch, out):
    peak, peak_source = measured_peak(models, pytorch)
    clip = {}
    for b in models:
        name = b.get("name", "")
        if b.get("run_type") == "aggregate" or "/" not in name:
            continue
        case, batch = name.split("/")[0], name.split("/")[1]
        if b.get("error_occurred"):
            clip[case] = {"batch": batch, "error": b.get("error_message", "error")}
        else:
            clip[case] = {"batch": batch, "ms": 1e3 * seconds(b), "items": b.get("items_per_second"),
                          "tflops": b.get("TFLOP/s")}
    torch = {}
    for r in pytorch:
        if "case" in r and "mode" in r:
            torch[(r["case"], r["mode"])] = r

    info = next((r["info"] for r in pytorch if "info" in r), None)
    if info:
        out.append(f"PyTorch {info.get('torch')} (CUDA {info.get('cuda')}) on {info.get('device')}, "
                   f"batch {info.get('batch')}, {info.get('dtype')}; scaled_dot_product_attention: {info.get('sdpa')}")
    out.append(f"Measured bf16 matrix-product peak: {fmt(peak, '.3g')} TFLOP/s ({peak_source or 'not measured'})")
    torch_peak = next((r["tflops"] for r in pytorch if r.get("case") == "bf16_gemm_peak" and "tflops" in r), None)
    if torch_peak is not None:
        out.append(f"torch.matmul bf16 on the same card: {torch_peak:.3g} TFLOP/s")
    out.append("")
    out.append("| case | batch | clip ms | clip items/s | clip TFLOP/s | % of peak | eager items/s | compile items/s "
               "| vs eager | vs compile | target | met |")
    out.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    missed = checked = 0
    extra = sorted((set(clip) | {c for c, _ in torch}) - set(CASES) - {"bf16_gemm_peak"})
    for case in CASES + extra:
        c = clip.get(case, {})
        eager, compiled = torch.get((case, "eager"), {}), torch.get((case, "compile"), {})
        if not c and not eager and not compiled:
            continue
        items, tflops = c.get("items"), c.get("tflops")
        fraction = tflops / peak if tflops and peak else None
        vs_eager, vs_compile = ratio(items, eager.get("items_per_s")), ratio(items, compiled.get("items_per_s"))
        checks, target = [], []
        if case.endswith("_train"):
            target.append(f">= {TRAINING_VS_COMPILE}x compile")
            checks.append(vs_compile is not None and vs_compile >= TRAINING_VS_COMPILE)
        elif case in CASES:
            target.append(f">= {INFERENCE_VS_EAGER}x eager")
            checks.append(vs_eager is not None and vs_eager >= INFERENCE_VS_EAGER)
        if case in PEAK_CASES:
            target.append(f"> {PEAK_FRACTION:.0%} peak")
            checks.append(fraction is not None and fraction > PEAK_FRACTION)
        met = "yes" if checks and all(checks) else ("no" if checks else "")
        if "error" in c:
            met = "no: " + c["error"][:60]
        missed += met.startswith("no")
        checked += bool(checks)

        def torch_cell(r):
            if "items_per_s" in r:
                return f"{r['items_per_s']:.4g}"
            return "skipped" if "skipped" in r else ("error" if "error" in r else "—")

        out.append(f"| {case} | {c.get('batch') or eager.get('batch') or '—'} | {fmt(c.get('ms'), '.2f')} "
                   f"| {fmt(items, '.4g')} | {fmt(tflops, '.3g')} | {fmt(fraction and 100 * fraction, '.0f')} "
                   f"| {torch_cell(eager)} | {torch_cell(compiled)} | {fmt(vs_eager, '.2f')} | {fmt(vs_compile, '.2f')} "
                   f"| {', '.join(target)} | {met} |")
    for r in pytorch:
        if "error" in r:
            out.append(f"- PyTorch {r.get('mode', '')} {r.get('case', '')}: {r['error']}")
    return missed, checked


def kernel_table(kernels, out):
    rows = [b for b in kernels if b.get("run_type") != "aggregate"]
    if not rows:
        return
    keys = []
    for b in rows:
        for k, v in b.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in keys and k not in (
                    "family_index", "per_family_instance_index", "repetitions", "repetition_index", "threads",
                    "iterations", "real_time", "cpu_time", "items_per_second", "bytes_per_second"):
                keys.append(k)
    out.append("")
    # The value of static shapes: the same LayerNorm body with C known at compile time or not.
    probe = {b["name"].split("/")[1]: seconds(b) for b in rows
             if b["name"].startswith("layernorm_probe") and not b.get("error_occurred") and b.get("real_time")}
    if "static" in probe and "runtime" in probe:
        out.append(f"Static shapes: LayerNorm (C = 768) with C known at compile time runs "
                   f"{probe['runtime'] / probe['static']:.2f}x as fast as the same kernel taking C at run time "
                   f"({1e6 * probe['static']:.1f} us against {1e6 * probe['runtime']:.1f} us).")
        out.append("")
    out.append("| kernel case | us |" + "".join(f" {k} |" for k in keys))
    out.append("| --- | ---: |" + " ---: |" * len(keys))
    for b in rows:
        if b.get("error_occurred"):
            out.append(f"| {b['name']} | {b.get('error_message', 'error')} |" + " — |" * len(keys))
            continue
        cells = [fmt(b.get(k), ".3g") for k in keys]
        out.append(f"| {b['name']} | {1e6 * seconds(b):.1f} |" + "".join(f" {c} |" for c in cells))


def test_table(path, out):
    if not path:
        return 0
    try:
        with open(path) as f:
            lines = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    except OSError as e:
        warn(f"cannot read {path}: {e}")
        return 0
    failed = [row for row in lines if len(row) > 1 and row[1] not in ("pass", "skip")]
    out.append("GPU tests: " + ", ".join(f"{row[0]} {row[1]}" for row in lines))
    out.append("")
    return len(failed)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="clip-bench-cuda-models JSON (Google Benchmark)")
    parser.add_argument("--kernels", help="clip-bench-cuda-kernels JSON (Google Benchmark)")
    parser.add_argument("--pytorch", nargs="*", help="bench/pytorch_gpu.py JSON lines")
    parser.add_argument("--tests", help="gpu_check.sh's test summary (tab-separated)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args()
    out = []
    test_table(args.tests, out)
    missed, checked = model_table(load_gbench(args.models), load_jsonl(args.pytorch), out)
    kernel_table(load_gbench(args.kernels), out)
    print("\n".join(out))
    if not checked:
        print("\nNo model row to check against the targets.")
    else:
        print(f"\n{missed} of {checked} row(s) miss a target." if missed else f"\nAll {checked} rows with a target meet it.")
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
