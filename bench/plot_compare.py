"""Perplexity against artifact size, from the JSON of ``llmopt eval --compare``, as a PNG.

Each variant is a point: x = its artifact's bytes (log scale), y = its perplexity (log scale),
coloured by what compressed it (quantization, pruning, low-rank, a mix of them, or nothing), labelled
with its spec. The lower-left frontier is the best mix of methods at each size.

    python bench/plot_compare.py bench/results/compress_smollm2/compare.json -o bench/results/compress_smollm2/ppl_vs_size.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

FAMILY_COLOURS = {"fp32": "black", "quantization": "tab:blue", "pruning": "tab:red", "low-rank": "tab:green",
                  "mix": "tab:purple"}


def family(spec: str) -> str:
    """What compressed a ``--compare`` variant."""
    if spec == "fp32":
        return "fp32"
    steps = {part.partition("=")[0] if "=" in part else "quant" for part in spec.split("+")}
    if len(steps) > 1:
        return "mix"
    return {"prune": "pruning", "lowrank": "low-rank"}.get(steps.pop(), "quantization")


def frontier(rows: list[dict]) -> list[dict]:
    """The variants no other variant beats on both size and perplexity, smallest first."""
    best, kept = float("inf"), []
    for row in sorted(rows, key=lambda r: (r["artifact_bytes"], r["perplexity"])):
        if row["perplexity"] < best:
            best = row["perplexity"]
            kept.append(row)
    return kept


def plot(comparison: dict, out: Path) -> None:
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = comparison["rows"]
    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    for name, colour in FAMILY_COLOURS.items():
        members = [r for r in rows if family(r["spec"]) == name]
        if members:
            ax.scatter([r["artifact_bytes"] / 1e6 for r in members], [r["perplexity"] for r in members],
                       color=colour, label=name, s=36, zorder=3)
    for r in rows:
        ax.annotate(r["spec"], (r["artifact_bytes"] / 1e6, r["perplexity"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=7)
    best = frontier(rows)
    ax.plot([r["artifact_bytes"] / 1e6 for r in best], [r["perplexity"] for r in best], color="grey",
            linestyle="--", linewidth=1, zorder=2, label="best at each size")
    s = comparison["settings"]
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("artifact size (MB, log scale)")
    ax.set_ylabel(f"perplexity on {Path(s['text']).name} (log scale)")
    ax.set_title(f"{Path(s['model']).name}: {s['windows']} windows of {s['context']} tokens")
    for axis in (ax.xaxis, ax.yaxis):  # plain numbers, not powers of ten
        axis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        axis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.tick_params(which="minor", labelsize=7)
    ax.grid(True, which="both", linewidth=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("comparison", type=Path, help="compare.json written by llmopt eval --compare")
    parser.add_argument("-o", "--out", type=Path, default=None, help="PNG to write [default: next to the JSON]")
    args = parser.parse_args()
    out = args.out or args.comparison.with_name("ppl_vs_size.png")
    plot(json.loads(args.comparison.read_text()), out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
