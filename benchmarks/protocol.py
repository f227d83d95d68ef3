"""The speed protocol: each benchmark in a fresh process, several rounds, then the median and range of each ratio.

Run from the repository root:
  python -m benchmarks.protocol run --out DIR [--rounds 3] [--benches htopk,harvest,lime,sae,streaming]
                                    [--wrap ../shared/tools/quiet] [--set sae="--shape 64,16,64,4 --rounds 1"]
  python -m benchmarks.protocol summarize DIR
`run` goes round by round, each round running every benchmark once (so no benchmark sees only one stretch of
the machine's day), as `python -m benchmarks.<script> ARGS` under `--wrap` (a command prefix such as the quiet
guard). Each run leaves DIR/<bench>.<round>.jsonl (stdout), .err (stderr) and .rc (exit code); a run already
done (exit code 0, and a "-> quiet" verdict on stderr when wrapped) is skipped, so a killed protocol resumes.
`summarize` prints one JSON line per figure (`figure`, `median`, `min`, `max`, `values`: one per round), one per
benchmark with its runs' quiet verdicts and load before, then the figures as a markdown table. A run the guard
judged not quiet is void: it is counted but its figures are left out.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from jaxsae import configlib

# The commands of the benchmarks/README.md tables: script and arguments.
BENCHES = {
    "htopk": ("htopk_step", "impls=topk,htopk rounds=2 reps=16"),
    "harvest": ("harvest", ""),
    "lime": ("lime_step", "--shape 16,128,8,128 --d_models 64,128,256 --rounds 8 --depths="),
    "sae": ("sae_step", "--impls jaxsae,jaxsae_vmap8,sparsify --rounds 5"),
    "streaming": ("streaming", "seeds=1,8 steps=2 rounds=2"),
}
VERDICT = re.compile(r"^quiet: load before ([\d.]+);.*-> (.*)$")


def _verdict(err_path: Path) -> tuple[float | None, str | None]:
    """(load before, verdict) from the quiet guard's line on stderr; (None, None) where it did not run."""
    if err_path.exists():
        for line in err_path.read_text(errors="replace").splitlines():
            if m := VERDICT.match(line):
                return float(m.group(1)), m.group(2)
    return None, None


def _void(verdict: str | None) -> bool:
    """Whether the guard ran and saw other work beside the run (its timings are void)."""
    return verdict is not None and verdict != "quiet"


def run(out: Path, rounds: int, benches: list[str], wrap: list[str], args: dict[str, str]) -> int:
    """Every round runs each of `benches` once; returns how many runs failed."""
    out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for r in range(1, rounds + 1):
        for b in benches:
            stem = out / f"{b}.{r}"
            rc_path, err_path = Path(f"{stem}.rc"), Path(f"{stem}.err")
            done = rc_path.exists() and rc_path.read_text().strip() == "0"
            if done and (not wrap or _verdict(err_path)[1] == "quiet"):
                continue
            script, default = BENCHES[b]
            cmd = [*wrap, sys.executable, "-m", f"benchmarks.{script}", *shlex.split(args.get(b, default))]
            print(f"round {r}: {b}: {shlex.join(cmd)}", file=sys.stderr, flush=True)
            with open(f"{stem}.jsonl", "w") as fo, open(err_path, "w") as fe:
                rc = subprocess.call(cmd, stdout=fo, stderr=fe)
            rc_path.write_text(f"{rc}\n")
            load, verdict = _verdict(err_path)
            print(f"round {r}: {b}: exit {rc}" + (f", load before {load}, {verdict}" if verdict else ""),
                  file=sys.stderr, flush=True)
            failed += rc != 0
    return failed


# ------------------------------------------------------------------ figures of one run's JSON lines


def _by(rows, key, **match):
    """{row[key]: row} over the rows whose fields equal `match`."""
    return {r[key]: r for r in rows if all(r.get(k) == v for k, v in match.items()) and key in r}


def _sae(rows):
    d = _by(rows, "impl")
    out = {}
    if "jaxsae" in d and "sparsify" in d:
        out["SAE step, jaxsae / sparsify tokens/s"] = d["jaxsae"]["tokens_per_s"] / d["sparsify"]["tokens_per_s"]
    if "jaxsae" in d:
        out["SAE step / JAX encoder matmul"] = d["jaxsae"]["step_over_matmul"]
    if "jaxsae" in d and "jaxsae_vmap8" in d:
        out["8 seeds vmapped, per-seed tokens/s / one seed"] = (d["jaxsae_vmap8"]["tokens_per_s"]
                                                              / d["jaxsae"]["tokens_per_s"])
    return out


def _harvest(rows):
    out = {}
    for b in sorted({r["batch"] for r in rows if "batch" in r}):
        own = _by(rows, "impl", bench="harvest_forward", batch=b)
        bound = _by(rows, "impl", bench="matmul_bound", batch=b).get("xla_matmuls")
        if "lime_jax" in own and "transformers" in own:
            out[f"harvest batch {b}, lime_jax / transformers"] = (own["lime_jax"]["tokens_per_s"]
                                                                  / own["transformers"]["tokens_per_s"])
            if "speed_vs_transformers" in own["lime_jax"]:  # the median of per-round paired ratios
                out[f"harvest batch {b}, lime_jax / transformers, paired"] = own["lime_jax"]["speed_vs_transformers"]
        if "lime_jax" in own and bound:
            out[f"harvest batch {b}, lime_jax / matmul bound"] = (own["lime_jax"]["tokens_per_s"]
                                                                  / bound["matmul_bound_tokens_per_s"])
    return out


