"""Turn committed benchmark JSON (benchmarks/results/bench-*.json) into a PNG plot and the README table.

    python benchmarks/report.py                 # writes benchmarks/results/bench.png and updates README.md
    python benchmarks/report.py --check         # exit 1 if README.md's table is not what the JSON says

Only the committed version of each result file is used (what `git show HEAD:<file>` gives): a smoke run's
JSON, or a re-run not yet committed, never reaches the README. To publish a new result, commit its JSON first.
Every table row names the device it was measured on.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = "benchmarks/results"
PATTERN = "bench-*.json"
START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"


def _git(root: str, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout


def committed_results(root: str = ROOT) -> tuple[list[dict], list[str]]:
    """(results committed at HEAD, in file-name order; result files on disk whose content is not committed)."""
    names = [n for n in _git(root, "ls-tree", "-r", "--name-only", "HEAD", "--", RESULTS).splitlines()
             if fnmatch.fnmatch(os.path.basename(n), PATTERN)]
    results = [json.loads(_git(root, "show", f"HEAD:{n}")) for n in sorted(names)]
    changed = set(_git(root, "diff", "--name-only", "HEAD", "--", RESULTS).splitlines())
    on_disk = sorted(f"{RESULTS}/{n}" for n in os.listdir(os.path.join(root, RESULTS)) if fnmatch.fnmatch(n, PATTERN))
    uncommitted = [n for n in on_disk if n not in names or n in changed]
    return results, uncommitted


def table(results: list[dict]) -> str:
    """Markdown table, one row per (file, engine, batch)."""
    lines = [
        "| device | model | engine | dtype | batch | audio | ms/step p50 | p99 | render s | audio s/s | peak MB | vs transformers |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        env, cfg = result["environment"], result["config"]
        for r in result["rows"]:
            vs = f"{r['speedup_vs_transformers']:.2f}×" if r.get("speedup_vs_transformers") else "—"
            lines.append(
                f"| {env['device']} | {cfg['model']} | {r['engine']} | {r['dtype']} | {r['batch']} | "
                f"{cfg['duration_s']:g} s | {r['ms_step_p50']:.1f} | {r['ms_step_p99']:.1f} | {r['render_s']:.2f} | "
                f"{r['audio_s_per_s']:.3f} | {r['peak_mem_mb']:.0f} | {vs} |"
            )
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    """Throughput vs batch and step latency per engine, one marker style per device."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for result in results:
        device = result["environment"]["device"]
        model = result["config"]["model"]
        engines = sorted({r["engine"] for r in result["rows"]})
        for engine in engines:
            rows = sorted((r for r in result["rows"] if r["engine"] == engine), key=lambda r: r["batch"])
            label = f"{engine} ({model}, {device})"
            left.plot([r["batch"] for r in rows], [r["audio_s_per_s"] for r in rows], marker="o", label=label)
        smallest = min(r["batch"] for r in result["rows"])
        right.bar([f"{e}\n{model}" for e in engines],
                  [next(r["ms_step_p50"] for r in result["rows"] if r["engine"] == e and r["batch"] == smallest)
                   for e in engines])
        batches = sorted({r["batch"] for r in result["rows"]})
    left.set(xlabel="batch size", ylabel="audio seconds per wall second", title="Throughput", yscale="log")
    left.set_xscale("log", base=2)
    left.set_xticks(batches, [str(b) for b in batches])
    left.legend(fontsize=7)
    right.set(ylabel="ms per decode step (p50, smallest batch)", title="Step latency")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def update_readme(text: str, readme: str = os.path.join(ROOT, "README.md"), check: bool = False) -> bool:
    """Replace the text between the markers; with check=True only report whether it is current."""
    with open(readme) as f:
        content = f.read()
    head, rest = content.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{text}\n{END}{tail}"
    if check:
        return new == content
    with open(readme, "w") as f:
        f.write(new)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that README.md is current")
    args = parser.parse_args()
    results, uncommitted = committed_results()
    for name in uncommitted:
        print(f"note: {name} is not committed (or differs from HEAD): left out; commit it to publish it", file=sys.stderr)
    text = table(results) if results else "No benchmark results are committed yet."
    if args.check:
        ok = update_readme(text, check=True)
        print("README table is current" if ok else "README table is stale: run python benchmarks/report.py")
        return 0 if ok else 1
    update_readme(text)
    if results:
        plot(results, os.path.join(ROOT, RESULTS, "bench.png"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
