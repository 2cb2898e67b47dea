"""A Chrome trace-event file of what the simulated device did; Perfetto and
chrome://tracing open it. One process per device (plus the host), one track per
category as the RBLN profiler shows them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

HOST = "Host"
EXTERNAL_HDMA = "External HDMA"
TASK_DMA = "Task DMA"
NEURAL_ENGINE = "Neural Engine Clusters"
DEVICE_SYNC = "Device Sync"
DEVICE_TRACKS = (EXTERNAL_HDMA, TASK_DMA, NEURAL_ENGINE, DEVICE_SYNC)


@dataclass
class Slice:
    track: str
    name: str
    start_s: float
    duration_s: float
    device: int | None            # None for host slices
    args: dict = field(default_factory=dict)


class Trace:
    def __init__(self) -> None:
        self.slices: list[Slice] = []

    def add(self, track: str, name: str, start_s: float, duration_s: float, device: int | None, **args) -> None:
        self.slices.append(Slice(track, name, start_s, duration_s, device, args))

    def to_chrome_json(self) -> dict:
        events = [{"ph": "M", "name": "process_name", "pid": 0, "tid": 0, "args": {"name": "Host"}}]
        events.append({"ph": "M", "name": "thread_name", "pid": 0, "tid": 0, "args": {"name": HOST}})
        for device in sorted({s.device for s in self.slices if s.device is not None}):
            pid = device + 1
            events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": f"npu{device}"}})
            for tid, track in enumerate(DEVICE_TRACKS, start=1):
                events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": track}})
        for s in self.slices:
            pid = 0 if s.device is None else s.device + 1
            tid = 0 if s.track == HOST else DEVICE_TRACKS.index(s.track) + 1
            events.append({
                "ph": "X", "name": s.name, "cat": s.track, "pid": pid, "tid": tid,
                "ts": round(s.start_s * 1e6, 3), "dur": round(s.duration_s * 1e6, 3), "args": s.args,
            })
        return {"traceEvents": events, "displayTimeUnit": "ns"}

    def save(self, path: str | os.PathLike) -> str:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_chrome_json()))
        return str(path)
