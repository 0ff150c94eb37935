"""Plots issue 13's shapes from the --only-scale CSV: the whole `nftproxy --sync-once` process
against the kernel's own commit and kube-proxy's two restore paths, one run, log scale."""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

src, out = sys.argv[1], sys.argv[2]
rows = [r for r in csv.DictReader(open(src)) if r["case"] == "whole process" and r["metric"] == "ms"]
shapes = [(44000, 1), (5000, 50)]
bars = [
    ("nftproxy --sync-once, cold", lambda p: p == "--sync-once cold"),
    ("nftproxy --sync-once, again (one slice changed)", lambda p: p == "--sync-once again, one slice changed"),
    ("kernel floor (pre-encoded batch)", lambda p: p == "kernel floor (pre-encoded batch)"),
    ("kube-proxy rules: iptables-legacy-restore", lambda p: p.endswith("iptables-legacy-restore")),
    ("kube-proxy rules: nft -f", lambda p: p.startswith("kube-proxy nftables shape: nft -f")),
]
fig, ax = plt.subplots(figsize=(10, 4.8))
width = 0.8 / len(bars)
for k, (label, match) in enumerate(bars):
    xs, ys, cut = [], [], []
    for i, (n, e) in enumerate(shapes):
        hit = [r for r in rows if int(r["services"]) == n and int(r["endpoints"]) == e and match(r["path"])]
        if hit:
            xs.append(i + (k - (len(bars) - 1) / 2) * width)
            ys.append(float(hit[0]["value"]) / 1000)
            cut.append("cut at" in hit[0]["path"])
    drawn = ax.bar(xs, ys, width, label=label)
    for x, y, c in zip(xs, ys, cut):
        ax.annotate((">" if c else "") + (f"{y:.0f} s" if y >= 10 else f"{y:.2f} s"), (x, y), ha="center",
                    va="bottom", fontsize=7)
ax.set_xticks(range(len(shapes)), [f"{n:,} Services x {e} endpoint{'s' if e > 1 else ''}" for n, e in shapes])
ax.set(yscale="log", ylabel="seconds (log)", title="Programming a node from nothing, one run (issue 13's shapes)")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(out, dpi=110)
print("wrote", out)
