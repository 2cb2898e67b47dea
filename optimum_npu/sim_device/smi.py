"""`optimum-npu smi`: what `rbln-smi` shows, for the simulated machine.

`status()` gathers the devices of this machine (`OPTIMUM_NPU_SYSTEM`), their memory in
use and the runtimes holding it (from the allocation registry shared by every process),
as plain JSON-ready data, with the registry's records it ignored (of exited processes,
malformed); `format_status()` renders it as a table. `reset()` / `format_reset()` remove
the records no live process holds and say what was freed. `presets()` /
`format_presets()` list the hardware presets, marking estimated figures.
"""

from __future__ import annotations

from typing import Callable

from . import host_math, machine, memory
from .stats import format_bytes
from .specs import DEFAULT_NPU, GB, MB_BINARY as MiB, GiB, NPU_PRESETS, NPUSpec

ESTIMATE_MARK = "*"


def format_capacity(nbytes: int) -> str:
    """A capacity in the unit it was specified in: '16 GiB', '144 GB', '32 MiB', else as `format_bytes`."""
    if nbytes and nbytes % GiB == 0:
        return f"{nbytes // GiB} GiB"
    if nbytes and nbytes % GB == 0:
        return f"{nbytes // GB} GB"
    if nbytes and nbytes % MiB == 0:
        return f"{nbytes // MiB} MiB"
    return format_bytes(nbytes)


def _per_device(allocation: memory.Allocation) -> list[dict]:
    a = allocation
    return [
        {"device": index, "pid": a.pid, "owner": a.owner, "bytes": nbytes, "allocation_id": a.id, "kind": a.kind}
        for index, nbytes in sorted(a.bytes_per_device.items())
    ]


def _malformed(records: list[memory.MalformedRecord]) -> list[dict]:
    # A file name may hold control characters: shown as a Python literal then, never raw.
    return [{"file": r.path.name if r.path.name.isprintable() else repr(r.path.name), "reason": r.reason,
             "removed_by_reset": r.ours} for r in records]


def status() -> dict:
    """Devices, memory used / total per device, and the runtimes holding memory.

    Read-only: records of exited processes and malformed records are counted, not removed
    (`reset()` removes them)."""
    all_devices = machine.devices()
    scan = memory.scan_registry()
    processes = [p for a in scan.live for p in _per_device(a)]
    processes.sort(key=lambda p: (p["device"], p["pid"], p["owner"]))
    devices = []
    for d in all_devices:
        used = sum(p["bytes"] for p in processes if p["device"] == d.index)
        devices.append({
            "index": d.index,
            "name": d.name,
            "npu": d.spec.name,
            "product": d.spec.product,
            "card": d.card,
            "numa_node": d.numa_node,
            "memory_used_bytes": used,
            "memory_total_bytes": d.spec.usable_dram_bytes,
            "dram_bytes": d.spec.dram_bytes,
            # Every runtime holds one activations allocation; weights may be shared by several.
            "runtimes": sum(1 for p in processes if p["device"] == d.index and p["kind"] == "activations"),
        })
    return {
        "system": machine.system_description(),
        "state_dir": str(memory.state_dir()),
        "devices": devices,
        "processes": processes,
        "exited_records": len(scan.dead),
        "malformed_records": _malformed(scan.malformed),
        "host_math": host_math.status(),
    }


def _table(headers: list[str], rows: list[list[str]], right: set[int] | frozenset[int] = frozenset()) -> list[str]:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells):
        return "| " + " | ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ) + " |"

    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    return [rule, line(headers), rule] + [line(r) for r in rows] + [rule]


def format_status(data: dict | None = None) -> str:
    data = status() if data is None else data
    out = [f"Simulated NPU machine: OPTIMUM_NPU_SYSTEM={data['system']}   state: {data['state_dir']}"]
    if "host_math" in data:
        out.append(host_math.describe(data["host_math"]))
    out += _table(
        ["NPU", "Name", "Product", "Card", "NUMA", "Memory used / total", "Runtimes"],
        [
            [
                str(d["index"]), d["npu"], d["product"], str(d["card"]), str(d["numa_node"]),
                f"{format_bytes(d['memory_used_bytes'])} / {format_bytes(d['memory_total_bytes'])}",
                str(d["runtimes"]),
            ]
            for d in data["devices"]
        ],
        right={0, 3, 4, 5, 6},
    )
    known = {d["index"] for d in data["devices"]}
    out.append("Processes:")
    if not data["processes"]:
        out.append("  No runtime holds device memory.")
    else:
        out += _table(
            ["NPU", "PID", "Owner", "Memory"],
            [
                [str(p["device"]) + ("" if p["device"] in known else " (not in this system)"), str(p["pid"]),
                 p["owner"], format_bytes(p["bytes"])]
                for p in data["processes"]
            ],
            right={1, 3},
        )
    if data["exited_records"]:
        out.append(f"{data['exited_records']} record(s) of exited processes hold nothing; "
                   "`optimum-npu smi --reset` removes them.")
    if data["malformed_records"]:
        out.append(_malformed_line("Ignored", data["malformed_records"], suggest_reset=True))
    return "\n".join(out)


def _malformed_line(verb: str, records: list[dict], suggest_reset: bool = False) -> str:
    ours = [r for r in records if r["removed_by_reset"]]
    foreign = [r for r in records if not r["removed_by_reset"]]
    line = f"{verb} {len(records)} malformed record(s): " + "; ".join(f"{r['file']} ({r['reason']})" for r in records)
    if ours and suggest_reset:
        line += f". `optimum-npu smi --reset` removes {', '.join(r['file'] for r in ours)}"
    if foreign:
        line += (f". optimum-npu did not write {', '.join(r['file'] for r in foreign)}: "
                 "remove by hand what is not yours")
    return line + "."


