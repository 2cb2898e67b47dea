"""The public API of the compiled causal LMs: options, the folder on disk, loading, the Hub,
`generate` features, generation statistics and profiling, and bad input.

Most tests share one tiny Llama compiled in numerics="exact" (so outputs can be compared to
transformers token for token), batch 3 with decode buckets [3, 1], max_seq_len 128.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM, TextStreamer
from transformers.generation.streamers import BaseStreamer

from llm_fixtures import _one_torch_thread  # noqa: F401  (an autouse fixture)
from llm_fixtures import PAD, SPECIAL_TOKENS, hf_generate, left_pad, make_tokenizer, random_prompts, save_source
from optimum_npu import (
    RBLNAutoModelForCausalLM,
    RBLNLlamaForCausalLM,
    RBLNMistralForCausalLM,
    RBLNQwen2ForCausalLM,
)
from optimum_npu.configuration import CONFIG_NAME
from optimum_npu.modeling import base
from optimum_npu.modeling.decoderonly.kv_cache import KVCacheExhaustedError
from optimum_npu.modeling.decoderonly.configuration_decoderonly import RBLNLlamaForCausalLMConfig
from optimum_npu.sim_device import Artifact

OPTIONS = dict(rbln_batch_size=3, rbln_decoder_batch_sizes=[3, 1], rbln_max_seq_len=128, rbln_prefill_chunk_size=64,
               rbln_numerics="exact")
MAX_SEQ_LEN = 128
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# The weights live in prefill.rbln only; a decode graph holds its program and no tensors of its own.
DECODER_FILE_FRACTION = 0.10


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny Llama checkpoint folder with a tokenizer: (folder, fp32 HF model)."""
    return save_source(tmp_path_factory.mktemp("src") / "tiny-llama", "llama", tokenizer=True)


@pytest.fixture(scope="module")
def model(source):
    m = RBLNLlamaForCausalLM.from_pretrained(source[0], export=True, **OPTIONS)
    yield m
    m.close()


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    return Path(model.save_pretrained(tmp_path_factory.mktemp("compiled") / "tiny-llama-rbln"))


@pytest.fixture(scope="module")
def batch():
    """A left-padded batch of 3 prompts of different lengths."""
    return left_pad(random_prompts((21, 8, 13), seed=11))


@pytest.fixture(scope="module")
def baseline(model, batch):
    """Greedy output of the shared model on `batch`, before any test could have corrupted it."""
    return greedy(model, batch)


def greedy(model, batch, max_new_tokens=6, **kwargs):
    ids, mask = batch
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)


def assert_still_works(model, batch, baseline):
    """After a refused call: generate runs and gives the same tokens as before."""
    assert torch.equal(greedy(model, batch), baseline)
    assert model.block_manager.num_free_blocks == model.block_manager.num_blocks


def new_tokens(out, prompt_width):
    return out[:, prompt_width:]


# --------------------------------------------------------------------------- options


def test_options_three_equivalent_ways_give_the_same_config(source):
    folder = source[0]
    common = dict(batch_size=2, max_seq_len=MAX_SEQ_LEN, prefill_chunk_size=64, numerics="exact",
                  create_runtimes=False)
    by_kwargs = RBLNLlamaForCausalLM.from_pretrained(folder, export=True, **{f"rbln_{k}": v for k, v in common.items()})
    by_dict = RBLNLlamaForCausalLM.from_pretrained(folder, export=True, rbln_config=common)
    # A config object, with an rbln_* kwarg overriding one of its values.
    by_object = RBLNLlamaForCausalLM.from_pretrained(
        folder, export=True, rbln_config=RBLNLlamaForCausalLMConfig(**{**common, "batch_size": 1}), rbln_batch_size=2)
    assert by_kwargs.rbln_config == by_dict.rbln_config == by_object.rbln_config
    assert by_object.rbln_config.batch_size == 2
    assert by_object.rbln_config.decoder_batch_sizes == (2,)
    assert set(by_object.graphs) == {"prefill", "decoder_batch_2"}


