"""The markdown table of a suite run (benchmarks/suite.py): every figure with its ratio to
PyTorch and its fraction of the matmul peak measured in the same run."""

from __future__ import annotations


def _f(x, fmt="{:.3g}") -> str:
    return "—" if x is None else fmt.format(x)


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.0f} %"


def _result(res: dict, part: str) -> dict:
    r = res["parts"].get(part, {})
    return r.get("result", {}) if r.get("ok") else {}


def _util(d: dict) -> str:
    return _f(d.get("cpu_util"), "{:.2f}")


def _mfu(gflops, peak):
    return gflops / peak if gflops and peak else None


def _train_rows(res: dict, peak) -> list[str]:
    rows = []
    for name, m in _result(res, "train").get("models", {}).items():
        ours = m.get("ours", {})
        loop = m.get("ratio_ours_over_torch", {}).get("best_loop") or next(iter(ours), None)
        o, t = ours.get(loop, {}), m.get("torch", {})
        fl = m.get("flops_per_image")
        ours_mfu = _mfu(o.get("images_per_s", 0) * fl / 1e9 if fl else None, peak)
        torch_mfu = _mfu(t.get("images_per_s", 0) * fl / 1e9 if fl and t else None, peak)
        ratio = o["images_per_s"] / t["images_per_s"] if o and t else None
        rows.append(f"| train {name} ({loop}) | {_f(o.get('images_per_s'))} img/s | "
                    f"{_f(t.get('images_per_s'))} img/s | {_f(ratio, '{:.2f}x')} | "
                    f"{_pct(ours_mfu)} (torch {_pct(torch_mfu)}) | {_util(o)} | "
                    f"{_f(o.get('compile_s_est'), '{:.1f}')} |")
    for r in _result(res, "resnet").get("scaling", [])[:1]:
        mfu = _mfu(r.get("achieved_gflops"), peak)
        rows.append(f"| train resnet18 w32 (32x32x3, batch {_result(res, 'resnet').get('batch')})"
                    f" | {_f(r.get('images_per_s'))} img/s | — | — | {_pct(mfu)} | {_util(r)} | "
                    f"{_f(r.get('compile_s'), '{:.1f}')} |")
    return rows


def _dp_rows(res: dict) -> list[str]:
    rows = []
    for name, m in _result(res, "dp_inner").get("models", {}).items():
        o, t = m.get("ours", {}), m.get("torch_eager", {})
        for aug in ("no_aug", "dsa"):
            d = o.get(aug, {})
            per_cpu = (d["items_per_cpu_s"] / t["items_per_cpu_s"]
                       if aug == "no_aug" and d.get("items_per_cpu_s") and t.get("items_per_cpu_s")
                       else None)
            rows.append(f"| DP inner loop {name} {aug} ({o.get('loop')}) | "
                        f"{_f(d.get('items_per_s'))} steps/s | "
                        f"{_f(t.get('items_per_s')) if aug == 'no_aug' else '—'} steps/s | "
                        f"{_f(per_cpu, '{:.2f}x')} per CPU-s | — | {_util(d)} | "
                        f"{_f(d.get('compile_and_first_s'), '{:.1f}')} |")
        s = o.get("seeds", {})
        if s:
            rows.append(f"| {s.get('S')} seeds vmapped vs sequential, {name} | "
                        f"{_f(s.get('vmapped', {}).get('items_per_s'))} steps/s | "
                        f"{_f(s.get('sequential', {}).get('items_per_s'))} (sequential) | "
                        f"{_f(s.get('speedup'), '{:.2f}x')} | — | "
                        f"{_util(s.get('vmapped', {}))} | — |")
    return rows


def _seed_rows(res: dict) -> list[str]:
    rows = []
    for name, m in _result(res, "seeds").get("models", {}).items():
        v, q = m.get("vmapped", {}), m.get("sequential", {})
        rows.append(f"| {m.get('seeds')} seeds' training as one program, {name} "
                    f"({m.get('loop')}) | {_f(v.get('items_per_s'))} img/s | "
                    f"{_f(q.get('items_per_s'))} img/s (sequential) | "
                    f"{_f(m.get('speedup'), '{:.2f}x')} | — | {_util(v)} | "
                    f"{_f(v.get('compile_s'), '{:.1f}')} |")
    return rows


