"""Plots docs/benchmark.csv: full sync and single-change cost against the number of Services."""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

src, out = sys.argv[1], sys.argv[2]
rows = [r for r in csv.DictReader(open(src)) if r["endpoints"] == "5" and r["metric"] == "ms"]

def series(case, path):
    pts = sorted((int(r["services"]), float(r["value"])) for r in rows if r["case"] == case and r["path"] == path)
    return [p[0] for p in pts], [p[1] for p in pts]

fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
for path, style in [
    ("nftproxy", "o-"),
    ("kernel floor (pre-encoded batch)", "k--"),
    ("kube-proxy nftables shape: nft -f", "s-"),
    ("kube-proxy iptables shape: iptables-legacy-restore", "^-"),
    ("kube-proxy iptables shape: iptables-nft-restore", "v-"),
]:
    x, y = series("full sync", path)
    if x:
        a.plot(x, y, style, label=path)
a.set(xscale="log", yscale="log", xlabel="Services (x 5 endpoints)", ylabel="ms", title="Full sync into an empty kernel")
a.legend(fontsize=7)
for case, path, style in [
    ("incremental", "nftproxy p50", "o-"),
    ("incremental", "nftproxy p99", "o:"),
    ("add one", "kube-proxy nftables shape: nft -f", "s-"),
    ("add one", "kube-proxy iptables shape: iptables-legacy-restore", "^-"),
    ("add one", "kube-proxy iptables shape: iptables-nft-restore", "v-"),
]:
    x, y = series(case, path)
    if x:
        b.plot(x, y, style, label=f"{case}: {path}")
b.set(xscale="log", yscale="log", xlabel="Services (x 5 endpoints)", ylabel="ms", title="One change (nftproxy: one endpoint; anchors: add one Service)")
b.legend(fontsize=7)
fig.tight_layout()
fig.savefig(out, dpi=110)
print("wrote", out)
