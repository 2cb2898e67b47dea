"""One rank of a tensor-parallel model under torchrun (started by test_tensor_parallel.py).

    torchrun --nproc-per-node N tests/tp_worker.py COMPILED_FOLDER PROMPTS.json OUT_DIR

Each process joins a gloo process group, loads the same compiled folder and runs its own rank
on its own device; the collectives go through torch.distributed. Every rank writes what it
generated and the device memory it holds to OUT_DIR/rank<R>.json.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from optimum_npu import RBLNAutoModelForCausalLM


def main(folder: str, prompts_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    request = json.loads(Path(prompts_file).read_text())
    model = RBLNAutoModelForCausalLM.from_pretrained(folder)
    try:
        ids, mask = torch.tensor(request["input_ids"]), torch.tensor(request["attention_mask"])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=request["max_new_tokens"],
                                 do_sample=False, output_scores=True, return_dict_in_generate=True)
        result = {
            "tokens": out.sequences[:, ids.shape[1]:].tolist(),
            "scores": [s.tolist() for s in out.scores],
            "devices": [m.device for m in model.generation_stats.memory],
            "weights_bytes": [m.weights_bytes for m in model.generation_stats.memory],
            "decode_s": model.generation_stats.decode_s,
        }
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        model.close()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