def test_other_kwargs_go_to_the_hf_from_pretrained(source):
    folder = source[0]
    m = RBLNLlamaForCausalLM.from_pretrained(folder, export=True, num_hidden_layers=1, rbln_batch_size=1,
                                             rbln_max_seq_len=MAX_SEQ_LEN, rbln_numerics="exact")
    try:
        assert m.config.num_hidden_layers == 1
        buffers = {b.name for b in m.graphs["prefill"].program.buffers}
        assert {"k_cache_0", "v_cache_0"} <= buffers and "k_cache_1" not in buffers
        one_layer = LlamaForCausalLM.from_pretrained(folder, num_hidden_layers=1).float().eval()
        prompt = random_prompts((17,), seed=12)[0]
        out = m.generate(input_ids=prompt[None], max_new_tokens=5, do_sample=False)
        assert out[0, 17:].tolist() == hf_generate(one_layer, prompt, max_new_tokens=5, do_sample=False).tolist()
    finally:
        m.close()


# --------------------------------------------------------------------------- on disk


def test_saved_folder_layout(model, saved, source):
    files = {p.name for p in saved.iterdir()}
    expected = {"prefill.rbln", "decoder_batch_3.rbln", "decoder_batch_1.rbln", CONFIG_NAME, "config.json",
                "generation_config.json", *TOKENIZER_FILES}
    assert expected <= files, sorted(files)
    assert not {f for f in files if f.endswith((".bin", ".pt", ".pkl", ".safetensors"))}, "no pickles or raw weights"

    data = json.loads((saved / CONFIG_NAME).read_text())
    assert data["cls_name"] == "RBLNLlamaForCausalLM"
    assert isinstance(data["optimum_npu_version"], str) and data["optimum_npu_version"]
    compile_options = data["compile_options"]
    assert (compile_options["batch_size"], compile_options["max_seq_len"], compile_options["prefill_chunk_size"],
            compile_options["numerics"], compile_options["decoder_batch_sizes"]) == (3, MAX_SEQ_LEN, 64, "exact", [3, 1])
    assert data["graphs"]["prefill"] == [["input_ids", [1, 64], "int64"], ["start_pos", [1], "int32"],
                                         ["block_tables", [1, 1], "int32"], ["query_position", [1], "int64"]]
    assert data["graphs"]["decoder_batch_3"] == [["input_ids", [3, 1], "int64"], ["start_pos", [3], "int32"],
                                                 ["block_tables", [3, 1], "int32"]]
    assert json.loads((saved / "config.json").read_text())["model_type"] == "llama"
    for name in TOKENIZER_FILES:
        assert (saved / name).read_bytes() == (source[0] / name).read_bytes()

    prefill_size = (saved / "prefill.rbln").stat().st_size
    for name in ("decoder_batch_3.rbln", "decoder_batch_1.rbln"):
        size = (saved / name).stat().st_size
        assert size < DECODER_FILE_FRACTION * prefill_size, f"{name}: {size} bytes vs prefill {prefill_size}"


def test_no_tokenizer_files_when_the_source_has_none(tmp_path):
    folder, _ = save_source(tmp_path / "src", "llama")
    m = RBLNLlamaForCausalLM.from_pretrained(folder, export=True, rbln_max_seq_len=MAX_SEQ_LEN, rbln_create_runtimes=False)
    out = Path(m.save_pretrained(tmp_path / "out"))
    assert not [f for f in os.listdir(out) if f.startswith("tokenizer")]
    assert (out / "prefill.rbln").is_file() and (out / "decoder_batch_1.rbln").is_file()


def test_loading_never_recompiles_and_generates_the_same(saved, batch, baseline, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("compile_from_torch was called while loading a compiled folder")

    monkeypatch.setattr(base, "compile_from_torch", refuse)
    for cls in (RBLNLlamaForCausalLM, RBLNAutoModelForCausalLM):
        loaded = cls.from_pretrained(saved)
        try:
            assert type(loaded) is RBLNLlamaForCausalLM
            assert torch.equal(greedy(loaded, batch), baseline)
        finally:
            loaded.close()


def test_saving_a_loaded_model_writes_the_same_files(saved, tmp_path):
    loaded = RBLNLlamaForCausalLM.from_pretrained(saved, rbln_create_runtimes=False)
    again = Path(loaded.save_pretrained(tmp_path / "again"))
    assert sorted(os.listdir(again)) == sorted(os.listdir(saved))
    for name in ("prefill.rbln", "decoder_batch_3.rbln", "decoder_batch_1.rbln", *TOKENIZER_FILES):
        assert (again / name).read_bytes() == (saved / name).read_bytes(), name


def _fail_on_call(monkeypatch, owner, method, nth):
    """Make owner.method raise on its nth call (1-based)."""
    original = getattr(owner, method)
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == nth:
            raise OSError(f"disk full (simulated) in {method}")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, method, failing)


