"""Plots docs/benchmark.csv: full sync and single-change cost against the number of Services."""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

src, out = sys.argv[1], sys.argv[2]
every = [r for r in csv.DictReader(open(src)) if r["metric"] == "ms"]
rows = [r for r in every if r["endpoints"] == "5"]


def series(case, path, rows=rows):
    """Points of one case; `path` may end in `*` to match the sharded rows (20, 60 tables)."""
    pre, _, post = path.partition("*")
    match = (lambda p: p.startswith(pre) and p.endswith(post)) if "*" in path else (lambda p: p == path)
    pts = sorted((int(r["services"]), float(r["value"])) for r in rows if r["case"] == case and match(r["path"]))
    return [p[0] for p in pts], [p[1] for p in pts]


fig, (a, b, c) = plt.subplots(1, 3, figsize=(17, 4.5))
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
labels = {"nftproxy, * tables p50": "nftproxy, auto tables p50", "nftproxy, * tables p99": "nftproxy, auto tables p99",
          "nftproxy p50": "nftproxy, one table p50", "nftproxy p99": "nftproxy, one table p99"}
for case, path, style in [
    ("incremental", "nftproxy p50", "o-"),
    ("incremental", "nftproxy p99", "o:"),
    ("incremental", "nftproxy, * tables p50", "D-"),
    ("incremental", "nftproxy, * tables p99", "D:"),
    ("add one", "kube-proxy nftables shape: nft -f", "s-"),
    ("add one", "kube-proxy iptables shape: iptables-legacy-restore", "^-"),
    ("add one", "kube-proxy iptables shape: iptables-nft-restore", "v-"),
]:
    x, y = series(case, path)
    if x:
        b.plot(x, y, style, label=f"{case}: {labels.get(path, path)}")
b.set(xscale="log", yscale="log", xlabel="Services (x 5 endpoints)", ylabel="ms", title="One change (nftproxy: one endpoint; anchors: add one Service)")
b.legend(fontsize=7)
for path, style in [("any commit, N empty chains present, p50", "o-"), ("any commit, N empty chains present, p99", "o:")]:
    x, y = series("commit tax", path, every)
    if x:
        c.plot(x, y, style, label=path)
c.set(xscale="log", yscale="log", xlabel="chains in the namespace", ylabel="ms", title="Any commit's price (the kernel walks every chain)")
c.legend(fontsize=7)
fig.tight_layout()
fig.savefig(out, dpi=110)
print("wrote", out)
