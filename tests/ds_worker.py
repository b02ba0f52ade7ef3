"""Runs under ``torchrun --nproc_per_node N``: trains each job of a JSON file with the DeepSpeed backend and writes
what tests/test_deepspeed.py compares (metrics.jsonl and final/ come from the trainer itself).

    torchrun --nproc_per_node 2 tests/ds_worker.py jobs.json

A job: {"config": RunConfig dict, "max_steps": int|null, "dump_weights": path|null, "memory": path|null}.
"""

import json
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # ds_losses
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

torch.set_num_threads(1)

from align.config import pipeline_from_dict  # noqa: E402
from align.trainer import Trainer  # noqa: E402


def run_job(job: dict) -> None:
    pipe = pipeline_from_dict(job["config"])
    trainer = Trainer(pipe.stages[0].config, pipe.run_dir)
    trainer.fit(max_steps=job.get("max_steps"))
    rank = torch.distributed.get_rank()
    backend = trainer.backend
    if job.get("dump_weights"):
        # every rank iterates (ZeRO-3 gathers collectively); rank 0 keeps the tensors
        ours = {k: v.clone() for k, v in backend.named_weights()}
        oracle = None
        if backend.stage == 3:  # DeepSpeed's own consolidation (what save_16bit_model writes), as an oracle
            oracle = backend.engine._zero3_consolidated_16bit_state_dict()
        if rank == 0:
            if oracle is not None:
                oracle = {k.removeprefix("model."): v for k, v in oracle.items()}
            torch.save({"named_weights": ours, "deepspeed": oracle}, job["dump_weights"])
    if job.get("reference_pass"):
        # a frozen model loaded after setup (as a reference-precompute pass does): under ZeRO-3 transformers loads it
        # into shards, and backend.forward wraps it in an inference engine on first use; uneven shards per rank
        from align.collate import collate
        from align.models import load_model

        fresh = load_model(trainer.base_path, trainer.cfg.model, trainer.device).eval().requires_grad_(False)
        examples = trainer.source.examples[:5][rank::backend.world_size]
        batch, units = collate(examples, trainer.tokenizer.pad_token_id)
        lp = trainer._logprobs_no_grad(fresh, batch, units)
        torch.save({"index": batch.extras["index"], "logprobs": lp, "loss_mask": batch.loss_mask},
                   f"{job['reference_pass']}.rank{rank}")
    if job.get("memory"):
        mem = backend.memory_bytes()
        every = [None] * backend.world_size
        torch.distributed.all_gather_object(every, mem)
        if rank == 0:
            with open(job["memory"], "w") as f:
                json.dump(every, f)
    torch.distributed.barrier()


def main() -> None:
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    try:
        for job in jobs:
            run_job(job)
    except BaseException:
        import traceback

        with open(f"{sys.argv[1]}.rank{os.environ.get('RANK', '0')}.err", "w") as f:
            f.write(f"job {job.get('name')}:\n{traceback.format_exc()}")
        raise
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
