"""Write benchmark results: a marked section of BENCHMARKS.md, and PNG plots."""

from __future__ import annotations

import re
from pathlib import Path


def replace_section(path: Path, key: str, body: str) -> None:
    """Replace (or append) the text between <!-- key:begin --> and <!-- key:end --> in `path`."""
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def delay_cdf_plot(cdfs: dict, title: str, xlabel: str, path: Path) -> Path:
    """One CDF per (data path, fan-out) from delay histograms (fastrelay.lab.probe.Delays): a
    colour per fan-out, solid for the kernel path, dashed for userspace; log x axis in us."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {f: f"C{i}" for i, f in enumerate(sorted({f for _, f in cdfs}))}
    for (dp, fanout), d in sorted(cdfs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if d.matched:
            xs, ys = d.cdf()
            ax.plot([x / 1e3 for x in xs], ys, label=f"{dp}, fan-out {fanout}", color=colours[fanout],
                    linestyle="-" if dp == "kernel" else "--")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("CDF")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table(headers: list[str], rows: list[list[object]]) -> str:
    """A markdown table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)