def _lime(rows):
    return {f"LIMe d={r['D']}, {r['impl']} speed / Llama": r["speed_vs_llama"]
            for r in rows if r.get("impl", "llama") != "llama" and "speed_vs_llama" in r}


def _htopk(rows):
    out = {}
    for K in sorted({r["K"] for r in rows if "K" in r}):
        d = _by(rows, "impl", K=K)
        if "htopk" in d and "topk" in d:
            out[f"HTopK / TopK best step, K={K}"] = d["htopk"]["step_s"] / d["topk"]["step_s"]
            out[f"HTopK / TopK median step, K={K}"] = d["htopk"]["step_s_median"] / d["topk"]["step_s_median"]
            if "step_vs_topk" in d["htopk"]:  # the median of per-turn paired ratios
                out[f"HTopK / TopK paired step, K={K}"] = d["htopk"]["step_vs_topk"]
    return out


def _streaming(rows):
    out = {}
    for r in rows:
        if r.get("bench") == "compare":
            out[f"streaming S={r['seeds']}, stream / cache"] = r["streaming_vs_cache"]
            out[f"streaming S={r['seeds']}, stream / sparsify"] = r["streaming_vs_sparsify"]
    return out


FIGURES = {"sae": _sae, "harvest": _harvest, "lime": _lime, "htopk": _htopk, "streaming": _streaming}


def _rows(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON line: {line[:80]!r}") from e
    return rows


def summarize(folder: Path) -> list[dict]:
    """The protocol's figures from `folder`: per figure the median, min and max over the rounds that have it
    and were not judged void by the quiet guard."""
    if not folder.is_dir():
        raise ValueError(f"no such folder: {folder}")
    runs = sorted(folder.glob("*.*.jsonl"))
    if not runs:
        raise ValueError(f"no <bench>.<round>.jsonl files in {folder}")
    values: dict[str, list[float]] = {}
    verdicts: dict[str, list] = {}
    for path in runs:
        bench = path.name.split(".")[0]
        if bench not in FIGURES:
            raise ValueError(f"{path.name}: unknown benchmark {bench!r} (known: {', '.join(FIGURES)})")
        load, verdict = _verdict(path.with_suffix(".err"))
        verdicts.setdefault(bench, []).append((load, verdict))
        if _void(verdict):
            continue
        for name, v in FIGURES[bench](_rows(path)).items():
            values.setdefault(name, []).append(float(v))
    lines = [{"figure": name, "median": float(np.median(v)), "min": min(v), "max": max(v), "values": v}
             for name, v in values.items()]
    for bench, vs in verdicts.items():
        loads = [load for load, _ in vs if load is not None]
        lines.append({"bench": bench, "runs": len(vs), "quiet": sum(v == "quiet" for _, v in vs),
                      "void": sum(_void(v) for _, v in vs), "unguarded": sum(v is None for _, v in vs),
                      "load_before": [min(loads), max(loads)] if loads else None})
    return lines


def table(lines: list[dict]) -> str:
    """The figures as markdown rows: figure | median (min–max) | runs."""
    rows = ["| figure | median (min–max) | runs |", "|---|---|---|"]
    rows += [f"| {l['figure']} | {l['median']:.2f} ({l['min']:.2f}–{l['max']:.2f}) | {len(l['values'])} |"
             for l in lines if "figure" in l]
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.protocol", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the benchmarks round by round into --out")
    r.add_argument("--out", required=True, help="folder for <bench>.<round>.jsonl/.err/.rc (created)")
    r.add_argument("--rounds", type=int, default=3, help="separate invocations of each benchmark")
    r.add_argument("--benches", default=",".join(BENCHES), help="comma-separated, from: " + ", ".join(BENCHES))
    r.add_argument("--wrap", default="", help="command prefix for every run, e.g. ../shared/tools/quiet")
    r.add_argument("--set", action="append", default=[], metavar="BENCH=ARGS",
                   help="replace a benchmark's arguments (repeatable), e.g. sae='--rounds 1'")
    s = sub.add_parser("summarize", help="median and range of each figure over the rounds in a folder")
    s.add_argument("folder")
    a = ap.parse_args(argv)
    if a.cmd == "summarize":
        lines = summarize(Path(a.folder))
        for line in lines:
            print(json.dumps(line))
        print(table(lines))
        return 0
    benches = [b for b in a.benches.split(",") if b]
    unknown = [b for b in benches if b not in BENCHES]
    if unknown or not benches:
        raise ValueError(f"--benches {a.benches!r}: unknown {unknown} (known: {', '.join(BENCHES)})")
    if a.rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {a.rounds}")
    args = {}
    for item in a.set:
        bench, eq, rest = item.partition("=")
        if not eq or bench not in BENCHES:
            raise ValueError(f"--set {item!r}: expected BENCH=ARGS with BENCH one of {', '.join(BENCHES)}")
        args[bench] = rest
    wrap = shlex.split(a.wrap)
    if wrap and not shutil.which(wrap[0]):
        raise ValueError(f"--wrap {a.wrap!r}: {wrap[0]} is not an executable file")
    return 1 if run(Path(a.out), a.rounds, benches, wrap, args) else 0


if __name__ == "__main__":
    sys.exit(configlib.run(main, prog="python -m benchmarks.protocol"))
