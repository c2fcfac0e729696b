"""The result of :func:`speedbench.harness.run` as markdown tables."""

from __future__ import annotations

from typing import Any


def _t(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.0f} µs"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}x"


def _mib(v: float | None) -> str:
    return "-" if v is None else (f"{v / 1024:.2f} GiB" if v >= 1024 else f"{v:.0f} MiB")


def to_markdown(res: dict[str, Any]) -> str:
    """The report of :func:`run` as markdown tables."""
    cfg, m, f = res["config"], res["machine"], res["floors"]
    lines = [
        f"Machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('threads')} torch threads, "
        f"{m.get('ram_gib')} GiB RAM{', ' + m['gpu'] if 'gpu' in m else ''}; Python "
        f"{m.get('python')}, torch {m.get('torch')}; fused C kernel "
        f"{'on' if m.get('fused_kernel') else 'off (BLAS)'}; device {cfg['device']}, {cfg['dtype']}; "
        f"load average at start {' '.join(m.get('loadavg_at_start', []))}; started "
        f"{res.get('started')}, took {res.get('seconds', 0):.0f} s.",
        "",
        f"Floors measured in this run: read bandwidth {f['read_gbps']:.1f} GB/s (sum of "
        f"{f['bytes_used'] >> 20} MiB), copy {f['copy_gbps']:.1f} GB/s (read + write), matmul "
        f"{f['matmul_gflops']:.0f} GFLOP/s ({f['gemm_n']}^3 GEMM)"
        + (
            f"; per CPU-second: read {f['read_gbps_cpu']:.1f} GB/s, matmul "
            f"{f['matmul_gflops_cpu']:.0f} GFLOP/s."
            if f.get("read_gbps_cpu")
            else "."
        )
        + (
            f" Again at the end: {res['floors_at_end']['read_gbps']:.1f} GB/s, "
            f"{res['floors_at_end']['matmul_gflops']:.0f} GFLOP/s."
            if "floors_at_end" in res
            else ""
        ),
        "",
    ]
    if "models" in res:
        lines += [
            "Per LoRA (time of one call on a batch / batch size; best call), as wall / CPU time "
            "(CPU time: what the call cost the process, free of waiting for a shared core). "
            "x floor = time / max(bytes / bandwidth, FLOPs / matmul rate), wall over the wall "
            "floors / CPU over the CPU-time floors. Forward is the model's whole forward, "
            "featurization included. Peak = resident memory the model build + one featurize + "
            "forward added (parameters, features, activations; not the input).",
            "",
        ]
        for B in cfg["batch_sizes"]:
            lines += [
                f"Batch size {B}:",
                "",
                "| shape (L x width) | input/LoRA | model | featurize wall / CPU | x floor "
                "| forward wall / CPU | x floor | params | peak | note |",
                "|---|---|---|---|---|---|---|---|---|---|",
            ]
            for r in (r for r in res["models"] if r["batch_size"] == B):
                shape = f"{r['shape']} ({r['layers']} x {r['width']})"
                feat = (
                    f"{r['featurizer']}: {_t(r['featurize_s'])} / {_t(r['featurize_cpu_s'])}"
                    if r["featurizer"]
                    else "-"
                )
                if r["status"] != "ok":
                    lines.append(
                        f"| {shape} | {_mib(r['input_mib'])} | {r['model']} | - | - | - | - | - "
                        f"| - | **{r['status']}**: {r['note']} |"
                    )
                    continue
                lines.append(
                    f"| {shape} | {_mib(r['input_mib'])} | {r['model']} | {feat} "
                    f"| {_x(r['featurize_x_floor'])} / {_x(r['featurize_cpu_x_floor'])} "
                    f"| {_t(r['forward_s'])} / {_t(r['forward_cpu_s'])} "
                    f"| {_x(r['forward_x_floor'])} / {_x(r['forward_cpu_x_floor'])} "
                    f"| {_mib(r['param_mib'])} "
                    f"| {_mib(r['peak_mib'])} | {r['note']} |"
                )
            lines.append("")
    if "svals" in res:
        lines += [
            "Singular values of every delta W of one LoRA: the featurizer's factor route (Grams, QR where ill-conditioned) vs "
            "torch.linalg.svdvals of the dense U V^T.",
            "",
            "| shape | factor route wall / CPU | x floor wall / CPU | dense svdvals wall / CPU "
            "| dense / factor route wall / CPU | max rel. diff | note |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in res["svals"]:
            err = "-" if r["max_rel_err"] is None else f"{r['max_rel_err']:.1e}"
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:,.0f}x"
            ratio_cpu = "-" if r.get("ratio_cpu") is None else f"{r['ratio_cpu']:,.0f}x"
            lines.append(
                f"| {r['shape']} ({r['layers']} x {r['width']}) "
                f"| {_t(r['qr_s'])} / {_t(r.get('qr_cpu_s'))} "
                f"| {_x(r['qr_x_floor'])} / {_x(r.get('qr_cpu_x_floor'))} "
                f"| {_t(r['dense_s'])} / {_t(r.get('dense_cpu_s'))} | {ratio} / {ratio_cpu} "
                f"| {err} | {r['note']} |"
            )
        lines.append("")
    if "store" in res:
        info = res["store"]["info"]
        lines += [
            f"Reading {info['loras']} PEFT LoRAs ({info['layers']} layers, "
            f"{info['payload_bytes'] / info['loras'] / 1024:.0f} KiB of float32 U, V each) as "
            f"batches of {info['batch_size']}; cold = files evicted from the page cache with "
            f"posix_fadvise(DONTNEED) first. Packing them took {info['pack_s']:.1f} s.",
            "",
            "| source | page cache | LoRAs/s | GB/s | CPU s | files | store / PEFT (wall) "
            "| (CPU) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in res["store"]["rows"]:
            sp = "-" if r["speedup"] is None else f"**{r['speedup']:.0f}x**"
            spc = "-" if r.get("speedup_cpu") is None else f"{r['speedup_cpu']:.0f}x"
            lines.append(
                f"| {r['source']} | {r['cache']} | {r['loras_per_s']:,.0f} | "
                f"{r['gb_per_s']:.2f} | {_t(r.get('cpu_s'))} | {_mib(r['file_bytes'] / 2**20)} "
                f"| {sp} | {spc} |"
            )
        lines.append("")
    if "train" in res:
        lines += [
            "Training (loralens.learn.training.loop.train, AdamW, its default batch size per model): LoRAs/s "
            "per epoch (median over epochs), and the same DataLoader timed alone over the same "
            "rows.",
            "",
            "| model | LoRAs/epoch | epoch | LoRAs/s | loader alone | loader share | step "
            "(rest) | note |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in res["train"]:
            if r["status"] != "ok":
                lines.append(f"| {r['model']} | - | - | - | - | - | - | {r['note']} |")
                continue
            lines.append(
                f"| {r['model']} | {r['loras']} | {_t(r['epoch_s'])} | {r['loras_per_s']:,.0f} "
                f"| {_t(r['loader_s'])} | {100 * r['loader_share']:.0f}% | {_t(r['step_s'])} "
                f"| {r['note']} |"
            )
        lines.append("")
    return "\n".join(lines)