FAILURE_POINTS = {
    "second graph": (Artifact, "save", 2),
    "rbln_config.json": (RBLNLlamaForCausalLMConfig, "save", 1),
}


@pytest.mark.parametrize("failure", sorted(FAILURE_POINTS))
def test_a_failed_save_leaves_no_folder_and_no_temp_files(model, tmp_path, monkeypatch, failure):
    _fail_on_call(monkeypatch, *FAILURE_POINTS[failure])
    parent = tmp_path / "models"
    parent.mkdir()
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(parent / "tiny")
    assert os.listdir(parent) == []


@pytest.mark.parametrize("failure", sorted(FAILURE_POINTS))
def test_a_failed_save_keeps_the_previous_folder(model, tmp_path, monkeypatch, failure):
    target = Path(model.save_pretrained(tmp_path / "tiny"))
    before = {name: (target / name).read_bytes() for name in os.listdir(target)}
    _fail_on_call(monkeypatch, *FAILURE_POINTS[failure])
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(target)
    assert os.listdir(tmp_path) == ["tiny"]
    assert {name: (target / name).read_bytes() for name in os.listdir(target)} == before


def test_saving_over_a_compiled_folder_replaces_its_files_and_keeps_the_others(model, tmp_path):
    target = Path(model.save_pretrained(tmp_path / "tiny"))
    (target / "notes.txt").write_text("the user's own file")
    model.save_pretrained(target)
    assert (target / "notes.txt").read_text() == "the user's own file" and (target / "prefill.rbln").is_file()
    assert os.listdir(tmp_path) == ["tiny"]


# --------------------------------------------------------------------------- options at load


def test_runtime_options_may_change_at_load(saved, batch, baseline):
    profiled = RBLNLlamaForCausalLM.from_pretrained(saved, rbln_activate_profiler=True)
    try:
        assert profiled.rbln_config.activate_profiler is True
        assert all(rt.profiler_active for rt in profiled.runtimes.values())
        assert torch.equal(greedy(profiled, batch), baseline)
    finally:
        profiled.close()

    # Another device of the card (RBLN-CA25: devices 0..3): memory is taken there, outputs are the same.
    from optimum_npu.sim_device import memory

    before = memory.used_bytes(1)
    elsewhere = RBLNLlamaForCausalLM.from_pretrained(saved, rbln_device=1)
    try:
        assert {d for rt in elsewhere.runtimes.values() for d in rt.devices} == {1}
        assert memory.used_bytes(1) > before
        assert torch.equal(greedy(elsewhere, batch), baseline)
        assert [u.device for u in elsewhere.generation_stats.memory] == [1]
    finally:
        elsewhere.close()
    assert memory.used_bytes(1) == before

    offline = RBLNLlamaForCausalLM.from_pretrained(saved, rbln_create_runtimes=False)
    assert offline.runtimes == {}
    with pytest.raises(RuntimeError, match="rbln_create_runtimes"):
        greedy(offline, batch)


def test_compile_options_cannot_change_at_load(saved):
    with pytest.raises(ValueError, match="rbln_batch_size"):
        RBLNLlamaForCausalLM.from_pretrained(saved, rbln_batch_size=8, rbln_create_runtimes=False)
    with pytest.raises(ValueError, match="rbln_max_seq_len"):
        RBLNLlamaForCausalLM.from_pretrained(saved, rbln_config={"max_seq_len": 256}, rbln_create_runtimes=False)
    # Repeating the compiled value is fine.
    same = RBLNLlamaForCausalLM.from_pretrained(saved, rbln_batch_size=3, rbln_create_runtimes=False)
    assert same.rbln_config.batch_size == 3


