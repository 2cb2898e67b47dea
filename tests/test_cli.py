"""The `optimum-npu` command: smi, presets, compile, run; and its one-line errors."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from optimum_npu.cli import main
from optimum_npu.sim_device import Runtime

MODELS = textwrap.dedent(
    """
    import sys

    import torch

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up = torch.nn.Linear(16, 64)
            self.down = torch.nn.Linear(64, 8)

        def forward(self, x):
            return self.down(torch.nn.functional.gelu(self.up(x)))

    def build():
        torch.manual_seed(0)
        return MLP()

    NOT_CALLABLE = 3

    def returns_int():
        return 3

    def raises():
        raise RuntimeError("boom in factory")

    def too_big():
        return torch.nn.Linear(100_000, 100_000, bias=False, device="meta")

    def exits():
        sys.exit(3)

    def exits_with_a_message():
        sys.exit("no GPU found")

    def interrupted():
        raise KeyboardInterrupt

    def returns_the_class():
        return MLP

    def raises_multiline():
        raise ValueError("first line\\n  second line")

    class ExitsWhenTraced(torch.nn.Module):
        def forward(self, x):
            sys.exit(5)

    def exits_when_traced():
        return ExitsWhenTraced()
    """
)


@pytest.fixture(autouse=True)
def machine(tmp_path, monkeypatch):
    """A fresh device registry and the default machine (one RBLN-CA25 card) per test."""
    monkeypatch.setenv("OPTIMUM_NPU_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("OPTIMUM_NPU_SYSTEM", raising=False)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder holding `mymods.py` (and a module that fails to import), as cwd.
    sys.path is restored afterwards: the CLI adds the cwd to it."""
    (tmp_path / "mymods.py").write_text(MODELS)
    (tmp_path / "brokenmod.py").write_text("raise ImportError('missing dependency foo')\n")
    (tmp_path / "exitmod.py").write_text("import sys\nsys.exit(4)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in ("mymods", "brokenmod", "exitmod"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return tmp_path


def smi_json(capsys) -> dict:
    assert main(["smi", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# ---- smi / presets -------------------------------------------------------------------


def test_smi_default_machine_has_four_devices(capsys):
    assert main(["smi"]) == 0
    text = capsys.readouterr().out
    assert sum(1 for line in text.splitlines() if "ATOM-Max (RBLN-CA25)" in line) == 4
    assert "No runtime holds device memory" in text
    data = smi_json(capsys)
    assert [d["index"] for d in data["devices"]] == [0, 1, 2, 3]
    assert {(d["npu"], d["card"], d["numa_node"]) for d in data["devices"]} == {("RBLN-CA25", 0, 0)}
    assert all(d["memory_used_bytes"] == 0 and d["memory_total_bytes"] > 15 * 1024**3 for d in data["devices"])
    assert data["processes"] == []


@pytest.mark.parametrize(
    "system",
    [
        "RBLN-CA25x2",
        "RBLN-CA25,RBLN-CA25",
    ],
)
def test_smi_two_cards_have_eight_devices(capsys, monkeypatch, system):
    monkeypatch.setenv("OPTIMUM_NPU_SYSTEM", system)
    data = smi_json(capsys)
    assert len(data["devices"]) == 8
    assert [d["card"] for d in data["devices"]] == [0] * 4 + [1] * 4
    assert [d["numa_node"] for d in data["devices"]] == [0] * 4 + [1] * 4
    assert main(["smi"]) == 0
    assert sum(1 for line in capsys.readouterr().out.splitlines() if "RBLN-CA25 |" in line) == 8


def test_smi_bad_system_is_a_one_line_error(capsys, monkeypatch):
    monkeypatch.setenv("OPTIMUM_NPU_SYSTEM", "RBLN-NOPE")
    assert main(["smi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Unknown npu 'RBLN-NOPE'" in err


def test_presets_list_figures_and_estimates(capsys):
    assert main(["presets"]) == 0
    text = capsys.readouterr().out
    for name in ("RBLN-CA12", "RBLN-CA22", "RBLN-CA25", "RBLN-CR03"):
        assert name in text
    cr03 = next(line for line in text.splitlines() if line.startswith("| RBLN-CR03"))
    assert "144 GiB (140 GiB)" in cr03 and "4800 GB/s" in cr03 and "1000*" in cr03
    ca25 = next(line for line in text.splitlines() if line.startswith("| RBLN-CA25"))
    assert "16 GiB" in ca25 and " 32 " in ca25 and "350 W " in ca25 and "* estimate" in text
    assert main(["smi", "--presets"]) == 0
    assert capsys.readouterr().out == text
    assert main(["presets", "--json"]) == 0
    presets = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert presets["RBLN-CA25"]["devices_per_card"] == 4 and presets["RBLN-CA25"]["peak_flops_16bit"] == 32e12
    assert "peak_flops_16bit" in presets["RBLN-CR03"]["estimated"] and presets["RBLN-CA12"]["estimated"] == []


# ---- compile / run -------------------------------------------------------------------


@pytest.mark.parametrize("numerics, tol", [("device", 3e-2), ("exact", 1e-5)])
def test_compile_writes_a_runnable_artifact(project, capsys, numerics, tol):
    argv = ["compile", "mymods:build", "--input", "x:2x16:float32", "-o", "out/mlp.rbln", "--numerics", numerics]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"RBLN-CA25 x1, bfloat16, numerics={numerics}" in out and "estimated" in out
    assert "saved: out/mlp.rbln" in out
    sys.path.remove(str(project))
    from mymods import build  # noqa: E402  (the module the CLI imported)

    x = torch.randn(2, 16)
    with Runtime(project / "out" / "mlp.rbln") as runtime:
        torch.testing.assert_close(runtime(x), build()(x).detach(), atol=tol, rtol=tol)


def test_smi_shows_a_live_runtime_across_processes(project, capsys):
    assert main(["compile", "mymods:build", "--input", "x:16,16", "--dtype", "bf16", "-o", "mlp.rbln"]) == 0
    capsys.readouterr()
    runtime = Runtime("mlp.rbln", device=2)
    try:
        data = smi_json(capsys)
        used = [d["memory_used_bytes"] for d in data["devices"]]
        assert used[2] == runtime.stats.memory[0].total_bytes > 0 and used[:2] + used[3:] == [0, 0, 0]
        # A runtime holds two allocations: its weights (shared with runtimes sharing its state) and
        # its activations; together they are what the device shows as used.
        processes = data["processes"]
        assert {p["owner"] for p in processes} == {"Runtime(mlp.rbln) weights", "Runtime(mlp.rbln)"}
        assert {(p["device"], p["pid"]) for p in processes} == {(2, os.getpid())}
        assert sum(p["bytes"] for p in processes) == used[2]
        # ...but it is one runtime
        assert [d["runtimes"] for d in data["devices"]] == [0, 0, 1, 0]
        assert main(["smi"]) == 0
        text = capsys.readouterr().out
        assert "Runtime(mlp.rbln)" in text and str(os.getpid()) in text

        # Another process (the entry point, run as a module) sees this process's allocation.
        proc = subprocess.run(
            [sys.executable, "-m", "optimum_npu.cli", "smi", "--json"],
            capture_output=True, text=True, timeout=60, env=os.environ.copy(),
        )
        assert proc.returncode == 0, proc.stderr
        other = json.loads(proc.stdout)
        assert {p["pid"] for p in other["processes"]} == {os.getpid()}
        assert other["devices"][2]["memory_used_bytes"] == used[2]
    finally:
        runtime.close()
    assert smi_json(capsys)["processes"] == []


def test_run_prints_stats_and_writes_a_trace(project, capsys):
    assert main(["compile", "mymods:build", "--input", "x:2x16", "-o", "mlp.rbln"]) == 0
    capsys.readouterr()
    assert main(["run", "mlp.rbln", "--runs", "2", "--profile", "trace.json"]) == 0
    out = capsys.readouterr().out
    assert "runs: 2   simulated device time" in out and "npu0 (RBLN-CA25)" in out
    assert json.loads((project / "trace.json").read_text())
    assert smi_json(capsys)["processes"] == []  # the run released its memory


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compile", "mymods.build", "-i", "x:2x16", "-o", "o.rbln"], "must look like 'package.module:factory'"),
        (["compile", "mymods:build:x", "-i", "x:2x16", "-o", "o.rbln"], "must look like 'package.module:factory'"),
        (["compile", "no_such_module_xyz:build", "-i", "x:2x16", "-o", "o.rbln"], "cannot import module 'no_such_module_xyz'"),
        (["compile", "brokenmod:build", "-i", "x:2x16", "-o", "o.rbln"], "ImportError: missing dependency foo"),
        (["compile", "mymods:missing", "-i", "x:2x16", "-o", "o.rbln"], "module 'mymods' has no attribute 'missing'"),
        (["compile", "mymods:NOT_CALLABLE", "-i", "x:2x16", "-o", "o.rbln"], "is not callable"),
        (["compile", "mymods:returns_int", "-i", "x:2x16", "-o", "o.rbln"], "not a torch.nn.Module"),
        (["compile", "mymods:raises", "-i", "x:2x16", "-o", "o.rbln"], "RuntimeError: boom in factory"),
        (["compile", "mymods:build", "-i", "x", "-o", "o.rbln"], "expected NAME:SHAPE[:DTYPE]"),
        (["compile", "mymods:build", "-i", "x:2y16", "-o", "o.rbln"], "must be sizes separated by 'x' or ','"),
        (["compile", "mymods:build", "-i", "x:2x0", "-o", "o.rbln"], "sizes must be positive"),
        (["compile", "mymods:build", "-i", "x:2x16:float8", "-o", "o.rbln"], "unknown dtype 'float8'"),
        (["compile", "mymods:build", "-i", "x:2x16", "--dtype", "float32", "-o", "o.rbln"], "computes in bfloat16 or float16"),
        (["compile", "mymods:build", "-i", "x:2x16", "--numerics", "fast", "-o", "o.rbln"], "must be one of device, exact"),
        (["compile", "mymods:build", "-i", "x:2x16", "--npu", "RBLN-X", "-o", "o.rbln"], "Unknown npu 'RBLN-X'"),
        # Errors raised by compile_from_torch: its message, one line.
        (["compile", "mymods:build", "-i", "x:2x17", "-o", "o.rbln"], "torch.export could not trace MLP"),
        (["compile", "mymods:build", "-i", "x:2x16", "--tensor-parallel-size", "0", "-o", "o.rbln"],
         "tensor_parallel_size must be a positive int"),
        (["compile", "mymods:too_big", "-i", "x:1x100000", "-o", "o.rbln"], "needs 18.63 GiB per device"),
        (["run", "missing.rbln"], "No compiled artifact at missing.rbln"),
        (["run", "mymods.py"], "is not a .rbln artifact"),
    ],
)
def test_bad_input_exits_2_with_one_line(project, capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # a tqdm progress line may precede it on stderr
    assert last.startswith(f"optimum-npu {argv[0]}: error: ") and message in last, err
    assert "Traceback" not in err
    assert not (project / "o.rbln").exists()


@pytest.mark.parametrize(
    "argv, message, exit_code",
    [
        # The user's code stopping the process is reported, not obeyed.
        (["compile", "mymods:exits", "-i", "x:2x16", "-o", "o.rbln"], "the factory called sys.exit(3)", 2),
        (["compile", "mymods:exits_with_a_message", "-i", "x:2x16", "-o", "o.rbln"],
         "the factory called sys.exit('no GPU found')", 2),
        (["compile", "exitmod:build", "-i", "x:2x16", "-o", "o.rbln"], "importing module 'exitmod' failed: it called sys.exit(4)", 2),
        (["compile", "mymods:exits_when_traced", "-i", "x:2x16", "-o", "o.rbln"], "sys.exit(5)", 2),
        (["compile", "mymods:interrupted", "-i", "x:2x16", "-o", "o.rbln"], "interrupted", 130),
        (["compile", "mymods:returns_the_class", "-i", "x:2x16", "-o", "o.rbln"], "returned an object of type type, not a torch.nn.Module", 2),
        (["compile", "mymods:raises_multiline", "-i", "x:2x16", "-o", "o.rbln"], "ValueError: first line second line", 2),
        # Files that are not what they should be.
        (["compile", "mymods:build", "-i", "x:2x16", "-o", "mymods.py/o.rbln"], "mymods.py", 2),
        (["run", "garbage.rbln"], "garbage.rbln", 2),
        (["run", "folder.rbln"], "folder.rbln", 2),
    ],
)
def test_every_failure_is_one_line(project, capsys, argv, message, exit_code):
    (project / "garbage.rbln").write_bytes(b"RBLN" + bytes(range(256)) * 4)
    (project / "folder.rbln").mkdir()
    assert main(argv) == exit_code
    err = capsys.readouterr().err
    # progress of a compile that succeeded before the failure (one line when stderr is not a terminal)
    lines = [line for line in err.splitlines() if "it/s]" not in line and not line.startswith("Compiling ")]
    assert len(lines) == 1 and lines[0].startswith(f"optimum-npu {argv[0]}: error: ") and message in lines[0], err
    assert "Traceback" not in err
    assert not (project / "o.rbln").exists()


def test_unexpected_errors_name_their_type_and_can_show_the_traceback(project, capsys, monkeypatch):
    from optimum_npu.sim_device import smi

    def broken():
        raise KeyError("surprise")

    monkeypatch.setattr(smi, "format_presets", broken)
    assert main(["presets"]) == 2
    err = capsys.readouterr().err
    assert err == "optimum-npu presets: error: KeyError: 'surprise' (OPTIMUM_NPU_TRACEBACK=1 shows where)\n"
    monkeypatch.setenv("OPTIMUM_NPU_TRACEBACK", "1")
    with pytest.raises(KeyError, match="surprise"):
        main(["presets"])


def test_usage_errors_exit_2(capsys):
    assert main([]) == 2
    assert main(["compile", "mymods:build"]) == 2  # --input and -o are required
    assert "required" in capsys.readouterr().err
    assert main(["--version"]) == 0


# ---- export --------------------------------------------------------------------------

from optimum_npu.cli_export import parse_options, split_export_argv  # noqa: E402


def test_export_command_line_splits_into_own_flags_and_rbln_config():
    tokens = ["--batch_size", "4", "ckpt", "-o", "out", "--unet.batch_size", "2", "--max-seq-len", "8192",
              "--use_inputs_embeds", "--offset", "-1", "--decoder_batch_sizes", "1,2,4", "--device", "[0,1]",
              "--npu=RBLN-CA22", "--dtype", "bfloat16", "--guidance_scale", "7.5", "--flag_a", "True",
              "--show-rbln-config", "--kvcache_num_blocks", "null"]
    own, free = split_export_argv(tokens)
    assert own == ["ckpt", "-o", "out", "--show-rbln-config"]
    assert parse_options(free) == {
        "batch_size": 4, "unet": {"batch_size": 2}, "max_seq_len": 8192, "use_inputs_embeds": True, "offset": -1,
        "decoder_batch_sizes": [1, 2, 4], "device": [0, 1], "npu": "RBLN-CA22", "dtype": "bfloat16",
        "guidance_scale": 7.5, "flag_a": True, "kvcache_num_blocks": None,
    }


@pytest.mark.parametrize("tokens, message", [
    (["--batch_size", "2", "--batch_size", "4"], "--batch_size is given twice"),
    (["--unet", "2", "--unet.batch_size", "2"], "--unet is already given a value"),
    (["--unet.", "2"], "not an option name"),
    (["--hf-trust-remote-code"], "never runs code from a model folder"),
    (["--hf-dtype", "bf16"], "unknown Hub option"),
])
def test_export_command_line_mistakes(tokens, message):
    with pytest.raises(ValueError, match=message):
        parse_options(tokens)


@pytest.fixture(scope="module")
def llama_source(tmp_path_factory):
    from llm_fixtures import save_source

    return save_source(tmp_path_factory.mktemp("export") / "llama", "llama", tokenizer=True)[0]


def _saved_options(folder) -> dict:
    return json.loads((folder / "rbln_config.json").read_text())


def test_export_llama_infers_the_class_and_writes_a_loadable_folder(llama_source, tmp_path, capsys):
    from optimum_npu import RBLNLlamaForCausalLM

    out = tmp_path / "llama-rbln"
    assert main(["export", str(llama_source), "-o", str(out), "--batch_size", "2", "--max_seq_len", "128",
                 "--decoder-batch-sizes", "1,2", "--dtype", "float16"]) == 0
    assert f"saved: {out}" in capsys.readouterr().out
    saved = _saved_options(out)
    assert saved["cls_name"] == "RBLNLlamaForCausalLM"
    assert "create_runtimes" not in saved.get("runtime_options", {})  # runtime options are chosen at each load
    options = saved["compile_options"]
    assert (options["batch_size"], options["max_seq_len"], sorted(options["decoder_batch_sizes"]), options["dtype"]) == (
        2, 128, [1, 2], "float16")
    loaded = RBLNLlamaForCausalLM.from_pretrained(out, rbln_create_runtimes=False)
    assert loaded.rbln_config.batch_size == 2 and sorted(loaded.graphs) == ["decoder_batch_1", "decoder_batch_2",
                                                                             "prefill"]


def test_export_show_rbln_config_compiles_nothing(llama_source, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["export", str(llama_source), "--show-rbln-config", "--tensor_parallel_size", "2",
                 "--max_seq_len", "8192", "--attn_impl", "flash_attn", "-o", str(out)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["class"] == "RBLNLlamaForCausalLM" and shown["config_cls"] == "RBLNLlamaForCausalLMConfig"
    assert shown["compile_options"]["tensor_parallel_size"] == 2
    assert shown["compile_options"]["attn_impl"] == "flash_attn"
    assert shown["compile_options"]["kvcache_num_blocks"] is None  # decided from the checkpoint when compiling
    assert not out.exists()


def _write_json(folder, name, data):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(data))
    return folder


@pytest.mark.parametrize("argv, message", [
    (["{llama}", "-o", "{out}", "--batch_sise", "2"], "Unknown option batch_sise in rbln_config for "
                                                      "RBLNLlamaForCausalLMConfig. Did you mean batch_size?"),
    (["{llama}", "-o", "{out}", "--dtype", "fp8"], "rbln_dtype must be one of 'bfloat16', 'float16'; got 'fp8'"),
    (["{llama}", "-o", "{out}", "--attn_impl", "paged"], "rbln_attn_impl must be one of None, 'eager', 'flash_attn'"),
    (["{llama}", "-o", "{out}", "--batch_size", "two"], "rbln_batch_size must be an int; got 'two'"),
    (["{llama}", "-o", "{out}", "--class", "RBLNLlamaForCausalLLM"], "Did you mean RBLNLlamaForCausalLM?"),
    (["{llama}", "-o", "{out}", "--class", "RBLNBertModel"], "has model_type 'llama': use RBLNLlamaForCausalLM"),
    (["{llama}", "--batch_size", "2"], "-o DIR is required"),
    (["{llama}", "-o", "{llama}"], "the folder is not empty and holds no compiled model"),
    (["{llama}", "-o", "{out}", "--safety-checker", "{out}"], "RBLNLlamaForCausalLM takes no guardrail"),
    (["{falcon}", "-o", "{out}"], "model_type 'falcon' (architectures ['FalconForCausalLM']) has no RBLN class here; "
                                "the classes by model_type: "),
    (["{flux}", "-o", "{out}"], "names the pipeline 'FluxPipeline', which has no RBLN class here"),
    (["{empty}", "-o", "{out}"], "cannot tell which model it is"),
    (["{compiled}", "-o", "{out}"], "is already a compiled folder"),
    (["no/such/model/here", "-o", "{out}"], "no such folder, and not a Hugging Face Hub model id"),
])
def test_export_errors_are_one_line_and_name_the_fix(llama_source, tmp_path, capsys, argv, message):
    folders = {"llama": llama_source, "out": tmp_path / "out",
               "falcon": _write_json(tmp_path / "falcon", "config.json",
                                     {"model_type": "falcon", "architectures": ["FalconForCausalLM"]}),
               "flux": _write_json(tmp_path / "flux", "model_index.json", {"_class_name": "FluxPipeline"}),
               "empty": _write_json(tmp_path / "empty", "README.json", {}),
               "compiled": _write_json(tmp_path / "compiled", "rbln_config.json", {})}
    assert main(["export", *(a.format(**folders) for a in argv)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("optimum-npu export: error: ")
    assert message in err
    assert not (tmp_path / "out").exists()
    if "falcon" in argv[0]:
        assert "RBLNLlamaForCausalLM (llama)" in err and "RBLNBertModel (bert)" in err


def test_export_encoder_and_vision_models(tmp_path, capsys):
    from transformers import BertConfig, BertModel, ResNetConfig, ResNetForImageClassification

    BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp_path / "bert")
    ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                              layer_type="basic", num_labels=3)).save_pretrained(tmp_path / "resnet")
    assert main(["export", str(tmp_path / "bert"), "-o", str(tmp_path / "bert-rbln"), "--max_seq_len", "16",
                 "--batch_size", "2"]) == 0
    assert main(["export", str(tmp_path / "resnet"), "-o", str(tmp_path / "resnet-rbln"), "--image_size", "32"]) == 0
    bert, resnet = _saved_options(tmp_path / "bert-rbln"), _saved_options(tmp_path / "resnet-rbln")
    assert bert["cls_name"] == "RBLNBertModel"
    assert (bert["compile_options"]["max_seq_len"], bert["compile_options"]["batch_size"]) == (16, 2)
    assert resnet["cls_name"] == "RBLNResNetForImageClassification"
    assert resnet["compile_options"]["image_size"] in (32, [32, 32])


def test_export_stable_diffusion_with_component_options(tmp_path, capsys):
    from optimum_npu import RBLNStableDiffusionPipeline
    from optimum_npu.testing import build_tiny_stable_diffusion

    source = build_tiny_stable_diffusion(tmp_path / "sd")
    out = tmp_path / "sd-rbln"
    assert main(["export", source, "-o", str(out), "--height", "32", "--width", "32", "--guidance_scale", "1.0",
                 "--unet.batch_size", "2", "--vae.dtype", "float16"]) == 0
    saved = _saved_options(out)
    assert saved["cls_name"] == "RBLNStableDiffusionPipeline"
    assert saved["components"]["unet"]["compile_options"]["batch_size"] == 2  # the component's own, not CFG's 1
    assert saved["components"]["vae"]["compile_options"]["dtype"] == "float16"
    assert saved["components"]["text_encoder"]["compile_options"]["dtype"] == "bfloat16"
    pipe = RBLNStableDiffusionPipeline.from_pretrained(out, rbln_create_runtimes=False)
    assert pipe.unet.rbln_config.batch_size == 2 and pipe.rbln_config.height == 32
    # A component's unknown option is the pipeline API's error, in one line.
    assert main(["export", source, "-o", str(tmp_path / "x"), "--unet.batch_sise", "2"]) == 2
    assert "Unknown option batch_sise in rbln_config['unet']" in capsys.readouterr().err


def test_export_cosmos_pipeline_without_a_guardrail_is_refused(tmp_path, capsys):
    from optimum_npu.testing import build_tiny_cosmos

    source = build_tiny_cosmos(tmp_path / "cosmos")
    # Diffusers' Cosmos pipelines never run unguarded: without a guardrail the export is refused, before compiling.
    assert main(["export", source, "-o", str(tmp_path / "x"), "--height", "16"]) == 2
    assert "needs a safety checker" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.heavy  # the guardrail's four networks and the Cosmos pipeline: ~75 s on a busy 2-core machine
def test_export_cosmos_pipeline_with_its_guardrail(tmp_path, capsys):
    from optimum_npu.testing import build_tiny_cosmos, build_tiny_cosmos_guardrail

    source = build_tiny_cosmos(tmp_path / "cosmos")
    guardrail = build_tiny_cosmos_guardrail(tmp_path / "guardrail")
    checker_out = tmp_path / "guardrail-rbln"
    assert main(["export", str(guardrail), "-o", str(checker_out), "--llamaguard3.max_seq_len", "128",
                 "--face_blur_filter.image_size", "32,32"]) == 0
    checker = _saved_options(checker_out)
    assert checker["cls_name"] == "RBLNCosmosSafetyChecker"
    assert _saved_options(checker_out / "llamaGuard3")["compile_options"]["max_seq_len"] == 128
    out = tmp_path / "cosmos-rbln"
    assert main(["export", source, "-o", str(out), "--safety-checker", str(checker_out), "--height", "16",
                 "--width", "16", "--num_frames", "9", "--max_seq_len", "16",
                 "--transformer.tensor_parallel_size", "2"]) == 0
    saved = _saved_options(out)
    assert saved["cls_name"] == "RBLNCosmosTextToWorldPipeline"
    assert saved["components"]["transformer"]["compile_options"]["tensor_parallel_size"] == 2
    assert _saved_options(out / "safety_checker")["cls_name"] == "RBLNCosmosSafetyChecker"
def test_a_shape_mismatch_is_one_line_in_a_real_process(project):
    """torch logs the traceback of the failing op through its own logging handler (not seen by
    capsys): run the command as a user does and read the process's stderr."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run([sys.executable, "-m", "optimum_npu.cli", "compile", "mymods:build", "-i", "x:8x15",
                           "-o", "bad.rbln"], cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "optimum-npu compile: error: torch.export could not trace MLP with the given inputs: RuntimeError: "
        "a and b must have same reduction dim, but got [8, 15] X [16, 64]."], done.stderr
    assert not (project / "bad.rbln").exists()