def reset(dry_run: bool = False) -> dict:
    """Remove the records no live process holds (see `memory.reset_registry`); what was freed."""
    scan = memory.reset_registry(dry_run=dry_run)
    return {
        "dry_run": dry_run,
        "state_dir": str(memory.state_dir()),
        "freed": sorted(({**p, "why": d.why} for d in scan.dead for p in _per_device(d.allocation)),
                        key=lambda p: (p["device"], p["pid"], p["owner"])),
        "malformed_removed": _malformed([r for r in scan.malformed if r.ours]),
        "malformed_left": _malformed([r for r in scan.malformed if not r.ours]),
        "half_written_removed": [path.name for path in scan.stale_tmp],
        "live_kept": len(scan.live),
    }


def format_reset(data: dict) -> str:
    free, remove = ("Would free", "Would remove") if data["dry_run"] else ("Freed", "Removed")
    out = [f"Device registry: {data['state_dir']}" + ("   (dry run: nothing removed)" if data["dry_run"] else "")]
    if data["freed"]:
        out.append(f"{free} the memory of processes that are gone:")
        out += _table(
            ["NPU", "Memory", "Owner", "PID"],
            [[str(p["device"]), format_bytes(p["bytes"]), p["owner"], f"{p['pid']} ({p['why']})"] for p in data["freed"]],
            right={0, 1},
        )
    if data["malformed_removed"]:
        out.append(_malformed_line(remove, data["malformed_removed"]))
    if data["half_written_removed"]:
        out.append(f"{remove} {len(data['half_written_removed'])} half-written record(s) of exited processes: "
                   + ", ".join(data["half_written_removed"]) + ".")
    if data["malformed_left"]:
        out.append(_malformed_line("Left", data["malformed_left"]))
    if not (data["freed"] or data["malformed_removed"] or data["half_written_removed"]):
        out.append("Nothing to free.")
    out.append(f"Kept {data['live_kept']} allocation(s) of live processes.")
    return "\n".join(out)


# ---- hardware presets --------------------------------------------------------------

# Column -> (NPUSpec fields it shows, how to render the spec).
_PRESET_COLUMNS: dict[str, tuple[tuple[str, ...], Callable[[NPUSpec], str]]] = {
    "Devices/card": (("devices_per_card",), lambda s: str(s.devices_per_card)),
    "DRAM (usable)": (
        ("dram_bytes", "usable_dram_bytes"),
        lambda s: f"{format_capacity(s.dram_bytes)} ({format_capacity(s.usable_dram_bytes)})",
    ),
    "DRAM BW": (("dram_bandwidth",), lambda s: f"{s.dram_bandwidth / 1e9:g} GB/s"),
    "TFLOPS bf16": (("peak_flops_16bit",), lambda s: f"{s.peak_flops_16bit / 1e12:g}"),
    "TOPS int8": (("peak_ops_int8",), lambda s: f"{s.peak_ops_int8 / 1e12:g}"),
    "TFLOPS fp8": (("peak_flops_fp8",), lambda s: "-" if s.peak_flops_fp8 is None else f"{s.peak_flops_fp8 / 1e12:g}"),
    "SRAM": (
        ("sram_shared_bytes", "sram_per_engine_bytes", "num_neural_engines"),
        lambda s: f"{format_capacity(s.sram_shared_bytes)} + {s.num_neural_engines}x{format_capacity(s.sram_per_engine_bytes)}",
    ),
    "PCIe": (("pcie_bandwidth",), lambda s: f"{s.pcie_bandwidth / 1e9:g} GB/s"),
    "Dev link": (("device_link_bandwidth",), lambda s: f"{s.device_link_bandwidth / 1e9:g} GB/s"),
    "Card TDP": (("card_tdp_watts",), lambda s: f"{s.card_tdp_watts:g} W"),
}

_PRESET_FIELDS = (
    "product", "devices_per_card", "dram_bytes", "usable_dram_bytes", "dram_bandwidth", "peak_flops_16bit",
    "peak_ops_int8", "peak_flops_fp8", "sram_shared_bytes", "sram_per_engine_bytes", "num_neural_engines", "pcie_bandwidth",
    "device_link_bandwidth", "card_tdp_watts",
)


def presets() -> list[dict]:
    """Every hardware preset with its figures (per device; TDP per card) and which are estimates."""
    return [
        {"name": spec.name, **{f: getattr(spec, f) for f in _PRESET_FIELDS}, "estimated": list(spec.estimated)}
        for spec in NPU_PRESETS.values()
    ]


def _preset_row(spec: NPUSpec) -> list[str]:
    row = [spec.name, spec.product]
    for fields, render in _PRESET_COLUMNS.values():
        mark = ESTIMATE_MARK if any(f in spec.estimated for f in fields) else ""
        row.append(render(spec) + mark)
    return row


def format_presets() -> str:
    out = ["Hardware presets (figures per device; TDP per card):"]
    out += _table(
        ["Preset", "Product", *_PRESET_COLUMNS],
        [_preset_row(spec) for spec in NPU_PRESETS.values()],
        right=set(range(2, 2 + len(_PRESET_COLUMNS))),
    )
    out.append(f"{ESTIMATE_MARK} estimate (not published by the vendor); other figures from Rebellions' product briefs.")
    out.append(f"Default preset (when no npu is given): {DEFAULT_NPU}")
    return "\n".join(out)