def _mtt_rows(res: dict) -> list[str]:
    pts = _result(res, "mtt").get("points", [])
    torch = {(p["width"], p["N"]): p for p in pts if p.get("series") == "torch"
             and "s_per_iter" in p}
    rows = []
    for p in pts:
        if p.get("series") == "torch" or "s_per_iter" not in p:
            continue
        t = torch.get((p["width"], p["N"]))
        ratio = t["s_per_iter"] / p["s_per_iter"] if t else None
        rows.append(f"| MTT iteration w{p['width']} N={p['N']} {p['series']} | "
                    f"{p['s_per_iter']:.2f} s, {p.get('peak_rss_mb', 0) / 1024:.2f} GB | "
                    + (f"{t['s_per_iter']:.2f} s, {t.get('peak_rss_mb', 0) / 1024:.2f} GB"
                       if t else "—")
                    + f" | {_f(ratio, '{:.2f}x')} | — | {_f(p.get('cpu_util'), '{:.2f}')} | — |")
    return rows


def _analysis_rows(res: dict) -> list[str]:
    rows = []
    for name, m in _result(res, "hvp").get("models", {}).items():
        for kind in ("single", "batched8"):
            d = m.get(kind, {})
            rows.append(f"| HVP {name} ({m.get('examples')} examples, {kind}) | "
                        f"{_f(d.get('hvps_per_s'))} HVP/s | — | — | — | {_util(d)} | "
                        f"{_f(d.get('compile_s'), '{:.1f}')} |")
    for r in _result(res, "alpha").get("results", []):
        rows.append(f"| alpha sweep, batch {r['eval_batch_size']} | vmap "
                    f"{r['vmap']['median_s']:.2f} s | loop {r['loop']['median_s']:.2f} s | "
                    f"{r['ratio_loop_over_vmap_median']:.2f}x (loop/vmap) | — | "
                    f"{r['vmap']['cpu_utilisation']:.2f} | — |")
    return rows


def _kernel_rows(res: dict) -> list[str]:
    rows = []
    for setting, r in _result(res, "kernels").get("settings", {}).items():
        train = r.get("train", {})
        for name in ("convnet32", "convnet128"):
            m = train.get(name, {})
            rows.append(f"| YNNPACK `{setting}`: {name} training | "
                        f"{_f(m.get('images_per_s'))} img/s | — | "
                        f"{_f(m.get('ratio_to_torch'), '{:.2f}x')} | {_pct(m.get('mfu'))} | — | — |")
        inner, rn = r.get("dp_inner_convnet32", {}), r.get("resnet18_w32", {})
        rows.append(f"| YNNPACK `{setting}`: DP inner loop convnet32 | "
                    f"{_f(inner.get('steps_per_s'))} steps/s | — | "
                    f"{_f(inner.get('ratio_to_torch_per_cpu_s'), '{:.2f}x')} (per CPU-s) | — | — | — |")
        rows.append(f"| YNNPACK `{setting}`: ResNet-18 w32 training | "
                    f"{_f(rn.get('images_per_s'))} img/s | {_f(rn.get('torch_images_per_s'))} img/s | "
                    f"{_f(rn.get('ratio_to_torch'), '{:.2f}x')} | {_pct(rn.get('mfu'))} | — | — |")
    return rows


def markdown(res: dict) -> str:
    """The suite's markdown table (figures missing from a failed part are absent)."""
    peak = res.get("peak_gflops")
    pk = _result(res, "peak")
    lines = [f"Backend `{res['backend']}`{' (quick)' if res.get('quick') else ''}, malloc "
             f"{res.get('malloc', 'stock')}, suite wall "
             f"{res['wall_s'] / 60:.1f} min. Matmul peak measured in this run: jax f32 "
             f"{_f(peak)} GFLOP/s"]
    host = pk.get("host_blas", {})
    extra = [f"{k} {_f(v.get('gflops'))}" for k, v in {**pk.get("jax", {}), **host}.items()
             if isinstance(v, dict) and k != "f32" and "gflops" in v]
    if extra:
        lines[0] += " (" + ", ".join(extra) + " GFLOP/s)"
    lines[0] += "."
    lines += ["", "| figure | dp_jax | PyTorch | ratio | % of peak | CPU util | compile s |",
              "|---|---|---|---|---|---|---|"]
    lines += _train_rows(res, peak) + _dp_rows(res) + _seed_rows(res) + _mtt_rows(res) + _analysis_rows(res)
    lines += _kernel_rows(res)
    failed = [f"- **{n} failed**: {r.get('error', '')[-300:]}" for n, r in res["parts"].items()
              if not r.get("ok")]
    return "\n".join(lines + ([""] + failed if failed else []))
