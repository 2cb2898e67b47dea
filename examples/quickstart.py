"""The compiler and the simulated NPU on three tiny modules.

Run: `make demo` (or `python examples/quickstart.py` inside the venv). Writes the .rbln
artifacts and Perfetto traces to ./quickstart_out/ (open a trace at https://ui.perfetto.dev).
"""

from pathlib import Path

import torch

from optimum_npu import Runtime, compile_from_torch


class LinearReLU(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(16, 16)

    def forward(self, x):
        return torch.relu(self.linear(x))


class LinearAtanLinear(torch.nn.Module):
    """atan has no device kernel: it runs on the host between two device segments."""

    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(16, 16)
        self.second = torch.nn.Linear(16, 16)

    def forward(self, x):
        return self.second(torch.atan(self.first(x)))


def main(out_dir: Path = Path("quickstart_out")) -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 16)
    for name, module in [("linear", torch.nn.Linear(16, 16)), ("linear_relu", LinearReLU()),
                         ("linear_atan_linear", LinearAtanLinear())]:
        compiled = compile_from_torch(module, example_inputs=[x])
        path = compiled.save(out_dir / f"{name}.rbln")
        runtime = Runtime(path, tensor_type="pt", activate_profiler=True)
        y = runtime.run(x)
        error = (y - module(x)).abs().max().item()
        trace = runtime.save_trace(out_dir / f"{name}_trace.json")
        print(f"\n=== {name}: {compiled.summary()}")
        print(f"max |device - torch fp32| = {error:.2e}   trace: {trace}")
        print("what the device did:")
        for step in compiled.program.steps:
            where = {"kernel": "Neural Engine", "host": "Host", "h2d": "External HDMA", "d2h": "External HDMA"}[step.kind]
            print(f"  {where:<14} {step.name:<28} {step.flops + step.vector_flops:>8.0f} FLOPs "
                  f"{step.bytes_read + step.bytes_written:>6d} bytes")
        print(runtime.stats)
        runtime.close()


if __name__ == "__main__":
    main()