def test_runtime_options_of_the_export_do_not_stick_to_the_folder(source, tmp_path):
    compile_only = RBLNLlamaForCausalLM.from_pretrained(
        source[0], export=True, rbln_batch_size=1, rbln_max_seq_len=MAX_SEQ_LEN, rbln_create_runtimes=False,
        rbln_activate_profiler=True)
    folder = compile_only.save_pretrained(tmp_path / "compiled")
    deployed = RBLNLlamaForCausalLM.from_pretrained(folder)  # on the machine with the devices
    try:
        assert deployed.rbln_config.create_runtimes is True and deployed.runtimes
        assert deployed.rbln_config.activate_profiler is False
    finally:
        deployed.close()


# --------------------------------------------------------------------------- auto class, wrong class


def test_auto_class_picks_the_family_from_the_hf_config(tmp_path):
    expected = {"llama": RBLNLlamaForCausalLM, "qwen2": RBLNQwen2ForCausalLM, "mistral": RBLNMistralForCausalLM}
    folders = {family: save_source(tmp_path / family, family)[0] for family in expected}
    for family, cls in expected.items():
        assert RBLNAutoModelForCausalLM.class_for(folders[family], export=True) is cls
    m = RBLNAutoModelForCausalLM.from_pretrained(folders["qwen2"], export=True, rbln_max_seq_len=MAX_SEQ_LEN,
                                                 rbln_create_runtimes=False)
    assert type(m) is RBLNQwen2ForCausalLM
    # A compiled folder: the class comes from rbln_config.json.
    compiled = m.save_pretrained(tmp_path / "qwen2-rbln")
    assert RBLNAutoModelForCausalLM.class_for(compiled) is RBLNQwen2ForCausalLM
    loaded = RBLNAutoModelForCausalLM.from_pretrained(compiled, rbln_create_runtimes=False)
    assert type(loaded) is RBLNQwen2ForCausalLM and loaded.rbln_config == m.rbln_config


def test_auto_class_refuses_an_unsupported_model_type(tmp_path):
    from transformers import BloomConfig

    BloomConfig(n_layer=1, hidden_size=32, n_head=2, vocab_size=64).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="bloom.*not supported"):
        RBLNAutoModelForCausalLM.from_pretrained(tmp_path, export=True)


def test_loading_a_folder_compiled_for_another_class(saved):
    with pytest.raises(ValueError, match="RBLNLlamaForCausalLM"):
        RBLNQwen2ForCausalLM.from_pretrained(saved)
    with pytest.raises(ValueError, match="RBLNLlamaForCausalLM"):
        RBLNMistralForCausalLM.from_pretrained(saved, rbln_create_runtimes=False)


def test_loading_an_uncompiled_folder_without_export(source):
    with pytest.raises(ValueError, match="export=True"):
        RBLNLlamaForCausalLM.from_pretrained(source[0])


# --------------------------------------------------------------------------- Hub


def test_push_to_hub_uploads_the_compiled_folder(model, monkeypatch):
    import huggingface_hub

    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        calls["upload_folder"] = (repo_id, sorted(os.listdir(folder)), json.loads((folder / CONFIG_NAME).read_text()),
                                  kwargs)
        return "https://huggingface.co/org/tiny-llama-rbln/commit/abc"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    url = model.push_to_hub("org/tiny-llama-rbln", private=True)
    assert url.endswith("/commit/abc")
    repo_id, create_kwargs = calls["create_repo"]
    assert repo_id == "org/tiny-llama-rbln" and create_kwargs.get("private") is True
    repo_id, files, config, _ = calls["upload_folder"]
    assert repo_id == "org/tiny-llama-rbln"
    assert {"prefill.rbln", "decoder_batch_3.rbln", "decoder_batch_1.rbln", CONFIG_NAME, "config.json",
            "generation_config.json", *TOKENIZER_FILES} <= set(files)
    assert not [f for f in files if f.startswith(".")], "no temporary files uploaded"
    assert config["cls_name"] == "RBLNLlamaForCausalLM"


def _lay_out_hub_cache(cache: Path, repo_id: str, folder: Path, revision: str = "0123456789abcdef0123") -> None:
    """The standard HF cache layout: models--org--name/{refs/main, snapshots/<rev>/files}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)


def test_load_by_repo_id_from_the_hub_cache_offline(saved, batch, baseline, tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    _lay_out_hub_cache(cache, "org/tiny-llama-rbln", saved)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for cls in (RBLNLlamaForCausalLM, RBLNAutoModelForCausalLM):
        loaded = cls.from_pretrained("org/tiny-llama-rbln")
        try:
            assert type(loaded) is RBLNLlamaForCausalLM
            assert torch.equal(greedy(loaded, batch), baseline)
        finally:
            loaded.close()
    # An explicit cache_dir works too, and the tokenizer comes along.
    other = tmp_path / "other_cache"
    _lay_out_hub_cache(other, "org/other", saved)
    loaded = RBLNLlamaForCausalLM.from_pretrained("org/other", cache_dir=str(other), rbln_create_runtimes=False)
    assert loaded.rbln_config.batch_size == 3
    assert AutoTokenizer.from_pretrained("org/tiny-llama-rbln").get_vocab() == make_tokenizer().get_vocab()


def test_export_from_a_hub_id_keeps_the_tokenizer(source, tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    _lay_out_hub_cache(cache, "org/tiny-llama", source[0])  # an uncompiled HF checkpoint with a tokenizer
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    m = RBLNAutoModelForCausalLM.from_pretrained("org/tiny-llama", export=True, rbln_max_seq_len=MAX_SEQ_LEN,
                                                 rbln_create_runtimes=False)
    out = Path(m.save_pretrained(tmp_path / "compiled"))
    assert {*TOKENIZER_FILES} <= set(os.listdir(out))


# --------------------------------------------------------------------------- generate


def test_greedy_left_padded_batch_matches_hf_row_by_row(model, source, batch, baseline):
    ids, mask = batch
    hf = source[1]
    for row in range(ids.shape[0]):
        prompt = ids[row][mask[row].bool()]
        expected = hf_generate(hf, prompt, max_new_tokens=6, do_sample=False)
        assert new_tokens(baseline, ids.shape[1])[row].tolist() == expected.tolist(), row


def test_decode_batch_is_padded_to_the_nearest_bucket(model, batch, baseline):
    ids, mask = batch
    expectations = {1: 1, 2: 3, 3: 3}  # buckets [3, 1]: a batch of 2 runs in bucket 3 with a padding row
    for rows, bucket in expectations.items():
        sub = (ids[:rows], mask[:rows])
        out = greedy(model, sub)
        assert model.generation_stats.decode_bucket == bucket
        # Each row gives the same tokens whatever the batch (and bucket) it is in.
        assert torch.equal(out, baseline[:rows]), rows


@pytest.mark.parametrize("sampling", [dict(temperature=0.7, top_k=50, top_p=0.9), dict(temperature=1.5)],
                         ids=["temperature-top_k-top_p", "temperature"])
def test_sampling_with_a_seed_matches_hf(model, source, batch, sampling):
    """Exact numerics: the same logits, so the same draws from the same RNG state."""
    ids, mask = batch
    torch.manual_seed(1234)
    ours = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=True, **sampling)
    torch.manual_seed(1234)
    with torch.no_grad():
        theirs = source[1].generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=True, **sampling)
    assert torch.equal(ours, theirs)
    assert ours[:, ids.shape[1]:].max() < model.config.vocab_size and ours.min() >= 0

    torch.manual_seed(1234)
    again = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=True, **sampling)
    torch.manual_seed(99)
    other_seed = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=True, **sampling)
    assert torch.equal(again, ours)
    assert not torch.equal(other_seed, ours)


def test_repetition_penalty_matches_hf(model, source, batch):
    ids, mask = batch
    out = greedy(model, batch, max_new_tokens=10, repetition_penalty=1.5)
    for row in range(ids.shape[0]):
        prompt = ids[row][mask[row].bool()]
        expected = hf_generate(source[1], prompt, max_new_tokens=10, do_sample=False, repetition_penalty=1.5)
        assert out[row, ids.shape[1]:].tolist() == expected.tolist(), row
    assert not torch.equal(out[:, ids.shape[1]:], greedy(model, batch, max_new_tokens=10)[:, ids.shape[1]:])


def test_eos_stops_a_row_and_pads_it_like_hf(model, source, batch, baseline):
    ids, mask = batch
    width = ids.shape[1]
    eos = int(baseline[0, width + 2])  # the third token row 0 generates
    out = greedy(model, batch, max_new_tokens=6, eos_token_id=eos, pad_token_id=PAD)
    finished_row0 = False
    for row in range(ids.shape[0]):
        prompt = ids[row][mask[row].bool()]
        expected = hf_generate(source[1], prompt, max_new_tokens=6, do_sample=False, eos_token_id=eos,
                               pad_token_id=PAD).tolist()
        got = out[row, width:].tolist()
        assert got[: len(expected)] == expected, row
        assert all(t == PAD for t in got[len(expected):]), row
        finished_row0 |= row == 0 and expected[-1] == eos and len(expected) == 3
    assert finished_row0


def test_stop_strings_with_a_tokenizer(model, source, saved, batch, baseline):
    tokenizer = AutoTokenizer.from_pretrained(saved)  # the tokenizer files travelled with the model
    ids, mask = batch
    width = ids.shape[1]
    prompt = ids[1][mask[1].bool()]
    # The first token after the first that is a plain character (not a special token).
    position = next(i for i in range(1, 6) if int(baseline[1, width + i]) >= len(SPECIAL_TOKENS))
    stop = tokenizer.convert_ids_to_tokens(int(baseline[1, width + position]))
    out = model.generate(input_ids=prompt[None], max_new_tokens=6, do_sample=False, stop_strings=[stop],
                         tokenizer=tokenizer)
    expected = hf_generate(source[1], prompt, max_new_tokens=6, do_sample=False, stop_strings=[stop],
                           tokenizer=tokenizer)
    assert out[0, prompt.shape[0]:].tolist() == expected.tolist()
    assert out.shape[1] - prompt.shape[0] <= position + 1 < 6  # stopped early


class Collector(BaseStreamer):
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        self.ended = True


def test_streamers_receive_the_tokens(model, saved, batch, baseline, capsys):
    ids, mask = batch
    prompt = ids[0][mask[0].bool()]
    collector = Collector()
    out = model.generate(input_ids=prompt[None], max_new_tokens=6, do_sample=False, streamer=collector)
    assert collector.ended
    assert collector.chunks[0].flatten().tolist() == prompt.tolist()  # the prompt first, then each new token
    assert [int(c.flatten()[0]) for c in collector.chunks[1:]] == out[0, prompt.shape[0]:].tolist()

    tokenizer = AutoTokenizer.from_pretrained(saved)
    capsys.readouterr()
    model.generate(input_ids=prompt[None], max_new_tokens=6, do_sample=False,
                   streamer=TextStreamer(tokenizer, skip_prompt=True))
    printed = capsys.readouterr().out
    assert printed.strip() == tokenizer.decode(out[0, prompt.shape[0]:]).strip()


def test_beam_search_is_refused(model, batch, baseline):
    with pytest.raises(ValueError, match="beam search"):
        greedy(model, batch, num_beams=2)
    assert_still_works(model, batch, baseline)


# --------------------------------------------------------------------------- statistics, profiling


def test_generation_stats(model, source, batch):
    greedy(model, batch, max_new_tokens=7)
    stats = model.generation_stats
    assert stats.batch_size == 3 and stats.new_tokens == 7 and stats.decode_bucket == 3
    assert stats.prompt_tokens == batch[1].sum(-1).tolist()
    assert stats.ttft_s > 0 and stats.tpot_s > 0
    assert stats.decode_steps == 6
    assert stats.tokens_per_s == pytest.approx(3 * 7 / (stats.ttft_s + stats.decode_steps * stats.tpot_s), rel=1e-9)
    weights_bytes = 2 * sum(p.numel() for p in source[1].parameters())  # 16-bit weights on the device
    assert len(stats.memory) == 1
    assert stats.memory[0].total_bytes > weights_bytes
    assert stats.memory[0].weights_bytes >= weights_bytes
    assert "TTFT" in str(stats)


def test_profiler_trace_has_prefill_and_decode_kernels(saved, batch, tmp_path):
    profiled = RBLNLlamaForCausalLM.from_pretrained(saved, rbln_activate_profiler=True)
    try:
        greedy(profiled, batch, max_new_tokens=3)
        path = profiled.save_trace(tmp_path / "trace.json")
    finally:
        profiled.close()
    events = json.loads(Path(path).read_text())["traceEvents"]
    slices = [e for e in events if e.get("ph") == "X"]
    names = {e["name"] for e in slices}
    assert "kv_cache_update" in names and "paged_attention" in names
    assert any("linear" in n for n in names)
    engine_tracks = {(e["pid"], e["tid"]) for e in events if e.get("ph") == "M" and e["name"] == "thread_name"
                     and e["args"]["name"] == "Neural Engine Clusters"}
    attention = sorted((e for e in slices if e["name"] == "paged_attention" and (e["pid"], e["tid"]) in engine_tracks),
                       key=lambda e: e["ts"])
    layers, prompts, decode_steps = 2, 3, 2  # one chunk per prompt; 3 new tokens = prefill + 2 decode steps
    assert len(attention) == layers * (prompts + decode_steps)
    prefill, decode = attention[: layers * prompts], attention[layers * prompts:]
    # A prefill attends 64 query tokens, a decode step 1 per row: the prefill slices come first and are larger.
    assert min(e["args"]["flops"] for e in prefill) > max(e["args"]["flops"] for e in decode)


def test_device_memory_is_accounted_and_freed_by_close(source):
    from optimum_npu.sim_device import memory

    before = memory.used_bytes(0)
    m = RBLNLlamaForCausalLM.from_pretrained(source[0], export=True, rbln_batch_size=2, rbln_decoder_batch_sizes=[2, 1],
                                             rbln_max_seq_len=MAX_SEQ_LEN)
    try:
        held = memory.used_bytes(0) - before
        assert held == sum(u.total_bytes for u in m.device_memory()) > 0
    finally:
        m.close()
    assert memory.used_bytes(0) == before
    with pytest.raises(RuntimeError):
        m.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=2)


def test_inputs_embeds_model(source):
    """rbln_use_inputs_embeds: generate from token ids (embedded on the host) or from embeddings, as HF."""
    hf = source[1]
    m = RBLNLlamaForCausalLM.from_pretrained(source[0], export=True, rbln_batch_size=2, rbln_max_seq_len=MAX_SEQ_LEN,
                                             rbln_use_inputs_embeds=True, rbln_numerics="exact")
    try:
        assert m.graphs["prefill"].program.inputs[0].name == "inputs_embeds"
        prompts = random_prompts((20, 13), seed=19)
        ids, mask = left_pad(prompts)
        from_ids = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        for row, prompt in enumerate(prompts):
            assert from_ids[row, ids.shape[1]:].tolist() == hf_generate(hf, prompt, max_new_tokens=5,
                                                                         do_sample=False).tolist()
        with torch.no_grad():
            embeds = hf.get_input_embeddings()(ids)
            expected = hf.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=5, do_sample=False)
        from_embeds = m.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=5, do_sample=False)
        assert torch.equal(from_embeds, expected)
        assert torch.equal(from_embeds, from_ids[:, ids.shape[1]:])
    finally:
        m.close()


# --------------------------------------------------------------------------- bad input


def test_prompt_longer_than_max_seq_len(model, batch, baseline):
    long = torch.randint(4, 200, (1, MAX_SEQ_LEN + 1))
    with pytest.raises(ValueError, match="rbln_max_seq_len"):
        model.generate(input_ids=long, max_new_tokens=1)
    assert_still_works(model, batch, baseline)


@pytest.mark.parametrize("length_kwargs", [dict(max_new_tokens=MAX_SEQ_LEN - 20), dict(max_length=MAX_SEQ_LEN + 5)],
                         ids=["max_new_tokens", "max_length"])
def test_generation_running_past_max_seq_len(model, batch, baseline, length_kwargs):
    ids, mask = batch
    with pytest.raises(ValueError, match="rbln_max_seq_len"):
        model.generate(input_ids=ids, attention_mask=mask, do_sample=False, **length_kwargs)
    assert_still_works(model, batch, baseline)


def test_generation_up_to_max_seq_len(model, source):
    prompt = random_prompts((MAX_SEQ_LEN - 8,), seed=13)[0]
    out = model.generate(input_ids=prompt[None], max_new_tokens=8, do_sample=False)
    assert out[0, prompt.shape[0]:].tolist() == hf_generate(source[1], prompt, max_new_tokens=8,
                                                            do_sample=False).tolist()


def test_batch_larger_than_compiled(model, batch, baseline):
    ids, mask = left_pad(random_prompts((5, 6, 7, 8), seed=14))
    with pytest.raises(ValueError, match="rbln_batch_size=3"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)
    assert_still_works(model, batch, baseline)


def test_empty_prompt_row(model, batch, baseline):
    ids, mask = batch
    mask = mask.clone()
    mask[1] = 0
    with pytest.raises(ValueError, match="empty"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)
    assert_still_works(model, batch, baseline)


@pytest.fixture(scope="module")
def flash_source(tmp_path_factory):
    return save_source(tmp_path_factory.mktemp("flash") / "tiny-llama-8k", "llama", max_position_embeddings=8192)


@pytest.fixture(scope="module")
def flash_model(flash_source):
    """Flash attention with a shared pool of 2 blocks of 4096 for 2 slots: one sequence past 4096 takes both."""
    m = RBLNLlamaForCausalLM.from_pretrained(
        flash_source[0], export=True, rbln_batch_size=2, rbln_max_seq_len=8192, rbln_kvcache_partition_len=4096,
        rbln_kvcache_num_blocks=2, rbln_prefill_chunk_size=1024, rbln_numerics="exact")
    yield m
    m.close()


def _flash_check_still_works(m, hf):
    prompts = random_prompts((10, 12), seed=15)
    ids, mask = left_pad(prompts)
    out = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    for row, prompt in enumerate(prompts):
        assert out[row, ids.shape[1]:].tolist() == hf_generate(hf, prompt, max_new_tokens=3, do_sample=False).tolist()
    assert m.block_manager.num_free_blocks == 2


def test_kv_cache_exhausted_in_prefill(flash_model, flash_source):
    assert flash_model.rbln_config.kvcache_num_blocks == 2
    # Row 0 takes one block; row 1 (4100 tokens) needs two, only one is left.
    ids, mask = left_pad(random_prompts((10, 4100), seed=16))
    with pytest.raises(KVCacheExhaustedError, match="rbln_kvcache_num_blocks"):
        flash_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
    _flash_check_still_works(flash_model, flash_source[1])


def test_kv_cache_exhausted_during_decode(flash_model, flash_source):
    # Row 1 fits one block at prefill (4090 tokens) and needs a second one at position 4096.
    ids, mask = left_pad(random_prompts((10, 4090), seed=17))
    with pytest.raises(KVCacheExhaustedError, match="rbln_kvcache_num_blocks"):
        flash_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    _flash_check_still_works(flash_model, flash_source[1])


def test_export_refuses_fewer_kv_blocks_than_batch_slots(source):
    with pytest.raises(ValueError, match="rbln_kvcache_num_blocks=1 is less than rbln_batch_size=2"):
        RBLNLlamaForCausalLM.from_pretrained(source[0], export=True, rbln_batch_size=2, rbln_max_seq_len=MAX_SEQ_LEN,
                                             rbln_kvcache_num_blocks=1, rbln_create_runtimes=False)


def test_export_refuses_max_seq_len_above_the_model_positions(source):
    with pytest.raises(ValueError, match="rbln_max_seq_len=512.*max_position_embeddings=256"):
        RBLNLlamaForCausalLM.from_pretrained(source[0], export=True, rbln_max_seq_len=512, rbln_create_runtimes=False)


def test_batch_between_decode_buckets_and_batch_size(source):
    """batch_size 3 with decode buckets [2, 1] only: a batch of 3 has no bucket and is refused up front."""
    m = RBLNLlamaForCausalLM.from_pretrained(source[0], export=True, rbln_batch_size=3, rbln_decoder_batch_sizes=[2, 1],
                                             rbln_max_seq_len=MAX_SEQ_LEN, rbln_numerics="exact")
    try:
        ids, mask = left_pad(random_prompts((5, 6, 7), seed=18))
        runs = m.runtimes["prefill"].stats.runs
        with pytest.raises(ValueError, match="decode batch sizes"):
            m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)
        assert m.runtimes["prefill"].stats.runs == runs  # refused before any device work
        out = m.generate(input_ids=ids[:2], attention_mask=mask[:2], max_new_tokens=2)
        assert m.generation_stats.decode_bucket == 2 and out.shape == (2, ids.shape[1] + 2)
    finally:
        m.close()
